"""Test support: fixed stats shaped like the router's, a source that replays them, and reading the screen."""

from __future__ import annotations

import asyncio
import html
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from textual.app import App
from textual.pilot import Pilot

from llamakit.tui import RouterUnreachable

# 2026-01-02 12:00:00 UTC: the tests that look at clock times run with TZ=UTC.
NOW = 1767355200.0


def _key(
    account: str,
    prefix: str,
    limits: dict[str, Any],
    *,
    name: str | None = None,
    today: int = 0,
    held: int = 0,
    expired: bool = False,
) -> dict[str, Any]:
    """A key with limits as the router's stats show it (`keys.key_view`)."""
    every = [
        "spend_cap",
        "spend_cap_day",
        "spend_cap_month",
        "rpm_limit",
        "tpm_limit",
        "max_parallel_requests",
        "expires_at",
        "models",
    ]
    return {
        "account": account, "prefix": prefix, "name": name, "created": NOW - 86_400, "revoked": None, "active": True,
        "expired": expired, "limits": {**dict.fromkeys(every), **limits},
        "spend": {"total": today, "today": today, "this_month": today, "held": held},
    }  # fmt: skip


def fixed_snapshot(
    *, nodes: int = 4, at: float = NOW, depth: int = 3, fees_per_minute: float = 1240.0
) -> dict[str, Any]:
    """A router snapshot with `nodes` nodes, two models, a queue, fees, agents, accounts, refusals and recent
    requests (two of them refused)."""
    models = ["smollm2-135m-instruct", "gemma-3-270m"]
    states = ["ready", "ready", "draining", "down"]
    node_list = []
    for i in range(nodes):
        slots = 4 if i % 2 == 0 else 2
        state = states[i % 4] if i < 4 else "ready"
        busy = {0: 4, 1: 1}.get(i, 0) if state == "ready" else 0
        node_list.append(
            {
                "id": f"{models[i % 2]}-{i // 2 + 1}",
                "name": f"{models[i % 2]}-{i // 2 + 1}",
                "url": f"http://10.0.0.{i + 1}:9000",
                "models": [models[i % 2]],
                "state": state,
                "slots": slots,
                "busy": busy,
                "tokens_per_second": round(12.5 + i * 0.75, 2),
                "requests": 100 * (i + 1) + 7,
                "fees_earned": 12_345 * (i + 1),
                "last_seen": at - (0.5 if state != "down" else 95.0),
                "static": False,
            }
        )
    recent = []
    refusals = {3: ("insufficient_funds", 402), 8: ("model_not_found", 404)}
    for j in range(12):
        status, http_status = refusals.get(j, ("ok" if j % 5 else "error", None))
        ran = http_status is None
        recent.append(
            {
                "time": at - 60 + j * 5,
                "request_id": f"req-{j:02d}{'7f3e9a2c5b81d4e6' * 2}"[:36],
                "account": ["alice", "trader-bot", "dev"][j % 3],
                "model": models[j % 2],
                "node": f"{models[j % 2]}-1" if status == "ok" else None,
                "status": status,
                "http_status": http_status,
                "prompt_tokens": 20 + j if ran else 0,
                "completion_tokens": 64 if status == "ok" else 0,
                "cost_credits": 158 + j if status == "ok" else 0,
                "cost": (158 + j) / 10**6 if status == "ok" else 0.0,
                "currency": "USD",
                "held": 600 if ran else 0,
                "bid": ["1", "1.5", "1.05", "2"][j % 4] if ran else "1",
                "latency_ms": 420.5 + j * 10 if ran else None,
                "queue_ms": 3.0 + 250 * (j % 4) if ran else None,
                "ttft_ms": 95.0 + j if ran and j % 2 else None,
                "user": f"user-{j % 4}",
                "error": {"ok": None, "error": "node failed"}.get(status, "refused"),
            }
        )
    return {
        "time": at,
        "uptime": 3600.0,
        "currency": "USD",
        "credit_value": 1e-06,
        "credit_value_exact": "0.000001",
        "nodes": node_list,
        "queue": {
            "total": depth + 1,
            "last_multiplier": 1.05,
            "last_multiplier_exact": "1.05",
            "models": {
                "smollm2-135m-instruct": {"depth": depth, "oldest_wait": 4.2},
                "gemma-3-270m": {"depth": 1, "oldest_wait": 0.8},
            },
        },
        "fees": {"earned": 1_234_567, "per_minute": fees_per_minute, "by_node": {"smollm2-135m-instruct-1": 12_345}},
        "books": {"deposits": 5_000_000, "balances": 3_765_433, "holds": 0, "charges": 1_234_567, "balanced": True},
        "requests": {
            "by_status": {"ok": 1180, "error": 12, "cut": 3, "insufficient_funds": 5, "model_not_found": 1},
            "total": 1201,
            "latency_ms": {"p50": 412.0, "p90": 980.5, "p99": 2210.0},
            "recent": recent,
        },
        "accounts": [
            {
                "id": 1,
                "name": "alice",
                "kind": "user",
                "balance": 48_210,
                "held": 600,
                "spent": 1_790,
                "requests": 14,
                "refusals": 0,
                "last_seen": at - 5,
            },
            {
                "id": 2,
                "name": "trader-bot",
                "kind": "agent",
                "balance": 0,
                "held": 0,
                "spent": 25_000,
                "requests": 92,
                "refusals": 5,
                "last_seen": at - 20,
            },
            {
                "id": 3,
                "name": "dev",
                "kind": "user",
                "balance": 1_000_000,
                "held": 0,
                "spent": 0,
                "requests": 1,
                "refusals": 1,
                "last_seen": at - 3_600,
            },
            {
                "id": 4,
                "name": "idle-co",
                "kind": "user",
                "balance": 5_000,
                "held": 0,
                "spent": 0,
                "requests": 0,
                "refusals": 0,
                "last_seen": None,
            },
        ],
        "refusals": {"today": 6, "by_status": {"insufficient_funds": 5, "model_not_found": 1}},
        "keys": [
            _key(
                "alice",
                "lk-Ab3dE",
                {"spend_cap_day": 2_000, "rpm_limit": 60},
                name="alice's laptop",
                today=1_790,
                held=150,
            ),
            _key(
                "trader-bot",
                "lk-Xy9zQ",
                {
                    "spend_cap_month": 100_000,
                    "tpm_limit": 20_000,
                    "models": ["smollm2-135m-instruct"],
                    "expires_at": at + 30 * 86_400,
                },
                name="trading bot (live account)",
                today=25_000,
            ),
            _key("dev", "lk-Dev01", {"max_parallel_requests": 4}, expired=True),
        ],
        "agents": {
            "trader-bot": {
                "counts": {"request": 40, "buy": 22, "skip": 15, "error": 3},
                "total": 80,
                "position": 7,
                "pnl": 182.5,
                "last": at - 2,
            },
            "vol-bot": {
                "counts": {"request": 12, "buy": 2, "skip": 9, "error": 1},
                "total": 24,
                "position": -2,
                "pnl": -41.25,
                "last": at - 30,
            },
        },
    }


