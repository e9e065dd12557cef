"""Find the attention sites of a graph: run the pattern families, analyse masks, name and describe.

Matching and rewriting are separate steps (as in torch.fx's subgraph rewriter): this module
only reads the graph. `rewrite.py` changes it.
"""
from __future__ import annotations

import re

import torch
import torch.fx as fx

from attnpass import patterns
from attnpass.graph_ops import shape, view
from attnpass.mask_analysis import ProbeSet, analyse_mask
from attnpass.site import AttentionSite, MaskInfo, SiteMatch, SkippedSite


def module_path(node: fx.Node) -> tuple[str, str]:
    """The owning module's dotted path and class name, from export's or dynamo's nn_module_stack."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    path = re.sub(r"^L\['self'\]\.?", "", str(path))
    path = re.sub(r"\[(\d+)\]", r".\1", path).replace("._modules['", ".").replace("']", "")
    cls_name = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1]
    return path.strip("."), cls_name


def _projection_source(node, steps: int = 16):
    """The input of the linear layer a q/k tensor was projected by, to tell self from cross attention."""
    for _ in range(steps):
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return node
        if node.target in (torch.ops.aten.linear.default, torch.nn.functional.linear, torch._C._nn.linear):
            return node.args[0]
        if node.target is torch.ops.aten.addmm.default:
            return node.args[1]
        tensors = [a for a in node.all_input_nodes
                   if isinstance(a.meta.get("val", a.meta.get("example_value")), (torch.Tensor, list, tuple))]
        if not tensors:
            return node
        node = tensors[0]
    return node


def _is_cross(match: SiteMatch, lq, lk) -> bool:
    if str(lq) != str(lk):
        return True
    return _projection_source(match.q) is not _projection_source(match.k)


def _describe(name: str, path: str, cls: str, match: SiteMatch, info: MaskInfo, heads_from_padding: int) -> AttentionSite:
    q_shape, k_shape, v_shape = shape(match.q), shape(match.k), shape(match.v)
    score_shape = shape(match.anchor.args[0]) if match.pattern != "sdpa" else None
    lq = score_shape[-2] if score_shape else q_shape[-2]
    lk = score_shape[-1] if score_shape else k_shape[-2]
    head_dim = q_shape[-1] if not match.q_adapter or match.q_adapter[0][0] in ("unsqueeze",) else _last_after(match.q, match.q_adapter)
    head_dim_v = v_shape[-1] if not match.v_adapter or match.v_adapter[0][0] == "unsqueeze" else _last_after(match.v, match.v_adapter)
    if match.batch_dims == 2:
        lead = score_shape[:2] if score_shape else q_shape[:2]
        batch, heads_q = lead[0], lead[1]
        layout = "B,H,L,D"
    elif heads_from_padding > 1:
        batch, heads_q = "B", heads_from_padding
        layout = "B*H,L,D"
    else:
        batch, heads_q = (score_shape or q_shape)[0], 1
        layout = "B*H,L,D (heads folded in batch)"
    heads_kv = heads_q // match.gqa_groups if isinstance(heads_q, int) else heads_q
    if match.batch_dims == 2 and match.gqa_groups == 1 and k_shape is not None and not match.k_adapter and k_shape[1] != heads_q:
        heads_kv = k_shape[1]
    mask = info.kind + (" (bottom-right)" if info.causal_bottom_right else "")
    if info.kind == "general" and info.why_general:
        mask = "general"
    return AttentionSite(
        name=name, module_path=path, module_type=cls, pattern=match.pattern,
        batch=batch, heads_q=heads_q, heads_kv=heads_kv, len_q=lq, len_k=lk,
        head_dim=head_dim, head_dim_v=head_dim_v, layout=layout,
        scale=match.scale, scale_note=match.scale_note, mask=mask, bias=info.bias_note,
        dropout=match.dropout_p, cross=_is_cross(match, lq, lk), dtype=_dtype(match.q),
        notes=list(match.notes) + ([info.why_general] if info.why_general else []),
        match=match, mask_info=info,
    )


def _dtype(node) -> str:
    val = node.meta.get("val", node.meta.get("example_value"))
    return str(val.dtype).replace("torch.", "") if isinstance(val, torch.Tensor) else "?"


def _last_after(node, adapter):
    s = shape(node)
    perm = [a for a in adapter if a[0] == "permute"]
    if perm:
        return s[perm[0][1][-1]]
    return s[-1]


def find_sites(gm: fx.GraphModule, probes: ProbeSet | None) -> tuple[list[AttentionSite], list[SkippedSite]]:
    """All attention sites of `gm` in graph order, and the skipped ones with their reasons."""
    sites, skipped, used = [], [], {}
    for node in list(gm.graph.nodes):
        for family in patterns.FAMILIES:
            try:
                match = family(node)
            except patterns.NotAttention:
                match = None
            except patterns.Skip as reason:
                path, _ = module_path(node)
                skipped.append(SkippedSite(_unique(path, used), path, _family_name(family, node), str(reason)))
                break
            if match is None:
                continue
            path, cls = module_path(node)
            name = _unique(path, used)
            score_node = match.anchor.args[0] if match.pattern != "sdpa" else None
            if probes is not None and score_node is not None:
                info = analyse_mask(match, score_node, probes)
            elif probes is not None:
                info = analyse_mask(match, _SdpaScores(match), probes)
            else:
                info = MaskInfo(kind="general" if match.pieces else ("causal" if match.causal else "none"),
                                general_bias=[p for p in match.pieces if p.kind == "add"],
                                general_bool=[p for p in match.pieces if p.kind != "add"])
            sites.append(_describe(name, path, cls, match, info, info.heads_from_padding))
            break
    return sites, skipped


class _SdpaScores:
    """Stands in for the (never materialised) scores node of an SDPA call: only its shape is read."""

    def __init__(self, match: SiteMatch):
        q = match.q.meta["val"]
        k = match.k.meta["val"]
        lead = list(q.shape[:-2]) if match.batch_dims == 2 else [q.shape[0]]
        self.meta = {"val": _ShapeOnly((*lead, q.shape[-2], k.shape[-2]))}


class _ShapeOnly:
    def __init__(self, shape):
        self.shape = shape


def _family_name(family, node) -> str:
    ov = view(node)
    return ov.kind if ov is not None else family.__name__


def _unique(path: str, used: dict) -> str:
    base = path or "<root>"
    used[base] = used.get(base, 0) + 1
    return base if used[base] == 1 else f"{base}#{used[base]}"
