"""ONNX lowering of Sparsefinder's block predictor: its two kernel-level ops as nodes.

Unlike the other methods, a block-predictor site is not bound to a method-level op: the standard
exporter traces the site module's own inference code (the anchor's sinks and the method's key
padding as standard ops), in which the two ops that depend on the length through loops are single
nodes (`attnpass/methods/sparsefinder/blocks.py`, `lowering/torch/block_flash.py`):

- ``attnpass.ChooseBlocks(q, k, key_keep, offset) -> chosen`` (attributes scale, block, top_blocks,
  samples, causal, window, share): `choose_blocks`. Per query block its sampled queries (the last and
  every (block // samples)-th before it) score every key they may see; the logits are max-pooled
  per key block, a softmax over the key blocks gives each block's share, the largest over the
  samples (and, with share, over the query heads of a kv head) is the block's score, and the
  min(top_blocks, key blocks) best are chosen (TopK: ties to the lowest index, as the PyTorch
  side), -1 where the score is 0. The query blocks are scored in chunks of block // samples (a
  Loop): at most `block` sampled queries per head against the keys at a time, no Lq x Lk tensor.
- ``attnpass.BlockAttention(q, k, v, chosen, key_keep, sinks, offset) -> (out, lse)`` (attributes
  scale, block, causal, local): `block_flash_attention`. Each query block's candidates are its
  chosen blocks' keys, the keys its window may reach (i + offset < j <= i + offset + local over the
  block's queries) and the sinks; a pair counts as the kernel defines it (a chosen key up to the
  query's limit and not a sink, a window key after it, a sink up to it; key padding throughout), and
  one softmax runs over them. Largest intermediate (B, Hs, query blocks, G * block, candidates),
  candidates = top_blocks * block + block - 1 + local + sinks: O(L) in the length.

A site exports this way when its inference call runs those ops: softmax normaliser, no bias or
general mask, no band (`check_site`).
"""
from __future__ import annotations

import onnx
from onnxscript import script
from onnxscript import opset18 as op

from attnpass.lowering.onnx.common import ATTNPASS, all_keys, check_float, int_input, node_op, static_float

_INT64 = onnx.TensorProto.INT64
_BOOL = onnx.TensorProto.BOOL


def check_site(module) -> None:
    """Raise if a block-predictor site's inference call would not run the two ops (the export then
    has no node for its attention)."""
    name = f"sparsefinder site {module.spec.name!r} (predictor 'blocks')"
    if module.normalizer != "softmax":
        raise NotImplementedError(f"export_onnx: {name}: normalizer {module.normalizer!r} runs the grouped kernel, "
                                  "which has no ONNX node; export with normalizer='softmax' (the default with "
                                  "sinks= / local=)")
    if module.spec.has_bias or module.spec.has_mask:
        raise NotImplementedError(f"export_onnx: {name}: the site keeps a general bias / mask, which the block "
                                  "nodes do not take")
    if module.spec.window:
        raise NotImplementedError(f"export_onnx: {name} is a band (sliding window of {module.spec.window}); "
                                  "the block nodes have no band in this version")


