"""Inline nn.MultiheadAttention's attention into a dynamo graph, so the patterns can see it.

dynamo does not trace into `torch.nn.functional.multi_head_attention_forward` (nn.MultiheadAttention,
nn.TransformerEncoderLayer with grad enabled): it puts ONE call_function node in the graph, and the
softmax(QK^T)V inside it is invisible to the pattern library. `torch.export` traces into it, which is
why `sparsify` finds these sites.

Here each such node is traced with `make_fx(tracing_mode="symbolic", pre_dispatch=True)` on the
node's own example values (dynamo's fake tensors): make_fx picks up dynamo's fake mode, so sizes
stay dynamo's symbols (no new shape environment, no specialisation: the function's shape checks
were already evaluated on these same fakes when dynamo propagated them). Pre-dispatch keeps the
ATen spelling `torch.export` produces (`aten.linear`, `aten.scaled_dot_product_attention`,
`aten.baddbmm > aten.softmax > aten.bmm`), which `graph_ops` reads. The traced graph is copied in
place of the node, its nodes carrying the node's `nn_module_stack` (site names are the module
paths, as in `sparsify`) and their fake values as `example_value` and `val`; the users of the
node's (attn_output, attn_weights) tuple are pointed at the copied outputs. Unused outputs (the
averaged weights of `need_weights=True` when the model drops them) are left to dead-code
elimination, as `sparsify` does after export.

PyTorch's fused inference fast path of nn.TransformerEncoderLayer (`torch._transformer_encoder_layer_fwd`,
taken in eval mode under no_grad) is a native op with no decomposition. It is first lowered to what
the layer's own slow path computes (`TransformerEncoderLayer.forward` after its fast-path check:
layer norms, `F.multi_head_attention_forward`, the feed-forward block; dropout is off, as the fast
path is only taken in eval mode), spelled as dynamo would have (torch functions with
`example_value`s), the attention call carrying a `<layer>.self_attn` module entry so the site has
the name `sparsify` gives it; that call is then inlined like any other. The fast path is meant to
compute the slow path's function; `tests/test_compile_backend.py` checks the compiled model against
the eager fast path (pre- and post-norm, ReLU and GELU, padding and causal+padding masks). Masks
are passed on as the layer passes them (mask types 1 and 2 of `MultiheadAttention.merge_masks`);
another mask type is declined. `torch._native_multi_head_attention` (nn.MultiheadAttention's own
fast path, which dynamo was not seen to take on the zoo models) is not lowered: it stays reported.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.fx.experimental.proxy_tensor import make_fx

MHA_FORWARD = F.multi_head_attention_forward
ENCODER_LAYER_FAST_PATH = getattr(torch, "_transformer_encoder_layer_fwd", None)
_COPIED_META = ("nn_module_stack", "stack_trace", "source_fn_stack")


def inline_mha(gm: fx.GraphModule) -> tuple[list[fx.Node], dict[fx.Node, str]]:
    """Lower every `torch._transformer_encoder_layer_fwd` node of `gm` to the layer's slow path, then
    replace every `F.multi_head_attention_forward` node by its traced body.

    Returns the nodes replaced (now erased from the graph, kept for their metadata) and, for each
    node left as it was, the reason. The caller runs dead-code elimination.
    """
    inlined, declined = [], {}
    # fast-path layers first: lowering one leaves an F.multi_head_attention_forward call to inline
    for target, replace in ((ENCODER_LAYER_FAST_PATH, _lower_encoder_layer), (MHA_FORWARD, _inline)):
        for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]:
            try:
                replace(gm, node)
            except _Decline as reason:
                declined[node] = str(reason)
                continue
            inlined.append(node)
    if inlined:
        gm.graph.lint()
        gm.recompile()
    return inlined, declined


class _Decline(Exception):
    """A call that cannot be inlined; the message is the reason reported to the user."""


def _inline(gm: fx.GraphModule, node: fx.Node) -> None:
    users = list(node.users)
    if not all(u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int) for u in users):
        raise _Decline("its (attn_output, attn_weights) result is used other than by indexing: "
                       + ", ".join(u.format_node() for u in users))
    flat, spec = pytree.tree_flatten((node.args, node.kwargs))
    inputs = list(dict.fromkeys(a for a in flat if isinstance(a, fx.Node)))  # one input per distinct node
    values = [n.meta.get("example_value", n.meta.get("val")) for n in inputs]
    bad = [n.name for n, v in zip(inputs, values) if not isinstance(v, torch.Tensor)]
    if bad:
        raise _Decline(f"multi_head_attention_forward: arguments {bad} are not tensors with example values")
    position = {n: i for i, n in enumerate(inputs)}

    def call(*tensors):
        # the same graph value is the same tensor object: the function tests `query is key`
        leaves = [tensors[position[a]] if isinstance(a, fx.Node) else a for a in flat]
        args, kwargs = pytree.tree_unflatten(leaves, spec)
        return MHA_FORWARD(*args, **kwargs)

    try:
        traced = make_fx(call, tracing_mode="symbolic", pre_dispatch=True)(*values)
    except Exception as error:  # noqa: BLE001 - any tracing failure leaves the call as it was, reported
        raise _Decline(f"multi_head_attention_forward could not be traced: {type(error).__name__}: {error}") from None
    if any(n.op in ("get_attr", "call_module") for n in traced.graph.nodes):
        raise _Decline("multi_head_attention_forward traced to a graph with constants or modules; not inlined")

    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    val_map = dict(zip(placeholders, inputs))
    meta = {key: node.meta[key] for key in _COPIED_META if key in node.meta}
    with gm.graph.inserting_before(node):
        outputs = gm.graph.graph_copy(traced.graph, val_map)
    for new in traced.graph.nodes:
        copied = val_map.get(new)
        if new.op in ("placeholder", "output") or copied is None:
            continue
        copied.meta.update(meta)
        if "val" in copied.meta:
            copied.meta["example_value"] = copied.meta["val"]  # dynamo's key; graph_ops.meta_val reads both
    outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    for user in users:
        index = user.args[1]
        if index >= len(outputs) or not isinstance(outputs[index], fx.Node):
            raise AssertionError(f"multi_head_attention_forward: output {index} used but traced as {outputs}")
        user.replace_all_uses_with(outputs[index])
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)


# -- nn.TransformerEncoderLayer's fused fast path, lowered to its slow path ----------------------

_ENCODER_LAYER_ARGS = ("src", "embed_dim", "num_heads", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias",
                       "use_gelu", "norm_first", "eps", "norm1_weight", "norm1_bias", "norm2_weight", "norm2_bias",
                       "linear1_weight", "linear1_bias", "linear2_weight", "linear2_bias", "mask", "mask_type")


def _lower_encoder_layer(gm: fx.GraphModule, node: fx.Node) -> None:
    """Replace `torch._transformer_encoder_layer_fwd(...)` by the layer's slow path (see the module docstring)."""
    a = dict(zip(_ENCODER_LAYER_ARGS, node.args))
    a.update(node.kwargs)
    a.setdefault("mask", None)
    a.setdefault("mask_type", None)
    constants = ("embed_dim", "num_heads", "use_gelu", "norm_first", "eps", "mask_type")
    if any(isinstance(a[name], fx.Node) for name in constants):
        raise _Decline("_transformer_encoder_layer_fwd: a size or flag is a graph value, not a constant")
    src = a["src"]
    src_val = _value(src)
    if not isinstance(src_val, torch.Tensor) or src_val.dim() != 3:
        raise _Decline("_transformer_encoder_layer_fwd: the input is not a (batch, length, embed) tensor")
    mask, mask_type = a["mask"], a["mask_type"]
    if (mask is None) != (mask_type is None) or mask_type not in (None, 1, 2):
        raise _Decline(f"_transformer_encoder_layer_fwd: mask type {mask_type!r} is not one this pass knows")

    graph = gm.graph
    meta = {key: node.meta[key] for key in _COPIED_META if key in node.meta}
    stack = dict(meta.get("nn_module_stack", {}))
    if stack:  # the attention belongs to the layer's self_attn, as in the slow path
        path, _ = list(stack.values())[-1]
        stack[f"{path}.self_attn"] = (f"{path}.self_attn", torch.nn.MultiheadAttention)

    def emit(fn, *args, **kwargs):
        new = graph.call_function(fn, args, kwargs)
        new.meta.update(meta)
        values = pytree.tree_map(_value, (args, kwargs))
        new.meta["example_value"] = fn(*values[0], **values[1])
        return new

    def norm(x, which):
        return emit(F.layer_norm, x, (a["embed_dim"],), a[f"{which}_weight"], a[f"{which}_bias"], a["eps"])

    def self_attention(x):  # (B, L, E) in and out; the function wants (L, B, E)
        t = emit(torch.transpose, x, 0, 1)
        kpm = mask if mask_type == 1 else None
        attn_mask = None
        if mask_type == 2:  # (B, H, L, L), attn_mask and padding merged: one (B*H, L, L) attention mask
            attn_mask = emit(torch.flatten, mask, 0, 1)
        out = emit(MHA_FORWARD, t, t, t, a["embed_dim"], a["num_heads"], a["qkv_weight"], a["qkv_bias"], None,
                   None, False, 0.0, a["proj_weight"], a["proj_bias"], training=False, key_padding_mask=kpm,
                   need_weights=False, attn_mask=attn_mask)
        out.meta["nn_module_stack"] = stack
        return emit(torch.transpose, emit(operator.getitem, out, 0), 0, 1)

    def feed_forward(x):
        hidden = emit(F.linear, x, a["linear1_weight"], a["linear1_bias"])
        hidden = emit(F.gelu if a["use_gelu"] else F.relu, hidden)
        return emit(F.linear, hidden, a["linear2_weight"], a["linear2_bias"])

    with graph.inserting_before(node):
        if a["norm_first"]:
            x = emit(operator.add, src, self_attention(norm(src, "norm1")))
            x = emit(operator.add, x, feed_forward(norm(x, "norm2")))
        else:
            x = norm(emit(operator.add, src, self_attention(src)), "norm1")
            x = norm(emit(operator.add, x, feed_forward(x)), "norm2")
    node.replace_all_uses_with(x)
    graph.erase_node(node)


def _value(x):
    return x.meta.get("example_value", x.meta.get("val")) if isinstance(x, fx.Node) else x
