"""llama.cpp's own log, through Python's `logging` (logger `llama.cpp`), and model loads that never silence stderr.

llama.cpp logs through one process-wide callback (`llama_log_set`, llama.h). Left to llama-cpp-python, a node's
log gets about a thousand lines of graph and KV-cache detail for every context it creates, and a load with
`verbose=False` silences the whole process's stderr while it runs: llama-cpp-python `dup2`s /dev/null over file
descriptors 1 and 2 (`llama_cpp._utils.suppress_stdout_stderr`), which loses what other threads write meanwhile
and, when two loads overlap in threads, leaves stderr on /dev/null for good. So a node routes the callback into
`logging` (WARNING and up by default: llama.cpp's errors and warnings still show) and loads with
`verbose=True`, which redirects nothing.

What llama.cpp decides while it loads a model or makes a context (where the layers went, whether flash attention
is on) it says only in that log: `hearing()` collects what it says on one thread meanwhile, for the node to
report (see placement.py).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import llama_cpp

log = logging.getLogger("llama.cpp")

# enum ggml_log_level (ggml.h): NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the last message).
# llama-cpp-python's own callback (llama_cpp/_logger.py) still reads the older order, in which INFO was 1 and
# WARN 2, so it shows llama.cpp's INFO lines as warnings even when told not to be verbose.
_LEVELS = {0: logging.INFO, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_CONT = 5

# llama-cpp-python's `Llama` has no way to load without its redirection when it is not verbose (verbose prints
# the model's metadata): loads that use it take this lock, so that two redirections never interleave.
redirecting = threading.Lock()

_installed: list[object] = []  # the ctypes callback, kept alive for as long as llama.cpp may call it
_last_level = logging.INFO
_heard = threading.local()  # `now`: the Heard that this thread's llama.cpp messages go to while hearing() runs


@dataclass
class Heard:
    """What llama.cpp logged on one thread during a `hearing()`: every message, and its errors apart."""

    lines: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def reason(self) -> str:
        """llama.cpp's own error messages, for a failure's message: '' when it logged none."""
        return "; ".join(e.strip() for e in self.errors if e.strip())


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
def _forward(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    global _last_level
    python_level = _last_level if level == _CONT else _LEVELS.get(level, logging.INFO)
    _last_level = python_level
    heard: Heard | None = getattr(_heard, "now", None)
    if heard is not None:
        heard.lines.append(text.decode("utf-8", "replace"))
        if python_level >= logging.ERROR:
            heard.errors.append(heard.lines[-1])
    if log.isEnabledFor(python_level):
        message = text.decode("utf-8", "replace").rstrip("\n")
        if message.strip():
            log.log(python_level, "%s", message)


def route_llama_log(level: int = logging.WARNING) -> None:
    """Send llama.cpp's log to the `llama.cpp` logger from now on, and show `level` (a `logging` level) and up.
    Idempotent; call before the first model loads."""
    log.setLevel(level)
    _install()


def _install() -> None:
    if not _installed:
        llama_cpp.llama_log_set(_forward, ctypes.c_void_p(0))
        _installed.append(_forward)


@contextmanager
def hearing() -> Iterator[Heard]:
    """The messages llama.cpp logs on this thread while the block runs, at every level (shown or not): llama.cpp
    logs from the thread that calls it, so loads and contexts made on other threads meanwhile are not mixed in."""
    _install()
    outer: Heard | None = getattr(_heard, "now", None)
    heard = Heard()
    _heard.now = heard
    try:
        yield heard
    finally:
        _heard.now = outer
        if outer is not None:
            outer.lines += heard.lines
            outer.errors += heard.errors