@script(ATTNPASS, default_opset=op)
def ChooseBlocks(q, k, key_keep, offset, scale: float, block: int, top_blocks: int, samples: int, causal: int,
                 window: int, share: int):
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    zero_i = op.Constant(value_int=0)
    one_i = op.Constant(value_int=1)
    b = op.Unsqueeze(op.Constant(value_int=block), [0])
    s = op.Unsqueeze(op.Constant(value_int=samples), [0])
    batch = op.Shape(q, start=0, end=1)
    hq = op.Shape(q, start=1, end=2)
    hkv = op.Shape(k, start=1, end=2)
    lq = op.Shape(q, start=2, end=3)
    lk = op.Shape(k, start=2, end=3)
    d = op.Shape(q, start=3, end=4)
    n_qb = op.Div(op.Sub(op.Add(lq, b), one), b)
    n_kb = op.Div(op.Sub(op.Add(lk, b), one), b)
    # per query block its last query and every stride-th before it (stride = block // samples)
    stride = op.Max(op.Div(b, s), one)
    sample_at = op.Max(op.Sub(op.Sub(b, one), op.Mul(stride, op.Range(zero_i, op.Squeeze(s, [0]), one_i))), zero)
    # keys padded to whole blocks, transposed once; padding is never seen
    padded = op.Sub(op.Mul(n_kb, b), lk)
    key_t = op.Transpose(op.Pad(k, op.Concat(zero, zero, zero, zero, zero, zero, padded, zero, axis=0)),
                         perm=[0, 1, 3, 2])                                       # (B, Hkv, D, Kp)
    key_pos = op.Range(zero_i, op.Squeeze(op.Mul(n_kb, b), [0]), one_i)          # (Kp,)
    keep_at = op.Unsqueeze(op.Gather(key_keep, op.Min(key_pos, op.Sub(lk, one)), axis=1), [1, 2])  # (B, 1, 1, Kp)
    q_scaled = op.Mul(q, op.CastLike(op.Constant(value_float=scale), q))
    g = op.Div(hq, hkv)
    shared = op.Cast(op.Constant(value_int=share), to=_BOOL)
    per_kv = op.Where(shared, one, g)                    # heads kept per kv head: 1 sharing, else G
    scores = op.CastLike(op.ConstantOfShape(op.Concat(batch, op.Mul(hkv, per_kv), zero, n_kb, axis=0)), q)
    neg_inf = op.CastLike(op.Constant(value_float=float("-inf")), q)
    zero_f = op.CastLike(op.Constant(value_float=0.0), q)
    not_causal = op.Equal(op.Constant(value_int=causal), zero_i)
    win = op.Constant(value_int=window)
    chunk = stride                                       # query blocks per chunk: at most `block` sampled queries
    n_chunks = op.Squeeze(op.Div(op.Sub(op.Add(n_qb, chunk), one), chunk), [0])
    for t in range(n_chunks):
        first = op.Mul(op.Unsqueeze(op.Cast(t, to=_INT64), [0]), chunk)
        blocks = op.Range(op.Squeeze(first, [0]), op.Squeeze(op.Min(op.Add(first, chunk), n_qb), [0]), one_i)
        c = op.Shape(blocks)
        rows = op.Min(op.Add(op.Unsqueeze(op.Mul(blocks, op.Squeeze(b, [0])), [1]), op.Unsqueeze(sample_at, [0])),
                      op.Sub(lq, one))
        rows = op.Reshape(rows, op.Constant(value_ints=[-1]))                     # (R,) = c * samples
        r = op.Shape(rows)
        qs = op.Reshape(op.Gather(q_scaled, rows, axis=2), op.Concat(batch, hkv, op.Mul(g, r), d, axis=0))
        logits = op.MatMul(qs, key_t)                                             # (B, Hkv, G R, Kp)
        limit = op.Unsqueeze(op.Add(rows, offset), [1])                           # (R, 1)
        in_window = op.Or(op.Equal(win, zero_i), op.Greater(key_pos, op.Sub(limit, win)))
        seen = op.And(op.Less(key_pos, lk), op.Or(not_causal, op.And(op.LessOrEqual(key_pos, limit), in_window)))
        seen = op.Reshape(op.Expand(op.Unsqueeze(seen, [0]), op.Concat(g, op.Shape(seen), axis=0)),
                          op.Concat(op.Mul(g, r), op.Constant(value_ints=[-1]), axis=0))  # (G R, Kp)
        seen = op.And(op.Unsqueeze(seen, [0, 1]), keep_at)                        # (B, 1, G R, Kp)
        pooled = op.ReduceMax(op.Reshape(op.Where(seen, logits, neg_inf),
                                         op.Concat(batch, hkv, op.Mul(g, r), n_kb, b, axis=0)), [-1], keepdims=0)
        top = op.ReduceMax(pooled, [-1], keepdims=1)
        e = op.Exp(op.Sub(pooled, op.Where(op.IsInf(top), zero_f, top)))        # -inf: 0
        total = op.ReduceSum(e, [-1], keepdims=1)
        shares = op.Div(e, op.Max(total, op.CastLike(op.Constant(value_float=1e-30), e)))  # nothing seen: 0
        shares = op.ReduceMax(op.Reshape(shares, op.Concat(batch, hkv, g, c, s, n_kb, axis=0)), [4], keepdims=0)
        # sharing: the largest over the query heads of a kv head, kept once, else every head's own
        shares = op.Where(shared, op.Expand(op.ReduceMax(shares, [2], keepdims=1), op.Shape(shares)), shares)
        shares = op.Slice(shares, zero, per_kv, op.Constant(value_ints=[2]))
        scores = op.Concat(scores, op.Reshape(shares, op.Concat(batch, op.Mul(hkv, per_kv), c, n_kb, axis=0)), axis=2)
    values, chosen = op.TopK(scores, op.Min(op.Unsqueeze(op.Constant(value_int=top_blocks), [0]), n_kb), axis=-1,
                             largest=1, sorted=1)
    return op.Where(op.Greater(values, op.CastLike(op.Constant(value_float=0.0), values)), chosen,
                    op.Constant(value_int=-1))


