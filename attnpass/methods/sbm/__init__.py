"""method="sbm": SBM attention (Cho et al. 2022, "Transformers meet Stochastic Block Models").

Per site, new parameters (they show in `parameters()` and `state_dict()` of the sparse model):

    clusters   (Hq, k, D)   per query head, k cluster embeddings C_h
    phi        MLP D -> D -> D (Linear, ReLU, Linear), shared by queries, keys and heads

Per head, the block matrix B_h = softmax over the k*k entries of C_h C_h^T, the memberships
Y_Q = sigmoid(phi(Q) C_h^T) and Y_K = sigmoid(phi(K) C_h^T) (independent sigmoids), and the edge
probabilities P = Y_Q B_h Y_K^T. A graph is sampled from P without forming it (`sbm.sampling`:
fastRG, cost linear in the edges; a pair is an edge with probability 1 - exp(-P_ij)), and the site
attends over the sampled edges only: softmax of the site's own scores (scale, bias, mask, causal,
padding, GQA, dropout as in the original) over each query's edges, on the edge-list kernel.

Choices (the paper leaves them open):
- A query that drew no edge gets one edge to the key at its own position (causal: i + offset, the
  last key it may see; otherwise floor(i * Lk / Lq); with padding, the nearest real key before it).
  The paper gives such a row zeros; a zero attention output wipes the token's attention
  contribution, while its own position is always allowed (also under causal) and costs one edge.
  This edge is not a sample of P, so it carries no straight-through gradient.
- Attention uses the site's q, k as they are; phi and the clusters only decide the graph.
- Training: a fresh graph per call, drawn from torch's global RNG (so `torch.manual_seed` makes
  runs reproducible). Gradients reach q, k, v as in ordinary attention and reach the clusters and phi
  through the straight-through estimator on the sampled edges (`EdgeProbabilitySTE`). `aux_loss()`
  holds density_weight * (expected edge density), the paper's density regulariser.
- Eval (`eval_graph="sample"`, the default): the graph is drawn from a generator seeded with the
  `seed` option, so the same input gives the same graph (and output) on every call; a different
  seed gives another draw.
- Eval with `eval_graph="clusters"`: a deterministic graph from the same memberships, no sampling
  (`sbm.cluster_graph`): keys hard-assigned to their dominant cluster, each query attends to the
  keys of its `eval_clusters` clusters of largest expected edge mass, plus its own position. This
  is the rule the ONNX export computes (no runtime reproduces torch's sampler). Training always
  samples.
- `floor` (default 0) adds the uniform edge rate the authors' training script adds to P.
- `max_density` (default 0.1; None: the paper's P as it is) bounds the pairs a call computes: where
  a head's P would draw more than that share of its allowed pairs in expectation, its P is scaled
  down to it (one factor per head and call, the block matrix times max_density / density), so the
  graph is still a draw from the model's relative edge rates. Calibration fits the clusters and phi
  towards a density (`density_weight`); the cap holds whatever they are, e.g. for an untrained site
  (whose P covers about a fifth of the pairs). The regulariser and calibration's fit read the
  model's own P; the straight-through gradient, the scaled P the graph was drawn from. `floor`'s rate and the one edge
  of a row that drew none come on top.
- `memory_limit` (bytes; default: the memory the machine has available): a sampled call whose
  expected edge count (known from the memberships before drawing) needs more is refused with
  `attnpass.memory_guard.AttentionTooLarge`, instead of the process being killed part-way through
  (docs/memory.md).
Nothing of size Lq x Lk is built.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnpass.lowering.torch.edge_attention import edge_attention, edges_to_dense_mask
from attnpass.methods.base import SiteAttention, SiteSpec, refuse_budget
from attnpass.methods.anchor import ANCHOR_OPTIONS, Anchor, check_anchor_options
from attnpass.methods.options import check_choice, check_int, check_known, check_real
from attnpass.methods.sbm.cluster_graph import cluster_graph
from attnpass.memory_guard import PairLimit, check_limit_option
from attnpass.methods.sbm.sampling import (
    EdgeProbabilitySTE, SBMGraph, block_matrix, expected_density, expected_edge_count, head_densities, sample_graph,
)

_OPTIONS = ("clusters", "density_weight", "floor", "max_density", "seed", "eval_graph", "eval_clusters",
            "memory_limit") + ANCHOR_OPTIONS
EVAL_GRAPHS = ("sample", "clusters")
DEFAULT_CLUSTERS = 128        # the authors' LRA setting
DEFAULT_DENSITY_WEIGHT = 1e-4  # lambda of the LRA scripts
# The expected share of a head's allowed pairs a call may draw (the density the cost model counts for
# a learned graph, prefill.NOMINAL_DENSITY)
DEFAULT_MAX_DENSITY = 0.1
# Peak working memory of a sampled call per drawn edge (the draw's index arrays, their merge into a
# CSR, the kernel's per-edge logits; forward and backward alike), with a margin:
# benchmarks/memory_per_pair.py prints the measured figure (docs/memory.md).
BYTES_PER_EDGE = 160


class SBMAttention(SiteAttention):
    method_name = "sbm"
    onnx_lowering = "attnpass.lowering.onnx.sbm"
    cost_formulas = "attnpass.methods.sbm.cost"
    learns_density = True
    has_learned_state = True
    state_sized_by = "SBM sizes its clusters and MLP"
    options = _OPTIONS

    def __init__(self, spec: SiteSpec, **options):
        self.check_site(spec, **options)
        super().__init__(spec, Anchor.from_options(options))
        heads, dim = spec.heads_q, spec.head_dim
        self.num_clusters: int = int(options.get("clusters", DEFAULT_CLUSTERS))
        self.density_weight: float = float(options.get("density_weight", DEFAULT_DENSITY_WEIGHT))
        self.floor: float = float(options.get("floor", 0.0))
        max_density = options.get("max_density", DEFAULT_MAX_DENSITY)
        self.max_density: float | None = None if max_density is None else float(max_density)
        self.seed: int = int(options.get("seed", 0))
        self.eval_graph: str = options.get("eval_graph", "sample")
        self.eval_clusters: int = int(options.get("eval_clusters", 1))
        # bytes a call may take (None: what the machine has available); a sampled graph expected to
        # need more is refused before it is drawn (attnpass.memory_guard)
        self.memory_limit: int | None = options.get("memory_limit")
        # N(0, 1/D) entries: C_h C_h^T and phi(x) C_h^T start at unit scale, neither saturated nor flat
        self.clusters = nn.Parameter(torch.randn(heads, self.num_clusters, dim) / math.sqrt(dim))
        self.phi = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self._last_aux_loss: Tensor | None = None
        # Set keep_graph to keep each call's graph in last_graph (for inspection and plots): off by
        # default, since a long sequence's graph is hundreds of MB per site.
        self.keep_graph = False
        self.last_graph: SBMGraph | None = None

    @classmethod
    def validate_options(cls, **options) -> None:
        check_known("sbm", options, _OPTIONS)
        check_anchor_options("sbm", options)
        if "clusters" in options:
            check_int("sbm", "clusters", options["clusters"], 1)
        if "density_weight" in options:
            check_real("sbm", "density_weight", options["density_weight"], 0.0, math.inf, low_open=False)
        if "floor" in options:
            check_real("sbm", "floor", options["floor"], 0.0, 1.0, low_open=False)
        if options.get("max_density") is not None:
            check_real("sbm", "max_density", options["max_density"], 0.0, 1.0, low_open=True, high_open=False)
        if "seed" in options:
            check_int("sbm", "seed", options["seed"], 0)
        if "eval_graph" in options:
            check_choice("sbm", "eval_graph", options["eval_graph"], EVAL_GRAPHS)
        check_limit_option("sbm", options)
        if "eval_clusters" in options:
            check_int("sbm", "eval_clusters", options["eval_clusters"], 1)
            clusters = options.get("clusters", DEFAULT_CLUSTERS)
            if options["eval_clusters"] > clusters:
                raise ValueError(f"method 'sbm': option eval_clusters={options['eval_clusters']} exceeds "
                                 f"clusters={clusters} (the number of clusters a query can pick from)")

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, clusters={self.num_clusters}, density_weight={self.density_weight:g}, "
                f"floor={self.floor:g}, max_density={self.max_density}, seed={self.seed}, eval_graph={self.eval_graph!r}"
                + (f", eval_clusters={self.eval_clusters}" if self.eval_graph == "clusters" else ""))

    def aux_loss(self) -> Tensor | None:
        """density_weight * expected edge density of the last training call (None before any)."""
        return self._last_aux_loss

    # ---------------------------------------------------------------------------------------

    def memberships(self, q: Tensor, k: Tensor, key_keep: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(Y_Q (B*Hq, Lq, k), Y_K (B*Hq, Lk, k), block (B*Hq, k, k)) in float32 (float64 for float64 q).

        Query head h reads kv head h // (Hq // Hkv) (GQA): its keys get head h's memberships.
        Padding keys get all-zero memberships, so they are never sampled.
        """
        B, Hq, Lq, D = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        C = self.clusters.to(acc)
        y_q = torch.sigmoid(self._phi(q, acc) @ C.transpose(-1, -2))                       # (B, Hq, Lq, k)
        grouped = C.view(Hkv, Hq // Hkv, self.num_clusters, D)
        y_k = torch.sigmoid(self._phi(k, acc).unsqueeze(2) @ grouped.transpose(-1, -2))   # (B, Hkv, g, Lk, k)
        y_k = y_k.reshape(B, Hq, Lk, self.num_clusters)
        if key_keep is not None:
            y_k = y_k * key_keep.view(B, 1, Lk, 1).to(acc)
        block = block_matrix(C).unsqueeze(0).expand(B, -1, -1, -1)
        k_ = self.num_clusters
        return y_q.reshape(B * Hq, Lq, k_), y_k.reshape(B * Hq, Lk, k_), block.reshape(B * Hq, k_, k_)

    def _phi(self, x: Tensor, acc: torch.dtype) -> Tensor:
        """phi in the accumulation dtype, without converting the module's own parameters."""
        first, _, second = self.phi
        hidden = F.relu(F.linear(x.to(acc), first.weight.to(acc), first.bias.to(acc)))
        return F.linear(hidden, second.weight.to(acc), second.bias.to(acc))

    def sample(self, q: Tensor, k: Tensor, key_keep: Tensor | None = None,
               generator: torch.Generator | None = None) -> SBMGraph:
        """The graph this site would attend over for (q, k): a fresh draw in training; in eval the
        `seed` draw, or the deterministic cluster graph with eval_graph="clusters" (a draw from
        `generator` when one is given)."""
        with torch.no_grad():
            y_q, y_k, block = self.memberships(q, k, key_keep)
            block = self.capped_block(q, k, y_q, y_k, block, key_keep)
        return self._sample(q, k, y_q, y_k, block, key_keep, generator)

    def capped_block(self, q: Tensor, k: Tensor, y_q: Tensor, y_k: Tensor, block: Tensor,
                     key_keep: Tensor | None) -> Tensor:
        """The block matrices the graph is drawn from: each head's scaled so that its expected
        density over its allowed pairs is at most `max_density` (unchanged where it is already)."""
        if self.max_density is None:
            return block
        causal = self.spec.causal
        with torch.no_grad():
            # on the memberships the sampler draws from (a NaN / inf token draws nothing: `_sample`)
            y_q, y_k = (torch.nan_to_num(y.detach(), nan=0.0, posinf=0.0, neginf=0.0) for y in (y_q, y_k))
            density = head_densities(y_q, y_k, block.detach(), causal=causal,
                                     causal_offset=self.layout_offset(q, k) if causal else 0,
                                     key_keep=key_keep, heads=q.shape[1])
            factor = (self.max_density / density.clamp(min=torch.finfo(density.dtype).tiny)).clamp(max=1.0)
        return block * factor.view(-1, 1, 1)

    def _sample(self, q, k, y_q, y_k, block, key_keep, generator) -> SBMGraph:
        causal = self.spec.causal
        offset = self.layout_offset(q, k) if causal else 0
        if generator is None and not self.training and self.eval_graph == "clusters":
            return cluster_graph(y_q.detach(), y_k.detach(), block.detach(), top=self.eval_clusters, heads=q.shape[1],
                                 causal=causal, causal_offset=offset, key_keep=key_keep)
        if generator is None:
            # train: from the global RNG (torch.manual_seed reproduces a run); eval: fixed per site
            seed = int(torch.randint(0, 2**62, (), device="cpu")) if self.training else self.seed
            generator = torch.Generator(device=q.device).manual_seed(seed)
        # a NaN / inf token (a broken input) draws no edges; its own output is NaN through attention
        y_q, y_k = (torch.nan_to_num(y.detach(), nan=0.0, posinf=0.0, neginf=0.0) for y in (y_q, y_k))
        self._check_memory(y_q, y_k, block.detach(), key_keep, q.shape[1])
        return sample_graph(y_q, y_k, block.detach(), generator, heads=q.shape[1],
                            causal=causal, causal_offset=offset, key_keep=key_keep, floor=self.floor)

    def _check_memory(self, y_q, y_k, block, key_keep, heads: int) -> None:
        keep_n = None if key_keep is None else key_keep.repeat_interleave(heads, dim=0)
        limit = PairLimit(f"sbm site {self.spec.name!r}", "sampled edges", BYTES_PER_EDGE,
                          y_q.shape[0] * y_q.shape[1] * y_k.shape[1], self.memory_limit,
                          "Calibrate the clusters towards a lower density (attnpass.calibrate), use "
                          "eval_graph='clusters', or shorter inputs; memory_limit=<bytes> sets the limit")
        limit(expected_edge_count(y_q, y_k, block, self.floor, keep_n))

    def computed_pairs(self, q, k, key_keep=None):
        # eval draws the graph from the site's seed, so sample() repeats the graph the call attended over
        graph = self.last_graph if self.last_graph is not None else self.sample(q, k, key_keep)
        B, Hq, Lq, _ = q.shape
        return edges_to_dense_mask(graph.row_ptr, graph.col_index, B, Hq, Lq, k.shape[2]), None

    def cost_options(self, len_q: int, len_k: int, head_dim: int) -> dict:
        from attnpass.prefill import NOMINAL_DENSITY

        density = NOMINAL_DENSITY if self.max_density is None else min(NOMINAL_DENSITY, self.max_density)
        return {"clusters": self.num_clusters, "density": density}

    def cost_options_at_any_length(self, head_dim: int) -> dict | None:
        return self.cost_options(0, 0, head_dim)  # they do not read the lengths

    def fitter(self, *, lr, gold, mass, density_weight, budget=None):
        """The cluster embeddings and phi, by Adam on recall and density (`calibrate_fitters.SBMFitter`)."""
        refuse_budget(self.method_name, budget)
        from attnpass.tools.calibrate_fitters import SBMFitter

        return SBMFitter(self, lr=lr, density_weight=density_weight)

    def sparse_forward(self, q, k, v, bias=None, mask=None, key_keep=None, dropout_p: float = 0.0,
                       empty_rows: str = "zero"):  # queries with no key get zeros (SiteAttention.forward)
        return self.sparse_attention(q, k, v, bias, mask, key_keep, dropout_p)[0]

    def sparse_attention(self, q, k, v, bias, mask, key_keep, dropout_p: float):
        if q.shape[1] != self.spec.heads_q or q.shape[3] != self.spec.head_dim:
            raise ValueError(f"sbm site {self.spec.name!r} was built for {self.spec.heads_q} query heads of dim "
                             f"{self.spec.head_dim}, got q of shape {tuple(q.shape)}")
        B, Hq, Lq, _ = q.shape
        if Lq == 0 or k.shape[2] == 0:  # no key to see: zeros, as dense attention gives
            return q.new_zeros(B, Hq, Lq, v.shape[3]), q.new_zeros(B, Hq, Lq, dtype=torch.float32)
        causal = self.spec.causal
        offset = self.layout_offset(q, k) if causal else 0
        y_q, y_k, model_block = self.memberships(q, k, key_keep)
        block = self.capped_block(q, k, y_q, y_k, model_block, key_keep)
        graph = self._sample(q, k, y_q, y_k, block, key_keep, None)
        self.last_graph = graph if self.keep_graph else None

        edge_bias = None
        if torch.is_grad_enabled() and self.clusters.requires_grad:
            edge_bias = EdgeProbabilitySTE.apply(y_q, y_k, block, graph.edge_row, graph.col_index, graph.sampled)
        if self.training:
            density = expected_density(y_q, y_k, model_block, causal=causal, causal_offset=offset,
                                       key_keep=key_keep, heads=Hq)
            self._last_aux_loss = self.density_weight * density

        if mask is not None:
            # a bool mask becomes -inf logits at its own (already built) shape; the kernel reads it at the edges
            mask_bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, -math.inf)
            bias = mask_bias if bias is None else bias + mask_bias
        p = dropout_p if self.training else 0.0
        return edge_attention(
            q, k, v, graph.row_ptr, graph.col_index, scale=self.scale(q), causal=causal, causal_offset=offset,
            window=self.layout_window(), key_padding_mask=key_keep, bias=bias, edge_bias=edge_bias, dropout_p=p,
            dropout_seed=self.dropout_seed(p), normalizer="softmax",
        )
