"""Where llama.cpp runs a node's model and how it attends: the settings for GPU offload, flash attention and the
KV cache as llama.cpp's model and context parameters (`LlamaOptions`), and what llama.cpp made of them
(`Placement`), read from what it logs while it loads the model and makes a context: its API has no getter for
the devices it chose nor for what flash attention `auto` became.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import llama_cpp
from llama_cpp._internals import LlamaModel

from llamakit.node.llama_log import Heard, hearing
from llamakit.node.settings import NodeSettings

__all__ = ["LlamaOptions", "Placement", "flash_attn_chosen", "load_model", "placement_of"]

# ggml_type of each --cache-type name (ggml.h).
_GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}
_FLASH_ATTN_TYPES = {
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}
_SPLIT_MODES = {
    "none": llama_cpp.LLAMA_SPLIT_MODE_NONE,
    "layer": llama_cpp.LLAMA_SPLIT_MODE_LAYER,
    "row": llama_cpp.LLAMA_SPLIT_MODE_ROW,
}

# What llama.cpp logs (src/llama-model.cpp, src/llama-context.cpp) about the choices it makes.
_LAYER_DEVICE = re.compile(r"layer\s+\d+ assigned to device (\S+?),")
_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
_FLASH_ATTN_OFF = ("Flash Attention not supported, set to disabled", "flash_attn is not compatible")
_FLASH_ATTN_ON = ("Flash Attention enabled", "enabling flash_attn since it is required")


@dataclass(frozen=True)
class LlamaOptions:
    """The node's llama.cpp options, the same for every model and context it makes (both engines, embeddings)."""

    gpu_layers: int | Literal["all"] = "all"
    main_gpu: int = 0
    split_mode: Literal["none", "layer", "row"] = "layer"
    tensor_split: tuple[float, ...] | None = None
    flash_attn: Literal["auto", "on", "off"] = "auto"
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    # The ctypes arrays that model parameters point to, kept alive as long as these options are.
    _keep: list[Any] = field(default_factory=list, compare=False, repr=False)

    @classmethod
    def from_settings(cls, settings: NodeSettings) -> LlamaOptions:
        return cls(
            gpu_layers=settings.gpu_layers,
            main_gpu=settings.main_gpu,
            split_mode=settings.split_mode,
            tensor_split=settings.tensor_split,
            flash_attn=settings.flash_attn,
            cache_type_k=settings.cache_type_k,
            cache_type_v=settings.cache_type_v,
        )

    @property
    def n_gpu_layers(self) -> int:
        """llama.cpp's `n_gpu_layers`: a negative number means every layer."""
        return -1 if self.gpu_layers == "all" else self.gpu_layers

    def model_params(self) -> llama_cpp.llama_model_params:
        params: llama_cpp.llama_model_params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = self.n_gpu_layers
        params.split_mode = _SPLIT_MODES[self.split_mode]
        params.main_gpu = self.main_gpu
        if self.tensor_split is not None:
            params.tensor_split = self._tensor_split()
        return params

    def _tensor_split(self) -> Any:
        devices = llama_cpp.llama_max_devices()
        if self.tensor_split is not None and len(self.tensor_split) > devices:
            raise ValueError(
                f"--tensor-split gives {len(self.tensor_split)} shares, but this llama.cpp handles at most "
                f"{devices} devices"
            )
        shares = (ctypes.c_float * devices)(*(self.tensor_split or ()))
        self._keep.append(shares)
        return shares

    def context_params(self, params: llama_cpp.llama_context_params) -> llama_cpp.llama_context_params:
        """`params` with this flash attention and these KV cache types."""
        params.flash_attn_type = _FLASH_ATTN_TYPES[self.flash_attn]
        params.type_k = _GGML_TYPES[self.cache_type_k]
        params.type_v = _GGML_TYPES[self.cache_type_v]
        return params

    def llama_kwargs(self, *, flash_attn: bool) -> dict[str, Any]:
        """The same, as llama-cpp-python's `Llama` takes them; it knows flash attention only on or off."""
        return {
            "n_gpu_layers": self.n_gpu_layers,
            "split_mode": _SPLIT_MODES[self.split_mode],
            "main_gpu": self.main_gpu,
            "tensor_split": list(self.tensor_split) if self.tensor_split is not None else None,
            "flash_attn": flash_attn,
            "type_k": _GGML_TYPES[self.cache_type_k],
            "type_v": _GGML_TYPES[self.cache_type_v],
        }


