"""The paid path: one request from its arrival to its settlement, by job.

    endpoint.py     authenticate, read the body, refusals on record, once per idempotency key, quote, serve
    quote.py        the model, the bid and the most the request can cost; the key's limits; the hold
    request.py      PaidRequest: a priced request with an open hold, and the charge for its tokens (its Bill)
    fallback.py     a request's `models`: the next model when one cannot serve it, and what was passed over
    serve.py        a node slot from the dispatcher, the node's whole answer, failover before the first token
    relay.py        a stream passed on token by token; what it delivered; its transcript
    settle.py       settle on the exact tokens (or what a cut stream delivered), or refund in full
    record.py       the usage record of every outcome, refusals included
    idempotency.py  claims, remembered answers and their replay

The hold is closed exactly once on every path (see settle.py). Nothing is imported here: import the module.
"""
