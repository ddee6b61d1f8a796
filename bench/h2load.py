"""A native closed loop for the check-in benchmarks: h2load (nghttp2's HTTP/2 load generator, Debian's package
nghttp2-client), where it is installed.

The Python load generator spends ~0.25 ms of CPU per gRPC call here (threads or asyncio alike, measured), so at
2,000-2,500 check-ins/s it takes half a core of this machine's two from the servers it measures; real devices
spend their own. h2load sends the same bytes (a gRPC request: length-prefixed message, `content-type:
application/grpc`, `te: trailers`) from one native thread, each caller a connection of its own with one call in
flight, for a fixed time, at a small fraction of that CPU. It cannot read gRPC's status (sent in trailers after an
HTTP 200), so each caller of this module checks what the calls did another way: the assignments the check-ins
made, counted in the database, or every answer's message bytes.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench.common import percentile

H2LOAD = shutil.which("h2load")
INSTALL = "apt-get install nghttp2-client"


def closed_loop(address: str, method: str, request: bytes, callers: int, seconds: float) -> dict[str, Any]:
    """``callers`` connections each calling ``method`` (``/package.Service/Method``) with ``request`` in a loop for
    ``seconds``: calls/s answered HTTP 200, p50/p99 (ms), calls not answered 200, and the answers' message bytes."""
    if H2LOAD is None:
        raise RuntimeError(f"h2load is not installed ({INSTALL})")
    with tempfile.TemporaryDirectory(prefix="fedcompute-h2load-") as tmp:
        body, log = Path(tmp) / "body", Path(tmp) / "log"
        body.write_bytes(b"\0" + struct.pack(">I", len(request)) + request)  # uncompressed, its length
        done = subprocess.run(
            [H2LOAD, "--clients", str(callers), "--max-concurrent-streams", "1", "--threads", "1",
             "--duration", f"{seconds:g}", "--header", "content-type: application/grpc", "--header", "te: trailers",
             "--data", str(body), "--log-file", str(log), f"http://{address}{method}"],
            capture_output=True, text=True, timeout=seconds + 60, check=True,
        )  # fmt: skip
        calls = [line.split("\t") for line in log.read_text().splitlines()]
    traffic = re.search(r"\((\d+)\) data", done.stdout)
    ok = [int(duration) / 1000 for _, status, duration in calls if status == "200"]
    return {
        "per_s": len(ok) / seconds,
        "calls": len(ok),
        "p50_ms": percentile(ok, 0.5),
        "p99_ms": percentile(ok, 0.99),
        "not_200": len(calls) - len(ok),
        "data_bytes": int(traffic.group(1)) if traffic else -1,
    }
