"""What `calibrate` fits at each kind of site, and the objective it reports.

One fitter per method with learned sparsity state. A fitter sees only the site's recorded inputs
(the original model's q, k, bias and masks at that site, detached) and changes only the site
module's own state, never the model's weights:

- routing: the centroids, by mini-batch k-means (Sculley 2010) on the layer-normalised queries
  and keys, with routing's own assignment (each token to its most similar centroid). Objective:
  the mean squared distance of a token to its centroid (the quantity routing's commitment loss
  measures). Each centroid moves to the running mean of every token ever assigned to it, so the
  steps shrink as counts grow and the result does not depend on a decay.
- sparsefinder: the projections W_Q, W_K by Adam on the site's hinge loss against the gold graph
  (`gold`: "entmax15" = the entmax-1.5 support; "mass" = the smallest key set holding `mass` of
  the row's softmax probability; default: the site's own rule), and the clustering predictor's
  centroids by an EMA k-means step on the projected tokens each step. Objective: the hinge loss.
  Each step uses the gold pairs of a random subset of query rows (about `GOLD_PAIRS_PER_STEP`
  pairs: a diffuse 512-token row can have hundreds of gold keys); the objective before / after is
  measured on one fixed subset per batch, so the two numbers compare like with like.
  With a pair `budget` (distance predictor), the threshold is then set to the budget-quantile of
  the projected distances of all allowed pairs of the calibration batches, so the predictor keeps
  about that share of pairs (window / first-token edges come on top).
- sbm: the cluster embeddings and phi by Adam on
      loss = -(expected recall of the dense attention mass) + density_weight * (expected density),
  recall = sum_ij A_ij (1 - exp(-P_ij)) / rows, density = the method's `expected_density` (mean P
  over the pairs the causal rule and padding allow, as its training regulariser), where A
  is the site's dense softmax and 1 - exp(-P_ij) the probability that the sampler draws (i, j). The
  fit reads the model's own P, not P scaled to the site's `max_density` (a bound on what a call
  draws): with the scaled P, the recall gained above the cap is discounted while the density term is
  not, and on MiniLM the fit ended sparser and worse (docs/calibration.md).
  A pair is worth an edge when A_ij > density_weight / (allowed keys of the row): with the
  default 1, when its attention is above uniform. Builds P densely (calibration lengths only).
Combiner and dense have nothing to fit. Each method's class picks its fitter (`SiteAttention.fitter`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from attnpass.tools import site_probe
from attnpass.methods.kmeans import OnlineKMeans, Tokens


class Fitter:
    """Fits one site's sparsity state on recorded inputs; `step` returns the objective before it."""

    def __init__(self, module: nn.Module):
        self.module = module

    def prepare(self, inputs: dict) -> dict:
        """Per-batch data computed once (gold graphs, dense probabilities, ...)."""
        return inputs

    def objective(self, data: dict) -> float:
        raise NotImplementedError

    def step(self, data: dict) -> float:
        raise NotImplementedError

    def finish(self) -> None:
        """Write the fitted state back into the module."""


# --------------------------------------------------------------------------------------------
# routing
# --------------------------------------------------------------------------------------------


