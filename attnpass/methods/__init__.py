"""The registry of attention methods a site can be bound to.

Method classes are imported on first use: each pulls in its kernels, and a user asking for
`method="dense"` should not pay for (or be broken by) the others.
"""
from __future__ import annotations

import importlib

from attnpass.methods.base import SiteAttention, SiteSpec

_CLASSES = {
    "dense": "attnpass.methods.dense:DenseAttention",
    "combiner": "attnpass.methods.combiner:CombinerAttention",
    "routing": "attnpass.methods.routing:RoutingAttention",
    "sbm": "attnpass.methods.sbm:SBMAttention",
    "sparsefinder": "attnpass.methods.sparsefinder:SparsefinderAttention",
}

# The names a user can pass as `method=`.
METHODS: tuple[str, ...] = tuple(_CLASSES)

# Methods described in the design whose kernels are being built (see the issues); named here so
# the error for them says so rather than "unknown".
PLANNED: tuple[str, ...] = ()


def method_class(name: str) -> type[SiteAttention]:
    if not isinstance(name, str):
        raise TypeError(f"method must be a string, got {type(name).__name__}")
    key = name.lower()
    if key in _CLASSES:
        module, cls = _CLASSES[key].split(":")
        return getattr(importlib.import_module(module), cls)
    if key in PLANNED:
        raise NotImplementedError(f"method {name!r} is not available in this version yet; available: {list(METHODS)}")
    raise ValueError(f"unknown method {name!r}; available: {list(METHODS)}")


__all__ = ["METHODS", "SiteAttention", "SiteSpec", "method_class"]
