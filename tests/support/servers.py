"""Real aiohttp servers on loopback for tests, benches and scripts: on a port the kernel picks (`RunningServer`),
or on a given one (`PinnedServer`, a server brought back where its clients already know it to be)."""

from __future__ import annotations

from aiohttp import web

__all__ = ["PinnedServer", "RunningServer"]


class RunningServer:
    """An aiohttp app served on 127.0.0.1 on a free port."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.runner = web.AppRunner(app)
        self.url = ""

    async def start(self) -> RunningServer:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()


class PinnedServer(RunningServer):
    """A RunningServer on a given port: a node brought back where the router already knows it to be."""

    def __init__(self, app: web.Application, port: int) -> None:
        super().__init__(app)
        self.port = port

    async def start(self) -> PinnedServer:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        self.url = f"http://127.0.0.1:{self.port}"
        return self
