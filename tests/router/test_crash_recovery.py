"""A router killed mid-request leaves holds open in its ledger; the next router on that file releases them."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from llamakit.router.ledger import ledger_at
from tests.support.fake_node import FakeNode, Script
from tests.support.herd import Herd

PROMPT = "one two three four"

# What a router does up to the moment it is killed: an account with money, one request settled and two
# requests holding credits, then SIGKILL, so nothing is closed, flushed or checkpointed.
KILLED_ROUTER = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from llamakit.router.ledger import ledger_at

    async def main() -> None:
        ledger = ledger_at(sys.argv[1])
        await ledger.open()
        account = await ledger.create_account("alice")
        print(await ledger.create_key(account.id), flush=True)
        await ledger.deposit(account.id, 1000)
        await ledger.hold(account.id, 100, request_id="req-done", model="fake-model")
        await ledger.settle("req-done", charge=60, node="n1", prompt_tokens=10, completion_tokens=20)
        await ledger.hold(account.id, 300, request_id="req-open-1", model="fake-model", bid="1")
        await ledger.hold(account.id, 250, request_id="req-open-2", model="fake-model", bid="1.5")
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main())
    """
)


async def killed_router(db: Path) -> str:
    """Run a 'router' that is killed with two holds open on `db`; returns alice's API key."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLED_ROUTER, str(db), stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).parents[2]
    )
    out, _ = await proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    return out.decode().strip()


async def test_startup_releases_the_holds_of_a_killed_router(
    herd: Herd, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = await killed_router(tmp_path / "ledger.db")
    async with ledger_at(tmp_path / "ledger.db") as before:  # what the killed router left: two open holds
        left = await before.books()
        assert (left.deposits, left.balances, left.holds, left.charges) == (1000, 390, 550, 60)

    caplog.set_level(logging.INFO)
    await herd.add_node(FakeNode("n1", script=Script(tokens=2)))
    router = await herd.start()
    assert "released 2 hold(s)" in caplog.text
    assert await herd.books() == {"deposits": 1000, "balances": 940, "holds": 0, "charges": 60, "balanced": True}
    async with httpx.AsyncClient(base_url=router.url, headers={"Authorization": f"Bearer {key}"}) as alice:
        account = (await alice.get("/v1/account")).json()
        assert (account["balance"], account["held"], account["spent"]) == (940, 0, 60)
        usage = {u["request_id"]: u for u in (await alice.get("/v1/account/usage")).json()["data"]}
        assert {r: (u["status"], u["cost_credits"], u["held"]) for r, u in usage.items()} == {
            "req-done": ("ok", 60, 100),
            "req-open-1": ("recovered", 0, 300),
            "req-open-2": ("recovered", 0, 250),
        }
        assert usage["req-open-2"]["bid"] == "1.5" and usage["req-open-1"]["error"]
        # The account works as before.
        resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
        assert resp.status_code == 200
        spent = int(resp.headers["X-Llamakit-Cost-Credits"])
        assert (await alice.get("/v1/account")).json()["balance"] == 940 - spent
    # Recovery released only what a dead router held: nothing was released twice, no stats were skewed.
    stats = (await herd.admin.get("/admin/stats")).json()  # type: ignore[union-attr]
    assert stats["fees"]["earned"] == 60 + spent and stats["fees"]["by_node"] == {"n1": 60 + spent}


async def test_a_restart_after_a_clean_stop_releases_nothing(herd: Herd, caplog: pytest.LogCaptureFixture) -> None:
    await herd.add_node(FakeNode("n1", script=Script(tokens=2)))
    router = await herd.start()
    alice = await herd.account("alice", 10_000)
    assert (await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})).status_code == 200
    before = await herd.books()
    await herd.admin.aclose()  # type: ignore[union-attr]
    await router.stop()
    caplog.set_level(logging.INFO)
    caplog.clear()
    await herd.start()
    assert "released" not in caplog.text
    assert await herd.books() == before
    usage = (await herd.admin.get("/admin/usage")).json()["data"]  # type: ignore[union-attr]
    assert [u["status"] for u in usage] == ["ok"]


async def test_holds_left_by_a_closed_ledger_are_released_too(herd: Herd, tmp_path: Path) -> None:
    # The same through an orderly close that skipped settling (a router whose shutdown was cut short).
    async with ledger_at(tmp_path / "ledger.db") as ledger:
        account = await ledger.create_account("bob")
        await ledger.deposit(account.id, 500)
        for i in range(3):
            await ledger.hold(account.id, 100, request_id=f"req-{i}", model="fake-model")
    await herd.add_node(FakeNode("n1"))
    await herd.start()
    assert herd.admin is not None
    bob = (await herd.admin.get("/admin/accounts/bob")).json()
    assert (bob["balance"], bob["held"], bob["spent"]) == (500, 0, 0)
    usage = (await herd.admin.get("/admin/usage")).json()["data"]
    assert sorted((u["request_id"], u["status"], u["cost_credits"]) for u in usage) == [
        (f"req-{i}", "recovered", 0) for i in range(3)
    ]
