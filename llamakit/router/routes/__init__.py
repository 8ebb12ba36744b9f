"""The router's HTTP routes, one module per part; each handler is short, the work is in `paid/`, `dispatch/` and
the ledger.

    openai.py       the tenant's OpenAI-compatible API: chat and text completions, models, info, account, events
    embeddings.py   POST /v1/embeddings
    responses.py    POST /v1/responses (OpenAI's Responses API, served as a chat completion)
    admin.py        the operator's routes under /admin/ and the nodes' under /herd/ (sub-apps, see router/auth.py)
    admin_keys.py   the operator's routes for API keys and their limits
    usage_pages.py  the paging of usage records shared by the tenant's and the operator's usage routes
"""
