"""Attention written out: scores = Q·Kᵀ, scaled, masked, biased, softmax, dropout, times V.

One walker instead of one template per model: from a softmax over the last axis, walk back
through the ops that only rescale, shift or mask the scores (mul/div by a scalar, add of a
tensor, masked_fill or where with a masking value, dtype casts) to a Q·Kᵀ product, and forward
through casts and dropout to a P·V product. Anything else on the way means the softmax is not
attention, or not one we can reproduce exactly, and the walker says which.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from attnpass.graph_ops import shape, view
from attnpass.site import MaskPiece, SiteMatch
from attnpass.patterns.common import PRODUCT_KINDS, NotAttention, Skip, constant_scalar, is_masking_value, normalise_dim
from attnpass.patterns.kv_repeat import unrepeat_kv
from attnpass.patterns.products import read_score_product, read_value_product

aten = torch.ops.aten
_CHAIN_KINDS = ("cast", "mul", "div", "add", "masked_fill", "where")


def _reaches_product(node, depth: int = 16) -> bool:
    """Does `node` come from a Q·Kᵀ product through score-chain ops only? (mask operands don't)"""
    for _ in range(depth):
        ov = view(node)
        if ov is None:
            return False
        if ov.kind in PRODUCT_KINDS:
            return True
        if ov.kind not in _CHAIN_KINDS:
            return False
        if ov.kind == "add":
            return any(_reaches_product(x, depth - 1) for x in (ov["x"], ov["y"]) if isinstance(x, fx.Node))
        node = ov["y"] if ov.kind == "where" and not isinstance(ov["x"], fx.Node) else ov["x"]
    return False


def _walk_back(start: fx.Node, internal: set):
    """From the softmax input back to the product: returns (product node, scale, pieces)."""
    scale, pieces, node = 1.0, [], start
    while True:
        ov = view(node)
        if ov is None:
            raise NotAttention
        if ov.kind in PRODUCT_KINDS:
            return node, scale, pieces
        internal.add(node)
        if ov.kind == "cast":
            node = ov["x"]
        elif ov.kind in ("mul", "div"):
            x, y = ov["x"], ov["y"]
            c = constant_scalar(y)
            if c is None and ov.kind == "mul":
                c, y, x = constant_scalar(x), x, y
            if c is None or not isinstance(x, fx.Node):
                raise NotAttention  # a gate or a learned temperature: not a plain scaled score
            if c == 0:
                raise Skip("scores multiplied by zero")
            scale *= c if ov.kind == "mul" else 1.0 / c
            node = x
        elif ov.kind == "add":
            x, y = ov["x"], ov["y"]
            if not isinstance(x, fx.Node) or not isinstance(y, fx.Node):
                raise Skip("a scalar added to the scores")
            x_path, y_path = _reaches_product(x), _reaches_product(y)
            if x_path == y_path:
                raise NotAttention
            path, term = (x, y) if x_path else (y, x)
            pieces.append(MaskPiece("add", term, scale))
            node = path
        elif ov.kind == "masked_fill":
            if not is_masking_value(ov["value"]):
                raise Skip(f"masked_fill with value {constant_scalar(ov['value'])}, not a masking value")
            pieces.append(MaskPiece("fill", ov["mask"], value=constant_scalar(ov["value"])))
            node = ov["x"]
        elif ov.kind == "where":
            cond, x, y = ov["cond"], ov["x"], ov["y"]
            if is_masking_value(y) and isinstance(x, fx.Node):
                pieces.append(MaskPiece("keep", cond, value=constant_scalar(y)))
                node = x
            elif is_masking_value(x) and isinstance(y, fx.Node):
                pieces.append(MaskPiece("fill", cond, value=constant_scalar(x)))
                node = y
            else:
                raise NotAttention
        else:
            raise NotAttention


def real_users(node: fx.Node) -> list[fx.Node]:
    """Users of a node other than export's metadata assertions (which check, not consume)."""
    return [u for u in node.users if u.target is not aten._assert_tensor_metadata.default]


def _walk_forward(softmax: fx.Node, internal: set):
    """From the softmax to the P·V product: returns (P node, product node, dropout p)."""
    node, p = softmax, 0.0
    while True:
        users = real_users(node)
        if len(users) != 1:
            if any(view(u) is not None and view(u).kind in ("matmul", "bmm", "einsum") for u in users):
                raise Skip("attention probabilities are also used elsewhere (returned attention weights?)")
            raise NotAttention
        user = users[0]
        ov = view(user)
        if ov is None:
            raise NotAttention
        if ov.kind in ("matmul", "bmm", "einsum"):
            return node, user, p
        internal.add(user)
        if ov.kind == "dropout":
            prob, train = ov["p"], ov["train"]
            if not isinstance(prob, (int, float)) or not isinstance(train, bool):
                raise Skip("dropout with a tensor probability or a traced training flag")
            p = float(prob) if train else 0.0
        elif ov.kind != "cast":
            raise NotAttention
        node = user


def _check_kv_broadcast(heads_q, heads_k, heads_v) -> None:
    """K/V may have fewer heads than Q (GQA/MQA by broadcasting or repetition), as the canonical
    op allows: q head h reads kv head h // (Hq // Hkv). Anything else is not exact there."""
    if str(heads_k) != str(heads_v):
        raise Skip(f"K has {heads_k} heads and V has {heads_v}")
    if str(heads_k) == str(heads_q) or heads_k == 1:
        return
    if isinstance(heads_q, int) and isinstance(heads_k, int) and heads_q % heads_k == 0:
        return
    raise Skip(f"K/V with {heads_k} heads broadcast against {heads_q} query heads")


def match_softmax_chain(node: fx.Node) -> SiteMatch | None:
    ov = view(node)
    if ov is None or ov.kind != "softmax":
        return None
    scores_shape = shape(ov["x"])
    if scores_shape is None or len(scores_shape) < 2:
        return None
    rank = len(scores_shape)
    if normalise_dim(ov["dim"], rank) != rank - 1:
        raise NotAttention  # softmax over the query axis (or any other) is not attention
    internal = {node}
    product_node, scale, pieces = _walk_back(ov["x"], internal)
    scores = read_score_product(product_node)
    if scores is None:
        raise NotAttention
    if scores.batch_dims not in (1, 2):
        raise Skip(f"scores with {scores.batch_dims} batch dims (only (B, H, L, L) and (B*H, L, L) layouts)")
    internal.add(product_node)
    probs, pv_node, p = _walk_forward(node, internal)
    value = read_value_product(pv_node, probs, scores.batch_dims)
    if value is None:
        raise NotAttention
    for inner in internal:
        outside = [u for u in real_users(inner) if u not in internal and u is not pv_node]
        if outside:
            raise Skip(f"intermediate {inner.name} of the attention is also used by {outside[0].name}")
    notes: list[str] = []
    q, k, v = scores.q, scores.k, value.v
    k_adapter, v_adapter = scores.k_adapter, value.v_adapter
    if scores.batch_dims == 2 and not k_adapter and not v_adapter:
        k_src, nk = unrepeat_kv(k)
        v_src, nv = unrepeat_kv(v)
        if nk == nv and nk > 1:
            k, v = k_src, v_src
            notes.append("kv heads repeated before the product")
    if scores.batch_dims == 2 and all(step[0] == "transpose" for step in k_adapter) and not v_adapter:
        _check_kv_broadcast(shape(product_node)[1], shape(k)[1], shape(v)[1])
    to4 = [("unsqueeze", 1)] if scores.batch_dims == 1 else []
    pieces = scores.pieces + pieces
    return SiteMatch(
        pattern=f"{scores.spelling}-softmax",
        anchor=node, output=pv_node, q=q, k=k, v=v,
        q_adapter=scores.q_adapter + to4, k_adapter=k_adapter + to4, v_adapter=v_adapter + to4,
        out_adapter=([("squeeze", 1)] if scores.batch_dims == 1 else []) + value.out_adapter,
        scale=scores.scale * scale, scale_note=", ".join(dict.fromkeys(scores.scale_notes)),
        pieces=pieces, dropout_p=p, internal=internal, notes=notes,
        batch_dims=scores.batch_dims,
    )
