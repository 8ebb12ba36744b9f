"""Ports for servers a test starts: one nobody listens on, and one held taken for the length of a block."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now, for a server that must be told its port before it starts (a subprocess)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def taken_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port that something listens on until the block ends, for proving a server refuses a port in use."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        sock.listen()
        port: int = sock.getsockname()[1]
        yield port
