"""The canonical contribution context: round trips, and nothing but canonical bytes parse."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedcompute.core.context import MAGIC, ContributionContext

texts = st.text(max_size=40)
u64 = st.integers(min_value=0, max_value=2**64 - 1)


@given(texts, texts, u64, texts, texts, texts, u64, texts, texts)
def test_round_trip(p: str, t: str, r: int, agg: str, asg: str, key: str, v: int, plan: str, policy: str) -> None:
    ctx = ContributionContext(p, t, r, agg, asg, key, v, plan, policy)
    assert ContributionContext.decode(ctx.encode()) == ctx


@given(texts, texts)
def test_distinct_fields_never_collide(a: str, b: str) -> None:
    one = ContributionContext(a + b, "", 1, "", "", "", 1, "", "")
    two = ContributionContext(a, b, 1, "", "", "", 1, "", "")
    if b:
        assert one.encode() != two.encode()


def test_rejects_truncated_and_trailing_bytes() -> None:
    data = ContributionContext("p", "t", 1, "a", "s", "k", 2, "h", "q").encode()
    with pytest.raises(ValueError, match="truncated"):
        ContributionContext.decode(data[:-1])
    with pytest.raises(ValueError, match="trailing"):
        ContributionContext.decode(data + b"x")
    with pytest.raises(ValueError, match="magic"):
        ContributionContext.decode(b"{}")
    assert data.startswith(MAGIC)
