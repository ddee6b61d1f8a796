"""Property tests of hand-written protobuf readers: messages damaged the ways a network or a peer can damage them."""

from __future__ import annotations

from hypothesis import strategies as st


def maybe_damaged(raw: bytes, data: st.DataObject) -> bytes:
    """``raw`` as it is, cut short, or with one byte altered (hypothesis draws which and where)."""
    if not data.draw(st.booleans()):
        return raw
    at = data.draw(st.integers(0, max(len(raw) - 1, 0)))
    altered = bytes([data.draw(st.integers(0, 255))])
    return raw[:at] if data.draw(st.booleans()) else raw[:at] + altered + raw[at + 1 :]
