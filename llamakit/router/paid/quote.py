"""Quote a request and hold the most it can cost: its model and bid, the key's limits, the hold.

The hold is the quote for the prompt bound and the full token limit (docs/money.md): nothing is queued before
it is held, and a request refused here leaves nothing held or counted.
"""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

from aiohttp import web

from llamakit.money.fees import format_bid, hold_amount, parse_bid, prompt_token_bound, raw_prompt_token_bound
from llamakit.router.affinity import PrefixMap, chat_text
from llamakit.router.ledger import MAX_AMOUNT, InsufficientFunds, LedgerUnavailable, SpendCapExceeded
from llamakit.router.limits import Admission, Caller
from llamakit.router.paid.fallback import Candidate, PassedOver, passed_over_header
from llamakit.router.paid.idempotency import Claim
from llamakit.router.paid.request import PaidRequest, new_request_id
from llamakit.router.state import RouterState
from llamakit.router.tracing import PROVIDER, AttributeValue, RequestTrace, operation_of
from llamakit.wire.completions import ChatCompletionRequest, GenerationRequest
from llamakit.wire.embeddings import EmbeddingRequest
from llamakit.wire.errors import ApiError
from llamakit.wire.headers import BID_HEADER, PASSED_OVER_HEADER

__all__ = [
    "EMBEDDINGS_PATH",
    "hold_credits",
    "known_model",
    "model_not_allowed",
    "quote_embeddings",
    "quote_generation",
    "request_bid",
    "request_model",
]

EMBEDDINGS_PATH = "/v1/embeddings"


async def quote_generation(
    state: RouterState,
    request: web.Request | None,
    caller: Caller,
    req: GenerationRequest,
    data: dict[str, Any],
    path: str,
    claim: Claim | None = None,
    trace: RequestTrace | None = None,
    *,
    discount: Decimal | None = None,
) -> PaidRequest:
    """Validate what only the router knows (model, bid, token limit), then hold the most a chat or text completion
    can cost: on the dearest of its models when it names `models` (fallback.py). `data` is the request's JSON;
    `path` the node's route; `trace` times (and traces) the request. A batch line has no `request` and is priced
    at `discount` × its price (see `hold_credits`)."""
    settings = state.settings
    trace = trace or RequestTrace()
    bid = request_bid(request, req.bid)
    max_tokens = req.token_limit or settings.default_max_tokens
    if max_tokens > settings.max_tokens_limit:
        field = "max_tokens" if req.max_tokens is not None else "max_completion_tokens"
        raise ApiError(
            400,
            f"{field} is {max_tokens}; the most this router allows is {settings.max_tokens_limit}",
            param=field,
            code="invalid_value",
        )
    if isinstance(req, ChatCompletionRequest):
        # What the node's template will render: tools offered, earlier calls and their results included.
        rendered = req.template_messages()
        texts = [m["content"] for m in rendered]
        bound = prompt_token_bound(texts, messages=len(texts))
        text = chat_text([(m["role"], m["content"]) for m in rendered])
    else:
        text = data["prompt"] if isinstance(data["prompt"], str) else data["prompt"][0]
        bound = raw_prompt_token_bound(text)
    first, first_bound, rest, passed = _candidates(state, caller, req.model_names(), bound, max_tokens)
    priced = [(first, first_bound), *((c, b) for c, b in rest if isinstance(c, Candidate))]
    held = max(hold_amount(c.fees, bid, prompt_bound, max_tokens, discount=discount) for c, prompt_bound in priced)
    _quoted(trace, path, first.model, bid, held, max_tokens=max_tokens, stream=req.stream)
    request_id, admission = await hold_credits(
        state, caller, held, model=first.model, bid=bid, user=req.user,
        tokens=max(prompt_bound for _, prompt_bound in priced) + max_tokens, trace=trace, discount=discount,
    )  # fmt: skip
    # `null` means "not given" (OpenAI's fields are nullable): the node gets the field's default by its absence.
    dropped = ("bid", "max_completion_tokens", "usage", "models")
    body = {k: v for k, v in data.items() if v is not None and k not in dropped}
    body["model"], body["max_tokens"] = first.model, max_tokens
    if req.stream:
        # Always ask the node for usage: it is what the request is settled on.
        body["stream_options"] = {"include_usage": True}
    chain = PrefixMap.chain((first.model, caller.account.id), text) if settings.affinity else []
    return PaidRequest(
        id=request_id,
        account=caller.account,
        admission=admission,
        key_prefix=caller.key.prefix,
        model=first.model,
        path=path,
        body=body,
        bid=bid,
        fees=first.fees,
        held=held,
        stream=req.stream,
        include_usage=req.include_usage,
        arrived=time.monotonic(),
        claim=claim,
        trace=trace,
        text=text if settings.affinity else None,
        user=req.user or None,
        chain=chain,
        affinity=state.prefixes.holder(chain) if chain else None,
        fallbacks=bool(req.models),
        candidates=[c for c, _ in rest],
        passed_over=passed,
        discount=discount,
    )


