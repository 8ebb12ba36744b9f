"""Chaos: kill and freeze the real processes of a herd under load, and check that nothing is lost or paid twice.

A router (``python -m llamakit.router``, SQLite ledger, JSONL usage log) and two nodes (``python -m
llamakit.node``, the real SmolLM2 model, ``--engine batched --slots 2``) run as processes on loopback, as
deployed: ``node-a`` joins with ``--router``, ``node-b`` is a static ``--node`` of the router. Three scenarios:

* ``node-kill``: streams under way on both nodes, then ``node-a`` is killed with SIGKILL. At that moment it
  holds one stream that has delivered tokens and one request that has none yet (the node is frozen with
  SIGSTOP for the instant it takes to hand it that request; without the freeze it would start at once and
  which case a kill hits would be luck), and more requests wait in the queue. The started stream must end
  with a ``node_failed`` error event and be charged only for the tokens delivered; everything else must
  complete on ``node-b``, the request that failed over ahead of those that arrived after it; ``node-a`` must
  be marked down, and come back ready and take work when restarted on the same port.
* ``router-kill``: the router is killed with SIGKILL under a mix of streamed and plain requests, and
  restarted on the same ledger and usage log. Every answer a client received is charged exactly what it was
  told, the holds of the requests in flight or queued are closed (usage status ``recovered``: a stream charged
  at most what its client received, as of its last checkpoint, every 8 tokens here; a whole request nothing),
  each cut
  request sent again with its ``Idempotency-Key`` is answered and paid once, the usage log and the ledger
  agree line for line, the nodes stop the generations nobody waits for, and the books balance.
* ``hang`` (here only, not in the test suite): ``node-b`` is frozen with SIGSTOP while it serves a stream and
  a plain request. The router gives up on it after ``--node-timeout``: the stream ends with ``node_failed``
  and is charged for what it delivered, the plain request fails over to ``node-a``; the node gets no work
  while it rests, even once it answers its health checks again (SIGCONT), and is taken back afterwards.

Every check prints PASS or FAIL with its figures; the books are printed at the end. The exit code is 1 if a
check failed. ``tests/reliability/test_faults.py`` runs the first two scenarios with the same code.

Run: ``.venv/bin/python bench/chaos.py [--scenario node-kill router-kill hang] [--keep]`` (about a minute on two
cores; the processes' logs, the ledger and the usage log are in the work directory, kept with ``--keep`` or
when a check fails).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from llamakit.cli.up import free_port
from llamakit.money.fees import FeeSchedule, settle_amount

__all__ = [
    "NODES",
    "SCENARIOS",
    "Call",
    "Check",
    "Cluster",
    "Report",
    "Stuck",
    "hang",
    "node_kill",
    "router_kill",
]

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
ADMIN_KEY = "chaos-admin-key"
HERD_TOKEN = "chaos-herd-token"
FEES = FeeSchedule(base_fee=10, prompt_token_fee=1, completion_token_fee=2)
# Checkpoints of running streams every so many tokens (--checkpoint-tokens): fewer than the default 32, so that the
# streams the router-kill scenario cuts (a few dozen tokens in) have checkpoints for the restart to charge.
CHECKPOINT_TOKENS = 8
DEPOSIT = 10_000_000
# The model keeps counting for as long as it may: long streams whose text is plain ASCII, one piece per token.
PROMPT = "Count from 1 to 1000: 1, 2, 3, 4, 5,"
NODES = ("node-a", "node-b")  # node-a joins with --router; node-b is a static --node of the router
JOINS = "node-a"
SLOTS = 2


class Stuck(Exception):
    """A state the scenario waits for did not come: the scenario cannot go on."""


@dataclass
class Check:
    scenario: str
    name: str
    ok: bool
    figures: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'}  [{self.scenario}] {self.name}: {self.figures}"


@dataclass
class Report:
    say: Callable[[str], None] = print
    checks: list[Check] = field(default_factory=list)

    def check(self, scenario: str, name: str, ok: bool, figures: str) -> bool:
        item = Check(scenario, name, bool(ok), figures)
        self.checks.append(item)
        self.say(item.line())
        return item.ok

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def summary(self) -> str:
        return "\n".join(c.line() for c in self.failed) or f"all {len(self.checks)} checks passed"


# -- requests as a client sees them ----------------------------------------------------------------------


@dataclass
class Call:
    """One request as its client saw it, updated while it runs so that a scenario can watch it."""

    label: str
    stream: bool
    status: int | None = None
    node: str | None = None
    request_id: str | None = None
    chunks: int = 0  # events that carried text
    text: str = ""
    error: dict[str, Any] | None = None  # a stream's error event, or the error body of a refusal
    usage: dict[str, Any] | None = None
    cost: int | None = None
    done: bool = False  # [DONE] of a stream, or a whole answer
    failure: str | None = None  # the connection broke
    key: str | None = None  # sent as Idempotency-Key
    replayed: bool = False  # answered from the ledger (Idempotent-Replayed: true), not generated again
    sent: float = field(default_factory=time.monotonic)
    first_token: float | None = None  # when the first text arrived
    ended: float | None = None

    @property
    def complete(self) -> bool:
        """The client got a whole answer with its usage and cost."""
        return self.status == 200 and self.done and self.error is None and self.usage is not None

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.sent


async def run_call(client: httpx.AsyncClient, call: Call, path: str, body: dict[str, Any]) -> Call:
    headers = {"Idempotency-Key": call.key} if call.key is not None else {}
    try:
        if call.stream:
            async with client.stream("POST", path, json=body, headers=headers) as resp:
                _headers(call, resp)
                if resp.status_code != 200:
                    await resp.aread()
                    call.error = resp.json().get("error")
                    return call
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        call.done = True
                        break
                    _event(call, json.loads(data))
        else:
            resp = await client.post(path, json=body, headers=headers)
            _headers(call, resp)
            answer = resp.json()
            if resp.status_code == 200:
                call.usage, call.done = answer["usage"], True
                call.cost = int(resp.headers["X-Llamakit-Cost-Credits"])
                choice = answer["choices"][0]
                call.text = choice["message"]["content"] if "message" in choice else choice["text"]
            else:
                call.error = answer.get("error")
    except (httpx.HTTPError, ValueError) as exc:
        call.failure = repr(exc)
    finally:
        call.ended = time.monotonic()
    return call


def _headers(call: Call, resp: httpx.Response) -> None:
    call.status = resp.status_code
    call.node = resp.headers.get("X-Llamakit-Node")
    call.request_id = resp.headers.get("X-Llamakit-Request-Id")
    call.replayed = resp.headers.get("Idempotent-Replayed") == "true"


def _event(call: Call, event: dict[str, Any]) -> None:
    if "error" in event:
        call.error = event["error"]
        return
    if event.get("usage"):
        call.usage = event["usage"]
        call.cost = event["usage"].get("cost_credits")
    for choice in event.get("choices") or ():
        piece = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
        if piece:
            if call.first_token is None:
                call.first_token = time.monotonic()
            call.chunks += 1
            call.text += piece


def long_stream(max_tokens: int) -> dict[str, Any]:
    return {
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def short_answer(max_tokens: int = 8) -> dict[str, Any]:
    return {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}


# -- the processes ---------------------------------------------------------------------------------------


class Cluster:
    """A router and two nodes, each a process of its own on loopback, that a scenario can kill and restart."""

    def __init__(
        self,
        workdir: Path,
        *,
        threads: int = 1,
        ctx_size: int = 1024,
        node_timeout: float = 30.0,
        node_rest: float = 5.0,
        health_interval: float = 1.0,
    ) -> None:
        self.workdir = workdir
        self.db = workdir / "ledger.db"
        self.usage_log = workdir / "usage.jsonl"
        self.threads, self.ctx_size = threads, ctx_size
        self.node_timeout, self.node_rest, self.health_interval = node_timeout, node_rest, health_interval
        self.router_port = free_port(HOST)
        self.node_ports = {name: free_port(HOST) for name in NODES}
        self.url = f"http://{HOST}:{self.router_port}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.frozen: set[str] = set()
        # No keep-alive: a pooled connection to a router that was killed would fail the next call.
        self.admin = httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            timeout=30,
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    def node_url(self, name: str) -> str:
        return f"http://{HOST}:{self.node_ports[name]}"

    def _spawn(self, name: str, args: list[str]) -> None:
        env = {**os.environ, "LLAMAKIT_ADMIN_KEY": ADMIN_KEY, "LLAMAKIT_HERD_TOKEN": HERD_TOKEN}
        with (self.workdir / f"{name}.log").open("ab") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
            )

    def start_router(self, *, node_timeout: float | None = None, node_rest: float | None = None) -> None:
        self.node_timeout = node_timeout if node_timeout is not None else self.node_timeout
        self.node_rest = node_rest if node_rest is not None else self.node_rest
        fees = ["--base-fee", str(FEES.base_fee), "--prompt-token-fee", str(FEES.prompt_token_fee),
                "--completion-token-fee", str(FEES.completion_token_fee)]  # fmt: skip
        self._spawn(
            "router",
            ["-m", "llamakit.router", "--host", HOST, "--port", str(self.router_port),
             "--db", str(self.db), "--usage-log", str(self.usage_log),
             "--node", self.node_url("node-b"), "--health-interval", str(self.health_interval),
             "--node-timeout", str(self.node_timeout), "--node-rest", str(self.node_rest),
             "--checkpoint-tokens", str(CHECKPOINT_TOKENS), *fees],
        )  # fmt: skip

    def start_node(self, name: str) -> None:
        args = ["-m", "llamakit.node", "--name", name, "--host", HOST, "--port", str(self.node_ports[name]),
                "--engine", "batched", "--slots", str(SLOTS), "--ctx-size", str(self.ctx_size),
                "--threads", str(self.threads)]  # fmt: skip
        if name == JOINS:
            args += ["--router", self.url]
        self._spawn(name, args)

    def start(self) -> None:
        self.start_router()
        for name in NODES:
            self.start_node(name)

    def alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def freeze(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGSTOP)
        self.frozen.add(name)

    def thaw(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGCONT)
        self.frozen.discard(name)

    def kill(self, name: str) -> None:
        """SIGKILL: no shutdown code runs, nothing is flushed or closed by the process itself."""
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        self.frozen.discard(name)

    def stop(self, name: str) -> None:
        """An orderly stop (SIGTERM), SIGKILL after 15 s."""
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        if name in self.frozen:
            self.thaw(name)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            self.kill(name)

    def revive(self) -> None:
        """Whatever a scenario that stopped half-way left frozen or dead, running again."""
        for name in list(self.frozen):
            self.thaw(name)
        if not self.alive("router"):
            self.start_router()
        for name in NODES:
            if not self.alive(name):
                self.start_node(name)

    async def close(self) -> None:
        await self.admin.aclose()
        for name in (*NODES, "router"):
            self.stop(name)

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.workdir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def released_at_start(self) -> int:
        """How many holds the last router to start released, as its log says."""
        text = (self.workdir / "router.log").read_text(errors="replace")
        # A router says it is on once it listens, after its start-up released what it found: the last run's
        # start-up is logged between the run before's line and its own.
        starts = [m.start() for m in re.finditer("llamakit router on", text)]
        begin = starts[-2] if len(starts) > 1 else 0
        end = starts[-1] if starts else len(text)
        found = re.search(r"released (\d+) hold\(s\)", text[begin:end])
        return int(found.group(1)) if found else 0

    # -- reading the router ------------------------------------------------------------------------------

    async def nodes(self) -> dict[str, dict[str, Any]]:
        resp = await self.admin.get("/admin/nodes")
        resp.raise_for_status()
        return {n["name"]: n for n in resp.json()["data"]}

    async def queue_length(self) -> int:
        info = (await self.admin.get("/v1/info")).json()
        return sum(m["queue_length"] for m in info["models"].values())

    async def books(self) -> dict[str, Any]:
        resp = await self.admin.get("/admin/books")
        resp.raise_for_status()
        books: dict[str, Any] = resp.json()
        return books

    async def usage(self) -> list[dict[str, Any]]:
        resp = await self.admin.get("/admin/usage", params={"limit": 1000})
        resp.raise_for_status()
        records: list[dict[str, Any]] = resp.json()["data"]
        return records

    async def account(self, name: str, deposit: int = DEPOSIT) -> str:
        resp = await self.admin.post("/admin/accounts", json={"name": name, "deposit": deposit})
        resp.raise_for_status()
        key: str = resp.json()["api_key"]
        return key

    def client(self, api_key: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx.Timeout(300, connect=10),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=0),
        )

    async def wait_for(self, what: str, predicate: Callable[[], Awaitable[bool]], within: float) -> float:
        """Poll `predicate` until it holds; the seconds it took. Raises Stuck after `within` seconds."""
        started = time.monotonic()
        while True:
            try:
                if await predicate():
                    return time.monotonic() - started
            except (httpx.HTTPError, ValueError, KeyError):
                pass  # the router is starting or was just killed
            for name, proc in self.procs.items():
                if proc.poll() is not None and proc.returncode != -signal.SIGKILL:
                    raise Stuck(
                        f"{name} exited with {proc.returncode} while waiting for {what}:\n{self.log_tail(name)}"
                    )
            if time.monotonic() - started > within:
                raise Stuck(f"waited {within:g}s for {what}")
            await asyncio.sleep(0.1)

    async def wait_ready(self, names: Iterable[str] = NODES, within: float = 180) -> float:
        """Until the router answers and sees every named node ready."""
        wanted = list(names)

        async def ready() -> bool:
            nodes = await self.nodes()
            return all(n in nodes and nodes[n]["state"] == "ready" for n in wanted)

        return await self.wait_for(f"{', '.join(wanted)} ready in /admin/nodes", ready, within)

    async def wait_idle(self, within: float = 120) -> float:
        """Until no node is busy and nothing waits in the queue, as the router sees it."""

        async def idle() -> bool:
            nodes = await self.nodes()
            return all(n["busy"] == 0 for n in nodes.values()) and await self.queue_length() == 0

        return await self.wait_for("an idle herd", idle, within)

    async def node_health(self, name: str) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=2) as client:
            health: dict[str, Any] = (await client.get(f"{self.node_url(name)}/health")).json()
            return health


# -- shared steps and checks -----------------------------------------------------------------------------


class Launcher:
    """Starts calls on one client and keeps them, with their tasks, in order."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.calls: list[Call] = []
        self.tasks: list[asyncio.Task[Call]] = []

    def send(self, body: dict[str, Any], path: str = "/v1/completions") -> Call:
        call = Call(f"#{len(self.calls) + 1}", stream=bool(body.get("stream")))
        self.calls.append(call)
        self.tasks.append(asyncio.create_task(run_call(self.client, call, path, body)))
        return call

    async def finish(self, within: float) -> None:
        _, pending = await asyncio.wait(self.tasks, timeout=within)
        if pending:
            raise Stuck(f"{len(pending)} request(s) still running after {within:g}s")


