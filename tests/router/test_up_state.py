"""`llamakit up` beside another herd: the state directory is locked, and a running herd keeps its profile."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from llamakit.cli.up import HerdRunning, claim_state_dir, profile_target
from llamakit.profile import Profile, write_profile
from tests.support.ports import free_port, taken_port


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def running_router() -> Iterator[str]:
    """A server on loopback that answers /health, as a running herd's router does."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def default_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "config" / "profile.json"
    monkeypatch.setenv("LLAMAKIT_PROFILE", str(path))
    return path


def test_a_second_herd_cannot_share_a_state_directory_with_a_running_one(tmp_path: Path) -> None:
    first = claim_state_dir(tmp_path, "http://127.0.0.1:8080")
    try:
        with pytest.raises(HerdRunning, match=r"router http://127\.0\.0\.1:8080, pid \d+.*--state-dir"):
            claim_state_dir(tmp_path, "http://127.0.0.1:8081")
    finally:
        os.close(first)
    os.close(claim_state_dir(tmp_path, "http://127.0.0.1:8081"))  # free again once the first herd stops


def test_the_profile_of_a_herd_that_still_runs_is_left_alone(default_profile: Path, running_router: str) -> None:
    write_profile(Profile(url=running_router, api_key="lk-first"), default_profile)
    path, kept = profile_target("http://127.0.0.1:8181", None)
    assert (path, kept) == (default_profile.with_name("profile-8181.json"), running_router)


def test_the_default_profile_is_replaced_when_its_herd_is_gone_or_is_this_one(
    default_profile: Path, running_router: str
) -> None:
    assert profile_target("http://127.0.0.1:8181", None) == (default_profile, None)  # none yet
    write_profile(Profile(url=f"http://127.0.0.1:{free_port('127.0.0.1')}"), default_profile)  # nobody answers
    assert profile_target("http://127.0.0.1:8181", None) == (default_profile, None)
    write_profile(Profile(url=running_router), default_profile)  # this herd's own, from an earlier run
    assert profile_target(running_router, None) == (default_profile, None)
    default_profile.write_text("{not json")
    assert profile_target("http://127.0.0.1:8181", None) == (default_profile, None)


def test_a_profile_path_given_is_used_as_given(default_profile: Path, running_router: str, tmp_path: Path) -> None:
    write_profile(Profile(url=running_router), default_profile)
    assert profile_target("http://127.0.0.1:8181", tmp_path / "mine.json") == (tmp_path / "mine.json", None)


def test_up_says_which_herd_holds_the_state_directory_and_starts_nothing(tmp_path: Path) -> None:
    lock = claim_state_dir(tmp_path, "http://127.0.0.1:8080")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "llamakit.cli", "up", "--headless", "--state-dir", str(tmp_path),
             "--port", str(free_port("127.0.0.1"))],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "LLAMAKIT_PROFILE": str(tmp_path / "profile.json")},
        )  # fmt: skip
    finally:
        os.close(lock)
    assert done.returncode == 1
    assert f"a herd already runs from {tmp_path} (router http://127.0.0.1:8080" in done.stderr
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())
    assert not (tmp_path / "profile.json").exists()


def test_the_herds_processes_hold_the_state_directory_after_up_is_killed(tmp_path: Path) -> None:
    """A router or node outlives a SIGKILLed `up`; while it runs, no second herd may start on its ledger."""
    from llamakit.cli.up import Launcher, UpOptions

    launcher = Launcher(UpOptions(state_dir=tmp_path, port=free_port("127.0.0.1"), profile=tmp_path / "p.json"))
    launcher._spawn("router", ["-c", "import time; time.sleep(60)"])  # stands for the router: it only lives
    child = launcher.processes["router"]
    try:
        assert launcher._lock is not None
        os.close(launcher._lock)  # as when `up` dies: its own descriptor is gone, the child's is not
        with pytest.raises(HerdRunning):
            claim_state_dir(tmp_path, "http://127.0.0.1:8081")
        (tmp_path / "up.lock").write_text("router http://127.0.0.1:18080, pid 4194304\n")  # a pid that is no more
        with pytest.raises(HerdRunning, match=r"that llamakit up is gone.*the router at http://127\.0\.0\.1:18080"):
            claim_state_dir(tmp_path, "http://127.0.0.1:8081")
    finally:
        child.kill()
        child.wait()
    os.close(claim_state_dir(tmp_path, "http://127.0.0.1:8081"))  # the last holder gone, the directory is free


def test_up_refuses_a_port_in_use_and_a_profile_it_cannot_write_before_starting_anything(tmp_path: Path) -> None:
    def up(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "llamakit.cli", "up", "--headless", "--state-dir", str(tmp_path / "state"), *extra],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "LLAMAKIT_PROFILE": str(tmp_path / "profile.json")},
        )  # fmt: skip

    with taken_port() as port:
        done = up("--port", str(port))
    assert done.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in done.stderr, done.stderr
    (tmp_path / "a-file").write_text("")
    done = up("--port", str(free_port("127.0.0.1")), "--profile", str(tmp_path / "a-file" / "profile.json"))
    assert done.returncode == 1 and "cannot write the profile at" in done.stderr, done.stderr
    done = up("--port", str(free_port("127.0.0.1")), "--profile", str(tmp_path))
    assert done.returncode == 1 and "is a directory" in done.stderr, done.stderr
    assert not (tmp_path / "profile.json").exists()
    assert not any((tmp_path / "state" / "logs").glob("*.log"))  # nothing was started
