"""core/files.py ``UncachedAppender``: an upload's staging file written past the page cache (``O_DIRECT``, whole
aligned blocks, the last one padded then cut back), or plainly where direct I/O is refused. Whatever the path, the
file holds exactly the bytes written once ``sync`` returns, a file reopened at an offset keeps what lies before it
(a resume inside a block included), and a process killed after a ``sync`` leaves at least the synced bytes, which a
reopen at that offset carries on from."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcompute.core import files
from fedcompute.core.files import UncachedAppender
from tests.pagecache import kept_in_memory, pages_cached

BLOCK = 4096
SIZES = st.one_of(
    st.sampled_from([0, 1, BLOCK - 1, BLOCK, BLOCK + 1, (1 << 20) - 1, 1 << 20, (1 << 20) + 1]),
    st.integers(0, 3 * (1 << 20)),
)
# what the platform and file system do with direct I/O: take it; refuse it at the open; refuse the first or the
# third write; not have it (macOS: no os.O_DIRECT)
REFUSALS = ["none", "open", "first write", "third write", "absent"]


def _refusing(monkeypatch: pytest.MonkeyPatch, refusal: str) -> None:
    if refusal == "none":
        return
    if refusal == "absent":
        monkeypatch.delattr(os, "O_DIRECT")
        return
    real_open, real_pwrite = os.open, os.pwrite
    direct_writes = [0]

    def open_(name: str | Path, flags: int, *args: int) -> int:
        if refusal == "open" and flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "direct I/O refused")
        return real_open(name, flags, *args)

    def pwrite(fd: int, data: bytes | memoryview, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            direct_writes[0] += 1
            if direct_writes[0] == (1 if refusal == "first write" else 3):
                raise OSError(errno.EINVAL, "direct I/O refused")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "pwrite", pwrite)


pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="the direct path is Linux's (O_DIRECT)")


@pytest.mark.parametrize("refusal", REFUSALS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    held=st.integers(0, 3 * BLOCK),
    cut=st.integers(0, 3 * BLOCK),
    steps=st.lists(st.one_of(SIZES, st.just(-1)), max_size=8),  # -1: a sync
    seed=st.integers(0, 255),
)
def test_the_file_holds_exactly_what_was_written_once_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: str, held: int, cut: int, steps: list[int], seed: int
) -> None:
    """From a staged file of ``held`` bytes reopened at ``offset`` (a resume: often inside a block), writes of every
    size (none, one byte, around a block, around the buffer, several buffers) with syncs between: after each sync
    the file is exactly the kept prefix and the bytes written so far, by either path and when the path changes
    midway."""
    with monkeypatch.context() as patch:
        _refusing(patch, refusal)
        path = tmp_path / f"staged-{seed}-{held}"
        start = os.urandom(held)
        path.write_bytes(start)
        offset = min(cut, held)
        expected = bytearray(start[:offset])
        with UncachedAppender(path, offset) as out:
            for step in [*steps, -1]:
                if step < 0:
                    out.sync()
                    assert path.read_bytes() == expected
                else:
                    data = bytes([seed]) * step
                    out.write(data if step % 2 else memoryview(data))
                    expected += data
        path.unlink()


@pytest.mark.skipif(sys.platform != "linux", reason="mincore is Linux's")
def test_direct_writes_leave_no_page_in_the_cache(tmp_path: Path) -> None:
    """Where the file system takes direct I/O, not one page of the written file is in the page cache after the
    sync: the kernel never had to find, clear, write back or drop pages for it (the plain path caches each page it
    writes until it is dropped)."""
    if kept_in_memory(tmp_path):
        pytest.skip("the test directory is on tmpfs: its files live in the page cache")
    path = tmp_path / "staged"
    data = os.urandom(3 * (1 << 20) + 1234)
    with UncachedAppender(path, 0) as out:
        out.write(data)
        out.sync()
    assert path.read_bytes() == data  # read here: cached now, so count before reading again
    path.unlink()
    with UncachedAppender(path, 0) as out:
        out.write(data)
        out.sync()
        cached, pages = pages_cached(path)
    assert pages == -(-len(data) // BLOCK)
    assert cached == 0, f"{cached} of {pages} pages were cached"


def test_an_error_other_than_a_refusal_of_direct_io_is_raised(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        UncachedAppender(tmp_path / "no such directory" / "staged", 0)


def test_a_failure_between_the_padded_write_and_the_cut_leaves_bytes_a_reopen_drops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync writes the last partial block padded with zeros, then cuts the file back: a crash between the two
    leaves the zeros past the length the caller records (nothing recorded counts them); reopening at that length
    drops them and goes on."""
    path = tmp_path / "staged"
    first = os.urandom(5000)
    with UncachedAppender(path, 0) as out:
        out.write(first)
        with monkeypatch.context() as patch:
            patch.setattr(os, "ftruncate", _failing)
            with pytest.raises(OSError, match="crashed here"):
                out.sync()
    assert path.stat().st_size == 2 * BLOCK  # the padded block, never cut back
    second = os.urandom(7000)
    with UncachedAppender(path, len(first)) as out:
        out.write(second)
        out.sync()
    assert path.read_bytes() == first + second


