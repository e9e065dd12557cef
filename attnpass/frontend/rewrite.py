"""Replace each attention site of a graph by one call of its site module.

For a site: bring q, k, v to the canonical layout (the pattern's adapters), build what remains
of its masking after mask analysis (structured padding becomes a (B, Lk) bool vector, general
pieces stay tensors), call the site module, bring the output back to the model's layout, and
point the old output's users at it. The old chain — and the L x L mask it was fed, when the mask
was recovered as structure — is then dead and removed.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from attnpass.frontend.graph_ops import meta_val
from attnpass.frontend.site import AttentionSite, MaskPiece

aten = torch.ops.aten
_DROPOUTS = (torch.nn.functional.dropout,)  # dynamo spelling; ATen random ops are recognised by tag


def _apply(graph: fx.Graph, node: fx.Node, adapter) -> fx.Node:
    for step in adapter:
        op = step[0]
        if op == "transpose":
            node = graph.call_function(aten.transpose.int, (node, step[1], step[2]))
        elif op == "permute":
            node = graph.call_function(aten.permute.default, (node, list(step[1])))
        elif op == "unsqueeze":
            node = graph.call_function(aten.unsqueeze.default, (node, step[1]))
        elif op == "squeeze":
            node = graph.call_function(aten.squeeze.dim, (node, step[1]))
        elif op == "split_heads":
            node = graph.call_function(aten.unflatten.int, (node, 0, [-1, step[1]]))
        elif op == "merge_heads":
            node = graph.call_function(aten.flatten.using_ints, (node, 0, 1))
        elif op == "flatten":
            node = graph.call_function(aten.flatten.using_ints, (node, step[1], step[2]))
        elif op == "unflatten":
            sizes = [graph.call_function(aten.sym_size.int, size) if isinstance(size, tuple) else size
                     for size in step[2]]
            node = graph.call_function(aten.unflatten.int, (node, step[1], sizes))
        else:
            raise AssertionError(f"unknown adapter step {op}")
    return node


def _piece_rank(piece: MaskPiece) -> int:
    """The rank of a piece in the scores' layout, read off the model's own piece (nodes built here
    have no metadata)."""
    rank = len(meta_val(piece.node).shape)
    return rank + sum(step[0] == "split_heads" for step in piece.adapter)


def _to_canonical_rank(graph, node, piece: MaskPiece, site: AttentionSite, heads: int):
    """A mask/bias piece in the scores' layout, moved to (B, H, Lq, Lk): a 3-D site's
    (B*H, Lq, Lk)-broadcastable piece gets its heads, a blocked site's (G1, .., Gn, H, Lq, Lk) piece
    its leading dims merged (patterns.softmax_chain checked they are whole or 1)."""
    rank = _piece_rank(piece)
    if site.match.batch_dims > 2 and rank > 4:
        return _apply(graph, node, [("flatten", 0, rank - 4)])
    if site.match.batch_dims != 1 or rank < 3:
        return node
    step = ("split_heads", heads) if heads > 1 else ("unsqueeze", 1)
    return _apply(graph, node, [step])


def _with_heads(adapter, heads: int, merge: bool):
    """Replace the 3-D layout's unsqueeze/squeeze by a split/merge of the recovered heads."""
    if heads <= 1:
        return adapter
    out = []
    for step in adapter:
        if step == ("unsqueeze", 1) and not merge:
            out.append(("split_heads", heads))
        elif step == ("squeeze", 1) and merge:
            out.append(("merge_heads",))
        else:
            out.append(step)
    return out


def rewrite_site(gm: fx.GraphModule, site: AttentionSite, target: str) -> fx.Node:
    """Rewrite one site to `call_module(target, ...)`; returns the call node."""
    match, info = site.match, site.mask_info
    graph = gm.graph
    heads = info.heads_from_padding
    with graph.inserting_before(match.output):
        q = _apply(graph, match.q, _with_heads(match.q_adapter, heads, False))
        k = _apply(graph, match.k, _with_heads(match.k_adapter, heads, False))
        v = _apply(graph, match.v, _with_heads(match.v_adapter, heads, False))
        bias = None
        for piece in info.general_bias:
            term = _apply(graph, piece.node, piece.adapter)
            term = term if piece.coef == 1.0 else graph.call_function(aten.mul.Tensor, (term, piece.coef))
            term = _to_canonical_rank(graph, term, piece, site, heads)
            bias = term if bias is None else graph.call_function(aten.add.Tensor, (bias, term))
        mask = None
        for piece in info.general_bool:
            keep = _apply(graph, piece.node, piece.adapter)
            if piece.kind == "fill":
                keep = graph.call_function(aten.logical_not.default, (keep,))
            elif meta_val(piece.node) is not None and meta_val(piece.node).dtype != torch.bool:
                keep = graph.call_function(aten.ne.Scalar, (keep, 0))
            keep = _to_canonical_rank(graph, keep, piece, site, heads)
            mask = keep if mask is None else graph.call_function(aten.logical_and.default, (mask, keep))
        key_keep = None
        if info.padding_input is not None:
            test = aten.eq.Scalar if info.padding_keep_zero else aten.ne.Scalar
            key_keep = graph.call_function(test, (info.padding_input, 0))
        kwargs = {"bias": bias, "mask": mask, "key_keep": key_keep, "dropout_p": match.dropout_p}
        if info.empty_rows != "zero":  # a fact of this graph's masking, not of the site module
            kwargs["empty_rows"] = info.empty_rows
        call = graph.call_module(target, (q, k, v), kwargs)
        call.meta["nn_module_stack"] = dict(match.anchor.meta.get("nn_module_stack", {}))
        call.meta["attnpass_site"] = site.name
        out = _apply(graph, call, _with_heads(match.out_adapter, heads, True))
    match.output.replace_all_uses_with(out)
    return call


def remove_dead_code(gm: fx.GraphModule) -> None:
    """Dead-code elimination that can remove the replaced attention chains.

    FX keeps random ops (dropout, SDPA with dropout) and metadata assertions as impure even when
    their value is unused; here an unused random op is dead, and an `_assert_tensor_metadata` check is dropped
    when the value it checks is otherwise dead (it alone would keep the L x L mask alive).
    """
    graph = gm.graph
    asserts = (aten._assert_tensor_metadata.default,)

    def impure(node: fx.Node) -> bool:
        random = isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags
        return node.is_impure() and not random and node.target not in _DROPOUTS

    changed = True
    while changed:
        changed = False
        graph.eliminate_dead_code(is_impure_node=impure)
        for node in list(graph.nodes):
            if node.op == "call_function" and node.target in asserts:
                subject = node.args[0]
                if isinstance(subject, fx.Node) and all(u.target in asserts for u in subject.users):
                    graph.erase_node(node)
                    changed = True
    gm.recompile()
