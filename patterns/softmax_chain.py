"""Attention written out: scores = Q·Kᵀ, scaled, masked, biased, softmax, dropout, times V.

One walker instead of one template per model: from a softmax over the last axis, walk back
through the ops that only rescale, shift or mask the scores (mul/div by a scalar, add of a
tensor, masked_fill or where with a masking value, dtype casts) to a Q·Kᵀ product, and forward
through casts and dropout to a P·V product. Anything else on the way means the softmax is not
attention, or not one we can reproduce exactly, and the walker says which.

The site's layout is the softmax's. Two ways of reaching it are read through:
- heads folded into the batch around the softmax (BLOOM, DeBERTa-v2): a (B*H, L, L) bmm/baddbmm
  viewed as (B, H, L, L) for the mask and softmax, and viewed back for a (B*H, L, D) bmm with V;
- more than two leading dims (LongT5's local blocks (B, blocks, H, l, 3l), ProphetNet's n-gram
  streams (B, n, H, L, 2L)): the leading ones are merged into the canonical op's batch, so each
  block still attends only to its own keys (O(L·w) stays O(L·w)).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from attnpass.frontend.graph_ops import IN_PLACE, same_size, shape, view
from attnpass.frontend.site import MaskPiece, SiteMatch
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
        if ov.kind not in _CHAIN_KINDS and _heads_split(ov) is None:
            return False
        if ov.kind == "add":
            return any(_reaches_product(x, depth - 1) for x in (ov["x"], ov["y"]) if isinstance(x, fx.Node))
        node = ov["y"] if ov.kind == "where" and not isinstance(ov["x"], fx.Node) else ov["x"]
    return False


def _heads_split(ov) -> int | None:
    """H when `ov` views (B*H, Lq, Lk) scores as (B, H, Lq, Lk) with a static H, else None."""
    if ov.kind != "reshape":
        return None
    src, out = shape(ov["x"]), shape(ov.node)
    if src is None or out is None or len(src) != 3 or len(out) != 4 or not isinstance(out[1], int):
        return None
    return out[1] if same_size(src[1], out[2]) and same_size(src[2], out[3]) else None


def _heads_merged(ov) -> bool:
    """Does `ov` view (B, H, Lq, Lk) probabilities as (B*H, Lq, Lk)?"""
    if ov.kind != "reshape":
        return False
    src, out = shape(ov["x"]), shape(ov.node)
    return (src is not None and out is not None and len(src) == 4 and len(out) == 3
            and same_size(src[2], out[1]) and same_size(src[3], out[2]))


def _in_scores_layout(piece: MaskPiece, heads: int | None) -> MaskPiece:
    """A piece met before the (B*H, L, L) -> (B, H, L, L) view: split its heads the same way."""
    s = shape(piece.node)
    if heads is not None and s is not None and len(s) == 3 and s[0] != 1:
        piece.adapter = [("split_heads", heads)]
    return piece


def _walk_back(start: fx.Node, internal: set):
    """From the softmax input back to the product: returns (product node, scale, pieces, heads),
    `heads` being H when the walk passed a view of (B*H, Lq, Lk) scores as (B, H, Lq, Lk)."""
    scale, pieces, node, heads = 1.0, [], start, None
    while True:
        ov = view(node)
        if ov is None:
            raise NotAttention
        if ov.kind in PRODUCT_KINDS:
            return node, scale, pieces, heads
        internal.add(node)
        if ov.kind == "cast":
            node = ov["x"]
        elif heads is None and (split := _heads_split(ov)) is not None:
            # BLOOM / DeBERTa-v2: a (B*H, L, L) bmm or baddbmm viewed as (B, H, L, L) before the mask
            # and the softmax; the view only regroups the batch, and the pieces met from here on
            # (ALiBi, DeBERTa's position terms) are regrouped the same way (`_in_scores_layout`)
            heads, node = split, ov["x"]
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
            if node.target in IN_PLACE and path is not x:
                # `term += scores`: the sum lives in the term's storage, which the model may read again
                raise Skip("scores added in place into another tensor (term += scores)")
            pieces.append(_in_scores_layout(MaskPiece("add", term, scale), heads))
            node = path
        elif ov.kind == "masked_fill":
            if not is_masking_value(ov["value"]):
                raise Skip(f"masked_fill with value {constant_scalar(ov['value'])}, not a masking value")
            pieces.append(_in_scores_layout(MaskPiece("fill", ov["mask"], value=constant_scalar(ov["value"])), heads))
            node = ov["x"]
        elif ov.kind == "where":
            cond, x, y = ov["cond"], ov["x"], ov["y"]
            if is_masking_value(y) and isinstance(x, fx.Node):
                pieces.append(_in_scores_layout(MaskPiece("keep", cond, value=constant_scalar(y)), heads))
                node = x
            elif is_masking_value(x) and isinstance(y, fx.Node):
                pieces.append(_in_scores_layout(MaskPiece("fill", cond, value=constant_scalar(x)), heads))
                node = y
            else:
                raise NotAttention
        else:
            raise NotAttention


def real_users(node: fx.Node) -> list[fx.Node]:
    """Users of a node other than export's metadata assertions (which check, not consume)."""
    return [u for u in node.users if u.target is not aten._assert_tensor_metadata.default]


