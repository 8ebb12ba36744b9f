"""GPU offload, flash attention and KV-cache types: the flags, what reaches llama.cpp, and what the node says
llama.cpp made of them (on this CPU-only build: every layer on the CPU, 0 offloaded, said plainly)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import llama_cpp
import llama_cpp.llama_cpp as llama_cpp_bindings
import pytest

from llamakit.catalog import DEFAULT_MODEL, resolve_model
from llamakit.node.batched import BatchedModel
from llamakit.node.embeddings import Embedder
from llamakit.node.engine import SimpleModel
from llamakit.node.placement import LlamaOptions
from llamakit.node.settings import settings_from_args
from tests.node.test_node_log import TOKEN, free_port

N_LAYERS = 31  # SmolLM2-135M: 30 repeating layers and the output layer


def test_flags_and_their_environment_variables() -> None:
    settings = settings_from_args(
        [
            "--flash-attn", "off", "--cache-type-k", "q8_0", "--gpu-layers", "12", "--main-gpu", "1",
            "--split-mode", "row", "--tensor-split", "3,1",
        ],
        env={},
    )  # fmt: skip
    assert (settings.flash_attn, settings.cache_type_k, settings.cache_type_v) == ("off", "q8_0", "f16")
    assert (settings.gpu_layers, settings.main_gpu, settings.split_mode, settings.tensor_split) == (
        12,
        1,
        "row",
        (3.0, 1.0),
    )
    defaults = settings_from_args([], env={})
    assert (defaults.flash_attn, defaults.gpu_layers, defaults.split_mode, defaults.tensor_split) == (
        "auto",
        "all",
        "layer",
        None,
    )
    env = {"LLAMAKIT_GPU_LAYERS": "all", "LLAMAKIT_CACHE_TYPE_V": "q4_0", "LLAMAKIT_TENSOR_SPLIT": "1,1,2"}
    from_env = settings_from_args([], env=env)
    assert (from_env.gpu_layers, from_env.cache_type_v, from_env.tensor_split) == ("all", "q4_0", (1.0, 1.0, 2.0))


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--gpu-layers", "-1"], "--gpu-layers: give a number of layers (0 or more) or all; got '-1'"),
        (["--gpu-layers", "many"], "--gpu-layers: give a number of layers (0 or more) or all"),
        (["--tensor-split", "3,x"], "--tensor-split: expected comma-separated numbers, one per GPU"),
        (["--tensor-split", "0,0"], "at least one of them above zero"),
        (["--flash-attn", "off", "--cache-type-v", "q8_0"], "--cache-type-v q8_0 needs flash attention"),
        (["--cache-type-k", "q3_k"], "--cache-type-k: Input should be 'f32', 'f16'"),
        (["--flash-attn", "yes"], "--flash-attn: Input should be 'auto', 'on' or 'off'"),
        (["--split-mode", "tensor"], "--split-mode: Input should be 'none', 'layer' or 'row'"),
    ],
)
def test_a_wrong_flag_says_what_to_give(flags: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        settings_from_args(flags, env={})
    assert says in capsys.readouterr().err


@pytest.fixture
def llama_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[Any]]]:
    """The parameters of every model load and context creation that reach llama.cpp's C functions meanwhile."""
    calls: dict[str, list[Any]] = {"model": [], "context": []}

    def recording(kind: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(first: Any, params: Any) -> Any:
            calls[kind].append(params)
            return real(first, params)

        return call

    for module in (llama_cpp, llama_cpp_bindings):
        monkeypatch.setattr(module, "llama_model_load_from_file", recording("model", module.llama_model_load_from_file))
        monkeypatch.setattr(module, "llama_init_from_model", recording("context", module.llama_init_from_model))
    yield calls


OPTIONS = LlamaOptions(
    gpu_layers=7, main_gpu=0, split_mode="none", tensor_split=(3.0, 1.0), cache_type_k="q8_0", cache_type_v="q4_0"
)


def assert_reached(calls: dict[str, list[Any]], flash_attn_types: set[int]) -> None:
    assert calls["model"] and calls["context"]
    for params in calls["model"]:
        assert (params.n_gpu_layers, params.split_mode, params.main_gpu) == (7, llama_cpp.LLAMA_SPLIT_MODE_NONE, 0)
        assert params.tensor_split[0] == 3.0 and params.tensor_split[1] == 1.0 and params.tensor_split[2] == 0.0
    for params in calls["context"]:
        assert (params.type_k, params.type_v) == (llama_cpp.GGML_TYPE_Q8_0, llama_cpp.GGML_TYPE_Q4_0)
    assert {params.flash_attn_type for params in calls["context"]} == flash_attn_types


@pytest.mark.model
def test_the_batched_engine_passes_the_flags_to_llama_cpp(llama_calls: dict[str, list[Any]]) -> None:
    model = BatchedModel(resolve_model(DEFAULT_MODEL), slots=2, n_ctx=256, threads=1, options=OPTIONS)
    try:
        assert_reached(llama_calls, {llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO})
        placement = model.placement
        assert placement is not None
        assert (placement.backend, placement.offloaded, placement.layers, placement.gpu) == ("CPU", 0, N_LAYERS, False)
        # A quantized V cache needs flash attention: llama.cpp turned `auto` on for it.
        assert (placement.flash_attn, placement.cache_type_k, placement.cache_type_v) == ("on", "q8_0", "q4_0")
        assert placement.describe() == (
            "CPU, 0 of 31 layers offloaded (this llama.cpp build has no GPU backend), flash attention on (auto), "
            "KV cache q8_0/q4_0"
        )
    finally:
        model.close()


@pytest.mark.model
def test_the_simple_engine_passes_the_flags_to_llama_cpp(llama_calls: dict[str, list[Any]]) -> None:
    model = SimpleModel(resolve_model(DEFAULT_MODEL), slots=2, n_ctx=256, threads=1, options=OPTIONS)
    try:
        # `Llama` takes flash attention on or off: `auto` is asked of llama.cpp with a small context first.
        assert_reached(llama_calls, {llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO, llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED})
        assert len(llama_calls["model"]) == 2  # a model per slot, as before
        placement = model.placement
        assert placement is not None
        assert (placement.backend, placement.offloaded, placement.flash_attn) == ("CPU", 0, "on")
    finally:
        model.close()


@pytest.mark.model
def test_the_embedding_context_takes_the_same_flags(llama_calls: dict[str, list[Any]]) -> None:
    options = LlamaOptions(gpu_layers=7, split_mode="none", tensor_split=(3.0, 1.0), flash_attn="off")
    embedder = Embedder(resolve_model(DEFAULT_MODEL).path, n_ctx=256, threads=1, options=options)
    try:
        (model,) = llama_calls["model"]
        assert (model.n_gpu_layers, model.split_mode) == (7, llama_cpp.LLAMA_SPLIT_MODE_NONE)
        (context,) = llama_calls["context"]
        assert context.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED and context.embeddings
        assert embedder.flash_attn == "off"
        assert len(embedder.embed(["a cat"]).vectors) == 1
    finally:
        embedder.close()


@pytest.mark.model
@pytest.mark.timeout(300)
def test_the_node_says_where_llama_cpp_runs_and_what_it_chose(tmp_path: Path) -> None:
    """The node with every layer asked on a GPU, on this CPU-only build: llama.cpp's own log shows the flash
    attention and cache types it was given; the node's log line and /health say 0 offloaded, on the CPU."""
    port = free_port()
    err = tmp_path / "node.err"
    flags = ["--gpu-layers", "all", "--cache-type-k", "q8_0", "--llama-log", "info"]
    with err.open("w") as sink:
        node = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llamakit.node",
                "--port",
                str(port),
                "--herd-token",
                TOKEN,
                "--threads",
                "1",
                *flags,
            ],
            stderr=sink,
        )
        try:
            health: dict[str, Any] = {}
            for _ in range(600):
                try:
                    health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
                except httpx.TransportError:
                    health = {}
                if health.get("status") in ("ready", "error"):
                    break
                time.sleep(0.1)
        finally:
            node.terminate()
            node.wait(timeout=60)
    text = err.read_text()
    assert health["status"] == "ready", text[-3000:]
    assert (health["backend"], health["gpu_layers"], health["layers"]) == ("CPU", 0, N_LAYERS)
    assert (health["flash_attn"], health["cache_type_k"], health["cache_type_v"]) == ("on", "q8_0", "f16")
    # llama.cpp's own words: flash attention left to it, which it turned on, and the keys' cache in q8_0.
    assert "flash_attn            = auto" in text and "Flash Attention enabled" in text, text[-3000:]
    assert "K (q8_0)" in text and "V (f16)" in text, text[-3000:]
    loaded = next(line for line in text.splitlines() if "loaded smollm2-135m-instruct" in line)
    assert loaded.endswith(
        "CPU, 0 of 31 layers offloaded (this llama.cpp build has no GPU backend), flash attention on (auto), "
        "KV cache q8_0/f16"
    ), loaded
