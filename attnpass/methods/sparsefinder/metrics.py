"""Sparsefinder's metrics of a predicted graph against the gold graph (Treviso et al. 2022; METHODS.md):
recall, graph sparsity, exact fraction and computation sparsity, as summable counts."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attnpass import cost_model
from attnpass.lowering.torch.common import csr_rows
from attnpass.methods.sparsefinder.gold import gold_pairs


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def allowed_by_rules(row: Tensor, col: Tensor, H: int, Lq: int, Lk: int, causal: bool, offset: int,
                     key_keep: Tensor | None) -> Tensor:
    """Which (row, col) pairs the causal rule and key padding allow."""
    ok = torch.ones_like(row, dtype=torch.bool)
    if causal:
        ok &= col <= row % Lq + offset
    if key_keep is not None:
        ok &= key_keep.reshape(-1)[(row // (H * Lq)) * Lk + col]
    return ok


@dataclass
class GraphMetrics:
    """Counts behind Sparsefinder's metrics (summable over sites) and the ratios (METHODS.md).

    recall = |pred ∩ gold| / |gold|; graph sparsity = 1 - |pred| / |valid| (valid: allowed by the
    causal rule and key padding; pred counts valid predicted pairs); exact fraction = share of
    queries with a nonempty gold row all of whose gold pairs are predicted; computation sparsity
    = 1 - ops / dense ops, ops = projection + predictor + |pred| * PAIR, dense = Lq*Lk*PAIR per head.
    """

    gold: int
    predicted: int
    hit: int
    valid: int
    queries: int        # queries with a nonempty gold row
    exact_queries: int
    ops: float
    dense_ops: float

    @property
    def recall(self) -> float:
        return self.hit / self.gold if self.gold else 1.0

    @property
    def graph_sparsity(self) -> float:
        return 1.0 - self.predicted / self.valid if self.valid else 0.0

    @property
    def exact_fraction(self) -> float:
        return self.exact_queries / self.queries if self.queries else 1.0

    @property
    def computation_sparsity(self) -> float:
        return 1.0 - self.ops / self.dense_ops if self.dense_ops else 0.0

    def __add__(self, other: GraphMetrics) -> GraphMetrics:
        return GraphMetrics(*(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__))

    def as_dict(self) -> dict:
        counts = {f: getattr(self, f) for f in self.__dataclass_fields__}
        return {"recall": self.recall, "graph_sparsity": self.graph_sparsity, "exact_fraction": self.exact_fraction,
                "computation_sparsity": self.computation_sparsity, **counts}


def pair_flops(head_dim: int) -> float:
    """cost_model's PAIR = 4*D + 5 FLOPs for one computed (query, key) pair."""
    return float(cost_model.PAIR.subs(cost_model.D, head_dim))


def predictor_flops(predictor: str, *, Lq: int, Lk: int, head_dim: int, rank: int, candidates: int = 0,
                    bucket_size: int = 16, clusters: int = 1, block: int = 1, samples: int = 1) -> float:
    """FLOPs of one (batch element, query head): projection + predictor (without the attention).

    projection 2*D*r*(Lq + Lk); distance 3*r*Lq*Lk (diffs, squares, sums; the compare is 1 more per
    pair); quantization r*(Lq log2 Lq + Lk log2 Lk) comparisons for the sorts + r*Lq*bucket_size
    candidate slots; clustering (Lq + Lk)*c*(3r + 1) for distances to centroids and selection.
    `candidates` (pairs generated before dedupe, per head) adds n*log2(n) for the dedupe sort.
    blocks (no projection, no dedupe): `samples` queries per query block against every key
    (2D + 1 each: product and max-pool), and a softmax over the key blocks for each.
    """
    if predictor == "blocks":
        sampled = math.ceil(Lq / block) * samples
        return sampled * Lk * (2 * head_dim + 1) + sampled * math.ceil(Lk / block) * 3
    flops = 2.0 * head_dim * rank * (Lq + Lk)
    if predictor == "distance":
        flops += (3 * rank + 1) * Lq * Lk
    elif predictor == "quantization":
        flops += rank * (Lq * math.log2(max(Lq, 2)) + Lk * math.log2(max(Lk, 2))) + rank * Lq * bucket_size
    elif predictor == "clustering":
        flops += (Lq + Lk) * clusters * (3 * rank + 1)
    else:
        raise ValueError(f"predictor_flops: unknown predictor {predictor!r}")
    if candidates > 1:
        flops += candidates * math.log2(candidates)
    return flops


def graph_metrics(q: Tensor, k: Tensor, row_ptr: Tensor, col_index: Tensor, *, scale: float, causal: bool = False,
                  causal_offset: int = 0, key_keep: Tensor | None = None, bias: Tensor | None = None,
                  mask: Tensor | None = None, predictor_ops: float = 0.0,
                  gold: tuple[Tensor, Tensor] | None = None, rule: str = "entmax15", mass: float = 0.9) -> GraphMetrics:
    """Metrics of a predicted CSR graph against the gold graph of (q, k) (`gold_pairs` rule/mass).

    `predictor_ops` is the projection + predictor FLOPs of the whole call (all heads and batch
    rows); the attention over the predicted pairs is added here. `gold`: the `gold_pairs` of these
    inputs if already computed (comparing several predictors on the same q, k).
    """
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    R = B * Hq * Lq
    pred_row = csr_rows(row_ptr, col_index.numel())
    ok = allowed_by_rules(pred_row, col_index, Hq, Lq, Lk, causal, causal_offset, key_keep)
    pred_key = pred_row[ok] * Lk + col_index[ok]  # sorted (CSR, columns sorted per row)
    if gold is None:
        gold = gold_pairs(q, k, scale=scale, causal=causal, causal_offset=causal_offset, key_keep=key_keep,
                          bias=bias, mask=mask, rule=rule, mass=mass)
    g_row, g_col = gold
    g_key = g_row * Lk + g_col
    pos = torch.searchsorted(pred_key, g_key).clamp(max=max(pred_key.numel() - 1, 0))
    found = (pred_key[pos] == g_key) if pred_key.numel() else torch.zeros_like(g_key, dtype=torch.bool)
    gold_per_row = torch.bincount(g_row, minlength=R)
    hit_per_row = torch.bincount(g_row[found], minlength=R)
    has_gold = gold_per_row > 0
    # valid pairs per row: causal limit times real keys up to it
    keep = torch.ones(B, Lk, dtype=torch.bool, device=q.device) if key_keep is None else key_keep
    real_upto = torch.cat([keep.new_zeros(B, 1, dtype=torch.int64), keep.long().cumsum(-1)], dim=-1)  # (B, Lk + 1)
    i = torch.arange(Lq, device=q.device)
    limit = (i + causal_offset + 1).clamp(0, Lk) if causal else torch.full_like(i, Lk)
    valid = int(real_upto[:, limit].sum()) * Hq
    n_pred = int(pred_key.numel())
    return GraphMetrics(
        gold=int(g_key.numel()), predicted=n_pred, hit=int(found.sum()), valid=valid,
        queries=int(has_gold.sum()), exact_queries=int((has_gold & (hit_per_row == gold_per_row)).sum()),
        ops=float(predictor_ops) + n_pred * pair_flops(D), dense_ops=float(B * Hq * Lq * Lk) * pair_flops(D),
    )