def _failing(fd: int, length: int) -> None:
    raise OSError(errno.EIO, "crashed here")


@pytest.mark.parametrize("when", ["after a write", "inside the next write"])
def test_a_process_killed_after_a_sync_leaves_the_synced_bytes_for_a_resume(tmp_path: Path, when: str) -> None:
    """A writer process killed with SIGKILL after a sync, with more written but not synced (or in the middle of
    writing it): the file holds at least the synced bytes, as they were; reopened at the synced length (what an
    upload records once a sync returns), the rest is written and the file is exactly both."""
    path = tmp_path / "staged"
    code = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        from fedcompute.core.files import UncachedAppender
        out = UncachedAppender(Path({str(path)!r}), 0)
        out.write(bytes(range(256)) * 20_000 + b"tail")  # 5,120,004 bytes: five buffers and a partial block
        out.sync()
        print("synced", flush=True)
        while True:
            out.write(os.urandom(1 << 20) if {when == "inside the next write"!r} else b"x" * 3000)
            if {when == "after a write"!r}:
                print("written", flush=True)
                time.sleep(60)
    """)
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "synced"
        if when == "after a write":
            assert process.stdout.readline().strip() == "written"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    _resumes_after(path, bytes(range(256)) * 20_000 + b"tail")


def _resumes_after(path: Path, synced: bytes) -> None:
    """``path`` starts with the ``synced`` bytes, as they were; reopened at their length, what is written next
    follows them exactly."""
    assert path.read_bytes()[: len(synced)] == synced
    rest = os.urandom(10_000)
    with UncachedAppender(path, len(synced)) as out:
        out.write(rest)
        out.sync()
    assert path.read_bytes() == synced + rest


def test_buffers_are_reused_and_kept_bounded(tmp_path: Path) -> None:
    """Each open appender holds a buffer of its own; closed, the buffer is kept for the next (at most a few)."""
    opened = [UncachedAppender(tmp_path / f"staged-{n}", 0) for n in range(files._FREE_KEPT + 4)]
    assert len({id(out._buffer) for out in opened}) == len(opened)
    for out in opened:
        out.close()
    assert len(files._free) == files._FREE_KEPT
    again = UncachedAppender(tmp_path / "again", 0)
    assert len(files._free) == files._FREE_KEPT - 1
    again.close()


@pytest.mark.parametrize("direct", [True, False])
def test_a_full_disk_is_raised_as_such_and_a_reopen_goes_on_from_the_synced_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    """A write the disk refuses (ENOSPC) is the caller's error, as it is, whether it came from a direct write or
    from the plain write that followed a refusal of direct I/O (not a fallback, not an error about the buffer); the
    bytes synced before it stay, and a reopen at their length carries on."""
    path = tmp_path / "staged"
    synced = os.urandom(5000)
    real_pwrite = os.pwrite

    def full(fd: int, data: bytes | memoryview, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            if direct:
                raise OSError(errno.ENOSPC, "No space left on device")
            raise OSError(errno.EINVAL, "direct I/O refused")
        if not direct:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    with UncachedAppender(path, 0) as out:
        out.write(synced)
        out.sync()
        with monkeypatch.context() as patch:
            patch.setattr(os, "pwrite", full)
            with pytest.raises(OSError, match="No space left on device") as info:
                out.write(os.urandom(3 << 20))
    assert info.value.errno == errno.ENOSPC
    _resumes_after(path, synced)
