"""Grouped-query attention spelled by repeating K and V heads before the product.

Hugging Face's `repeat_kv` does `k[:, :, None].expand(B, Hkv, n, L, D).reshape(B, Hkv*n, L, D)`;
others call `repeat_interleave(k, n, dim=1)`. Both give q head h the kv head h // n, the
convention of SDPA's enable_gqa and of the attnpass kernels, so the un-repeated K/V can be used
directly: nothing is copied, and the site reports its true kv head count.
"""
from __future__ import annotations

import torch.fx as fx

from attnpass.frontend.graph_ops import same_size, shape, view


def _through_unsqueeze(node: fx.Node, rank: int) -> fx.Node | None:
    """From a (B, Hkv, 1, L, D) node back to the (B, Hkv, L, D) node it adds an axis to."""
    while True:
        s = shape(node)
        if s is not None and len(s) == rank - 1:
            return node
        ov = view(node)
        if ov is None:
            return None
        if ov.kind == "unsqueeze" and ov["dim"] in (2, -3):
            node = ov["x"]
        elif ov.kind == "slice" and ov["start"] in (None, 0) and ov["step"] == 1 and (ov["end"] is None or ov["end"] >= 2**62):
            node = ov["x"]
        else:
            return None


def unrepeat_kv(node: fx.Node) -> tuple[fx.Node, int]:
    """(source, n) when `node` is `source` with each head repeated n times along dim 1, else (node, 1)."""
    out_shape = shape(node)
    if out_shape is None or len(out_shape) != 4:
        return node, 1
    ov = view(node)
    if ov is not None and ov.kind == "repeat_interleave" and ov["dim"] in (1, -3) and isinstance(ov["repeats"], int):
        return ov["x"], ov["repeats"]
    if ov is None or ov.kind != "reshape":
        return node, 1
    expanded = view(ov["x"])
    if expanded is None or expanded.kind != "expand":
        return node, 1
    five = shape(expanded.node)
    src5 = shape(expanded["x"])
    if five is None or src5 is None or len(five) != 5 or len(src5) != 5 or src5[2] != 1:
        return node, 1
    n = five[2]
    if not isinstance(n, int) or not same_size(five[1] * n, out_shape[1]):
        return node, 1
    source = _through_unsqueeze(expanded["x"], 5)
    if source is None:
        return node, 1
    s = shape(source)
    if not all(same_size(a, b) for a, b in zip((s[0], s[1], s[2], s[3]), (five[0], five[1], five[3], five[4]))):
        return node, 1
    return source, n