@script(ATTNPASS, default_opset=op)
def BlockAttention(q, k, v, chosen, key_keep, sinks, offset, scale: float, block: int, causal: int, local: int):
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    zero_i = op.Constant(value_int=0)
    one_i = op.Constant(value_int=1)
    minus_one = op.Constant(value_ints=[-1])
    b = op.Unsqueeze(op.Constant(value_int=block), [0])
    batch = op.Shape(q, start=0, end=1)
    hq = op.Shape(q, start=1, end=2)
    hkv = op.Shape(k, start=1, end=2)
    lq = op.Shape(q, start=2, end=3)
    lk = op.Shape(k, start=2, end=3)
    d = op.Shape(q, start=3, end=4)
    dv = op.Shape(v, start=3, end=4)
    hs = op.Shape(chosen, start=1, end=2)
    n_qb = op.Shape(chosen, start=2, end=3)
    gq = op.Div(hq, hs)                                                           # query heads per selection head
    causal_b = op.Cast(op.Constant(value_int=causal), to=_BOOL)
    w = op.Unsqueeze(op.Constant(value_int=local), [0])

    # --- candidates per query block: chosen blocks' keys, the window's reach, the sinks
    chosen_pos = op.Add(op.Mul(op.Unsqueeze(chosen, [4]), b), op.Range(zero_i, op.Constant(value_int=block), one_i))
    chosen_pos = op.Where(op.Unsqueeze(op.GreaterOrEqual(chosen, zero), [4]), chosen_pos, op.Constant(value_int=-1))
    chosen_pos = op.Reshape(chosen_pos, op.Concat(batch, hs, n_qb, minus_one, axis=0))
    has_window = op.And(causal_b, op.Greater(w, zero))
    reach = op.Where(has_window, op.Sub(op.Add(b, w), one), one)                 # one unused slot without a window
    block_start = op.Mul(op.Range(zero_i, op.Squeeze(n_qb, [0]), one_i), op.Squeeze(b, [0]))
    window_pos = op.Add(op.Unsqueeze(op.Add(op.Add(block_start, offset), one_i), [1]),
                        op.Range(zero_i, op.Squeeze(reach, [0]), one_i))          # (n_qb, reach)
    window_pos = op.Where(has_window, window_pos, op.Constant(value_int=-1))
    n_sinks = op.Shape(sinks, start=1, end=2)
    sink_pos = op.Expand(op.Unsqueeze(sinks, [1, 2]), op.Concat(batch, hs, n_qb, n_sinks, axis=0))
    window_pos = op.Expand(op.Unsqueeze(window_pos, [0, 1]), op.Concat(batch, hs, n_qb, reach, axis=0))
    cand = op.Concat(chosen_pos, window_pos, sink_pos, axis=3)                   # (B, Hs, n_qb, W)
    kind = op.Concat(op.Expand(zero, op.Shape(chosen_pos, start=3, end=4)), op.Expand(one, reach),
                     op.Expand(op.Constant(value_ints=[2]), n_sinks), axis=0)     # (W,) 0 chosen, 1 window, 2 sink
    width = op.Shape(cand, start=3, end=4)
    at = op.Min(op.Max(cand, zero), op.Sub(lk, one))

    # --- keys, values and padding at the candidates (the kv head of each selection head)
    kv_head = op.Div(op.Mul(op.Range(zero_i, op.Squeeze(hs, [0]), one_i), op.Squeeze(hkv, [0])), op.Squeeze(hs, [0]))
    flat_at = op.Unsqueeze(op.Reshape(at, op.Concat(batch, hs, minus_one, axis=0)), [3])  # (B, Hs, n_qb W, 1)
    k_g = op.Reshape(op.GatherND(op.Gather(k, kv_head, axis=1), flat_at, batch_dims=2),
                     op.Concat(batch, hs, n_qb, width, d, axis=0))
    v_g = op.Reshape(op.GatherND(op.Gather(v, kv_head, axis=1), flat_at, batch_dims=2),
                     op.Concat(batch, hs, n_qb, width, dv, axis=0))
    keep = op.Reshape(op.GatherND(key_keep, op.Unsqueeze(op.Reshape(at, op.Concat(batch, minus_one, axis=0)), [2]),
                                  batch_dims=1), op.Shape(cand))
    valid = op.And(op.And(op.GreaterOrEqual(cand, zero), op.Less(cand, lk)), keep)
    is_sink = op.Cast(op.ReduceMax(op.Cast(op.Equal(op.Unsqueeze(cand, [4]), op.Unsqueeze(sinks, [1, 2, 3])),
                                           to=_INT64), [4], keepdims=0), to=_BOOL)

    # --- queries: the G' heads of a selection head and the block's queries as one group's rows
    padded_q = op.Pad(q, op.Concat(zero, zero, zero, zero, zero, zero, op.Sub(op.Mul(n_qb, b), lq), zero, axis=0))
    q_g = op.Transpose(op.Reshape(padded_q, op.Concat(batch, hs, gq, n_qb, b, d, axis=0)), perm=[0, 1, 3, 2, 4, 5])
    q_g = op.Reshape(q_g, op.Concat(batch, hs, n_qb, op.Mul(gq, b), d, axis=0))
    row_pos = op.Add(op.Unsqueeze(block_start, [1]), op.Tile(op.Range(zero_i, op.Constant(value_int=block), one_i), gq))
    limit = op.Unsqueeze(op.Add(row_pos, offset), [0, 1, 4])                      # (1, 1, n_qb, G' block, 1)
    j = op.Unsqueeze(cand, [3])                                                   # (B, Hs, n_qb, 1, W)
    up_to_limit = op.Or(op.Not(causal_b), op.LessOrEqual(j, limit))
    in_window = op.And(op.Not(up_to_limit), op.LessOrEqual(j, op.Add(limit, w)))
    ok = op.Unsqueeze(valid, [3])
    allowed = op.Or(op.Or(
        op.And(op.And(op.Equal(kind, zero), op.Unsqueeze(op.Not(is_sink), [3])), op.And(ok, up_to_limit)),
        op.And(op.And(op.Equal(kind, one), has_window), op.And(ok, in_window))),
        op.And(op.Equal(kind, op.Constant(value_ints=[2])), op.And(ok, up_to_limit)))

    # --- one softmax per query over its allowed candidates
    scale_t = op.CastLike(op.Constant(value_float=scale), q)
    logits = op.Mul(op.MatMul(q_g, op.Transpose(k_g, perm=[0, 1, 2, 4, 3])), scale_t)
    neg_inf = op.CastLike(op.Constant(value_float=float("-inf")), logits)
    zero_f = op.CastLike(op.Constant(value_float=0.0), logits)
    top = op.ReduceMax(op.Where(allowed, logits, neg_inf), [-1], keepdims=1)
    top = op.Where(op.IsInf(top), zero_f, top)
    e = op.Where(allowed, op.Exp(op.Sub(logits, top)), zero_f)
    total = op.ReduceSum(e, [-1], keepdims=1)
    probs = op.Div(e, op.Max(total, op.CastLike(op.Constant(value_float=1e-30), e)))
    lse = op.Where(op.Greater(total, zero_f), op.Add(top, op.Log(op.Max(total, op.CastLike(op.Constant(
        value_float=1e-30), e)))), zero_f)                                        # a row seeing nothing: 0
    out = op.MatMul(probs, v_g)                                                   # (B, Hs, n_qb, G' block, Dv)
    out = op.Transpose(op.Reshape(out, op.Concat(batch, hs, n_qb, gq, b, dv, axis=0)), perm=[0, 1, 3, 2, 4, 5])
    out = op.Slice(op.Reshape(out, op.Concat(batch, hq, minus_one, dv, axis=0)), zero, lq, op.Constant(value_ints=[2]))
    lse = op.Transpose(op.Reshape(lse, op.Concat(batch, hs, n_qb, gq, b, axis=0)), perm=[0, 1, 3, 2, 4])
    lse = op.Slice(op.Reshape(lse, op.Concat(batch, hq, minus_one, axis=0)), zero, lq, op.Constant(value_ints=[2]))
    return out, lse


