"""Idempotency claims in the database: a repeat at any router waits for the first, wherever it runs."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from llamakit.router.dispatch.cluster._base import (
    CLAIM_POLL_SECONDS,
    CLAIM_WAIT_SECONDS,
)
from llamakit.router.ledger import Ledger, Remembered
from llamakit.router.paid.idempotency import Claim, Fingerprint, Idempotency, KeyInUse
from llamakit.router.tracing import RequestTrace

if TYPE_CHECKING:
    from llamakit.router.dispatch.cluster import Cluster

__all__ = ["ClusterIdempotency"]


class ClusterIdempotency(Idempotency):
    """Idempotency claims in the database: a repeat at any router waits for the first, wherever it runs.

    The answer is remembered in the ledger with the charge (as for one router); the claim (account, key,
    router) says that the first request is running. A repeat polls every `CLAIM_POLL_SECONDS` for the
    remembered answer or the claim's end; the claims of a router whose lease ran out are dropped by the janitor.
    """

    def __init__(self, ledger: Ledger, cluster: Cluster) -> None:
        super().__init__(ledger)
        self.cluster = cluster

    async def claim(
        self, account_id: int, key: str, print_: Fingerprint, trace: RequestTrace | None = None
    ) -> Claim | Remembered:
        """As Idempotency.claim; a repeat polls (every CLAIM_POLL_SECONDS, slowing to a second) for at most
        CLAIM_WAIT_SECONDS, then gets 409 `idempotency_key_in_use`: a client that left does not poll forever."""
        pool = self.cluster._db()
        deadline = time.monotonic() + CLAIM_WAIT_SECONDS
        pause = CLAIM_POLL_SECONDS
        while True:
            remembered = await self.ledger.recall(account_id, key)
            if remembered is not None:
                self._check(remembered.fingerprint, print_)
                return remembered
            # A claim only while no answer is remembered, in one statement: the first request remembers its answer
            # and then gives up its claim, and a repeat that looked for the answer just before could otherwise
            # claim the key just after, and run (and be charged) again.
            row = await pool.fetchrow(
                "WITH mine AS (INSERT INTO idempotency_claims (account_id, key, fingerprint, router_id) "
                "SELECT $1, $2, $3, $4 WHERE NOT EXISTS "
                "(SELECT 1 FROM idempotency WHERE account_id = $1 AND key = $2) "
                "ON CONFLICT DO NOTHING RETURNING fingerprint, true AS ours) "
                "SELECT fingerprint, ours FROM mine UNION ALL "
                "SELECT fingerprint, false FROM idempotency_claims WHERE account_id = $1 AND key = $2",
                account_id, key, print_.value, self.cluster.id,
            )  # fmt: skip
            if row is not None and row["ours"]:
                return Claim(account_id, key, print_)
            if row is not None:
                self._check(row["fingerprint"], print_)
            if time.monotonic() + pause > deadline:
                raise KeyInUse(
                    f"a request with this Idempotency-Key has been running for {CLAIM_WAIT_SECONDS:.0f} s; "
                    "retry later to get its answer"
                )
            asked = time.monotonic()
            await asyncio.sleep(pause)
            if trace is not None:  # waiting for the first request is not the router's own time
                trace.waited += time.monotonic() - asked
            pause = min(pause * 1.5, 1.0)

    def release(self, claim: Claim) -> None:
        cluster = self.cluster
        cluster._spawn(
            cluster._until_done(
                f"ending the claim of idempotency key {claim.key!r}",
                lambda: cluster._db().execute(
                    "DELETE FROM idempotency_claims WHERE account_id = $1 AND key = $2 AND router_id = $3",
                    claim.account_id,
                    claim.key,
                    cluster.id,
                ),
            )
        )
