"""llama.cpp's own `llama-server` behind a node: the HTTP client the node calls it with, what the node learns of
it (`/health`, `/props`, `/slots`, `/v1/models`), and the `Supervisor` that runs one on a loopback port.

What llama-server accepts and answers is that of the llama.cpp that llama-cpp-python 0.3.36 vendors
(tools/server/README.md, server-schema.cpp, server-task.cpp there). Errors are one class, `UpstreamError`,
with llama-server's status and error type; `Unreachable` when it did not answer at all.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from llamakit import jsontext

__all__ = [
    "LlamaServerClient",
    "ServerInfo",
    "Supervisor",
    "Unreachable",
    "UpstreamError",
    "free_loopback_port",
    "served_name",
]

log = logging.getLogger(__name__)
# llama-server's own log lines (a supervised one's stdout and stderr), at debug level.
output_log = logging.getLogger("llama-server")


class UpstreamError(Exception):
    """llama-server refused or failed a call: its HTTP `status` (0 when the stream broke), its error `type`
    (`invalid_request_error`, `exceed_context_size_error`, `not_supported_error`, …) and `message`."""

    def __init__(self, status: int, message: str, type: str = "server_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type


class Unreachable(UpstreamError):
    """llama-server did not answer (refused the connection, reset it, or timed out)."""

    def __init__(self, message: str) -> None:
        super().__init__(0, message, "unreachable")


@dataclass(frozen=True)
class ServerInfo:
    """What a ready llama-server serves: the model (its name as the node serves it, and its file), its slots
    and the context of each (tokens), its vocabulary and embedding sizes, and its build."""

    name: str
    model_path: str
    slots: int
    n_ctx: int
    n_vocab: int | None
    n_embd: int | None
    build: str


def served_name(props: dict[str, Any]) -> str:
    """The name llama-server's model is served under: its `--alias` (the first), else its file's stem (as the
    node serves a GGUF path, see catalog.resolve_model)."""
    path = str(props.get("model_path") or "")
    alias = str(props.get("model_alias") or "").split(",")[0].strip()
    if alias and alias != path:
        return alias
    name = Path(path).name
    return name.removesuffix(".gguf") if name else "llama-server"


class LlamaServerClient:
    """Calls to one llama-server at `url` with its API key (None: it wants none)."""

    def __init__(self, url: str, api_key: str | None) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            # No total timeout: a generation takes as long as it takes; the node stops it when told to.
            self._session = aiohttp.ClientSession(
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
                connector=aiohttp.TCPConnector(limit=0),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def ready(self) -> bool:
        """Whether llama-server has its model loaded (`GET /health` 200; 503 while it loads). Unreachable
        when it does not answer, UpstreamError for any other answer."""
        try:
            async with self.session.get(f"{self.url}/health", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                if resp.status == 200:
                    return True
                if resp.status == 503:
                    return False
                raise await _error_of(resp)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unreachable(f"llama-server at {self.url} does not answer: {_reason(exc)}") from exc

    async def get_json(self, path: str) -> Any:
        try:
            async with self.session.get(self.url + path, timeout=aiohttp.ClientTimeout(total=10)) as resp:
                if resp.status != 200:
                    raise await _error_of(resp)
                return jsontext.loads(await resp.read())
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unreachable(f"llama-server at {self.url} does not answer: {_reason(exc)}") from exc

    async def info(self) -> ServerInfo:
        """What it serves, from `/props` (slots, context per slot, model, build), `/slots` (each slot's context)
        and `/v1/models` (vocabulary and embedding sizes)."""
        props = await self.get_json("/props")
        try:
            slots = await self.get_json("/slots")
        except Unreachable:
            raise
        except UpstreamError:  # started with --no-slots: /props says the context of each
            slots = []
        models = await self.get_json("/v1/models")
        meta: dict[str, Any] = {}
        for entry in models.get("data") or []:
            if isinstance(entry, dict) and isinstance(entry.get("meta"), dict):
                meta = entry["meta"]
                break
        settings = props.get("default_generation_settings") or {}
        contexts: list[int] = [s["n_ctx"] for s in slots if isinstance(s, dict) and isinstance(s.get("n_ctx"), int)]
        n_ctx = min(contexts) if contexts else int(settings.get("n_ctx") or 0)
        return ServerInfo(
            name=served_name(props),
            model_path=str(props.get("model_path") or ""),
            slots=int(props.get("total_slots") or len(slots) or 1),
            n_ctx=n_ctx,
            n_vocab=meta.get("n_vocab") if isinstance(meta.get("n_vocab"), int) else None,
            n_embd=meta.get("n_embd") if isinstance(meta.get("n_embd"), int) else None,
            build=str(props.get("build_info") or "unknown"),
        )

    async def post_json(self, path: str, body: dict[str, Any]) -> Any:
        """A whole JSON answer to a POST (embeddings); UpstreamError for anything but 200."""
        try:
            async with self.session.post(self.url + path, data=jsontext.dumps(body), headers=_JSON) as resp:
                if resp.status != 200:
                    raise await _error_of(resp)
                return jsontext.loads(await resp.read())
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unreachable(f"llama-server at {self.url} broke off: {_reason(exc)}") from exc

    @asynccontextmanager
    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[Events]:
        """An SSE answer to a POST, open once llama-server has taken the request (it answers its status when the
        slot starts, before the first token); UpstreamError if it refused it. Leaving the block before `[DONE]`
        closes the connection: that is how llama-server learns to stop generating and free the slot."""
        try:
            resp = await self.session.post(self.url + path, data=jsontext.dumps(body), headers=_JSON)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unreachable(f"llama-server at {self.url} does not answer: {_reason(exc)}") from exc
        events: Events | None = None
        try:
            if resp.status != 200:
                raise await _error_of(resp)
            events = Events(resp)
            yield events
        finally:
            if events is not None and events.done:
                resp.release()  # read to its end: the connection goes back to the pool
            else:
                resp.close()


_JSON = {"Content-Type": "application/json"}


class Events:
    """The JSON objects of an SSE answer, up to `[DONE]` (`done` then); UpstreamError (status 0) if the stream
    ends in any other way, or carries an `error` object."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self._ready: deque[bytes] = deque()
        self._partial = b""
        self.done = False

    def __aiter__(self) -> Events:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while not self._ready:
            if self.done:
                raise StopAsyncIteration
            await self._read()
        payload = self._ready.popleft()
        try:
            event = jsontext.loads(payload)
        except ValueError as exc:
            raise UpstreamError(0, f"llama-server sent an event that is not JSON: {payload[:80]!r}") from exc
        if not isinstance(event, dict):
            raise UpstreamError(0, f"llama-server sent an event that is not a JSON object: {payload[:80]!r}")
        if "error" in event:
            error = event["error"] if isinstance(event["error"], dict) else {"message": str(event["error"])}
            code = error.get("code")
            status = code if isinstance(code, int) else 0
            raise UpstreamError(
                status, str(error.get("message") or "an error"), str(error.get("type") or "server_error")
            )
        return event

    async def _read(self) -> None:
        try:
            data = await self._resp.content.readany()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamError(0, f"llama-server broke off its stream: {_reason(exc)}") from exc
        if not data:
            raise UpstreamError(0, "llama-server ended its stream without [DONE]")
        *lines, self._partial = (self._partial + data).split(b"\n")
        for raw in lines:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue  # blank lines, and `: ping` comments while a long prompt is read
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                return
            self._ready.append(payload)


async def _error_of(resp: aiohttp.ClientResponse) -> UpstreamError:
    """llama-server's error answer (`{"error": {"code", "message", "type"}}`) as an UpstreamError."""
    text = await resp.read()
    try:
        body = jsontext.loads(text)
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return UpstreamError(resp.status, str(error.get("message") or resp.reason), str(error.get("type") or ""))
    return UpstreamError(resp.status, f"llama-server answered {resp.status}: {text[:200].decode(errors='replace')}")


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS's choice), for a supervised llama-server to listen on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# Restarts wait FIRST_BACKOFF seconds, twice as long after each start that did not last STABLE_SECONDS, at most
# MAX_BACKOFF (openai-python's retry curve): a llama-server that cannot start is not restarted in a tight loop.
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 8.0
STABLE_SECONDS = 30.0
STOP_WAIT = 10.0  # seconds llama-server has to exit after SIGTERM, before SIGKILL
OUTPUT_TAIL = 30  # lines of its output kept, and logged when it exits unasked


class Supervisor:
    """Runs `command` (a llama-server) until `stop()`: restarts it whenever it exits, with backoff, and logs why.

    Its output goes to the `llama-server` logger at debug level; the last lines are logged as a warning when it
    exits unasked. On Linux it also dies with the node (PR_SET_PDEATHSIG), so that a node killed outright leaves
    no llama-server holding the port and the model's memory.
    """

    def __init__(self, command: Sequence[str], *, env: Mapping[str, str] | None = None) -> None:
        self.command = list(command)
        self.shown = list(command)  # the command as logged (secrets go in `env`, never on it)
        # Added to the node's environment for llama-server: its API key goes there (LLAMA_API_KEY), because a
        # command line is readable by every local user (`ps`), and the key is what keeps them from using it.
        self.env = dict(env or {})
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.last_exit: str | None = None  # why the last one ended, while the next is not started yet
        self.tail: deque[str] = deque(maxlen=OUTPUT_TAIL)
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._started = asyncio.Event()
        # Called with the reason when llama-server exits unasked (before the restart's backoff), so that the
        # node stops taking work at once rather than at its next look.
        self.on_exit: Callable[[str], None] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.returncode is None else None

    @property
    def restarts(self) -> int:
        return max(self.starts - 1, 0)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="llama-server supervisor")

    async def started(self) -> None:
        """Wait until the first llama-server process has been started (or could not be)."""
        await self._started.wait()

    async def _run(self) -> None:
        backoff = FIRST_BACKOFF
        while not self._stopping:
            began = time.monotonic()
            try:
                self.process = await asyncio.create_subprocess_exec(
                    *self.command,
                    env={**os.environ, **self.env},
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,  # a ^C in the node's terminal reaches the node, which stops it
                    preexec_fn=functools.partial(_die_with_parent, os.getpid()) if sys.platform == "linux" else None,
                )
            except OSError as exc:
                self.last_exit = f"cannot start {self.command[0]}: {exc}"
                log.error("%s; trying again in %.1f s", self.last_exit, backoff)
            else:
                self.starts += 1
                self.last_exit = None
                self.tail.clear()  # the output told on an exit is this run's alone
                log.info(
                    "%s llama-server (pid %d): %s",
                    "started" if self.starts == 1 else f"restarted ({self.restarts})",
                    self.process.pid,
                    " ".join(self.shown),
                )
                self._started.set()
                await self._pump(self.process)
                code = await self.process.wait()
                if self._stopping:
                    break
                ran = time.monotonic() - began
                said = _last_error(self.tail)
                self.last_exit = f"llama-server (pid {self.process.pid}) exited with {_exit_text(code)}" + (
                    f": {said}" if said else ""
                )
                if self.on_exit is not None:
                    self.on_exit(self.last_exit)
                log.warning(
                    "%s after %.1f s; restarting in %.1f s. Its output ended:\n%s",
                    self.last_exit,
                    ran,
                    FIRST_BACKOFF if ran >= STABLE_SECONDS else backoff,
                    "\n".join(self.tail),
                )
                if ran >= STABLE_SECONDS:
                    backoff = FIRST_BACKOFF
            self._started.set()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _pump(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while True:
            try:
                line = await process.stdout.readline()
            except ValueError:  # a line longer than the reader's limit: skip it
                continue
            if not line:
                return
            text = line.decode(errors="replace").rstrip()
            self.tail.append(text)
            output_log.debug("%s", text)

    async def stop(self) -> None:
        """Stop llama-server (SIGTERM, then SIGKILL after STOP_WAIT seconds) and stop restarting it."""
        self._stopping = True
        process = self.process
        if process is not None and process.returncode is None:
            with suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), STOP_WAIT)
            except TimeoutError:
                with suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
            log.info("stopped llama-server (pid %d)", process.pid)
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task


def _last_error(lines: Iterable[str]) -> str | None:
    """The last line of llama-server's output that tells an error (`error: invalid argument: --x`, `failed to
    load model`), for the node's /health to say why it exited; None when none does."""
    said = None
    for line in lines:
        lowered = line.lower()
        if "error" in lowered or "failed" in lowered or "invalid" in lowered:
            said = line.strip()[:300]
    return said


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


def _die_with_parent(parent: int) -> None:
    """In the child, before exec: SIGTERM when the node that started it dies (Linux's PR_SET_PDEATHSIG)."""
    with suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent:  # the node died before the prctl: nobody would stop this one
        os._exit(1)
