"""Client version codes: dotted non-negative integers ("1", "1.4", "2.0.13"), compared numerically."""

from __future__ import annotations

from functools import lru_cache

MAX_VERSION_CHARS = 64  # a longer code is refused before it is parsed or cached (a device's request holds any)


@lru_cache(maxsize=1024)  # every check-in parses its own and each open task's bounds; devices send few distinct codes
def parse_version(code: str) -> tuple[int, ...]:
    """Parse a version code or raise ``ValueError`` saying what is wrong (a failure is not cached)."""
    if len(code) > MAX_VERSION_CHARS:
        raise ValueError(f"client version is over {MAX_VERSION_CHARS} characters")
    parts = code.strip().split(".")
    if not code.strip() or not all(p.isdigit() for p in parts):
        raise ValueError(f"client version {code!r} is not dotted numbers like '1.4.0'")
    return tuple(int(p) for p in parts)


def in_range(code: str, minimum: str, maximum: str) -> bool:
    """Whether ``code`` lies in the inclusive range; an empty bound is unbounded; unparsable codes are out."""
    try:
        version = parse_version(code)
    except ValueError:
        return False
    if minimum and version < parse_version(minimum):
        return False
    return not (maximum and version > parse_version(maximum))
