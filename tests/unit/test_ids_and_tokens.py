"""Identifiers (core/clock.py RandomIds) and assignment tokens (rpc/auth.py TokenSigner) on their hot paths:
bytes of the OS CSPRNG drawn ahead per thread, a key set up once. The same guarantees as a draw or a one-shot
HMAC per call: no identifier handed out twice (across threads, across a fork), tokens equal to HMAC-SHA256."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import sys
import threading
from types import FrameType
from typing import Any

import pytest

from fedcompute.core.clock import RandomIds
from fedcompute.rpc.auth import TokenSigner

_ID = re.compile(r"^asg_[A-Za-z0-9_-]{22}$")


def test_identifiers_are_prefixed_128_bit_url_safe_and_unique_across_threads() -> None:
    """16 threads x 2,000 identifiers each (each thread refills its draw ~8 times): all well-formed, none twice."""
    ids = RandomIds()
    made: list[list[str]] = [[] for _ in range(16)]

    def make(mine: list[str]) -> None:
        mine.extend(ids.new_id("asg") for _ in range(2000))

    threads = [threading.Thread(target=make, args=(m,)) for m in made]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    every = [i for m in made for i in m]
    assert len(every) == 32_000
    assert all(_ID.match(i) for i in every)
    assert len(set(every)) == len(every)


def test_an_identifier_made_between_two_lines_of_another_is_not_the_same() -> None:
    """As a signal handler can run between two bytecodes of ``new_id`` on the same thread and make an identifier
    itself: a tracer makes one at every line of every ``new_id`` call (300 calls, across refills of the draw), and
    every identifier, the tracer's and the traced calls', is distinct."""
    ids = RandomIds()
    made: list[str] = []
    inside = [False]

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code is RandomIds.new_id.__code__:
            return line
        return None

    def line(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line" and not inside[0]:
            inside[0] = True
            try:
                made.append(ids.new_id("asg"))
            finally:
                inside[0] = False
        return line

    sys.settrace(tracer)
    try:
        made.extend(ids.new_id("asg") for _ in range(300))
    finally:
        sys.settrace(None)
    assert len(made) > 600  # the tracer made several at each call
    assert len(set(made)) == len(made)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_hands_out_the_identifiers_its_parent_drew() -> None:
    """The parent has bytes drawn ahead when it forks: the child's next identifiers are not the parent's next."""
    ids = RandomIds()
    ids.new_id("asg")  # this thread now holds bytes drawn ahead
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next 50 identifiers, to the parent
        try:
            os.write(write, "\n".join(ids.new_id("asg") for _ in range(50)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = set(pipe.read().split("\n"))
    os.waitpid(pid, 0)
    parent = {ids.new_id("asg") for _ in range(50)}
    assert len(child) == 50
    assert not child & parent


def test_tokens_are_hmac_sha256_of_purpose_and_subject_on_every_thread() -> None:
    """A known answer (``openssl dgst -sha256 -hmac``), the one-shot HMAC of the same message, and the same from 8
    threads at once (the keyed state is shared and copied, never changed); another purpose, subject or secret
    gives another token."""
    secret = b"k" * 32
    signer = TokenSigner(secret)
    assert signer.token("upload", "uploads/asg_x") == (
        "51e187a6887a9dbdeb97a903a2eb4c92f4d2e2cfef6974e837f83a923806c128"
    )
    subjects = [f"asg_{n}" for n in range(500)] + ["uploads/asg_" + "x" * 5000]  # a long one: hashed in steps

    def expected(purpose: str, subject: str) -> str:
        return hmac.digest(secret, f"{purpose}\x00{subject}".encode(), hashlib.sha256).hex()

    wrong: list[str] = []

    def check() -> None:
        wrong.extend(s for s in subjects if signer.token("session", s) != expected("session", s))

    threads = [threading.Thread(target=check) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert wrong == []
    token = signer.token("session", "asg_1")
    assert signer.verify("session", "asg_1", token)
    assert not signer.verify("upload", "asg_1", token)
    assert not signer.verify("session", "asg_2", token)
    assert not TokenSigner(b"j" * 32).verify("session", "asg_1", token)