async def spread(cluster: Cluster, launcher: Launcher, body: dict[str, Any], victim: str) -> Call:
    """One stream under way on each node (least-loaded dispatch); returns the victim's."""
    first = [launcher.send(body) for _ in NODES]

    async def flowing() -> bool:
        return all(c.chunks >= 3 or c.failure or c.error for c in first)

    await cluster.wait_for("a stream under way on each node", flowing, 180)
    on_victim = [c for c in first if c.node == victim]
    if sorted(str(c.node) for c in first) != sorted(NODES) or len(on_victim) != 1:
        raise Stuck(f"the first streams did not go one to each node: {[c.node for c in first]}")
    return on_victim[0]


def picked_next(nodes: dict[str, dict[str, Any]]) -> str | None:
    """The node the router gives the next request to: the least loaded, then the most free slots, then by name."""
    ready = [n for n in nodes.values() if n["state"] == "ready" and n["busy"] < n["slots"]]
    if not ready:
        return None
    return str(min(ready, key=lambda n: (n["busy"] / n["slots"], n["busy"] - n["slots"], n["name"]))["name"])


async def hand_to(
    cluster: Cluster, launcher: Launcher, victim: str, target: dict[str, Any], filler: dict[str, Any]
) -> list[Call]:
    """Fill every free slot of the herd, the victim's with `target` requests and the others' with `filler`.

    Called right after the victim was frozen, while the router still counts it as ready. Each request is
    checked to have gone where it was meant to; the `target` requests the victim was given are returned.
    """
    given: list[Call] = []
    for _ in range(len(NODES) * SLOTS):
        before = await cluster.nodes()
        nxt = picked_next(before)
        if nxt is None:
            return given
        call = launcher.send(target if nxt == victim else filler)

        async def dispatched(node: str = nxt, busy: int = before[nxt]["busy"]) -> bool:
            return bool((await cluster.nodes())[node]["busy"] > busy)

        await cluster.wait_for(f"a request to be dispatched to {nxt}", dispatched, 30)
        if nxt == victim:
            given.append(call)
    raise Stuck("the herd's slots did not fill up")