CHOOSE_BLOCKS_NODE = node_op(
    "ChooseBlocks",
    inputs=[("q", "T"), ("k", "T"), ("key_keep", "B"), ("offset", "I")],
    attributes=[("scale", "float"), ("block", "int"), ("top_blocks", "int"), ("samples", "int"), ("causal", "int"),
                ("window", "int"), ("share", "int")],
    outputs=[("chosen", "I")],
)

BLOCK_ATTENTION_NODE = node_op(
    "BlockAttention",
    inputs=[("q", "T"), ("k", "T"), ("v", "T"), ("chosen", "I"), ("key_keep", "B"), ("sinks", "I"), ("offset", "I")],
    attributes=[("scale", "float"), ("block", "int"), ("causal", "int"), ("local", "int")],
    outputs=[("out", "T"), ("lse", "T")],
)

FUNCTIONS = (ChooseBlocks, BlockAttention)


def translate_choose_blocks(q, k, key_keep, scale, block, top_blocks, samples, causal, offset, window,
                            kv_heads_share):
    """custom_translation_table entry for torch.ops.attnpass.choose_blocks.default."""
    check_float("attnpass.ChooseBlocks", q, k)
    return CHOOSE_BLOCKS_NODE(
        q, k, all_keys(q, k) if key_keep is None else key_keep, int_input(offset),
        scale=static_float("attnpass.ChooseBlocks", "scale", scale), block=int(block), top_blocks=int(top_blocks),
        samples=int(samples), causal=int(bool(causal)), window=int(window), share=int(bool(kv_heads_share)))


def translate_block_flash(q, k, v, key_blocks, key_padding_mask, sinks, block, scale, causal, causal_offset, local):
    """custom_translation_table entry for torch.ops.attnpass.block_flash_attention.default (no sinks: one
    slot of -1, never seen)."""
    check_float("attnpass.BlockAttention", q, k, v)
    if sinks is None:
        sinks = op.Expand(op.Constant(value_int=-1), op.Concat(op.Shape(q, start=0, end=1),
                                                               op.Constant(value_ints=[1]), axis=0))
    return BLOCK_ATTENTION_NODE(
        q, k, v, key_blocks, all_keys(q, k) if key_padding_mask is None else key_padding_mask, sinks,
        int_input(causal_offset), scale=static_float("attnpass.BlockAttention", "scale", scale), block=int(block),
        causal=int(bool(causal)), local=int(local))
