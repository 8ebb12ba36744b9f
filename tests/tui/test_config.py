"""Which router `llamakit-tui` watches: flags, then environment, then the profile; a clear message if none."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llamakit.profile import Profile, write_profile
from llamakit.tui import NotConfigured, resolve_config


def test_flags_then_environment_then_profile(tmp_path: Path) -> None:
    profile = tmp_path / "profile.json"
    write_profile(Profile(url="http://127.0.0.1:8080", api_key="k", admin_key="from-profile"), profile)
    assert resolve_config(env={}, profile=profile).admin_key == "from-profile"
    env = {"LLAMAKIT_URL": "http://127.0.0.1:8080/", "LLAMAKIT_ADMIN_KEY": "from-env"}
    config = resolve_config(env=env, profile=profile)
    assert (config.url, config.admin_key) == ("http://127.0.0.1:8080", "from-env")
    config = resolve_config(url="http://127.0.0.1:8080", admin_key="from-flag", env=env, profile=profile)
    assert config.admin_key == "from-flag"


def test_the_profile_key_is_not_sent_to_another_router(tmp_path: Path) -> None:
    profile = tmp_path / "profile.json"
    write_profile(Profile(url="http://127.0.0.1:8080", admin_key="secret"), profile)
    with pytest.raises(NotConfigured, match="no admin key"):
        resolve_config(url="http://10.1.2.3:8080", env={}, profile=profile)


def test_nothing_configured_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(NotConfigured) as caught:
        resolve_config(env={}, profile=tmp_path / "none.json")
    message = str(caught.value)
    assert "no router URL and no admin key" in message
    assert "llamakit up" in message and "LLAMAKIT_ADMIN_KEY" in message
    with pytest.raises(NotConfigured, match="http://"):
        resolve_config(url="router:8080", admin_key="k", env={}, profile=tmp_path / "none.json")


def test_the_command_exits_with_the_message(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMAKIT_")}
    env["LLAMAKIT_PROFILE"] = str(tmp_path / "none.json")
    script = Path(sys.executable).parent / "llamakit-tui"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "llamakit.tui"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.startswith("llamakit-tui: no router URL and no admin key configured: run 'llamakit up'")
    assert done.stdout == ""