def _walk_forward(softmax: fx.Node, internal: set, fill_masks: set):
    """From the softmax to the P·V product: returns (P node, product node, dropout p, merged,
    zeroed), `merged` when the walk passed a view of (B, H, Lq, Lk) probabilities as (B*H, Lq, Lk),
    `zeroed` when it passed `masked_fill(P, m, 0)` with a mask m that also filled the scores before
    the softmax (SEW-D's XSoftmax): P is unchanged at every row with an allowed key, and a row with
    none gives zeros."""
    node, p, merged, zeroed = softmax, 0.0, False, False
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
            return node, user, p, merged, zeroed
        internal.add(user)
        if ov.kind == "dropout":
            prob, train = ov["p"], ov["train"]
            if not isinstance(prob, (int, float)) or not isinstance(train, bool):
                raise Skip("dropout with a tensor probability or a traced training flag")
            p = float(prob) if train else 0.0
        elif not merged and _heads_merged(ov):
            merged = True  # BLOOM / DeBERTa-v2: viewed back to (B*H, L, L) for a bmm with (B*H, L, D) values
        elif ov.kind == "masked_fill" and ov["mask"] in fill_masks and constant_scalar(ov["value"]) == 0.0:
            zeroed = True
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
    product_node, scale, pieces, split = _walk_back(ov["x"], internal)
    scores = read_score_product(product_node)
    if scores is None:
        raise NotAttention
    batch_dims = rank - 2  # the site's layout is the softmax's
    if batch_dims < 1:
        raise Skip(f"scores with {batch_dims} batch dims (no batch or head axis)")
    if scores.batch_dims != (1 if split else batch_dims):
        raise Skip(f"scores of rank {scores.batch_dims + 2} broadcast to rank {rank} before the softmax")
    internal.add(product_node)
    fill_masks = {piece.node for piece in pieces if piece.kind == "fill"}
    probs, pv_node, p, merged, zeroed = _walk_forward(node, internal, fill_masks)
    value = read_value_product(pv_node, probs, 1 if merged else batch_dims)
    if value is None:
        raise NotAttention
    for inner in internal:
        outside = [u for u in real_users(inner) if u not in internal and u is not pv_node]
        if outside:
            raise Skip(f"intermediate {inner.name} of the attention is also used by {outside[0].name}")
    notes: list[str] = []
    q, k, v = scores.q, scores.k, value.v
    q_adapter, k_adapter, v_adapter = list(scores.q_adapter), list(scores.k_adapter), list(value.v_adapter)
    out_adapter = list(value.out_adapter)
    if batch_dims == 2 and not split and not merged and not k_adapter and not v_adapter:
        k_src, nk = unrepeat_kv(k)
        v_src, nv = unrepeat_kv(v)
        if nk == nv and nk > 1:
            k, v = k_src, v_src
            notes.append("kv heads repeated before the product")
    if batch_dims == 2 and not split and not merged and all(step[0] == "transpose" for step in k_adapter) and not v_adapter:
        _check_kv_broadcast(shape(product_node)[1], shape(k)[1], shape(v)[1])
    if split:  # Q·Kᵀ in (B*H, L, D): its operands split to the softmax's (B, H, L, D)
        q_adapter.append(("split_heads", split))
        k_adapter.append(("split_heads", split))
    if merged:  # P·V in (B*H, L, D): V split to (B, H, L, D), the output merged back
        if not isinstance(scores_shape[1], int):
            raise Skip(f"probabilities of {scores_shape[1]} heads viewed as (B*H, L, L): the head count is not static")
        v_adapter.append(("split_heads", scores_shape[1]))
        out_adapter.insert(0, ("merge_heads",))
    # from the softmax inwards, as the walk met them (mask analysis reads them back in reverse, in
    # the order they apply): the product's own term comes last
    pieces = pieces + [_scaled(piece, scale, split) for piece in scores.pieces]
    if batch_dims == 1:  # (B*H, L, L): one head per batch row, unless mask analysis finds the heads
        to_canonical, from_canonical = [("unsqueeze", 1)], [("squeeze", 1)]
    elif batch_dims == 2:
        to_canonical, from_canonical = [], []
    else:
        to_canonical, from_canonical = _merge_leading(scores_shape, q, q_adapter, k, k_adapter, v, v_adapter, pieces)
        notes.append(f"{batch_dims - 1} leading dims of the {batch_dims + 2}-D scores merged into the batch "
                     "(each group attends only to its own keys, as in the model)")
    return SiteMatch(
        pattern=f"{scores.spelling}-softmax",
        anchor=node, output=pv_node, q=q, k=k, v=v,
        q_adapter=q_adapter + to_canonical, k_adapter=k_adapter + to_canonical, v_adapter=v_adapter + to_canonical,
        out_adapter=from_canonical + out_adapter,
        scale=scores.scale * scale, scale_note=", ".join(dict.fromkeys(scores.scale_notes)),
        pieces=pieces, dropout_p=p, internal=internal, notes=notes,
        batch_dims=batch_dims, zeroed_where_masked=zeroed,
    )


