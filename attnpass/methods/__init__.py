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


def canonical_method(name: str) -> str:
    """The registry key of a method name (`"Combiner"` -> `"combiner"`); a clear error if there is none."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a string, got {type(name).__name__}")
    key = name.lower()
    if key not in _CLASSES:
        raise ValueError(f"unknown method {name!r}; available: {list(METHODS)}")
    return key


def method_class(name: str) -> type[SiteAttention]:
    module, cls = _CLASSES[canonical_method(name)].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["METHODS", "SiteAttention", "SiteSpec", "canonical_method", "method_class"]
