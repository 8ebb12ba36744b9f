"""The llamakit SDK: paid llama.cpp inference from Python, with retries and usage you can put in pandas.

    from llamakit.sdk import generate, chat, embed, meter, usage_frame

    print(generate("The capital of France is", max_tokens=8))
    with meter() as m:
        answer = chat("Rate 1-5: I love it", grammar="root ::= [1-5]", temperature=0, bid="auto")
        vectors = embed(["a cat", "a kitten"]).vectors
    m.cost, m.cost_credits, usage_frame()  # the price in the router's currency, the credits charged
    batch = submit_batch(["Rate 1-5: great", "Rate 1-5: awful"], max_tokens=2)  # at the batch discount
    batch.wait(); batch.results()  # a progress bar, then one row per request: text, tokens, cost

After `llamakit up` it needs no setup; elsewhere set `LLAMAKIT_URL` and `LLAMAKIT_API_KEY`, or make a
`Client(url=..., api_key=...)`. Every call carries an idempotency key, is retried when that is safe, and
becomes a `UsageRecord`.
"""

from llamakit.sdk._batches import AsyncBatch, Batch, BatchCounts, BatchInfo, BatchUsage
from llamakit.sdk._calls import EmbedOptions, GenerateOptions, RequestOptions
from llamakit.sdk._client import AsyncClient, Client
from llamakit.sdk._default import (
    account,
    achat,
    aembed,
    agenerate,
    astream,
    astream_chat,
    asubmit_batch,
    chat,
    configure,
    default_client,
    embed,
    generate,
    generate_many,
    info,
    key,
    models,
    router_usage,
    stream,
    stream_chat,
    submit_batch,
    usage_frame,
    usage_records,
)
from llamakit.sdk._exceptions import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    ConflictError,
    InsufficientFunds,
    InternalServerError,
    LlamakitError,
    NotFoundError,
    PermissionDeniedError,
    QueueFullError,
    RateLimitError,
    SpendCapExceeded,
    StreamInterruptedError,
)
from llamakit.sdk._logprobs import TokenLogprob, TopLogprob
from llamakit.sdk._models import (
    Account,
    ApiKeyInfo,
    CostDetails,
    Embeddings,
    Fees,
    Generation,
    Info,
    KeyLimits,
    KeyRates,
    KeySpend,
    Model,
    ModelInfo,
    NodeCounts,
    PassedOver,
    Prices,
    PromptTokensDetails,
    RouterUsage,
    TokenUsage,
)
from llamakit.sdk._retry import RetryPolicy
from llamakit.sdk._streaming import AsyncStream, Stream
from llamakit.sdk._types import DEFAULT_TIMEOUT, NOT_GIVEN, NotGiven
from llamakit.sdk._usage import FRAME_DTYPES, Meter, UsageBook, UsageRecord, meter, read_usage_log

__all__ = [
    "DEFAULT_TIMEOUT",
    "FRAME_DTYPES",
    "NOT_GIVEN",
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "Account",
    "ApiKeyInfo",
    "AsyncBatch",
    "AsyncClient",
    "AsyncStream",
    "AuthenticationError",
    "BadRequestError",
    "Batch",
    "BatchCounts",
    "BatchInfo",
    "BatchUsage",
    "Client",
    "ConfigurationError",
    "ConflictError",
    "CostDetails",
    "EmbedOptions",
    "Embeddings",
    "Fees",
    "GenerateOptions",
    "Generation",
    "Info",
    "InsufficientFunds",
    "InternalServerError",
    "KeyLimits",
    "KeyRates",
    "KeySpend",
    "LlamakitError",
    "Meter",
    "Model",
    "ModelInfo",
    "NodeCounts",
    "NotFoundError",
    "NotGiven",
    "PassedOver",
    "PermissionDeniedError",
    "Prices",
    "PromptTokensDetails",
    "QueueFullError",
    "RateLimitError",
    "RequestOptions",
    "RetryPolicy",
    "RouterUsage",
    "SpendCapExceeded",
    "Stream",
    "StreamInterruptedError",
    "TokenLogprob",
    "TokenUsage",
    "TopLogprob",
    "UsageBook",
    "UsageRecord",
    "account",
    "achat",
    "aembed",
    "agenerate",
    "astream",
    "astream_chat",
    "asubmit_batch",
    "chat",
    "configure",
    "default_client",
    "embed",
    "generate",
    "generate_many",
    "info",
    "key",
    "meter",
    "models",
    "read_usage_log",
    "router_usage",
    "stream",
    "stream_chat",
    "submit_batch",
    "usage_frame",
    "usage_records",
]