class RoutingFitter(Fitter):
    def __init__(self, module: nn.Module):
        super().__init__(module)
        self.counts: Tensor | None = None  # tokens assigned to each centroid so far (H, c)

    def _tokens(self, data: dict) -> list[Tokens]:
        # initialises the centroids from this batch if they never were, as a forward call would
        return self.module.routing_tokens(data["q"], data["k"], data.get("key_keep"))

    @staticmethod
    def _sums(kmeans: OnlineKMeans, token_sets: list[Tokens]) -> tuple[Tensor, Tensor, Tensor]:
        """(count (H, c), sum (H, c, D), mean squared distance to the assigned centroid) of the real,
        finite tokens, in float64."""
        H = kmeans.centroids.shape[0]
        n, total = kmeans.cluster_sums(token_sets, torch.float64)
        dist = torch.zeros((), dtype=torch.float64)
        head = torch.arange(H).view(1, H, 1)
        for t in token_sets:
            B, _, L, _ = t.x_hat.shape
            x = t.x_hat.detach().double()
            weight = torch.isfinite(x).all(-1).double()
            if t.keep is not None:
                weight = weight * t.keep.view(B, 1, L).double()
            x = torch.where(weight.unsqueeze(-1) > 0, x, 0.0)
            mu = kmeans.centroids.double()[head, t.nearest]                         # (B, H, L, D)
            dist += ((x - mu).square().mean(-1) * weight).sum()
        return n, total, dist / n.sum().clamp(min=1)

    def objective(self, data: dict) -> float:
        with torch.no_grad():
            return float(self._sums(self.module.kmeans, self._tokens(data))[2])

    def step(self, data: dict) -> float:
        kmeans = self.module.kmeans
        with torch.no_grad():
            n, total, dist = self._sums(kmeans, self._tokens(data))
            mu = kmeans.centroids.double()
            if self.counts is None:
                self.counts = torch.ones_like(n)  # the starting centroid counts as one token
            # running mean of every token ever assigned: mu += (batch sum - n * mu) / (count + n)
            new = mu + (total - n.unsqueeze(-1) * mu) / (self.counts + n).unsqueeze(-1)
            self.counts += n
            kmeans.centroids.copy_(new.to(kmeans.centroids.dtype))
        return float(dist)

    def finish(self) -> None:
        kmeans = self.module.kmeans
        if self.counts is None:
            return
        # the EMA state must reproduce the fitted centroids (mu = sum / count) if training continues
        with torch.no_grad():
            kmeans.ema_count.copy_(self.counts.to(kmeans.ema_count.dtype))
            kmeans.ema_sum.copy_(kmeans.centroids * (kmeans.ema_count + kmeans.eps).unsqueeze(-1))
            kmeans.initialized.fill_(True)


# --------------------------------------------------------------------------------------------
# sparsefinder
# --------------------------------------------------------------------------------------------


GOLD_PAIRS_PER_STEP = 1 << 16


def _rows_subset(gold: tuple[Tensor, Tensor], rows: int) -> tuple[Tensor, Tensor]:
    """The gold pairs of a random subset of the `rows` query rows, about GOLD_PAIRS_PER_STEP of them."""
    g_row, g_col = gold
    if g_row.numel() <= GOLD_PAIRS_PER_STEP:
        return gold
    chosen = torch.rand(rows, device=g_row.device) < GOLD_PAIRS_PER_STEP / g_row.numel()
    keep = chosen[g_row]
    return g_row[keep], g_col[keep]


class SparsefinderFitter(Fitter):
    def __init__(self, module: nn.Module, *, lr: float, gold: str | None, mass: float | None,
                 budget: float | None = None):
        super().__init__(module)
        self.budget = budget
        self.seen: list[dict] = []
        rule = dict(module.gold_rule)
        if gold is not None:
            rule["rule"] = gold
        if mass is not None:
            rule["mass"] = mass
        self.rule = rule
        self.optimizer = torch.optim.Adam([module.w_q, module.w_k], lr=lr)

    def prepare(self, inputs: dict) -> dict:
        from attnpass.methods.sparsefinder import gold as sf_gold

        m = self.module
        q, k = inputs["q"], inputs["k"]
        gold = sf_gold.gold_pairs(q, k, scale=m.scale(q), causal=m.spec.causal, causal_offset=m.layout_offset(q, k),
                             key_keep=inputs.get("key_keep"), bias=inputs.get("bias"), mask=inputs.get("mask"),
                             **self.rule)
        rows = q.shape[0] * q.shape[1] * q.shape[2]
        data = {**inputs, "gold": gold, "rows": rows, "eval_gold": _rows_subset(gold, rows)}
        self.seen.append(data)
        return data

    def _loss(self, data: dict, gold: tuple[Tensor, Tensor], track: bool) -> Tensor:
        return self.module.projection_loss(data["q"], data["k"], data.get("key_keep"), data.get("bias"),
                                           data.get("mask"), gold=gold, track_threshold=track)

    def objective(self, data: dict) -> float:
        with torch.no_grad():  # measuring must not move the distance threshold
            return float(self._loss(data, data["eval_gold"], track=False))

    def step(self, data: dict) -> float:
        with torch.enable_grad():
            loss = self._loss(data, _rows_subset(data["gold"], data["rows"]), track=True)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        if self.module.predictor == "clustering":
            self.module.update_centroids_(data["q"], data["k"], data.get("key_keep"))
        return float(loss.detach())

    def finish(self) -> None:
        if self.budget is None:
            return
        m = self.module
        distances = []
        with torch.no_grad():
            for data in self.seen:
                qp, kp = m.project(data["q"], data["k"])
                d = torch.cdist(qp.float(), kp.float())                          # (B, Hq, Lq, Lk)
                distances.append(d[site_probe.allowed_pairs(m, data)])
            pooled = torch.cat(distances)
            if pooled.numel():
                # kthvalue, not quantile: quantile refuses inputs of more than 2**24 elements
                rank = max(1, min(pooled.numel(), round(self.budget * pooled.numel())))
                m.threshold_.fill_(float(pooled.kthvalue(rank).values))
                # keep the budget's threshold in this session (training would move it back towards
                # the default quantile of the gold distances)
                m._calibrate_threshold = False


