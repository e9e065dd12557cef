"""`scaled_dot_product_attention`, as export and dynamo spell it.

The call already is one attention: read its operands, turn attn_mask into a mask piece (bool:
pairs where it is False are removed; float: added to the scores), and its is_causal flag into
top-left causal structure, as SDPA defines it.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from attnpass.frontend.graph_ops import dtype, shape, view
from attnpass.frontend.site import MaskPiece, SiteMatch
from attnpass.patterns.common import Skip
from attnpass.patterns.kv_repeat import unrepeat_kv


def match_sdpa(node: fx.Node) -> SiteMatch | None:
    ov = view(node)
    if ov is None or ov.kind != "sdpa":
        return None
    q, k, v = ov["q"], ov["k"], ov["v"]
    q_shape = shape(q)
    if q_shape is None or len(q_shape) not in (3, 4):
        raise Skip(f"scaled_dot_product_attention on rank-{len(q_shape or ())} inputs")
    scale = ov["scale"]
    if scale is None and isinstance(q_shape[-1], int):
        scale = 1.0 / math.sqrt(q_shape[-1])
    # scale None: SDPA's default 1/sqrt(d) of a head dim only known at run time
    if scale is not None and not isinstance(scale, (int, float)):
        raise Skip("scale given as a tensor")
    pieces = []
    mask = ov["attn_mask"]
    if mask is not None:
        pieces.append(MaskPiece("keep" if dtype(mask) == torch.bool else "add", mask))
    if ov["is_causal"] and mask is not None:
        raise Skip("is_causal together with attn_mask")
    p = ov["dropout_p"]
    if not isinstance(p, (int, float)):
        raise Skip("dropout_p given as a tensor")
    notes = []
    if len(q_shape) == 4:
        k_src, nk = unrepeat_kv(k)
        v_src, nv = unrepeat_kv(v)
        if nk == nv and nk > 1:
            k, v = k_src, v_src
            notes.append("kv heads repeated before the call")
    adapter = [] if len(q_shape) == 4 else [("unsqueeze", 1)]
    out_adapter = [] if len(q_shape) == 4 else [("squeeze", 1)]
    return SiteMatch(
        pattern="sdpa", anchor=node, output=node, q=q, k=k, v=v,
        q_adapter=list(adapter), k_adapter=list(adapter), v_adapter=list(adapter), out_adapter=out_adapter,
        scale=None if scale is None else float(scale), pieces=pieces, causal=bool(ov["is_causal"]), dropout_p=float(p),
        internal=set(), notes=notes, batch_dims=len(q_shape) - 2,
    )
