"""ONNX lowering of an SBM site with its deterministic inference graph: node ``attnpass.SBM``, one per site.

Only ``eval_graph="clusters"`` exports: the default eval graph is drawn from a seeded
torch.Generator (Poisson counts, inverse-CDF endpoints) that no ONNX op sequence reproduces, so a
file "with the same seed" would compute another graph. The clusters rule
(`methods/sbm/cluster_graph.py`) is computed by PyTorch and by this body from the same formulas.

Node: ``SBM(q, k, v, bias, mask, key_keep, clusters, phi_w1, phi_b1, phi_w2, phi_b2) -> out`` with
attributes ``scale`` (float), ``causal`` (int), ``bottom_right`` (int: causal offset Lk - Lq,
derived from the shapes in the body, else 0) and ``eval_clusters`` (int). q (B, Hq, Lq, D), k
(B, Hkv, Lk, D), v (B, Hkv, Lk, Dv); bias (float) and mask (bool) 4-D, broadcastable to
(B, Hq, Lq, Lk) (0.0 / True when the site has none; read only at the candidate pairs); key_keep
(B, Lk) bool; clusters (Hq, k, D) and the MLP phi's two Linear layers (weight (out, in), bias),
the site's trained parameters, stored in the file as initializers.

Body, without an Lq x Lk tensor:
1. memberships Y_Q = sigmoid(phi(q) C_h^T), Y_K = sigmoid(phi(k) C_h^T) (kv heads repeated for
   GQA; padding keys zeroed), block matrix B_h = softmax over the k*k entries of C_h C_h^T;
2. each real key's hard cluster ArgMax(Y_K) (first maximum on ties, as torch.argmax), the
   per-cluster membership sums Z (B, H, k, k) and the expected edge mass of every (query, hard
   cluster) pair, (Y_Q B) Z^T (B, H, Lq, k); each query's `eval_clusters` largest (TopK: lowest
   index on ties, as the stable sort in PyTorch);
3. the member keys of those clusters (`candidates.cluster_member_keys`, padded to the largest
   cluster M) plus the query's own-position key (`sbm.sampling.fallback_keys`: with padding, the
   nearest real key at or before its anchor, else - not causal - the first real key);
4. softmax of the site's scores over those candidates (`candidates.candidate_scores`: causal
   rule, padding, bias and mask at the pairs, each key once).
The largest intermediate is (B, H, Lq, W, max(D, Dv)) with W = eval_clusters * M + 1.

Near ties (two clusters within float rounding of each other in Y_K or in the mass) can be decided
differently by onnxruntime's and torch's float32 MatMuls; that changes a token's cluster, hence
its keys. It needs equal memberships to the last bits (identical tokens, or chance).
"""
from __future__ import annotations

import functools
from typing import Optional

import onnx
import torch
from onnxscript import script
from onnxscript import opset18 as op
from torch import Tensor

from attnpass.lowering.onnx.candidates import (
    candidate_scores, causal_rule, cluster_member_keys, key_anchor, weighted_values,
)
from attnpass.lowering.onnx.common import ATTNPASS, all_keys, check_float, node_op, pair_bias, pair_mask, static_float
from attnpass.lowering.onnx.dense import masked_softmax, repeat_kv

_INT64 = onnx.TensorProto.INT64


# --------------------------------------------------------------------------------------------
# PyTorch side
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("attnpass::sbm", mutates_args=())
def sbm(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
        key_keep: Optional[Tensor], clusters: Tensor, phi_w1: Tensor, phi_b1: Tensor, phi_w2: Tensor,
        phi_b2: Tensor, scale: float, causal: bool, bottom_right: bool, cross: bool, eval_clusters: int) -> Tensor:
    """An SBM site's eval-mode attention on its deterministic cluster graph with these parameters,
    exactly as the site module computes it."""
    from attnpass.methods.base import SiteSpec
    from attnpass.methods.sbm import SBMAttention

    heads, count, dim = clusters.shape
    spec = SiteSpec(name="attnpass::sbm", scale=scale, causal=causal, causal_bottom_right=bottom_right,
                    heads_q=heads, heads_kv=k.shape[1], head_dim=dim, cross=cross)
    site = SBMAttention(spec, clusters=count, eval_graph="clusters", eval_clusters=eval_clusters)
    site = site.to(clusters.dtype).eval()
    with torch.no_grad():
        site.clusters.copy_(clusters)
        for layer, (w, b) in zip((site.phi[0], site.phi[2]), ((phi_w1, phi_b1), (phi_w2, phi_b2))):
            layer.weight.copy_(w)
            layer.bias.copy_(b)
    return site(q, k, v, bias, mask, key_keep)


@sbm.register_fake
def _(q, k, v, bias, mask, key_keep, clusters, phi_w1, phi_b1, phi_w2, phi_b2, scale, causal, bottom_right, cross,
      eval_clusters):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


