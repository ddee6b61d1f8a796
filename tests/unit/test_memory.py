"""The allocator setting of every fedcompute process (core/memory.py), observed through glibc's own accounting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# a fresh interpreter: allocates a 4 MiB buffer and reports where glibc put it (mallinfo2: hblkhd = bytes in
# mmapped chunks), after applying the setting or not
_PROBE = """
import ctypes, json, sys
from fedcompute.core.memory import keep_large_buffers
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
applied = keep_large_buffers() if sys.argv[1] == "apply" else None
before = libc.mallinfo2().hblkhd
buffer = bytearray(4 * 1024 * 1024)
during = libc.mallinfo2().hblkhd
del buffer
print(json.dumps({"applied": applied, "mmapped": during - before}))
"""

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc only"
)


def _probe(mode: str, **env: str) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], env={**clean, **env}, capture_output=True, text=True, check=True
    )
    answer: dict[str, object] = json.loads(out.stdout)
    return answer


@glibc
def test_a_large_buffer_comes_from_the_heap_once_applied_and_from_mmap_without() -> None:
    assert _probe("leave") == {"applied": None, "mmapped": pytest.approx(4 * 1024 * 1024, rel=0.01)}
    assert _probe("apply") == {"applied": True, "mmapped": 0}


@glibc
def test_an_operators_own_malloc_settings_win() -> None:
    small = _probe("apply", MALLOC_MMAP_THRESHOLD_=str(1024 * 1024))
    assert small["applied"] is False  # nothing changed by us: glibc's threshold is the operator's 1 MiB
    assert small["mmapped"] == pytest.approx(4 * 1024 * 1024, rel=0.01)


# a fresh interpreter: objects made at start-up, frozen, then one made after; what a full collection walks
_FREEZE_PROBE = """
import gc, json
from fedcompute.core.memory import freeze_startup_heap
class Node:
    pass
kept = Node(); kept.me = kept          # start-up's: a cycle the process keeps
garbage = Node(); garbage.me = garbage  # start-up's garbage: collected before the freeze
del garbage
moved = freeze_startup_heap()
later = Node(); later.me = later
walked = gc.get_objects()  # what a collection walks (the permanent generation is not in it)
print(json.dumps({"moved": moved, "frozen": gc.get_freeze_count(), "kept_walked": any(o is kept for o in walked),
                  "later_walked": any(o is later for o in walked),
                  "garbage_left": sum(type(o).__name__ == "Node" for o in walked) - 1}))
"""

# a fresh interpreter: start-up frozen, then a lazy import (a module nothing here imported yet); whether its objects
# are walked before and after refreeze_after_imports, and whether hold_frozen (the main thread's wait) does it alone
_REFREEZE_PROBE = """
import gc, json, sys, threading, time
from fedcompute.core.memory import freeze_startup_heap, hold_frozen, refreeze_after_imports
assert "xml.dom.minidom" not in sys.modules and "fractions" not in sys.modules
freeze_startup_heap()
nothing_new = refreeze_after_imports()
import xml.dom.minidom
walked_before = any(o is xml.dom.minidom.parseString for o in gc.get_objects())
moved = refreeze_after_imports()
walked_after = any(o is xml.dom.minidom.parseString for o in gc.get_objects())
rechecked = refreeze_after_imports()
walks, count_frozen = [], gc.get_freeze_count  # counting the frozen objects walks them all, the GIL held
gc.get_freeze_count = lambda: walks.append(1) or count_frozen()
again = refreeze_after_imports()
gc.get_freeze_count = count_frozen
stop = threading.Event()
holder = threading.Thread(target=hold_frozen, args=(stop, 0.05))
holder.start()
time.sleep(0.2)
import fractions
deadline = time.monotonic() + 10
while any(o is fractions.Fraction for o in gc.get_objects()) and time.monotonic() < deadline:
    time.sleep(0.05)
held = not any(o is fractions.Fraction for o in gc.get_objects())
stop.set()
holder.join()
print(json.dumps({"nothing_new": nothing_new, "walked_before": walked_before, "moved": moved,
                  "walked_after": walked_after, "rechecked": rechecked, "again": again, "walks": len(walks),
                  "held": held}))
"""

# a fedcompute command (argv) in a fresh interpreter, on its main thread (it waits for SIGTERM there); a thread
# stops it once the heap is frozen, or after 30 s
_SERVE_PROBE = """
import gc, os, signal, sys, threading, time
from fedcompute.cli import app
def watch():
    deadline = time.monotonic() + 30
    while not gc.get_freeze_count() and time.monotonic() < deadline:
        time.sleep(0.05)
    print("frozen", gc.get_freeze_count(), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=watch, daemon=True).start()
