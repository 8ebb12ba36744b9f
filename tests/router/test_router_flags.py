"""The router's flags: uvloop by default (`--loop`), asyncio's loop when asked, errors an operator can act on."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import uvloop

from llamakit.router.__main__ import new_event_loop
from llamakit.router.settings import settings_from_args
from tests.support.ports import taken_port


def test_the_router_runs_on_uvloop_unless_told_otherwise() -> None:
    assert settings_from_args([], env={}).event_loop == "uvloop"
    assert settings_from_args(["--loop", "asyncio"], env={}).event_loop == "asyncio"
    assert settings_from_args([], env={"LLAMAKIT_LOOP": "asyncio"}).event_loop == "asyncio"
    with pytest.raises(SystemExit):
        settings_from_args(["--loop", "trio"], env={})
    for kind, want in (("uvloop", uvloop.Loop), ("asyncio", asyncio.BaseEventLoop)):
        loop = new_event_loop(kind)
        try:
            assert isinstance(loop, want)
            assert kind == "uvloop" or not isinstance(loop, uvloop.Loop)
        finally:
            loop.close()


def test_bad_flags_get_messages_an_operator_can_act_on(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        settings_from_args(["--cluster", "maybe"], env={})
    assert "argument --cluster: expected yes or no, got 'maybe'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        settings_from_args(["--cluster", "yes", "--db", "ledger.db"], env={})
    err = capsys.readouterr().err
    assert "error: --cluster needs a PostgreSQL ledger" in err and "Value error" not in err, err


def test_llamakit_up_passes_the_event_loop_on() -> None:
    from llamakit.cli import build_parser

    assert build_parser().parse_args(["up", "--loop", "asyncio"]).loop == "asyncio"
    assert build_parser().parse_args(["up"]).loop is None  # the router's default
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--loop", "trio"])


@pytest.mark.parametrize("part", ["router", "node"])
def test_a_port_in_use_is_an_error_not_a_traceback(tmp_path: Path, part: str) -> None:
    with taken_port() as port:
        flags = {
            "router": ["--db", str(tmp_path / "ledger.db"), "--admin-key", "flags-admin", "--herd-token", "flags-herd"],
            "node": ["--herd-token", "flags-herd"],
        }[part]
        done = subprocess.run(
            [sys.executable, "-m", f"llamakit.{part}", "--port", str(port), *flags],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"python -m llamakit.{part}: error:" in done.stderr and "address already in use" in done.stderr
    assert "serving on" not in done.stderr and "router on" not in done.stderr  # it never claims to be up


def test_stream_checkpoints_every_32_tokens_or_a_second_unless_told_otherwise() -> None:
    default = settings_from_args([], env={})
    assert (default.checkpoint_tokens, default.checkpoint_ms) == (32, 1000.0)
    flags = settings_from_args(["--checkpoint-tokens", "8", "--checkpoint-ms", "250"], env={})
    assert (flags.checkpoint_tokens, flags.checkpoint_ms) == (8, 250.0)
    assert settings_from_args([], env={"LLAMAKIT_CHECKPOINT_TOKENS": "0"}).checkpoint_tokens == 0  # none
    for bad in (["--checkpoint-tokens", "-1"], ["--checkpoint-ms", "0"]):
        with pytest.raises(SystemExit):
            settings_from_args(bad, env={})
