"""Refuse a call whose estimated memory exceeds what the machine has, before allocating it.

A method whose pair count depends on the data (SBM's sampled graph: its density is whatever its
clusters give, ~22% of all pairs untrained) can ask for more memory than the machine has at long
lengths; the process is then killed by the system with no message. A method estimates its peak
working memory from counts it knows before allocating (SBM: its expected edge count) and checks it
with a `PairLimit`, which raises `AttentionTooLarge` naming the estimate and the limit.
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


def check_limit_option(method: str, options: dict) -> None:
    """The `memory_limit` option of a method that checks its pairs: None, or an int of bytes >= 1."""
    from attnpass.methods.options import check_int

    if options.get("memory_limit") is not None:
        check_int(method, "memory_limit", options["memory_limit"], 1)


class PairLimit:
    """One call's check of a data-dependent pair count: `limit(pairs)` raises `AttentionTooLarge`
    when pairs * bytes_per_pair exceed the limit, resolved once per call (`limit`, or the memory
    the machine has available; unknown: nothing is checked)."""

    def __init__(self, where: str, what: str, bytes_per_pair: int, all_pairs: int, limit: int | None = None,
                 advice: str = ""):
        self.where, self.what, self.bytes_per_pair, self.all_pairs, self.advice = where, what, bytes_per_pair, all_pairs, advice
        self.source = "the limit given" if limit is not None else "the memory this machine has available"
        self.limit = limit if limit is not None else available_bytes()

    def __call__(self, pairs: float) -> None:
        needed = pairs * self.bytes_per_pair
        if self.limit is None or needed <= self.limit:
            return
        raise AttentionTooLarge(
            f"{self.where}: this call needs about {_gb(needed)} (~{pairs / 1e6:.0f}M {self.what}, "
            f"{pairs / max(self.all_pairs, 1):.0%} of all pairs, at ~{self.bytes_per_pair} bytes each), more than "
            f"{self.source} ({_gb(self.limit)}); refused before allocating. {self.advice}".rstrip())


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