def as_recovered(call: Call, record: dict[str, Any]) -> tuple[bool, str]:
    """Was a request cut by the router's death charged, at its restart, at most what its client received, and
    about that, at its fees? A stream's last checkpoint is charged (fewer than CHECKPOINT_TOKENS behind it, and
    what it delivered while the checkpoint was committed: another CHECKPOINT_TOKENS is a wide margin for that), a
    whole request that never got its answer nothing. For ASCII text a token is one event with text (see
    as_delivered)."""
    tokens = record.get("completion_tokens", 0)
    within = tokens <= call.chunks or not call.text.isascii()
    within = within and tokens > call.chunks - 2 * CHECKPOINT_TOKENS
    price = settle_amount(FEES, record["bid"], record["prompt_tokens"], tokens, record["held"]) if tokens else 0
    ok = record.get("status") == "recovered" and within and record.get("cost_credits") == price
    kind = "stream" if call.stream else "whole"
    return ok, f"{kind} {call.chunks} → {tokens} tokens, {record.get('cost_credits')} credits (price {price})"


def as_delivered(call: Call, record: dict[str, Any], prompt_tokens: int | None) -> tuple[bool, str]:
    """Was a broken stream charged for exactly what its client received?

    The router charges the node's running token count on the last event it forwarded. Every token of this
    prompt's ASCII output is one event with text, so the count equals the events the client received; for
    other text a token may end inside a character and the count may exceed the events.
    """
    tokens = record["completion_tokens"]
    tokens_ok = tokens == call.chunks if call.text.isascii() else tokens >= call.chunks
    price = settle_amount(FEES, record["bid"], record["prompt_tokens"], tokens, record["held"])
    prompt_ok = prompt_tokens is None or record["prompt_tokens"] == prompt_tokens
    ok = record["status"] == "broken" and tokens_ok and record["cost_credits"] == price and prompt_ok
    figures = (
        f"status={record['status']}, received {call.chunks} text events, charged completion_tokens={tokens} "
        f"prompt_tokens={record['prompt_tokens']} (a whole answer's: {prompt_tokens}), cost={record['cost_credits']} "
        f"(price of those tokens {price}), held={record['held']}, released {record['held'] - record['cost_credits']}"
    )
    return ok, figures