def flash_attn_chosen(heard: Heard, asked: str) -> Literal["on", "off", "auto"]:
    """What flash attention became in a context whose creation llama.cpp logged `heard`: `auto` is decided by
    llama.cpp (on when the device of every layer runs it), and `auto` stays when it did not say."""
    text = heard.text
    if any(words in text for words in _FLASH_ATTN_OFF):
        return "off"
    if asked == "on" or asked == "off":
        return "on" if asked == "on" else "off"
    if any(words in text for words in _FLASH_ATTN_ON):
        return "on"
    return "auto"


@dataclass(frozen=True)
class Placement:
    """Where llama.cpp put a model and how its contexts attend, as llama.cpp said it while loading them.

    `backend` names the devices that hold the model's layers, GPUs first ("CUDA0", "Metal", "CUDA0+CPU" for a
    partial offload, "CPU"); `offloaded` of `layers` (the repeating layers and the output layer) are on a GPU;
    `gpu` is whether this llama.cpp build sees any GPU at all.
    """

    backend: str
    offloaded: int
    layers: int
    gpu: bool
    flash_attn: Literal["on", "off", "auto"]
    flash_attn_asked: str
    cache_type_k: str
    cache_type_v: str

    def describe(self) -> str:
        """One clause for the node's log line: the backend, the offload (0 said plainly), attention and cache."""
        if self.offloaded:
            where = f"{self.backend}, {self.offloaded} of {self.layers} layers on the GPU"
        elif not self.gpu:
            where = f"{self.backend}, 0 of {self.layers} layers offloaded (this llama.cpp build has no GPU backend)"
        else:
            where = f"{self.backend}, 0 of {self.layers} layers offloaded (--gpu-layers 0)"
        attention = f"flash attention {self.flash_attn}"
        if self.flash_attn_asked != self.flash_attn:
            attention += f" ({self.flash_attn_asked})"
        return f"{where}, {attention}, KV cache {self.cache_type_k}/{self.cache_type_v}"


def placement_of(
    heard: Heard, model: llama_cpp.llama_model_p, options: LlamaOptions, flash_attn: Literal["on", "off", "auto"]
) -> Placement:
    """The Placement of a model whose load llama.cpp logged `heard`."""
    text = heard.text
    devices: list[str] = []
    for device in _LAYER_DEVICE.findall(text):
        if device not in devices:
            devices.append(device)
    devices.sort(key=lambda d: d == "CPU")  # GPUs first
    offloaded = _OFFLOADED.search(text)
    layers = int(offloaded[2]) if offloaded else llama_cpp.llama_model_n_layer(model) + 1
    return Placement(
        backend="+".join(devices) or "CPU",
        offloaded=int(offloaded[1]) if offloaded else 0,
        layers=layers,
        gpu=bool(llama_cpp.llama_supports_gpu_offload()),
        flash_attn=flash_attn,
        flash_attn_asked=options.flash_attn,
        cache_type_k=options.cache_type_k,
        cache_type_v=options.cache_type_v,
    )


def load_model(path: Path, options: LlamaOptions) -> tuple[LlamaModel, Heard]:
    """The model at `path` placed as `options` say, and what llama.cpp said while loading it; a RuntimeError
    with llama.cpp's own reason (and a way out, when GPU memory is the likely cause) when it cannot."""
    with hearing() as heard:
        try:
            # verbose: llama-cpp-python redirects nothing (llama_log.py); llama.cpp's log goes to logging.
            model = LlamaModel(path_model=str(path), params=options.model_params(), verbose=True)
        except ValueError as exc:
            reason = heard.reason() or str(exc)
            hint = ""
            if options.n_gpu_layers != 0 and llama_cpp.llama_supports_gpu_offload():
                hint = "; if the GPU ran out of memory, offload fewer layers with --gpu-layers N"
            raise RuntimeError(f"llama.cpp could not load {path.name}: {reason}{hint}") from exc
    return model, heard
