"""The registry of attention methods a site can be bound to."""
from __future__ import annotations

from attnpass.methods.base import SiteAttention, SiteSpec
from attnpass.methods.dense import DenseAttention

METHODS: dict[str, type[SiteAttention]] = {
    "dense": DenseAttention,
}

# Methods described in the design whose kernels are being built (see the issues); named here so
# the error for them says so rather than "unknown".
PLANNED = ("combiner", "routing", "sbm", "sparsefinder")


def method_class(name: str) -> type[SiteAttention]:
    if not isinstance(name, str):
        raise TypeError(f"method must be a string, got {type(name).__name__}")
    key = name.lower()
    if key in METHODS:
        return METHODS[key]
    if key in PLANNED:
        raise NotImplementedError(f"method {name!r} is not available in this version yet; available: {sorted(METHODS)}")
    raise ValueError(f"unknown method {name!r}; available: {sorted(METHODS)}")


__all__ = ["METHODS", "SiteAttention", "SiteSpec", "method_class"]