app(sys.argv[1:], standalone_mode=False)
"""


def test_start_up_objects_are_frozen_and_later_ones_collected_as_before() -> None:
    out = subprocess.run([sys.executable, "-c", _FREEZE_PROBE], capture_output=True, text=True, check=True)
    answer = json.loads(out.stdout)
    assert answer["moved"] == answer["frozen"] > 1000  # the interpreter's own start-up objects too
    assert answer["kept_walked"] is False  # never walked again
    assert answer["later_walked"] is True  # made after start-up: collected as before
    assert answer["garbage_left"] == 0  # start-up's garbage was collected, not frozen


def test_a_lazy_import_after_start_up_is_frozen_too() -> None:
    """Modules imported once a process serves (a key service's accountants, the server's torch.export) are as
    long-lived as start-up's: frozen again, by the main thread's wait, so full collections do not walk them."""
    out = subprocess.run([sys.executable, "-c", _REFREEZE_PROBE], capture_output=True, text=True, check=True)
    answer = json.loads(out.stdout)
    assert answer["nothing_new"] == 0  # no import since the freeze: nothing to do
    assert answer["walked_before"] is True  # the lazily imported module's objects, walked by every collection
    assert answer["moved"] > 0
    assert answer["walked_after"] is False  # frozen with the rest
    assert answer["rechecked"] > 0  # once more after a freeze that followed imports (one may have been under way)
    assert answer["again"] == 0
    assert answer["walks"] == 0  # a check with nothing to do (every 10 s in every process) walks no heap
    assert answer["held"] is True  # hold_frozen froze the next lazy import within its check interval


# a module imported on another thread while the process freezes: its body waits until after the freeze, then
# makes a class (in a fresh interpreter; the module's file is written by the test, its directory is argv[1])
_SLOW_MODULE = """
import sys
sys.probe_started.set()
sys.probe_proceed.wait(30)
class Late:
    pass
"""
_IMPORT_UNDER_WAY_PROBE = """
import gc, json, sys, threading
sys.path.insert(0, sys.argv[1])
sys.probe_started, sys.probe_proceed = threading.Event(), threading.Event()
from fedcompute.core.memory import freeze_startup_heap, refreeze_after_imports
freeze_startup_heap()
importer = threading.Thread(target=lambda: __import__("slow_probe_module"))
importer.start()
assert sys.probe_started.wait(30)
during = refreeze_after_imports()  # the module is in sys.modules, its body still running
sys.probe_proceed.set()
importer.join(30)
late = sys.modules["slow_probe_module"].Late
walked_before = any(o is late for o in gc.get_objects())
after = refreeze_after_imports()  # no module imported since: the check after a freeze that followed imports
walked_after = any(o is late for o in gc.get_objects())
print(json.dumps({"during": during, "walked_before": walked_before, "after": after, "walked_after": walked_after}))
"""


def test_an_import_under_way_while_the_heap_is_frozen_is_frozen_at_the_next_check(tmp_path: Path) -> None:
    """A module imported on another thread (the key service's accountants load in the background) can be half
    run when a check freezes: what its body makes afterwards is frozen at the check after, though no further
    module was imported by then."""
    (tmp_path / "slow_probe_module.py").write_text(_SLOW_MODULE)
    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_UNDER_WAY_PROBE, str(tmp_path)], capture_output=True, text=True, check=True
    )
    answer = json.loads(out.stdout)
    assert answer["during"] > 0  # the module counted as imported: frozen, its class not made yet
    assert answer["walked_before"] is True  # made after that freeze
    assert answer["after"] > 0
    assert answer["walked_after"] is False


@pytest.mark.parametrize("command", [["serve", "keys"], ["up"]])
def test_a_long_running_command_freezes_its_start_up_heap(tmp_path: Path, command: list[str]) -> None:
    ports = {"FEDCOMPUTE_SERVER_PORT": "0", "FEDCOMPUTE_KEY_SERVICE_PORT": "0", "FEDCOMPUTE_METRICS_PORT": "0"}
    env = {**os.environ, **ports, "FEDCOMPUTE_WORKDIR": str(tmp_path), "FEDCOMPUTE_PLAINTEXT": "1"}
    probe = [sys.executable, "-c", _SERVE_PROBE, *command]
    done = subprocess.run(probe, env=env, capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    frozen = [line for line in done.stdout.splitlines() if line.startswith("frozen")]
    assert frozen, done.stdout + done.stderr
    assert int(frozen[0].split()[1]) > 10_000, done.stdout + done.stderr  # 0: never frozen (waited 30 s)