def _candidates(
    state: RouterState, caller: Caller, names: list[str | None], bound: int, max_tokens: int
) -> tuple[Candidate, int, list[tuple[Candidate | PassedOver, int]], list[PassedOver]]:
    """The first model that may serve a request, with its prompt bound; those after it, in the request's order,
    each with its prompt bound, or passed over already; and those passed over before it. A model is passed over
    here when it is unknown (404 `model_not_found`), the key may not use it (403 `model_not_allowed`) or
    `max_tokens` fills its context (400 `context_length_exceeded`); when every model is, the last one's error is
    raised, naming the others."""
    outcomes: list[tuple[Candidate | PassedOver, int]] = []
    refusals: list[ApiError] = []
    for name in names:
        try:
            model = known_model(state, name)
            if not caller.limits.allows_model(model):
                raise model_not_allowed(caller, model)
            prompt_bound = _prompt_bound(state, model, bound, max_tokens)
            outcomes.append((Candidate(model, state.prices.fees(model)), prompt_bound))
        except ApiError as exc:
            outcomes.append((PassedOver(name or "", exc.code or exc.type, exc.message), 0))
            refusals.append(exc)
    served = [i for i, (c, _) in enumerate(outcomes) if isinstance(c, Candidate)]
    if not served:
        others = [p for p, _ in outcomes[:-1] if isinstance(p, PassedOver)]
        if others:
            refusals[-1].message += "; the other models were passed over: " + ", ".join(
                f"{p.model} ({p.reason})" for p in others
            )
            refusals[-1].extra["passed_over"] = [p.as_dict() for p in others]
            refusals[-1].headers[PASSED_OVER_HEADER] = passed_over_header(others)
        raise refusals[-1]
    at = served[0]
    first, first_bound = outcomes[at]
    assert isinstance(first, Candidate)
    before = [p for p, _ in outcomes[:at] if isinstance(p, PassedOver)]
    return first, first_bound, outcomes[at + 1 :], before


async def quote_embeddings(
    state: RouterState,
    request: web.Request | None,
    caller: Caller,
    req: EmbeddingRequest,
    data: dict[str, Any],
    claim: Claim | None = None,
    trace: RequestTrace | None = None,
    *,
    discount: Decimal | None = None,
) -> PaidRequest:
    """Hold the most embeddings can cost: `ceil(bid × (base_fee + prompt_token_fee × bound))`, where the bound is
    exact for token ids and UTF-8 bytes plus an allowance per text (`EmbeddingRequest.token_bound`); × `discount`
    for a batch line (no `request`)."""
    trace = trace or RequestTrace()
    model, bid = request_model(state, request, req.model, req.bid)
    fees = state.prices.fees(model)
    bound = req.token_bound()
    held = hold_amount(fees, bid, bound, 0, discount=discount)
    _quoted(trace, EMBEDDINGS_PATH, model, bid, held, max_tokens=None, stream=False)
    request_id, admission = await hold_credits(
        state, caller, held, model=model, bid=bid, user=req.user, tokens=bound, trace=trace, discount=discount
    )
    body = {k: v for k, v in data.items() if v is not None and k != "bid"}
    body["model"] = model
    return PaidRequest(
        id=request_id,
        account=caller.account,
        admission=admission,
        key_prefix=caller.key.prefix,
        model=model,
        path=EMBEDDINGS_PATH,
        body=body,
        bid=bid,
        fees=fees,
        held=held,
        stream=False,
        include_usage=False,
        arrived=time.monotonic(),
        claim=claim,
        trace=trace,
        user=req.user or None,
        discount=discount,
    )


def _quoted(
    trace: RequestTrace, path: str, model: str, bid: Decimal, held: int, *, max_tokens: int | None, stream: bool
) -> None:
    """The request's span gets its GenAI name and what it asks for."""
    if not trace.on:
        return
    operation = operation_of(path)
    trace.rename(f"{operation} {model}")
    attributes: dict[str, AttributeValue] = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": PROVIDER,
        "gen_ai.request.model": model,
        "llamakit.bid": format_bid(bid),
        "llamakit.credits.held": held,
        "llamakit.stream": stream,
    }
    if max_tokens is not None:
        attributes["gen_ai.request.max_tokens"] = max_tokens
    trace.set(attributes)


