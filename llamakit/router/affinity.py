"""Prompt-cache affinity: send a conversation's next turn to the node whose slots still hold its history.

A node keeps each slot's last prompt and answer in llama.cpp's cache and decodes only what follows the
longest prefix a new prompt shares with one of them; a follow-up sent to another node decodes the whole
history again. The router cannot see the nodes' caches, but it knows what it sent where and what came back.
It cuts a request's text (chat messages in a canonical form, or the prompt) into blocks of `BLOCK_CHARS`
characters, hashes each block chained to the blocks before it, and remembers which node last held each
chain, the answer included. A new request's longest remembered chain names the node likely to hold its
prefix, and how many characters of it.

The map is a hint, as in SGLang's cache-aware router: a node's slots are overwritten by later requests, so a
hit may be stale, and then it costs nothing more than a miss. It is also weighed against load (see
`Scheduler`): the hint wins only while the saved prefix is worth the extra stream on a busier node.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

__all__ = ["BLOCK_CHARS", "CHARS_PER_EXTRA_REQUEST", "Affinity", "PrefixMap", "chat_text"]

BLOCK_CHARS = 256
# How many characters of cached prefix pay for one more running request on the node holding them than on the
# least-loaded node: about 250 tokens, a second of prompt decoding for a small model on a small CPU.
CHARS_PER_EXTRA_REQUEST = 1024


@dataclass(frozen=True)
class Affinity:
    """`node_id` likely holds the first `chars` characters of a request's text in its cache."""

    node_id: str
    chars: int


def chat_text(messages: Sequence[tuple[str, str]]) -> str:
    """A chat's messages (role, text) as one string whose prefixes are the conversation's prefixes: a
    follow-up that repeats the history and the answer starts with the text of the turn before it, answer
    included."""
    return "".join(f"{role}\x1f{text}\x1e" for role, text in messages)


class PrefixMap:
    """Chained block hashes → the node that last held that prefix, least recently used first out."""

    def __init__(self, capacity: int = 65536) -> None:
        self.capacity = capacity
        self._holders: OrderedDict[int, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._holders)

    @staticmethod
    def chain(scope: Hashable, text: str, known: Sequence[int] = ()) -> list[int]:
        """One hash per whole block of `text`, each covering `scope` and every block up to it. `scope` is what a
        node's cache is kept apart by: the model, and the account (a node reuses an account's cells only for
        that account, see node.engine.GenerationJob.cache_salt). `known` is the chain of a prefix of `text` (the
        prompt, when `text` is the prompt and its answer): its blocks are not hashed again."""
        hashes = list(known)
        h = hashes[-1] if hashes else hash(scope)
        for start in range(len(hashes) * BLOCK_CHARS, len(text) - BLOCK_CHARS + 1, BLOCK_CHARS):
            h = hash((h, text[start : start + BLOCK_CHARS]))
            hashes.append(h)
        return hashes

    def holder(self, chain: list[int]) -> Affinity | None:
        """The node that last held the longest remembered prefix of `chain`, if any."""
        for i in range(len(chain) - 1, -1, -1):
            node_id = self._holders.get(chain[i])
            if node_id is not None:
                return Affinity(node_id, (i + 1) * BLOCK_CHARS)
        return None

    def remember(self, chain: list[int], node_id: str) -> None:
        """`node_id` now holds every prefix in `chain` (it just served that text)."""
        holders = self._holders
        for h in chain:
            holders[h] = node_id
            holders.move_to_end(h)
        while len(holders) > self.capacity:
            holders.popitem(last=False)
