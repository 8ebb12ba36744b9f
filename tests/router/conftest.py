"""tests/router's fixtures: `herd` (tests/support/herd.py), a router in front of scripted fake nodes whose books
must balance at the end of the test."""

from __future__ import annotations

from tests.support.herd import ADMIN_KEY, Herd, herd

__all__ = ["ADMIN_KEY", "Herd", "herd"]
