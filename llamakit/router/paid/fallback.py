"""Model fallbacks, as OpenRouter's `models: [...]`: the models a request may be served by, in order, and passing
over one for the next when it cannot serve the request before its first token (no node, draining everywhere, its
queue full, or every node of it failing before the first token). The hold covers the dearest of them; the charge
is at the fees of the one that served (docs/money.md#model-fallbacks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote

from llamakit.money.fees import FeeSchedule
from llamakit.router.affinity import PrefixMap
from llamakit.router.dispatch.errors import DispatchError, NoNode, QueueFull, QueueShareExceeded

if TYPE_CHECKING:  # request.py keeps a request's candidates and what was passed over: these types
    from llamakit.router.paid.request import PaidRequest
    from llamakit.router.state import RouterState

__all__ = ["PASS_OVER", "Candidate", "PassedOver", "pass_over", "passed_over_header"]

# The dispatcher's refusals that send a request on to its next model. A queue timeout is not among them: the
# request has waited its whole --queue-timeout already, which the next model would have to share.
PASS_OVER: tuple[type[DispatchError], ...] = (NoNode, QueueFull, QueueShareExceeded)


@dataclass(frozen=True)
class Candidate:
    """A model a request may still be served by, with the fees it would be charged at."""

    model: str
    fees: FeeSchedule


@dataclass(frozen=True)
class PassedOver:
    """A model that did not serve the request: `reason` is the error code (`no_node`, `queue_full` …), `message`
    what it said."""

    model: str
    reason: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"model": self.model, "reason": self.reason, "message": self.message}


def pass_over(state: RouterState, paid: PaidRequest, exc: DispatchError) -> bool:
    """`paid.model` cannot serve the request (`exc`): note it and make the request the next model's, passing over
    those its quote found unfit already (unknown, not allowed to the key, too small a context). False when no
    model is left to try: then `exc` is the request's answer, and `passed_over` names every other model."""
    skipped: list[PassedOver] = []
    while paid.candidates:
        following = paid.candidates.pop(0)
        if isinstance(following, PassedOver):
            skipped.append(following)
            continue
        # The dispatcher's "nothing was charged" is about the request as it would have ended there; it goes on.
        message = exc.message.removesuffix("; nothing was charged")
        paid.passed_over += [PassedOver(paid.model, exc.code, message), *skipped]
        paid.model, paid.fees = following.model, following.fees
        paid.body["model"] = following.model
        if paid.text is not None:  # a node's cache is kept apart by model: the next one's prefix is another chain
            paid.chain = PrefixMap.chain((following.model, paid.account.id), paid.text)
            paid.affinity = state.prefixes.holder(paid.chain) if paid.chain else None
        return True
    paid.passed_over += skipped
    return False


def passed_over_header(passed: list[PassedOver]) -> str:
    """The `X-Llamakit-Passed-Over` value: `<model>=<reason>, …` with each model percent-encoded."""
    return ", ".join(f"{quote(p.model, safe='')}={p.reason}" for p in passed)