async def account_state(client: httpx.AsyncClient) -> dict[str, Any]:
    state: dict[str, Any] = (await client.get("/v1/account")).json()
    return state


async def account_usage(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    data = (await client.get("/v1/account/usage", params={"limit": 1000})).json()["data"]
    return {u["request_id"]: u for u in data}


async def check_account(report: Report, scenario: str, client: httpx.AsyncClient) -> None:
    acct = await account_state(client)
    usage = await account_usage(client)
    costs = sum(u["cost_credits"] for u in usage.values())
    report.check(
        scenario,
        "account: nothing held, deposits = balance + charges = balance + Σ usage costs",
        acct["held"] == 0 and acct["deposited"] == acct["balance"] + acct["spent"] and acct["spent"] == costs,
        f"deposited={acct['deposited']} balance={acct['balance']} held={acct['held']} spent={acct['spent']} "
        f"Σ usage costs={costs} over {len(usage)} records",
    )


async def check_books(report: Report, scenario: str, cluster: Cluster) -> None:
    books = await cluster.books()
    report.check(
        scenario,
        "books balanced, no hold open",
        books["balanced"] and books["holds"] == 0,
        f"deposits={books['deposits']} balances={books['balances']} holds={books['holds']} charges={books['charges']}",
    )


async def check_takes_work(
    report: Report, scenario: str, cluster: Cluster, client: httpx.AsyncClient, name: str
) -> None:
    launcher = Launcher(client)
    for _ in range(2 * SLOTS):
        launcher.send(short_answer())
    await launcher.finish(180)
    served = Counter(c.node for c in launcher.calls if c.complete)
    report.check(
        scenario,
        f"{name} takes work again",
        served[name] >= 1 and sum(served.values()) == len(launcher.calls),
        f"{len(launcher.calls)} concurrent requests served by {dict(served)}",
    )


# -- the scenarios ---------------------------------------------------------------------------------------


async def node_kill(
    cluster: Cluster, report: Report, *, streams: int = 6, max_tokens: int = 200, victim: str = "node-a"
) -> None:
    """A node killed with SIGKILL while it streams, with a request on it that has no token yet, under load.

    `node-a` (the default victim) rejoins by itself when restarted; a static node is taken back by health checks.
    """
    s = "node-kill"
    survivor = next(n for n in NODES if n != victim)
    if streams < len(NODES) * SLOTS:
        raise ValueError(f"node_kill needs at least {len(NODES) * SLOTS} streams, one per slot")
    cluster.revive()
    await cluster.wait_ready()
    await cluster.wait_idle()
    key = await cluster.account("chaos-node-kill")
    body = long_stream(max_tokens)
    async with cluster.client(key) as client:
        launcher = Launcher(client)
        started = await spread(cluster, launcher, body, victim)
        # Frozen for the instant it takes to give it one more request, which then has no token at the kill.
        cluster.freeze(victim)
        given = await hand_to(cluster, launcher, victim, body, body)
        while len(launcher.calls) < streams:
            launcher.send(body)
        waiting = launcher.calls[len(NODES) * SLOTS :]
        queued = streams - 2 * SLOTS

        async def all_placed() -> bool:
            nodes = await cluster.nodes()
            return nodes[survivor]["busy"] == SLOTS and await cluster.queue_length() == queued

        await cluster.wait_for(f"{queued} requests queued behind full nodes", all_placed, 30)
        tokenless = all(c.chunks == 0 and c.status is None for c in given)
        report.check(
            s,
            f"at the kill, {victim} holds a stream under way and a request with no token; {queued} wait in the queue",
            len(given) == 1 and tokenless and started.chunks > 0,
            f"stream {started.label}: {started.chunks} text events; given to {victim} after it: "
            f"{[(c.label, c.chunks) for c in given]}; queue={queued}",
        )
        cluster.kill(victim)
        killed = time.monotonic()

        async def down() -> bool:
            return bool((await cluster.nodes())[victim]["state"] == "down")

        await cluster.wait_for(f"{victim} marked down", down, 30)
        down_after = time.monotonic() - killed
        report.check(s, f"{victim} marked down in /admin/nodes", True, f"{down_after:.2f}s after SIGKILL")
        await launcher.finish(300)

        report.check(
            s,
            "the started stream on the killed node ends with a node_failed error event",
            started.status == 200 and (started.error or {}).get("code") == "node_failed" and started.usage is None,
            f"{started.label}: {started.chunks} text events, then error={started.error and started.error.get('code')}, "
            f"[DONE]={started.done}, failure={started.failure}",
        )
        usage = await account_usage(client)
        whole = next((c for c in launcher.calls if c.complete), None)
        whole_prompt = whole.usage["prompt_tokens"] if whole is not None and whole.usage else None
        record = usage.get(str(started.request_id))
        if record is None:
            report.check(s, "the broken stream is charged only for what was delivered", False, "no usage record")
        else:
            ok, figures = as_delivered(started, record, whole_prompt)
            report.check(
                s, "the broken stream is charged only for what was delivered", ok and record["node"] == victim, figures
            )
        others = [c for c in launcher.calls if c is not started]
        report.check(
            s,
            "the request that had no token fails over and completes on the other node",
            all(c.complete and c.node == survivor for c in given),
            "; ".join(f"{c.label}: status={c.status} node={c.node} tokens={c.usage and c.usage['completion_tokens']} "
                      f"error={c.error}" for c in given),
        )  # fmt: skip
        # FIFO among equal bids: the request that failed over arrived before those waiting in the queue, so it
        # must take one of the first slots that free up, not go to the back of the queue.
        before_it = [q.label for c in given for q in waiting if (q.first_token or 0) < (c.first_token or 0)]
        report.check(
            s,
            "the request that failed over keeps its place in the queue (FIFO among equal bids)",
            bool(given) and len(before_it) <= SLOTS - 1,
            f"requests queued after it that started first: {before_it} (at most {SLOTS - 1}: slots that free "
            f"together); first tokens: "
            + ", ".join(f"{c.label} +{(c.first_token or 0) - started.sent:.1f}s" for c in [*given, *waiting]),
        )
        report.check(
            s,
            f"every other request completes on {survivor}",
            all(c.complete and c.node == survivor for c in others),
            f"{sum(c.complete for c in others)}/{len(others)} complete, nodes={dict(Counter(c.node for c in others))}",
        )
        statuses = Counter(u["status"] for u in usage.values())
        told = {c.request_id: c.cost for c in others}
        billed = {rid: usage[rid]["cost_credits"] for rid in told if rid in usage}
        report.check(
            s,
            "one usage record per request; each completed one costs what its client was told",
            statuses == Counter({"ok": streams - 1, "broken": 1}) and billed == told,
            f"records={dict(statuses)}, costs told={sorted(v for v in told.values() if v is not None)}",
        )
        await check_account(report, s, client)

        cluster.start_node(victim)
        restarted = time.monotonic()
        await cluster.wait_ready([victim])
        report.check(
            s, f"{victim} restarted on the same port comes back ready", True,
            f"{time.monotonic() - restarted:.1f}s after the restart (model load included)",
        )  # fmt: skip
        await check_takes_work(report, s, cluster, client, victim)
        await check_account(report, s, client)
    await check_books(report, s, cluster)


async def router_kill(cluster: Cluster, report: Report, *, workers: int = 6, max_tokens: int = 100) -> None:
    """The router killed with SIGKILL under load and restarted on the same ledger and usage log.

    More workers than slots, so that requests wait in the queue too: their holds are as open as those in flight.
    """
    s = "router-kill"
    cluster.revive()
    await cluster.wait_ready()
    await cluster.wait_idle()
    key = await cluster.account("chaos-router-kill")
    stop = asyncio.Event()
    calls: list[Call] = []
    sent: dict[str, tuple[str, dict[str, Any]]] = {}
    kinds = [
        ("/v1/completions", long_stream(max_tokens)),
        ("/v1/completions", short_answer(12)),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 12}),
    ]
    async with cluster.client(key) as client:

        async def worker(i: int) -> None:
            n = i
            while not stop.is_set():
                path, body = kinds[n % len(kinds)]
                n += 1
                call = Call(f"w{i}#{n}", stream=bool(body.get("stream")), key=f"chaos-w{i}-{n}")
                calls.append(call)
                sent[call.label] = (path, body)
                await run_call(client, call, path, body)
                if call.failure is not None:
                    return  # the router is gone

        tasks = [asyncio.create_task(worker(i)) for i in range(workers)]

        def mid_stream() -> list[Call]:
            return [c for c in calls if c.stream and c.chunks > 0 and not c.done and c.failure is None]

        async def loaded() -> bool:
            return sum(c.complete for c in calls) >= 4 and len(mid_stream()) >= 2

        await cluster.wait_for("load with streams under way", loaded, 240)
        stop.set()
        cut, queued = len(mid_stream()), await cluster.queue_length()
        cluster.kill("router")
        await asyncio.wait(tasks, timeout=60)
        complete = [c for c in calls if c.complete]
        broken = [c for c in calls if not c.complete]
        report.check(
            s,
            "router killed under load",
            all(c.failure is not None for c in broken),
            f"{len(calls)} requests sent: {len(complete)} answered before the kill, {len(broken)} cut by it "
            f"({cut} streams under way, {queued} requests queued)",
        )

        async def nodes_idle() -> bool:
            return [(await cluster.node_health(n))["busy"] for n in NODES] == [0] * len(NODES)

        report.check(
            s, "the nodes stop the generations nobody waits for", True,
            f"both nodes report busy=0 {await cluster.wait_for('the nodes to go idle', nodes_idle, 60):.2f}s after",
        )  # fmt: skip

        cluster.start_router()
        restarted = time.monotonic()
        await cluster.wait_ready()
        report.check(
            s, "restarted on the same ledger, both nodes back", True,
            f"{time.monotonic() - restarted:.1f}s (node-a rejoins by heartbeat, node-b by health check)",
        )  # fmt: skip
        released = cluster.released_at_start()
        usage = await account_usage(client)
        statuses = Counter(u["status"] for u in usage.values())
        wrong_cost = [(c.request_id, c.cost, usage.get(str(c.request_id), {}).get("cost_credits")) for c in complete
                      if usage.get(str(c.request_id), {}).get("cost_credits") != c.cost
                      or usage[str(c.request_id)]["status"] != "ok"]  # fmt: skip
        report.check(
            s,
            "every answer a client received is charged exactly what it was told",
            not wrong_cost,
            f"{len(complete)} answers, Σ told={sum(c.cost or 0 for c in complete)}, mismatches={wrong_cost}",
        )
        cut_known = [c for c in broken if c.request_id is not None]
        recovered = {c.request_id: as_recovered(c, usage.get(str(c.request_id), {})) for c in cut_known}
        report.check(
            s,
            "the holds of the requests cut by the kill are closed at restart (status recovered), each charged at "
            f"most what its client received and fewer than {2 * CHECKPOINT_TOKENS} tokens less, at its fees",
            bool(cut_known) and all(ok for ok, _ in recovered.values()),
            f"{len(cut_known)} cut requests; received → charged: "
            + "; ".join(f"{'' if ok else 'WRONG '}{figures}" for ok, figures in recovered.values()),
        )
        report.check(
            s,
            "the restarted router released as many holds as there are recovered records",
            released == statuses["recovered"] > 0,
            f"router log: released {released} hold(s); recovered records: {statuses['recovered']}",
        )
        known = {c.request_id for c in calls}
        unknown = [u for u in usage.values() if u["request_id"] not in known]
        report.check(
            s,
            "every other record is a released hold or an answer the router settled before it died",
            set(statuses) <= {"ok", "recovered"} and all(u["status"] in ("ok", "recovered") for u in unknown),
            f"records={dict(statuses)}; cut before their headers: {len(unknown)} "
            f"({dict(Counter(u['status'] for u in unknown))})",
        )
        # What a client (the SDK) does after a crash: send each request that failed again, with its key.
        retries = [Call(f"{c.label} again", stream=c.stream, key=c.key) for c in broken]
        await asyncio.gather(*(run_call(client, r, *sent[c.label]) for r, c in zip(retries, broken, strict=True)))
        after = await account_usage(client)
        settled_before = {u["request_id"] for u in usage.values() if u["status"] == "ok"} - {
            c.request_id for c in complete
        }
        replayed = {r.request_id for r in retries if r.replayed}
        wrong = [(r.label, r.request_id, r.cost, after.get(str(r.request_id), {}).get("cost_credits")) for r in retries
                 if not r.complete or after.get(str(r.request_id), {}).get("cost_credits") != r.cost]  # fmt: skip
        ok_records = sum(u["status"] == "ok" for u in after.values())
        report.check(
            s,
            "each cut request sent again with its Idempotency-Key is answered once and paid once",
            not wrong and replayed == settled_before and ok_records == len(calls),
            f"{len(retries)} sent again: {sum(r.complete for r in retries)} answered, {len(replayed)} of them from the "
            f"ledger (settled before the kill: {len(settled_before)}); paid requests {ok_records} for {len(calls)} "
            f"sent; mismatches={wrong}",
        )
        await check_account(report, s, client)
        log = [json.loads(line) for line in cluster.usage_log.read_text().splitlines()]
        ledger = await cluster.usage()
        fields = ("status", "cost_credits", "prompt_tokens", "completion_tokens", "held", "node")
        in_log = {line["request_id"]: tuple(line[f] for f in fields) for line in log}
        in_ledger = {u["request_id"]: tuple(u[f] for f in fields) for u in ledger}
        differ = sorted(set(in_log.items()) ^ set(in_ledger.items()), key=str)
        report.check(
            s,
            "the usage log agrees with the ledger, line for line",
            len(log) == len(in_log) and in_log == in_ledger,
            f"{len(log)} log lines ({len(log) - len(in_log)} duplicated), {len(in_ledger)} ledger records, "
            f"differences: {differ[:4]}",
        )
    await check_books(report, s, cluster)


