"""Slot caches kept in RAM: a conversation's history survives its slot being taken by another request.

A slot keeps only its last request's cells, so a herd with more live conversations than slots finds almost
nothing in its caches (`bench/herd_affinity.py`: 3 % of prompt tokens with 6 conversations on 4 slots). Before
a slot's cells are overwritten, their state is copied out with `llama_state_seq_get_data` (about 23 KB a
token for SmolLM2, a millisecond or so), and a later request whose prompt shares a longer prefix with a saved
state than with any slot has it copied back into its own slot. This is llama-server's `--cache-ram`, bounded
by bytes and least recently used first out. It runs on the decode thread only.
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from dataclasses import dataclass

import llama_cpp

from llamakit.node.engine import shared_prefix

__all__ = ["SAVE_MIN_TOKENS", "RamCache"]

# A slot's state is saved only when at least this many of its tokens would be lost: below it, decoding them
# again costs less than keeping them around (a few hundred milliseconds at most on a small CPU).
SAVE_MIN_TOKENS = 64


@dataclass
class _Saved:
    tokens: list[int]
    data: bytes


class RamCache:
    def __init__(self, ctx: llama_cpp.llama_context_p, limit_bytes: int) -> None:
        self._ctx = ctx
        self.limit_bytes = limit_bytes
        self.used_bytes = 0
        # Keyed by (cache salt, tokens): a state is restored only for a request of the salt that left it.
        self._saved: OrderedDict[tuple[str, tuple[int, ...]], _Saved] = OrderedDict()

    def __len__(self) -> int:
        return len(self._saved)

    def save(self, seq_id: int, tokens: list[int], salt: str = "") -> None:
        """Copy the state of `seq_id`, whose cells hold `tokens` (of cache salt `salt`), before they are
        overwritten."""
        if len(tokens) < SAVE_MIN_TOKENS or not self.limit_bytes:
            return
        key = (salt, tuple(tokens))
        if key in self._saved:
            self._saved.move_to_end(key)
            return
        size = llama_cpp.llama_state_seq_get_size(self._ctx, seq_id)
        if size > self.limit_bytes:
            return
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self._ctx, buffer, size, seq_id)
        if written <= 0:
            return
        self._saved[key] = _Saved(list(tokens), bytes(buffer)[:written])
        self.used_bytes += written
        while self.used_bytes > self.limit_bytes:
            _, dropped = self._saved.popitem(last=False)
            self.used_bytes -= len(dropped.data)

    def best(self, prompt: list[int], salt: str = "") -> tuple[int, list[int] | None]:
        """The longest prefix of `prompt` a state saved with `salt` holds, and that state's tokens (None when
        none does)."""
        best_share, best_tokens = 0, None
        for (saved_salt, _), saved in self._saved.items():
            if saved_salt != salt:
                continue
            share = shared_prefix(saved.tokens, prompt)
            if share > best_share:
                best_share, best_tokens = share, saved.tokens
        return best_share, best_tokens

    def restore(self, tokens: list[int], seq_id: int, salt: str = "") -> bool:
        """Copy the saved state of `tokens` (saved with `salt`) into `seq_id`, whose cells must be empty; False if
        it failed."""
        key = (salt, tuple(tokens))
        saved = self._saved.get(key)
        if saved is None:
            return False
        self._saved.move_to_end(key)
        source = (ctypes.c_uint8 * len(saved.data)).from_buffer_copy(saved.data)
        return bool(llama_cpp.llama_state_seq_set_data(self._ctx, source, len(saved.data), seq_id))
