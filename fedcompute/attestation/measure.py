"""The aggregator's code measurement: one digest over its package files, interpreter and installed dependencies.

manifest = sorted lines "file <relative path> <sha256>" for every .py/.pyi/.so file of the fedcompute package,
"python <sha256 of the interpreter binary>", and "dist <name>==<version>" for every installed distribution;
measurement = "sha256:" + sha256(manifest). The launcher computes it before starting the worker, which runs
with ``python -I -B`` so what runs is what was measured.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import sys
from pathlib import Path

import fedcompute

MEASURED_SUFFIXES = {".py", ".pyi", ".so"}


def package_root() -> Path:
    return Path(fedcompute.__file__).resolve().parent


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(root: Path, interpreter: Path | None = None) -> list[str]:
    lines = [
        f"file {p.relative_to(root).as_posix()} {_file_digest(p)}"
        for p in root.rglob("*")
        if p.is_file() and p.suffix in MEASURED_SUFFIXES and "__pycache__" not in p.parts
    ]
    python = interpreter or Path(os.path.realpath(sys.executable))
    lines.append(f"python {_file_digest(python)}")
    dists = {f"dist {d.metadata['Name'].lower()}=={d.version}" for d in importlib.metadata.distributions()}
    return sorted(lines) + sorted(dists)


def measure(root: Path | None = None) -> str:
    text = "\n".join(manifest(root or package_root())) + "\n"
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
