"""The package's public surface, and that nothing else in llamakit needs it (or Textual)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

import llamakit.tui


def test_public_names_are_sorted_and_all_there() -> None:
    assert llamakit.tui.__all__ == sorted(llamakit.tui.__all__)
    for name in llamakit.tui.__all__:
        assert getattr(llamakit.tui, name) is not None


@pytest.mark.parametrize("module", ["llamakit.router", "llamakit.sdk", "llamakit.cli", "llamakit.tui"])
def test_other_packages_load_without_the_dashboard(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} does not exist yet")
    code = (
        f"import sys, {module}\n"
        "loaded = sorted(m for m in sys.modules if m == 'textual' or m.startswith(('textual.', 'llamakit.tui.')))\n"
        "print(loaded)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    expected = "[]"
    if module == "llamakit.tui":
        expected = "['llamakit.tui._cli', 'llamakit.tui._config', 'llamakit.tui._sign_in_limit']"
    assert done.stdout.strip() == expected
