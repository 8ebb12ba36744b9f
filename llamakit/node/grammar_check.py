"""Grammars are compiled by llama.cpp in a process of their own before a request may use them.

llama.cpp's GBNF compiler recurses on nested groups and on rules that can match nothing, and a grammar from a
request can overflow its stack (a segfault), loop or allocate without end: in the node's process that would
end every request on the node. `GrammarCheck` sends each new grammar to a helper process that holds only the
model's vocabulary (`vocab_only`, a fraction of a second to load) and a memory limit; a grammar that crashes
it, or takes longer than `timeout` seconds, is refused with the reason, and the helper is started again.
Verdicts are kept in an LRU by the grammar's hash, so a client that sends the same grammar pays once.

Run as `python -m llamakit.node.grammar_check MODEL.gguf`, the helper reads one JSON line per grammar on stdin
and answers one JSON line: `{"ok": true}` or `{"ok": false, "error": "<llama.cpp's message>"}`.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import json
import logging
import os
import select
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

__all__ = ["GrammarCheck"]

log = logging.getLogger(__name__)

# The helper's address space: a vocabulary and a grammar need far less; a grammar that needs more is refused.
HELPER_MEMORY_BYTES = 2 * 1024**3


class GrammarCheck:
    """Compile GBNF grammars for the model at `model_path` in a helper process; thread-safe.

    `error(grammar)` is None when llama.cpp compiles the grammar, else a message that says why not. The helper
    starts on first use and again after it dies.
    """

    def __init__(self, model_path: Path, *, timeout: float = 10.0, cache_size: int = 512) -> None:
        self._model_path = model_path
        self._timeout = timeout
        self._cache: collections.OrderedDict[bytes, str | None] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def error(self, grammar: str) -> str | None:
        key = hashlib.sha256(grammar.encode("utf-8", "surrogatepass")).digest()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            verdict = self._ask(grammar)
            self._cache[key] = verdict
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return verdict

    def _ask(self, grammar: str) -> str | None:
        proc = self._helper()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps({"grammar": grammar}).encode() + b"\n")
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], self._timeout)
            line = proc.stdout.readline() if ready else b""
        except OSError:
            line = b""
        if not ready:
            self._stop(proc)
            return f"llama.cpp took longer than {self._timeout:g} s to compile it"
        if not line:  # the helper died on this grammar
            code = proc.wait()
            self._proc = None
            self.restarts += 1
            log.warning("a grammar crashed the grammar helper (exit code %s); it will be started again", code)
            return f"it crashed llama.cpp's grammar compiler (exit code {code})"
        answer = json.loads(line)
        return None if answer.get("ok") else str(answer.get("error") or "llama.cpp could not parse it")

    def _helper(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "llamakit.node.grammar_check", str(self._model_path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
        return self._proc

    def _stop(self, proc: subprocess.Popen[bytes]) -> None:
        proc.kill()
        proc.wait()
        self._proc = None
        self.restarts += 1

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                if self._proc.stdin is not None:
                    self._proc.stdin.close()
                self._stop(self._proc)


def _serve(model_path: str, stdin: IO[bytes], stdout: IO[bytes]) -> int:
    """The helper's loop: load the vocabulary, then compile one grammar per line of `stdin`."""
    import resource

    import llama_cpp

    resource.setrlimit(resource.RLIMIT_AS, (HELPER_MEMORY_BYTES, HELPER_MEMORY_BYTES))
    messages: list[str] = []

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def collect(_level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        messages.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(model_path.encode(), params)
    if not model:
        return 2
    vocab = llama_cpp.llama_model_get_vocab(model)
    for line in stdin:
        grammar = json.loads(line)["grammar"]
        messages.clear()
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
        if sampler:
            llama_cpp.llama_sampler_free(sampler)
            answer: dict[str, object] = {"ok": True}
        else:
            said = " ".join(m.strip() for m in messages if m.strip())
            answer = {"ok": False, "error": said[:500] or "llama.cpp could not parse it"}
        stdout.write(json.dumps(answer).encode() + b"\n")
        stdout.flush()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(_serve(sys.argv[1], sys.stdin.buffer, sys.stdout.buffer))