async def hang(cluster: Cluster, report: Report, *, node_timeout: float = 4.0, node_rest: float = 8.0) -> None:
    """A node frozen (SIGSTOP) mid-work: timed out, failed over or charged as delivered, rested, taken back."""
    s, victim, survivor = "hang", "node-b", "node-a"
    cluster.revive()
    cluster.stop("router")
    cluster.start_router(node_timeout=node_timeout, node_rest=node_rest)
    await cluster.wait_ready()
    await cluster.wait_idle()
    report.check(s, "router restarted with a short node timeout", True, f"--node-timeout {node_timeout:g} "
                 f"--node-rest {node_rest:g}")  # fmt: skip
    key = await cluster.account("chaos-hang")
    async with cluster.client(key) as client:
        launcher = Launcher(client)
        started = await spread(cluster, launcher, long_stream(200), victim)
        cluster.freeze(victim)
        frozen = time.monotonic()
        given = await hand_to(cluster, launcher, victim, short_answer(16), long_stream(200))
        await launcher.finish(node_timeout * 4 + 180)
        gave_up = (started.ended or frozen) - frozen
        usage = await account_usage(client)
        record = usage.get(str(started.request_id))
        reason = str((record or {}).get("error"))
        # The node timeout bounds the silence since the last byte, which came just before the freeze.
        report.check(
            s,
            "the stream on the frozen node ends with node_failed when the node timeout runs out",
            (started.error or {}).get("code") == "node_failed" and "Timeout" in reason,
            f"{started.chunks} text events, then error={started.error and started.error.get('code')} "
            f"{gave_up:.1f}s after the freeze; recorded reason: {reason}",
        )
        whole = next((c for c in launcher.calls if c.complete and c.stream), None)
        ok, figures = as_delivered(started, record, whole.usage["prompt_tokens"] if whole and whole.usage else None) \
            if record else (False, "no usage record")  # fmt: skip
        report.check(s, "it is charged only for what it delivered, the rest of its hold refunded", ok, figures)
        report.check(
            s,
            "the plain request on the frozen node fails over after the node timeout",
            bool(given) and all(c.complete and c.node == survivor and c.seconds >= node_timeout for c in given),
            "; ".join(f"{c.label}: status={c.status} node={c.node} after {c.seconds:.1f}s" for c in given),
        )
        nodes = await cluster.nodes()
        report.check(
            s,
            f"{victim} is down and resting",
            nodes[victim]["state"] == "down" and nodes[victim]["timeouts"] >= 1 and nodes[victim]["resting"] > 0,
            f"state={nodes[victim]['state']} timeouts={nodes[victim]['timeouts']} resting={nodes[victim]['resting']}s",
        )
        cluster.thaw(victim)
        thawed = time.monotonic()

        async def answers() -> bool:
            return bool((await cluster.node_health(victim))["status"] == "ready")

        await cluster.wait_for(f"{victim} to answer /health again", answers, 30)
        resting = (await cluster.nodes())[victim]
        while_resting = Launcher(client)
        for _ in range(3):
            while_resting.send(short_answer())
        await while_resting.finish(120)
        still = (await cluster.nodes())[victim]
        served = Counter(c.node for c in while_resting.calls if c.complete)
        report.check(
            s,
            f"no work for {victim} while it rests, although its /health answers ready",
            served == Counter({survivor: 3}) and still["requests"] == resting["requests"],
            f"served by {dict(served)}; {victim} before: state={resting['state']} resting={resting['resting']}s, "
            f"after: state={still['state']} resting={still['resting']}s",
        )

        async def idle() -> bool:
            return bool((await cluster.node_health(victim))["busy"] == 0)

        report.check(
            s, f"{victim} drops the generations the router gave up on", True,
            f"busy=0 {await cluster.wait_for(f'{victim} idle', idle, 60):.2f}s after SIGCONT",
        )  # fmt: skip
        await cluster.wait_ready([victim], within=node_rest * 2**4 + 30)
        report.check(
            s, f"{victim} taken back after its rest", True, f"ready {time.monotonic() - thawed:.1f}s after SIGCONT"
        )
        await check_takes_work(report, s, cluster, client, victim)
        await check_account(report, s, client)
    await check_books(report, s, cluster)


