"""Refuse a call whose estimated memory exceeds what the machine has, before allocating it.

A method whose pair count depends on the data (SBM's sampled graph: its density is whatever its
clusters give, ~22% of all pairs untrained) can ask for more memory than the machine has at long
lengths; the process is then killed by the system with no message. A method estimates its peak
working memory from counts it knows before allocating (SBM: its expected edge count) and calls
`check_fits`, which raises `AttentionTooLarge` naming the estimate and the limit.
"""
from __future__ import annotations


class AttentionTooLarge(MemoryError):
    """A call of a sparse attention site would need more memory than the limit."""


def available_bytes() -> int | None:
    """The memory the system can give without swapping (Linux MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(where: str, needed: float, explain: str, limit: int | None = None, advice: str = "") -> None:
    """Raise `AttentionTooLarge` if `needed` bytes exceed `limit` (None: the machine's available memory)."""
    source = "the limit given" if limit is not None else "the memory this machine has available"
    if limit is None:
        limit = available_bytes()
        if limit is None:
            return
    if needed > limit:
        raise AttentionTooLarge(
            f"{where}: this call needs about {_gb(needed)} ({explain}), more than {source} ({_gb(limit)}); "
            f"refused before allocating{'. ' + advice if advice else ''}")


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