def _scaled(piece: MaskPiece, scale: float, heads: int | None) -> MaskPiece:
    """A term of the product itself (baddbmm's bias): scaled by what the chain applies after the
    product, and in the softmax's layout."""
    piece.coef *= scale
    return _in_scores_layout(piece, heads)


def _source_dim(adapter, dim: int, rank: int) -> int:
    """The dim of a node that lands at `dim` once `adapter` (permutes / transposes) has run."""
    for step in reversed(adapter):
        if step[0] == "permute":
            dim = step[1][dim]
        elif step[0] == "transpose":
            d0, d1 = normalise_dim(step[1], rank), normalise_dim(step[2], rank)
            dim = d1 if dim == d0 else d0 if dim == d1 else dim
        else:
            raise Skip(f"a layout step {step[0]} before the blocked dims are merged")
    return dim


def _merge_leading(scores_shape, q, q_adapter, k, k_adapter, v, v_adapter, pieces):
    """Adapters for scores (G1, ..., Gn, H, Lq, Lk), n >= 2 (LongT5's blocks, ProphetNet's streams):
    the G dims become the canonical batch of (G1*...*Gn, H, Lq, Lk), and the output is split back.
    Exact only if q, k, v and every mask/bias piece hold each G dim whole (no broadcasting over part
    of them, which a flat batch cannot express)."""
    lead, rank = len(scores_shape) - 3, len(scores_shape)
    for name, node, adapter in (("Q", q, q_adapter), ("K", k, k_adapter), ("V", v, v_adapter)):
        s = shape(node)
        if s is None or len(s) != rank or not all(
                same_size(s[_source_dim(adapter, i, rank)], scores_shape[i]) for i in range(lead)):
            raise Skip(f"{name} is broadcast over the blocked dims {tuple(scores_shape[:lead])}")
    for piece in pieces:
        s = shape(piece.node)
        if s is None:
            raise Skip("a mask/bias term of unknown shape on blocked scores")
        held = [s[i - (rank - len(s))] for i in range(lead) if i >= rank - len(s)]
        whole = len(s) == rank and all(same_size(s[i], scores_shape[i]) for i in range(lead))
        if not whole and not all(d == 1 for d in held):
            raise Skip(f"a mask/bias term of shape {tuple(s)} broadcast over part of the blocked dims "
                       f"{tuple(scores_shape[:lead])}")
    sizes = [-1] + [d if isinstance(d, int) else (q, _source_dim(q_adapter, i, rank))
                    for i, d in enumerate(scores_shape[1:lead], start=1)]
    return [("flatten", 0, lead - 1)], [("unflatten", 0, sizes)]
