"""How many cores a node may use, and whether the llamakit nodes on this machine ask for more than there are.

llama.cpp's worker threads spin while they wait for each other, so two nodes that each take every core do
not share the machine: they stall each other at every step, and both run several times slower than one
(`llamakit up` splits the cores between its nodes for this reason). A node started by hand cannot know what
else will start, but it can see the nodes already running and say so before it slows them down.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["NodeProcess", "available_cores", "oversubscription", "running_nodes"]


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity: `taskset`, cgroup cpusets), not all the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class NodeProcess:
    pid: int
    threads: int


def _threads(argv: list[str], environ: dict[str, str], default: int) -> int:
    for i, arg in enumerate(argv):
        try:
            if arg == "--threads":
                return int(argv[i + 1])
            if arg.startswith("--threads="):
                return int(arg.split("=", 1)[1])
        except (IndexError, ValueError):
            return default
    try:
        return int(environ["LLAMAKIT_THREADS"])
    except (KeyError, ValueError):
        return default


def _environ(path: Path) -> dict[str, str]:
    try:
        raw = path.read_bytes()
    except OSError:  # another user's process
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def running_nodes(proc: Path = Path("/proc"), *, exclude: int | None = None) -> list[NodeProcess]:
    """The `python -m llamakit.node` processes running here (but `exclude`), with the threads each asked for
    (`--threads`, else `LLAMAKIT_THREADS`, else the default: every core)."""
    found: list[NodeProcess] = []
    default = available_cores()
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit() or int(entry.name) == exclude:
            continue
        try:
            argv = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
        except OSError:  # gone meanwhile, or not ours to read
            continue
        # A Python running the node module; not a wrapper that started one (timeout, nohup, taskset …).
        if not argv or not Path(argv[0]).name.startswith("python"):
            continue
        if not any(argv[i : i + 2] == ["-m", "llamakit.node"] for i in range(len(argv) - 1)):
            continue
        found.append(NodeProcess(int(entry.name), _threads(argv, _environ(entry / "environ"), default)))
    return found


def oversubscription(threads: int, others: list[NodeProcess], cores: int) -> str | None:
    """A warning when this node's threads and those of the nodes already running exceed the cores, else None."""
    total = threads + sum(n.threads for n in others)
    if not others or total <= cores:
        return None
    share = max(1, cores // (len(others) + 1))
    return (
        f"{len(others)} other llamakit node(s) already run here with {total - threads} llama.cpp thread(s); with "
        f"{threads} more, {total} threads share {cores} core(s), and llama.cpp's threads spin while they wait, so "
        f"every node will run several times slower. Give each node --threads {share} (or pin them to separate "
        "cores with taskset), or start them together with `llamakit up`, which splits the cores."
    )
