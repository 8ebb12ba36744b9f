"""`shared_prefix` compares whole blocks first: it must agree with the plain definition at every length."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from llamakit.node.engine import shared_prefix

tokens = st.lists(st.integers(0, 3), max_size=700)


def plain(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@given(tokens, tokens, tokens)
def test_shared_prefix_is_the_length_of_the_common_prefix(common: list[int], a: list[int], b: list[int]) -> None:
    assert shared_prefix(common + a, common + b) == plain(common + a, common + b) >= len(common)
    assert shared_prefix(a, b) == plain(a, b) == shared_prefix(b, a)