_WHY_NOT_SAMPLED = ("its eval graph is sampled from a seeded torch.Generator (Poisson counts, inverse-CDF "
                    "endpoints), which ONNX cannot reproduce")


def check_options(options: dict) -> None:
    graph = options.get("eval_graph", "sample")
    if graph != "clusters":
        raise NotImplementedError(
            f"export_onnx: method 'sbm' with eval_graph={graph!r} cannot be exported to ONNX: {_WHY_NOT_SAMPLED}; "
            "pass eval_graph='clusters' (a deterministic graph from the same memberships, which the PyTorch model "
            "then computes too; docs/onnx.md)")


def bind(module) -> None:
    """Make an SBM site module (of a private copy, in eval mode) call `attnpass::sbm` when exported."""
    if module.eval_graph != "clusters":
        raise NotImplementedError(
            f"export_onnx: sbm site {module.spec.name!r} has eval_graph={module.eval_graph!r}, which cannot be "
            f"exported to ONNX: {_WHY_NOT_SAMPLED}; set `site.eval_graph = 'clusters'` (and `site.eval_clusters`) "
            "on each of sparse_model.site_modules().values() before exporting (the PyTorch model then computes "
            "the same deterministic graph), or sparsify with eval_graph='clusters'")
    module.forward = functools.partial(_export_forward, module)


def _export_forward(module, q, k, v, bias=None, mask=None, key_keep=None, dropout_p: float = 0.0,
                    empty_rows: str = "zero"):
    first, _, second = module.phi
    return torch.ops.attnpass.sbm(
        q, k, v, bias, mask, key_keep, module.clusters, first.weight, first.bias, second.weight, second.bias,
        float(module.scale(q)), bool(module.spec.causal), bool(module.spec.causal_bottom_right),
        bool(module.spec.cross), int(module.eval_clusters))


# --------------------------------------------------------------------------------------------
# ONNX side
# --------------------------------------------------------------------------------------------


@script(ATTNPASS, default_opset=op)
def sbm_memberships(x, clusters, phi_w1, phi_b1, phi_w2, phi_b2):
    """x (B, H, L, D) -> sigmoid(phi(x) C_h^T) (B, H, L, k); phi = Linear, ReLU, Linear (weights (out, in))."""
    hidden = op.Relu(op.Add(op.MatMul(x, op.Transpose(phi_w1, perm=[1, 0])), phi_b1))
    phi = op.Add(op.MatMul(hidden, op.Transpose(phi_w2, perm=[1, 0])), phi_b2)
    return op.Sigmoid(op.MatMul(phi, op.Transpose(clusters, perm=[0, 2, 1])))


@script(ATTNPASS, default_opset=op)
def own_key(key_keep, lq, offset, not_causal):
    """(B, Lq) the key at each query's own position (`sbm.sampling.fallback_keys`); Lk = none.

    anchor = floor(i Lk / Lq), or i + offset (at most Lk - 1) when causal; with padding the last
    real key at or before the anchor, else (not causal) the first real key; none for a negative anchor."""
    zero_i = op.Constant(value_int=0)
    one_i = op.Constant(value_int=1)
    one = op.Constant(value_ints=[1])
    lk = op.Shape(key_keep, start=1, end=2)
    i_pos = op.Range(zero_i, op.Squeeze(lq, [0]), one_i)                          # (Lq,)
    anchor = key_anchor(i_pos, lq, lk, offset, not_causal)
    keep = op.Cast(key_keep, to=_INT64)                                           # (B, Lk)
    positions = op.Range(zero_i, op.Squeeze(lk, [0]), one_i)
    real_sorted, unused = op.TopK(op.Add(positions, op.Mul(op.Sub(one, keep), lk)), lk, axis=-1, largest=0,
                                  sorted=1)                                       # real positions first
    upto = op.CumSum(keep, op.Constant(value_int=1))                              # real keys at or before j
    a = op.Unsqueeze(op.Max(anchor, op.Constant(value_ints=[0])), [0])            # (1, Lq)
    a = op.Expand(a, op.Concat(op.Shape(key_keep, start=0, end=1), lq, axis=0))   # (B, Lq)
    seen = op.GatherElements(upto, a, axis=1)
    before = op.GatherElements(real_sorted, op.Max(op.Sub(seen, one), op.Constant(value_ints=[0])), axis=1)
    first_real = op.Slice(real_sorted, op.Constant(value_ints=[0]), one, one)      # (B, 1); >= Lk: none
    after = op.Where(not_causal, first_real, lk)
    key = op.Where(op.GreaterOrEqual(seen, one), before, after)
    return op.Where(op.Less(op.Unsqueeze(anchor, [0]), op.Constant(value_ints=[0])), lk, key)