SCENARIOS: dict[str, Callable[[Cluster, Report], Awaitable[None]]] = {
    "node-kill": node_kill,
    "router-kill": router_kill,
    "hang": hang,
}


async def print_books(cluster: Cluster) -> None:
    books = await cluster.books()
    print("\nbooks")
    for name in ("deposits", "balances", "holds", "charges", "balanced"):
        print(f"  {name:<10} {books[name]}")
    accounts = (await cluster.admin.get("/admin/accounts")).json()["data"]
    print(f"  {'account':<20} {'deposited':>10} {'balance':>10} {'held':>6} {'spent':>8}")
    for acct in accounts:
        state = (await cluster.admin.get(f"/admin/accounts/{acct['name']}")).json()
        figures = (state["deposited"], state["balance"], state["held"], state["spent"])
        print(f"  {acct['name']:<20} " + " ".join(f"{v:>{w}}" for v, w in zip(figures, (10, 10, 6, 8), strict=True)))
    stats = (await cluster.admin.get("/admin/stats")).json()
    print(f"  fees by node: {stats['fees']['by_node']}")
    print(f"  usage records by status: {dict(Counter(u['status'] for u in await cluster.usage()))}")


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument(
        "--threads", type=int, default=1, help="llama.cpp threads per node (default 1: 2 nodes, 2 cores)"
    )
    parser.add_argument("--workdir", type=Path, help="where the ledger, usage log and process logs go")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="llamakit-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report = Report()
    cluster = Cluster(workdir, threads=args.threads)
    started, finished = time.monotonic(), False
    print(f"chaos: router {cluster.url}, nodes {cluster.node_ports}, work directory {workdir}")
    try:
        cluster.start()
        ready = await cluster.wait_ready()
        print(f"herd ready in {ready:.1f}s")
        for name in args.scenario:
            print(f"\n== {name}")
            t0 = time.monotonic()
            try:
                await SCENARIOS[name](cluster, report)
            except Stuck as exc:
                report.check(name, "scenario ran to its end", False, str(exc))
            print(f"   ({time.monotonic() - t0:.1f}s)")
        cluster.revive()
        await cluster.wait_ready()
        await print_books(cluster)
        finished = True
    finally:
        await cluster.close()
        if finished and not args.keep and args.workdir is None and not report.failed:
            shutil.rmtree(workdir, ignore_errors=True)
    failed = report.failed
    print(
        f"\n{len(report.checks) - len(failed)}/{len(report.checks)} checks passed in {time.monotonic() - started:.0f}s"
    )
    if failed:
        print("FAILED:\n" + report.summary() + f"\n(logs in {workdir})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
