"""A fast scripted node in a process of its own, for load tests: `python -m tests.reliability.fast_node PORT`."""

from __future__ import annotations

import sys

from aiohttp import web

from tests.router.fake_node import FakeNode, Script

if __name__ == "__main__":
    port = int(sys.argv[1])
    node = FakeNode(sys.argv[2] if len(sys.argv) > 2 else "fast", slots=512, script=Script(tokens=4))
    web.run_app(node.app(), host="127.0.0.1", port=port, print=None, access_log=None)