def fixed_series(count: int = 30, *, nodes: int = 4, step: float = 10.0) -> list[dict[str, Any]]:
    """`count` snapshots `step` seconds apart ending at NOW, with a queue and fee rate that rise and fall."""
    shape = [0, 1, 2, 4, 6, 8, 6, 3, 1, 0, 2, 5]
    return [
        fixed_snapshot(
            nodes=nodes,
            at=NOW - (count - 1 - k) * step,
            depth=shape[k % len(shape)],
            fees_per_minute=600.0 + 80.0 * shape[(k + 3) % len(shape)],
        )
        for k in range(count)
    ]


class FixedSource:
    """Replays snapshots (every `delay` seconds), then holds the connection open, as a quiet router would."""

    def __init__(self, snapshots: Sequence[dict[str, Any]], *, delay: float = 0.0) -> None:
        self.snapshots = list(snapshots)
        self.delay = delay
        self.drained: list[str] = []
        self.undrained: list[str] = []
        self.url = "http://router.test:8080"

    async def follow(self) -> AsyncIterator[dict[str, Any]]:
        for snapshot in self.snapshots:
            yield snapshot
            if self.delay:
                await asyncio.sleep(self.delay)
        await asyncio.Event().wait()

    async def drain(self, node_id: str) -> dict[str, Any]:
        self.drained.append(node_id)
        return {"id": node_id, "state": "draining"}

    async def undrain(self, node_id: str) -> dict[str, Any]:
        self.undrained.append(node_id)
        return {"id": node_id, "state": "ready"}


async def wait_until(pilot: Pilot[Any], check: Callable[[], object], *, within: float = 10.0, what: str = "") -> None:
    """Let the app run until `check()` is true; fail with `what` (and the screen) after `within` seconds."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not so after {within}s: {what or check}\n{screen_text(pilot.app)}")
        await pilot.pause(0.05)
    await pilot.pause()  # and let the screen catch up, for what a test reads from it next


TEXT_ELEMENT = re.compile(
    r'<text [^>]*x="([\d.]+)" y="[\d.]+" textLength="([\d.]+)"[^>]*'
    r'clip-path="url\(#[\w-]+-line-(\d+)\)">([^<]*)</text>'
)


def screen_text(app: App[Any]) -> str:
    """The screen as plain text, one line per terminal row (read back from Textual's SVG export)."""
    return svg_text(app.export_screenshot())


def svg_text(svg: str) -> str:
    """The text of a Textual SVG screenshot, one line per terminal row."""
    rows: dict[str, dict[int, str]] = {}
    char_width = None
    for match in TEXT_ELEMENT.finditer(svg):
        x, length, line, content = float(match[1]), float(match[2]), match[3], html.unescape(match[4])
        if content and char_width is None and len(content) == 1:
            char_width = length
        rows.setdefault(line, {})[round(x * 1000)] = content
    width = char_width or 12.2
    lines = []
    for line in sorted(rows, key=int):
        chars: list[str] = []
        for x1000, content in sorted(rows[line].items()):
            col = round(x1000 / 1000 / width)
            chars.extend(" " * (col - len(chars)))
            chars[col : col + len(content)] = content
        lines.append("".join(chars).replace("\xa0", " ").rstrip())
    return "\n".join(lines)


class FailingSource(FixedSource):
    """Gives its snapshots once, then the router is gone for good."""

    def __init__(self, snapshots: Sequence[dict[str, Any]], url: str = "http://router.test:8080") -> None:
        super().__init__(snapshots)
        self.url = url
        self.calls = 0

    async def follow(self) -> AsyncIterator[dict[str, Any]]:
        self.calls += 1
        if self.calls == 1:
            for snapshot in self.snapshots:
                yield snapshot
        raise RouterUnreachable(f"Router unreachable at {self.url}: cannot connect ([Errno 111] Connection refused).")