# --------------------------------------------------------------------------------------------
# sbm
# --------------------------------------------------------------------------------------------


# Query rows per batch and site whose dense probabilities the SBM fitter keeps: the recall is
# estimated on them, so memory is O(rows * Lk) per batch and site instead of O(Lq * Lk).
SBM_ROWS_PER_BATCH = 128


class SBMFitter(Fitter):
    def __init__(self, module: nn.Module, *, lr: float, density_weight: float):
        super().__init__(module)
        self.density_weight = density_weight
        self.optimizer = torch.optim.Adam([module.clusters, *module.phi.parameters()], lr=lr)

    def prepare(self, inputs: dict) -> dict:
        m = self.module
        len_q = inputs["q"].shape[2]
        rows = torch.randperm(len_q, device=inputs["q"].device)[:SBM_ROWS_PER_BATCH].sort().values
        probs = site_probe.dense_probabilities(m, inputs, dtype=torch.float32, rows=rows)
        return {**inputs, "rows": rows, "probs": probs}

    def _loss(self, data: dict) -> Tensor:
        m = self.module
        q, k = data["q"], data["k"]
        B, Hq, Lq, _ = q.shape
        key_keep = data.get("key_keep")
        y_q, y_k, block = m.memberships(q, k, key_keep)                         # (N, L, c), (N, c, c)
        y_rows = y_q.index_select(1, data["rows"])
        P = torch.matmul(torch.matmul(y_rows, block), y_k.transpose(-1, -2)).view(B, Hq, len(data["rows"]), -1) + m.floor
        drawn = -torch.expm1(-P)                                                # P(edge (i, j) is sampled)
        probs = data["probs"].to(P.dtype)
        rows = (probs.sum(-1) > 0).sum().clamp(min=1)
        recall = (probs * drawn).sum() / rows
        # the method's own density regulariser (O(L k^2), without the constant floor)
        causal = m.spec.causal
        from attnpass.methods.sbm.sampling import expected_density  # here: importing SBM's package loads the method

        density = expected_density(y_q, y_k, block, causal=causal, causal_offset=m.layout_offset(q, k) if causal else 0,
                                   key_keep=key_keep, heads=Hq)
        return -recall + self.density_weight * density

    def objective(self, data: dict) -> float:
        with torch.no_grad():
            return float(self._loss(data))

    def step(self, data: dict) -> float:
        with torch.enable_grad():
            loss = self._loss(data)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def fitter_for(module: nn.Module, *, lr: float, gold: str | None, mass: float | None,
               density_weight: float, budget: float | None = None) -> Fitter | None:
    """The fitter of a site module (its method's `SiteAttention.fitter`), or None when its method has
    nothing to fit (dense, Combiner)."""
    return module.fitter(lr=lr, gold=gold, mass=mass, density_weight=density_weight, budget=budget)