def _prompt_bound(state: RouterState, model: str, bound: int, max_tokens: int) -> int:
    """The most prompt tokens the request can be charged for: `bound`, from its bytes (see
    fees.prompt_token_bound), and no more than the context leaves beside `max_tokens` on the largest node
    serving the model, since a node refuses (400 context_length_exceeded, nothing charged) a prompt that does
    not fit. 400 when `max_tokens` alone fills that context."""
    context = state.herd.context(model)
    if context is None:  # a node that has not said its context yet: the bytes alone
        return bound
    if max_tokens >= context:
        raise ApiError(
            400,
            f"max_tokens is {max_tokens}, but {model!r} holds {context} tokens per request, prompt included: "
            "ask for fewer",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return min(bound, context - max_tokens)


def request_model(
    state: RouterState, request: web.Request | None, model: str | None, bid: object
) -> tuple[str, Decimal]:
    """The model a request names (or the default) and its validated bid (body field, else `X-Llamakit-Bid`):
    400 for a bad bid, 404 naming the models served for an unknown model."""
    return known_model(state, model), request_bid(request, bid)


def request_bid(request: web.Request | None, bid: object) -> Decimal:
    """A request's validated bid: its body field, else `X-Llamakit-Bid` (a batch line has no `request`), else 1;
    400 `invalid_bid`."""
    header = request.headers.get(BID_HEADER) if request is not None else None
    raw_bid: object = bid if bid is not None else (header if header is not None else 1)
    try:
        return parse_bid(raw_bid)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="bid", code="invalid_bid") from exc


def known_model(state: RouterState, model: str | None) -> str:
    """`model`, or the router's default when None; 404 `model_not_found` naming the models served."""
    name = model or state.default_model()
    if name is None or not state.knows_model(name):
        known = state.known_models()
        available = ", ".join(known) or "none (no node has joined yet)"
        raise ApiError(
            404,
            f"model {name!r} does not exist here; available models: {available}",
            type="not_found_error",
            code="model_not_found",
            param="model",
        )
    return name


def model_not_allowed(caller: Caller, model: str) -> ApiError:
    allowed = ", ".join(caller.limits.models or ())
    return ApiError(
        403,
        f"this API key may not use model {model!r}; it may use: {allowed}",
        type="permission_error",
        code="model_not_allowed",
        param="model",
    )


async def hold_credits(
    state: RouterState,
    caller: Caller,
    amount: int,
    *,
    model: str,
    bid: Decimal,
    user: str | None,
    tokens: int,
    trace: RequestTrace | None = None,
    discount: Decimal | None = None,
) -> tuple[str, Admission]:
    """Let a new request in under its key's limits and hold `amount` credits for it; returns its id and its
    admission (to finish when it ends). `tokens` is the most it may use (prompt bound and max_tokens), which
    counts against the key's tpm_limit while it runs. A batch line (`discount` given) is held at bid × discount
    and counted in the key's batch window, apart from its interactive requests (limits.KeyRates): the batch
    runner puts a line refused for it back to wait. Nothing is held or counted when it is refused:

    - 403 `model_not_allowed` when the key may not use `model`;
    - 429 `rate_limit_exceeded` with Retry-After over the key's rate or concurrency limits (see limits.py);
    - InsufficientFunds (402 `insufficient_funds`) when the balance is short;
    - SpendCapExceeded (402 `spend_cap_exceeded`) past one of the key's caps;
    - LedgerUnavailable (503 `ledger_unavailable`) when the ledger cannot be written (see ledger_gate.py);
    - 400 `hold_too_large` when `amount` is more than the ledger can hold (MAX_AMOUNT): no balance could pay it.
    """
    if amount > MAX_AMOUNT:  # fees near the bound and a long prompt: the ledger would refuse it with a ValueError
        raise ApiError(
            400,
            f"this request could cost up to {amount} credits at bid {format_bid(bid)}, more than the ledger can hold "
            f"({MAX_AMOUNT}): ask for fewer max_tokens, send a shorter prompt or bid less",
            param="max_tokens",
            code="hold_too_large",
        )
    trace = trace or RequestTrace()
    with trace.span("llamakit.limits"):
        if not caller.limits.allows_model(model):
            raise model_not_allowed(caller, model)
        admission = state.rates.admit(caller, tokens, batch=discount is not None)
    request_id = new_request_id()
    try:
        with trace.span("llamakit.hold", {"llamakit.credits.held": amount}):
            await state.ledger.hold(
                caller.account.id, amount, request_id=request_id, model=model,
                bid=bid if discount is None else bid * discount, user=user or None, key_hash=caller.key_hash,
            )  # fmt: skip
    except (InsufficientFunds, SpendCapExceeded, LedgerUnavailable):
        admission.cancel()  # refused before anything was done: it counts towards no rate limit
        raise
    except BaseException:
        admission.finish()
        raise
    return request_id, admission
