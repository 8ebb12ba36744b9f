"""The public surface: exactly what `llamakit.sdk` exports, its exception tree, and what importing it needs."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap

import llamakit.sdk as sdk
from llamakit.sdk import _exceptions

PUBLIC = [
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


def _isort_key(name: str) -> tuple[int, str]:
    # Constants, then classes, then functions (the order ruff's RUF022 keeps).
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


def test_all_is_exactly_the_public_surface_sorted() -> None:
    assert sdk.__all__ == PUBLIC
    assert sorted(PUBLIC, key=_isort_key) == PUBLIC
    for name in PUBLIC:
        obj = getattr(sdk, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"{name} has no docstring"
    defined = [
        getattr(sdk, n) for n in PUBLIC if inspect.isclass(getattr(sdk, n)) or inspect.isfunction(getattr(sdk, n))
    ]
    assert all(obj.__module__.startswith("llamakit.sdk._") for obj in defined), "defined in private modules"


def test_the_exception_tree_is_the_one_drawn_in_its_module() -> None:
    tree = _exceptions.__doc__ or ""
    parents = {
        sdk.ConfigurationError: sdk.LlamakitError,
        sdk.APIError: sdk.LlamakitError,
        sdk.APIConnectionError: sdk.APIError,
        sdk.APITimeoutError: sdk.APIConnectionError,
        sdk.APIResponseValidationError: sdk.APIError,
        sdk.StreamInterruptedError: sdk.APIError,
        sdk.APIStatusError: sdk.APIError,
        sdk.BadRequestError: sdk.APIStatusError,
        sdk.AuthenticationError: sdk.APIStatusError,
        sdk.InsufficientFunds: sdk.APIStatusError,
        sdk.SpendCapExceeded: sdk.InsufficientFunds,
        sdk.PermissionDeniedError: sdk.APIStatusError,
        sdk.NotFoundError: sdk.APIStatusError,
        sdk.ConflictError: sdk.APIStatusError,
        sdk.RateLimitError: sdk.APIStatusError,
        sdk.QueueFullError: sdk.RateLimitError,
        sdk.InternalServerError: sdk.APIStatusError,
    }
    for cls, parent in parents.items():
        assert cls.__bases__ == (parent,), cls
        assert cls.__name__ in tree
    exported = {getattr(sdk, n) for n in PUBLIC if n.endswith(("Error", "Funds", "Exceeded"))}
    assert exported == set(parents) | {sdk.LlamakitError}


def test_importing_the_sdk_needs_neither_llama_cpp_nor_textual_nor_the_router() -> None:
    script = textwrap.dedent(
        """
        import sys
        for name in ("llama_cpp", "textual", "aiohttp", "tqdm"):
            sys.modules[name] = None  # importing any of them now fails
        import llamakit.sdk
        from llamakit.sdk import Client, meter, usage_frame
        assert "pandas" not in sys.modules, "pandas is imported only when a frame is asked for"
        assert len(usage_frame()) == 0 and "pandas" in sys.modules
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
