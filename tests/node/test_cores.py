"""Nodes started by hand on one machine: the threads they ask for, and the warning when they exceed the cores."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from llamakit.node.cores import NodeProcess, available_cores, oversubscription, running_nodes


def fake_process(proc: Path, pid: int, argv: list[str], environ: dict[str, str] | None = None) -> None:
    entry = proc / str(pid)
    entry.mkdir(parents=True)
    (entry / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (entry / "environ").write_bytes(b"\0".join(f"{k}={v}".encode() for k, v in (environ or {}).items()))


def test_running_nodes_are_found_with_the_threads_they_asked_for(tmp_path: Path) -> None:
    python = sys.executable
    fake_process(tmp_path, 101, [python, "-m", "llamakit.node", "--threads", "3", "--port", "8081"])
    fake_process(tmp_path, 102, [python, "-m", "llamakit.node", "--threads=1"])
    fake_process(tmp_path, 103, [python, "-m", "llamakit.node"], {"LLAMAKIT_THREADS": "2"})
    fake_process(tmp_path, 104, [python, "-m", "llamakit.node", "--model", "gemma-3-270m"])  # the default
    fake_process(tmp_path, 105, [python, "-m", "llamakit.router", "--port", "8080"])
    fake_process(tmp_path, 106, [python, "-c", "print('llamakit.node')"])
    fake_process(tmp_path, 107, [python, "-m", "llamakit.node", "--threads", "5"])
    fake_process(tmp_path, 108, ["timeout", "60", python, "-m", "llamakit.node"])  # a wrapper, not a node
    (tmp_path / "self").mkdir()
    found = sorted(running_nodes(tmp_path, exclude=107), key=lambda n: n.pid)
    assert found == [NodeProcess(101, 3), NodeProcess(102, 1), NodeProcess(103, 2), NodeProcess(104, available_cores())]


def test_the_warning_names_the_threads_and_a_fair_share() -> None:
    assert oversubscription(2, [], 2) is None, "alone, every core is its own"
    assert oversubscription(1, [NodeProcess(1, 1)], 2) is None, "1 + 1 threads on 2 cores"
    warning = oversubscription(2, [NodeProcess(1, 2)], 2)
    assert warning is not None
    assert "4 threads share 2 core(s)" in warning and "--threads 1" in warning


def test_a_real_node_process_is_seen(tmp_path: Path) -> None:
    # A process whose command line is a node's (it sleeps instead of serving): the scan reads the real /proc.
    sleeper = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "-m", "llamakit.node", "--threads", "7"]
    )
    try:
        for _ in range(100):  # the child may not have reached exec yet
            found = running_nodes(exclude=os.getpid())
            if NodeProcess(sleeper.pid, 7) in found:
                break
            time.sleep(0.05)
        cmdline = Path(f"/proc/{sleeper.pid}/cmdline").read_bytes()
        assert NodeProcess(sleeper.pid, 7) in found, (found, cmdline)
    finally:
        sleeper.kill()
        sleeper.wait()
