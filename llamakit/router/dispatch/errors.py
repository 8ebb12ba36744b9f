"""Why a request got no node: the dispatcher's own exceptions, raised by both implementations.

    DispatchError
     ├── NoNode                no node that is up and not draining serves the model (or all of them failed it)
     ├── QueueFull             the model's queue holds --max-queue requests already
     ├── QueueShareExceeded    the account holds its share of the model's queue (--max-queue-share)
     ├── QueueTimeout          no slot came free within --queue-timeout
     └── LeaseLost             (--cluster) this router's lease ran out while the request waited: its hold is gone

The route layer turns each into its HTTP status and OpenAI error body (`llamakit.router.errors`); `code` is the
error code the client sees and the usage record's status, `retry_after` the seconds a client should wait.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = ["DispatchError", "LeaseLost", "NoNode", "QueueFull", "QueueShareExceeded", "QueueTimeout"]


class DispatchError(Exception):
    code: ClassVar[str]
    retry_after: ClassVar[int]

    def __init__(self, message: str, *, model: str) -> None:
        super().__init__(message)
        self.message = message
        self.model = model


class NoNode(DispatchError):
    code = "no_node"
    retry_after = 5


class QueueFull(DispatchError):
    code = "queue_full"
    retry_after = 2


class QueueShareExceeded(DispatchError):
    code = "queue_share_exceeded"
    retry_after = 2


class QueueTimeout(DispatchError):
    code = "queue_timeout"
    retry_after = 1


class LeaseLost(DispatchError):
    code = "router_lease_lost"
    retry_after = 1


def no_node_now(model: str) -> NoNode:
    return NoNode(f"no node is available for model {model!r} right now; nothing was charged", model=model)


def queue_full(model: str, max_queue: int) -> QueueFull:
    return QueueFull(f"the queue for {model!r} is full ({max_queue} waiting); retry later or bid higher", model=model)


def queue_share_exceeded(model: str, waiting: int | str, max_per_account: int, max_queue: int) -> QueueShareExceeded:
    return QueueShareExceeded(
        f"this account already has {waiting} requests waiting for {model!r}, its share of "
        f"the queue ({max_per_account} of {max_queue}); retry when some are served",
        model=model,
    )


def queue_timeout(model: str, max_wait: float) -> QueueTimeout:
    return QueueTimeout(
        f"waited {max_wait:g}s in the queue for {model!r} without a free node; nothing was charged", model=model
    )