@script(ATTNPASS, default_opset=op)
def SBM(q, k, v, bias, mask, key_keep, clusters, phi_w1, phi_b1, phi_w2, phi_b2, scale: float, causal: int,
        bottom_right: int, eval_clusters: int):
    hq = op.Shape(q, start=1, end=2)
    k4 = repeat_kv(k, hq)
    v4 = repeat_kv(v, hq)
    zero_i = op.Constant(value_int=0)
    one_i = op.Constant(value_int=1)
    lq = op.Shape(q, start=2, end=3)
    offset, not_causal = causal_rule(q, k, op.Constant(value_int=causal), op.Constant(value_int=bottom_right))
    scale_t = op.CastLike(op.Constant(value_float=scale), q)

    # --- memberships and block matrix (padding keys get zero memberships)
    w1, b1, w2, b2 = op.CastLike(phi_w1, q), op.CastLike(phi_b1, q), op.CastLike(phi_w2, q), op.CastLike(phi_b2, q)
    c = op.CastLike(clusters, q)
    y_q = sbm_memberships(q, c, w1, b1, w2, b2)                                   # (B, H, Lq, k)
    real = op.Unsqueeze(key_keep, [1, 3])                                         # (B, 1, Lk, 1)
    y_k = op.Mul(sbm_memberships(k4, c, w1, b1, w2, b2), op.CastLike(real, q))   # (B, H, Lk, k)
    gram = op.MatMul(c, op.Transpose(c, perm=[0, 2, 1]))                         # (H, k, k)
    block = op.Reshape(op.Softmax(op.Reshape(gram, op.Constant(value_ints=[0, -1])), axis=-1), op.Shape(gram))

    # --- hard key clusters, expected edge mass per (query, cluster), each query's top clusters
    ids = op.Range(zero_i, op.Squeeze(op.Shape(c, start=1, end=2), [0]), one_i)  # (k,)
    hard = op.ArgMax(y_k, axis=-1, keepdims=1)                                    # (B, H, Lk, 1)
    member = op.Mul(op.Cast(op.Equal(hard, ids), to=_INT64), op.Cast(real, to=_INT64))  # (B, H, Lk, k)
    z = op.MatMul(op.Transpose(op.CastLike(member, q), perm=[0, 1, 3, 2]), y_k)  # (B, H, k, k)
    mass = op.MatMul(op.MatMul(y_q, block), op.Transpose(z, perm=[0, 1, 3, 2]))   # (B, H, Lq, k)
    top = op.Unsqueeze(op.Constant(value_int=eval_clusters), [0])
    top_mass, q_clusters = op.TopK(mass, top, axis=-1, largest=1, sorted=1)       # (B, H, Lq, t)

    # --- candidates: the chosen clusters' keys and the own-position key; softmax over them
    cluster_keys = cluster_member_keys(op.Transpose(member, perm=[0, 1, 3, 2]), q_clusters)  # (B, H, Lq, t*M)
    own = op.Unsqueeze(own_key(key_keep, lq, offset, not_causal), [1, 3])         # (B, 1, Lq, 1)
    own = op.Expand(own, op.Concat(op.Shape(q, start=0, end=3), op.Constant(value_ints=[1]), axis=0))
    cand = op.Concat(cluster_keys, own, axis=3)
    logits, allowed, v_g = candidate_scores(q, k4, v4, cand, bias, mask, key_keep, offset, not_causal, scale_t)
    return weighted_values(masked_softmax(logits, allowed), v_g)                 # (B, H, Lq, Dv)


SBM_NODE = node_op(
    "SBM",
    inputs=[("q", "T"), ("k", "T"), ("v", "T"), ("bias", "T"), ("mask", "B"), ("key_keep", "B"),
            ("clusters", "T"), ("phi_w1", "T"), ("phi_b1", "T"), ("phi_w2", "T"), ("phi_b2", "T")],
    attributes=[("scale", "float"), ("causal", "int"), ("bottom_right", "int"), ("eval_clusters", "int")],
    outputs=[("out", "T")],
)

FUNCTIONS = (SBM, sbm_memberships, own_key)


def translate_sbm(q, k, v, bias, mask, key_keep, clusters, phi_w1, phi_b1, phi_w2, phi_b2, scale, causal,
                  bottom_right, cross, eval_clusters):
    """custom_translation_table entry for torch.ops.attnpass.sbm.default."""
    check_float("attnpass.SBM", q, k, v)
    return SBM_NODE(
        q, k, v, pair_bias(bias, q), pair_mask(mask), all_keys(q, k) if key_keep is None else key_keep,
        *(op.CastLike(t, q) for t in (clusters, phi_w1, phi_b1, phi_w2, phi_b2)),
        scale=static_float("attnpass.SBM", "scale", scale), causal=int(bool(causal)),
        bottom_right=int(bool(bottom_right)), eval_clusters=int(eval_clusters),
    )
