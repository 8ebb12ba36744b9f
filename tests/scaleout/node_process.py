"""A fake node in a process of its own: `python -m tests.scaleout.node_process --host H --port P --name N`.

With `--ports K` it serves K nodes on ports P..P+K-1 from one process and one event loop (for big herds:
`bench/herd_scale.py`); each is named N-<i>.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
from typing import Any

from aiohttp import web

from tests.router.fake_node import FakeNode, Script


class _Forgetful(list[dict[str, Any]]):
    """`FakeNode.received` in a process of its own: nobody reads it there, and a list of every request body
    a long benchmark sent grew the heap that each of the garbage collector's full passes walks."""

    def append(self, item: dict[str, Any]) -> None:
        pass


async def serve(host: str, port: int, name: str, ports: int, slots: int, tokens: int, token_delay: float) -> None:
    runners = []
    for i in range(ports):
        node = FakeNode(
            name if ports == 1 else f"{name}-{i}",
            slots=slots,
            script=Script(tokens, token_delay),
            received=_Forgetful(),
        )
        runner = web.AppRunner(node.app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port + i).start()
        runners.append(runner)
    # A thousand apps are a heap of long-lived objects: out of the collector's way, so that a herd of 1,000
    # answers as cheaply per request as a herd of one.
    gc.freeze()
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        for runner in runners:
            await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--ports", type=int, default=1)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--token-delay", type=float, default=0.02)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.name, args.ports, args.slots, args.tokens, args.token_delay))


if __name__ == "__main__":
    main()
