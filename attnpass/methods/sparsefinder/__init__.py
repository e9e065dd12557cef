"""method="sparsefinder": entmax-1.5 attention over a predicted sparse graph (Treviso et al. 2022).

The site's normaliser becomes entmax-1.5 (alpha = 1.5), computed only over the (query, key) pairs
a cheap predictor expects to be nonzero, with the CSR kernel `edge_attention(normalizer="entmax15")`.
For a trained softmax model converted after the fact, `normalizer="softmax"` keeps the model's
softmax and predicts instead the keys that hold most of each row's softmax mass (see `mass`).
Each query head has learnable projections W_Q, W_K: head dim -> `rank` (nn.Parameters; GQA: the
keys of kv head h // (Hq // Hkv) are projected with query head h's W_K). The predictors live in
`sparsefinder.predictors` (distance, quantization, clustering, plus window / first-token edges).

Options (validated before capture):
    predictor     "clustering" (default), "distance", "quantization" or "blocks". Clustering is the default:
                  of the predictors that are not all-pairs it finds the most gold pairs for the
                  pairs it keeps (tests/test_sparsefinder.py's acceptance test asserts it against
                  quantization; docs/benchmarks_sparsefinder.md measures each predictor with its
                  script). Distance finds more but tests every pair, O(Lq Lk r) by nature.
                  Centroids start from the first batch's projected tokens.
                  "blocks" (`sparsefinder.blocks`) needs no projection and nothing calibrated: each
                  block of queries computes the key blocks that a sample of its queries' exact
                  scores rank highest. It is the predictor for converting a pretrained LM (see
                  README's recipe): the pair predictors miss the keys its retrieval heads need.
    block, top_blocks, sampled_queries, kv_heads_share
                  blocks predictor: block size for queries and keys (default 32), key blocks each
                  query block computes (default 13: 416 keys per query whatever the length), queries
                  of a block whose scores rank the key blocks (default 8, at most `block`), whether
                  the query heads sharing a key/value head (GQA) choose their blocks together
                  (default True; at inference their queries then share one gathered set of keys). The
                  options of the other predictors (rank, threshold, bucket_size, clusters,
                  top_clusters, window, first_token, margin, decay) do not apply to it and are
                  refused, as its options are with the others.
    rank          r, projected dim (default 4, the paper's)
    threshold     distance predictor: ||W_Q q - W_K k|| < threshold. Default None = calibrated:
                  the hinge loss is invariant to shifting all squared distances, so no fixed
                  number is meaningful; each training call moves an EMA (`decay`) towards the
                  0.95-quantile of the gold pairs' projected distances (buffer `threshold_`,
                  +inf before any training: an untrained distance predictor keeps every pair)
    bucket_size   quantization predictor: keys per bucket (default 16)
    clusters      clustering predictor: centroids per query head (default 16)
    top_clusters  clustering predictor: a token's nearest centroids that count (default 2)
    window        local edges |anchor(i) - j| <= window in key space (default 1; None: none)
    first_token   edge to key 0 (default True)
    margin        hinge margin gamma (default 1.0)
    normalizer    "entmax15" (default, the paper's; "softmax" is the default with sinks= / local=) or
                  "softmax": keep the site's softmax, over the predicted pairs only; the gold graph the projections learn is then the smallest
                  set of each row's keys holding `mass` of its softmax probability
    mass          share of a row's softmax probability its gold keys hold (normalizer="softmax";
                  default 0.9)
    decay         EMA decay of the centroid updates (clustering) and of the calibrated distance
                  threshold (default 0.9)
    memory_limit  bytes a call may take (default None: the memory the machine has available): a
                  clustering / distance call predicting more pairs than fit is refused before they
                  are allocated (`attnpass.memory_guard.AttentionTooLarge`, docs/memory.md)

Defaults window=1, first_token=True: a row with no predicted edge gets zeros (the kernel's rule),
which silently drops that query's information. With both, every query whose own position (or
neighbour) or key 0 is allowed has an edge (causal self-attention: always), for 4 edges per query.

Training: in train mode each call leaves in `aux_loss()` the hinge loss of `projection_loss` on the
call's detached q, k (so it trains W_Q, W_K only), and the clustering predictor takes one EMA
k-means step on the projected tokens. The loss needs the gold graph, i.e. each row's entmax
threshold over all keys: O(Lq Lk D) work per training call (in chunks, never Lq x Lk at once),
the price of supervising the predictor. Eval calls compute only the predicted pairs.

A general bool `mask` becomes an additive -inf bias of the mask's own shape (read only at the
edges by the kernel); when the site also has a bias, the mask is merged into it if that does not
grow the bias, otherwise the predicted edges the mask forbids are removed instead (a per-edge
gather), so nothing bigger than what the model already built is allocated.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from attnpass.memory_guard import PairLimit, check_limit_option
from attnpass.lowering.torch.common import broadcastable, csr_ptr, csr_rows, read_at_pairs
from attnpass.lowering.torch.block_flash import block_flash_op
from attnpass.lowering.torch.bucket_attention import quantile_bucket_attention
from attnpass.lowering.torch.edge_attention import edge_attention, edges_to_dense_mask
from attnpass.lowering.torch.grouped_attention import grouped_attention
from attnpass.lowering.triton.switch import use_triton
from attnpass.methods import kmeans
from attnpass.methods.sparsefinder import blocks, gold as sf_gold, metrics as sf_metrics, predictors
from attnpass.methods.base import SiteAttention, SiteSpec, refuse_budget
from attnpass.methods.anchor import ANCHOR_OPTIONS, Anchor, check_anchor_options
from attnpass.methods.options import check_int, check_known, check_real

_OPTIONS = ("predictor", "rank", "threshold", "bucket_size", "clusters", "top_clusters", "window",
            "first_token", "margin", "decay", "normalizer", "mass", "memory_limit") + blocks.OPTIONS + ANCHOR_OPTIONS
THRESHOLD_QUANTILE = 0.95
DEFAULTS = dict(predictor="clustering", rank=4, threshold=None, bucket_size=16, clusters=16, top_clusters=2,
                window=1, first_token=True, margin=1.0, decay=0.9, normalizer="entmax15", mass=0.9, **blocks.DEFAULTS)
PREDICTOR_CHOICES = predictors.PREDICTORS + ("blocks",)
# options only the pair predictors read (projections, their predictors, their local edges)
_PAIR_PREDICTOR_OPTIONS = ("rank", "threshold", "bucket_size", "clusters", "top_clusters", "window", "first_token",
                           "margin", "decay")
NORMALIZERS = ("entmax15", "softmax")
# Peak working memory of a call per candidate pair of the distance / clustering predictors (the
# pairs, their merge into a CSR, the kernel's per-pair work; forward and backward alike), with a
# margin: benchmarks/memory_per_pair.py prints the measured figure.
BYTES_PER_PAIR = 80


def _fail(message: str, error: type = ValueError):
    raise error(f"method 'sparsefinder': {message}")


def _top_clusters(options: dict) -> int:
    """top_clusters as given, else the default capped at the cluster count (clusters=1 stays valid)."""
    if "top_clusters" in options:
        return options["top_clusters"]
    return min(DEFAULTS["top_clusters"], options.get("clusters", DEFAULTS["clusters"]))


def _mask_merge(bias: Tensor | None, mask: Tensor | None, dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
    """(bias to pass to the kernel, mask still to apply at the edges) -- see the module docstring."""
    if mask is None:
        return bias, None
    as_bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, -math.inf)
    if bias is None:
        return as_bias, None
    if broadcastable(tuple(mask.shape), tuple(bias.shape)):
        return bias + as_bias, None
    return bias, mask


def _drop_masked_edges(row_ptr: Tensor, col: Tensor, mask: Tensor, H: int, Lq: int) -> tuple[Tensor, Tensor]:
    R = row_ptr.numel() - 1
    row = csr_rows(row_ptr, col.numel())
    bh, i = row // Lq, row % Lq
    ok = read_at_pairs(mask, (bh // H, bh % H, i, col))
    row, col = row[ok], col[ok]
    return csr_ptr(torch.bincount(row, minlength=R)), col


class SparsefinderAttention(SiteAttention):
    method_name = "sparsefinder"
    onnx_lowering = "attnpass.lowering.onnx.sparsefinder"
    cost_formulas = "attnpass.methods.sparsefinder.cost"
    learns_density = True
    has_learned_state = True
    state_sized_by = "sparsefinder sizes its projections"
    options = _OPTIONS

    def __init__(self, spec: SiteSpec, **options):
        self.check_site(spec, **options)
        super().__init__(spec, Anchor.from_options(options))
        opts = resolved_options(options)
        self.predictor: str = opts["predictor"]
        self.rank: int = int(opts["rank"])
        self.margin: float = float(opts["margin"])
        self.normalizer: str = opts["normalizer"]
        self.mass: float = float(opts["mass"])
        # bytes a call may take (None: what the machine has available); a predicted graph needing
        # more is refused before its pairs are allocated (attnpass.memory_guard)
        self.memory_limit: int | None = options.get("memory_limit")
        self._calibrate_threshold = opts["threshold"] is None
        if self.predictor == "distance":
            # +inf until calibrated: an untrained distance predictor keeps every pair (exact, not sparse)
            start = math.inf if opts["threshold"] is None else float(opts["threshold"])
            self.register_buffer("threshold_", torch.tensor(start, dtype=torch.float64))
        self.bucket_size: int = int(opts["bucket_size"])
        self.clusters: int = int(opts["clusters"])
        self.top_clusters: int = int(_top_clusters(options))
        self.window: int | None = None if opts["window"] is None else int(opts["window"])
        self.first_token: bool = bool(opts["first_token"])
        self.decay: float = float(opts["decay"])
        self.block: int = int(opts["block"])
        self.top_blocks: int = int(opts["top_blocks"])
        # a block smaller than the default sample is sampled whole
        self.sampled_queries: int = int(options.get("sampled_queries", min(DEFAULTS["sampled_queries"], self.block)))
        self.kv_heads_share: bool = bool(opts["kv_heads_share"])
        H, D = spec.heads_q, spec.head_dim
        if self.predictor != "blocks":  # the blocks predictor reads the model's own q, k
            # N(0, 1/D) entries: projected coordinates start with the scale of the inputs
            self.w_q = nn.Parameter(torch.randn(H, D, self.rank) / math.sqrt(D))
            self.w_k = nn.Parameter(torch.randn(H, D, self.rank) / math.sqrt(D))
        if self.predictor == "clustering":
            kmeans.register_state(self, H, self.clusters, self.rank)  # routing's EMA k-means state
        self._last_aux_loss: Tensor | None = None
        self._collect_metrics = False
        self.last_metrics: sf_metrics.GraphMetrics | None = None

    # ---------------------------------------------------------------------------------------

    @classmethod
    def validate_options(cls, **options) -> None:
        check_known("sparsefinder", options, _OPTIONS)
        check_anchor_options("sparsefinder", {"normalizer": DEFAULTS["normalizer"], **_default_normalizer(options), **options})
        predictor = options.get("predictor", DEFAULTS["predictor"])
        if not isinstance(predictor, str) or predictor not in PREDICTOR_CHOICES:
            _fail(f"option predictor={predictor!r} must be one of {list(PREDICTOR_CHOICES)}")
        foreign = [n for n in (_PAIR_PREDICTOR_OPTIONS if predictor == "blocks" else blocks.OPTIONS) if n in options]
        if foreign:
            _fail(f"option {foreign[0]}= does not apply to predictor={predictor!r} "
                  + ("(it picks whole key blocks from the model's own scores; sinks= / local= add sinks and a window)"
                     if predictor == "blocks" else "(it is an option of predictor='blocks')"))
        for name in ("rank", "bucket_size", "clusters", "top_clusters", "block", "top_blocks"):
            if name in options:
                check_int("sparsefinder", name, options[name], 1)
        if options.get("window") is not None:
            check_int("sparsefinder", "window", options["window"], 0)
        for name in ("first_token", "kv_heads_share"):
            if name in options and not isinstance(options[name], bool):
                _fail(f"option {name}={options[name]!r} must be a bool", TypeError)
        if options.get("threshold") is not None:
            check_real("sparsefinder", "threshold", options["threshold"], 0.0, math.inf, low_open=True, high_open=False)
        if "margin" in options:
            check_real("sparsefinder", "margin", options["margin"], 0.0, math.inf, low_open=False)
        if "decay" in options:
            check_real("sparsefinder", "decay", options["decay"], 0.0, 1.0, low_open=False)
        normalizer = options.get("normalizer", DEFAULTS["normalizer"])
        if not isinstance(normalizer, str) or normalizer not in NORMALIZERS:
            _fail(f"option normalizer={normalizer!r} must be one of {list(NORMALIZERS)}")
        check_limit_option("sparsefinder", options)
        if "mass" in options:
            check_real("sparsefinder", "mass", options["mass"], 0.0, 1.0, low_open=True, high_open=False)
        if "sampled_queries" in options:
            check_int("sparsefinder", "sampled_queries", options["sampled_queries"], 1)
            if options["sampled_queries"] > options.get("block", DEFAULTS["block"]):
                _fail(f"option sampled_queries={options['sampled_queries']} is more than the queries of a block "
                      f"(block={options.get('block', DEFAULTS['block'])})")
        top, clusters = _top_clusters(options), options.get("clusters", DEFAULTS["clusters"])
        if top > clusters:
            _fail(f"option top_clusters={top} is more than clusters={clusters}")

    def extra_repr(self) -> str:
        normalizer = "entmax15" if self.normalizer == "entmax15" else f"softmax, mass={self.mass:g}"
        if self.predictor == "blocks":
            return (f"{super().extra_repr()}, predictor=blocks, block={self.block}, top_blocks={self.top_blocks}, "
                    f"sampled_queries={self.sampled_queries}, kv_heads_share={self.kv_heads_share}, "
                    f"normalizer={normalizer}")
        detail = {"distance": f"threshold={self.threshold:.4g}", "quantization": f"bucket_size={self.bucket_size}",
                  "clustering": f"clusters={self.clusters}, top_clusters={self.top_clusters}"}[self.predictor]
        return (f"{super().extra_repr()}, predictor={self.predictor}, rank={self.rank}, {detail}, "
                f"window={self.window}, first_token={self.first_token}, normalizer={normalizer}")

    @property
    def gold_rule(self) -> dict:
        """How this site's gold graph is defined: `gold_pairs` keyword arguments (rule, mass)."""
        return {"rule": "entmax15" if self.normalizer == "entmax15" else "mass", "mass": self.mass}

    @property
    def threshold(self) -> float:
        """The distance predictor's threshold (given, or calibrated in training; inf before)."""
        return float(self.threshold_) if hasattr(self, "threshold_") else math.nan

    def aux_loss(self) -> Tensor | None:
        """The hinge loss of the last training call (None before any)."""
        return self._last_aux_loss

    # ---------------------------------------------------------------------------------------
    # Prediction
    # ---------------------------------------------------------------------------------------

    def _check_shapes(self, q: Tensor, k: Tensor) -> None:
        if q.shape[1] != self.spec.heads_q or q.shape[3] != self.spec.head_dim:
            raise ValueError(
                f"sparsefinder site {self.spec.name!r} was built for {self.spec.heads_q} query heads of dim "
                f"{self.spec.head_dim}, got q of shape {tuple(q.shape)}")

    def project(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """(W_Q q, W_K k) per query head: (B, Hq, Lq, r), (B, Hq, Lk, r)."""
        return predictors.project(q, k, self.w_q, self.w_k)

    def predict(self, q: Tensor, k: Tensor, key_keep: Tensor | None = None) -> tuple[Tensor, Tensor, int]:
        """The predicted graph for (q, k): CSR (row_ptr, col_index) and the candidate count."""
        self._check_shapes(q, k)
        if self.predictor == "blocks":
            return self._block_graph(q, k, key_keep, *self.block_layout(q, k, key_keep))
        with torch.no_grad():
            qp, kp = self.project(q, k)
            if self.predictor == "clustering" and not bool(self.initialized):
                self._init_centroids(qp, kp, key_keep)
            return predictors.predict_edges(
                qp, kp, self.predictor, threshold=self.threshold, bucket_size=self.bucket_size,
                centroids=getattr(self, "centroids", None), top_clusters=self.top_clusters, window=self.window,
                first_token=self.first_token, causal=self.spec.causal, causal_offset=self.layout_offset(q, k),
                key_keep=key_keep, on_pairs=None if self.predictor == "quantization" else PairLimit(
                    f"sparsefinder site {self.spec.name!r}", "predicted pairs", BYTES_PER_PAIR,
                    q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2], self.memory_limit,
                    "Calibrate the predictor (attnpass.calibrate), use more clusters or fewer top_clusters, "
                    "predictor='quantization' (fixed pairs per query), or shorter inputs; memory_limit=<bytes> "
                    "sets the limit"))

    def chosen_blocks(self, q: Tensor, k: Tensor, key_keep: Tensor | None = None) -> Tensor:
        """The blocks predictor's choice for (q, k): (B, Hs, query blocks, top_blocks) key blocks, -1
        none; Hs is the kv heads with `kv_heads_share`, else the query heads."""
        return blocks.choose_blocks_op(q, k, key_keep, self.scale(q), self.block, self.top_blocks,
                                       self.sampled_queries, self.spec.causal, self.layout_offset(q, k),
                                       self.layout_window(), self.kv_heads_share)

    def block_layout(self, q: Tensor, k: Tensor, key_keep: Tensor | None = None,
                     chosen: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The blocks predictor's groups for (q, k) (of `chosen`, if given): (q_index, k_index) of the grouped kernel."""
        chosen = self.chosen_blocks(q, k, key_keep) if chosen is None else chosen
        chosen = chosen.repeat_interleave(q.shape[1] // chosen.shape[1], dim=1)  # per query head
        k_index = blocks.block_positions(chosen, self.block, k.shape[2])
        return blocks.query_groups(q.shape[2], self.block, q.shape[0], q.shape[1], q.device), k_index

    def _block_flash_serves(self, q: Tensor, k: Tensor, v: Tensor, bias, mask, dropout_p: float) -> bool:
        """Whether `block_flash_attention` serves this call: the softmax, inference on CPU (its flash
        kernel returns no gradient and takes no dropout), no bias or general mask, no band (it has no
        key range)."""
        return (self.normalizer == "softmax" and q.device.type == "cpu" and not use_triton(q) and bias is None
                and mask is None and not dropout_p
                and not self.layout_window() and q.dtype in (torch.float32, torch.float64)
                and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))))

    def layout_traces(self, q, k, v, bias, mask, dropout_p: float) -> bool:
        """The blocks predictor's inference path: the choice and the kernel are ops (`choose_blocks_op`,
        `block_flash_op`), and a causal call whose queries are its keys (a prompt) is no decode step
        without asking the lengths (a chunk over a cache is not traced here)."""
        return (self._fused_block_path(q, k, v, bias, mask, dropout_p)
                and (not self.spec.causal or statically_known_true(q.shape[2] == k.shape[2])))

    def _fused_block_path(self, q: Tensor, k: Tensor, v: Tensor, bias, mask, dropout_p: float) -> bool:
        """Whether a call runs the blocks predictor's fused path (choice, window, sinks and kernel as
        ops, no metrics graph built in Python): `anchored_forward`'s fast path, and what traces."""
        return (self.predictor == "blocks" and not self._collect_metrics
                and self._block_flash_serves(q, k, v, bias, mask, dropout_p))

    def _block_graph(self, q, k, key_keep, q_index, k_index) -> tuple[Tensor, Tensor, int]:
        """`predict`'s answer for a block layout: the CSR of its allowed pairs and its key slots."""
        row_ptr, col = blocks.groups_to_csr(
            q_index, k_index, q.shape[2], k.shape[2], causal=self.spec.causal, offset=self.layout_offset(q, k),
            window=self.layout_window(), key_keep=key_keep)
        return row_ptr, col, k_index.shape[-1] * q.shape[0] * q.shape[1] * q.shape[2]

    def predictor_ops(self, q: Tensor, k: Tensor, candidates: int) -> float:
        """Projection + predictor FLOPs of one call (all batch rows and heads)."""
        B, H, Lq, D = q.shape
        per_head = sf_metrics.predictor_flops(self.predictor, Lq=Lq, Lk=k.shape[2], head_dim=D, rank=self.rank,
                                      candidates=candidates // max(B * H, 1), bucket_size=self.bucket_size,
                                      clusters=self.clusters, block=self.block, samples=self.sampled_queries)
        return per_head * B * H

    # ---------------------------------------------------------------------------------------
    # Clustering state: EMA k-means in the projected space
    # ---------------------------------------------------------------------------------------

    @staticmethod
    def _tokens(qp: Tensor, kp: Tensor, key_keep: Tensor | None) -> Tensor:
        """Projected real tokens per head: (H, N, r) (queries, then real keys)."""
        B, H, _, r = qp.shape
        qs = qp.detach().transpose(0, 1).reshape(H, -1, r)
        ks = kp.detach().transpose(0, 1)  # (H, B, Lk, r)
        ks = ks.reshape(H, -1, r) if key_keep is None else ks[:, key_keep]
        pool = torch.cat([qs, ks], dim=1).float()
        finite = torch.isfinite(pool).all(-1).all(0)  # a NaN / inf token must never reach the centroids
        return pool if bool(finite.all()) else pool[:, finite]

    @torch.no_grad()
    def _init_centroids(self, qp: Tensor, kp: Tensor, key_keep: Tensor | None) -> None:
        """Centroids := distinct random tokens of this batch per head (torch's global RNG)."""
        kmeans.start_(self, self._tokens(qp, kp, key_keep), lowest_draws=True)

    @torch.no_grad()
    def update_centroids_(self, q: Tensor, k: Tensor, key_keep: Tensor | None = None) -> None:
        """One EMA k-means step on the projected tokens of (q, k) (initialises on the first call)."""
        qp, kp = self.project(q, k)
        if not bool(self.initialized):
            self._init_centroids(qp, kp, key_keep)
            return
        pool = self._tokens(qp, kp, key_keep).unsqueeze(0)  # (1, H, N, r): real, finite tokens
        # nearest by distance: the predictor's rule in the projected space (routing's is similarity)
        nearest = predictors.nearest_clusters(pool, self.centroids, 1)[..., 0]
        kmeans.ema_step_(self, [kmeans.Tokens(pool, None, nearest)], self.decay, eps=1e-5)

    # ---------------------------------------------------------------------------------------
    # Projection training
    # ---------------------------------------------------------------------------------------

    def projection_loss(self, q: Tensor, k: Tensor, key_keep: Tensor | None = None, bias: Tensor | None = None,
                        mask: Tensor | None = None, gold: tuple[Tensor, Tensor] | None = None,
                        track_threshold: bool | None = None) -> Tensor:
        """Hinge loss of the projections against the gold graph of (q, k) (both detached): the
        entmax-1.5 graph, or with normalizer="softmax" the keys holding `mass` of each row's softmax.

        Per query with at least one gold key and one sampled negative:
        relu(margin + mean_pos ||W_Q q - W_K k+||^2 - mean_neg ||W_Q q - W_K k-||^2). Negatives: one
        uniform draw among the query's allowed keys per gold pair, draws that hit a gold key (or a
        key the mask / a -inf bias forbids) rejected, so about as many as positives, uniform over
        the non-gold allowed keys (with replacement), in O(|gold|) work. Means rather than the
        paper's sums keep `margin` on the scale of one squared distance whatever the row's support
        size. The loss is the mean over such queries. `gold`: the (row, col) pairs of
        `sparsefinder.gold.gold_pairs` for these q, k, if already computed (calibration loops).
        `track_threshold` (default: in train mode): also move a calibrated distance threshold towards
        these gold distances; measuring the loss (eval) leaves the threshold alone.
        """
        self._check_shapes(q, k)
        q, k = q.detach(), k.detach()
        B, Hq, Lq, D = q.shape
        Lk = k.shape[2]
        causal, offset = self.spec.causal, self.layout_offset(q, k)
        if gold is None:
            gold = sf_gold.gold_pairs(q, k, scale=self.scale(q), causal=causal, causal_offset=offset,
                                 key_keep=key_keep, bias=bias, mask=mask, **self.gold_rule)
        g_row, g_col = gold
        neg_row, neg_col = sf_gold.sample_negatives(g_row, g_col, B=B, H=Hq, Lq=Lq, Lk=Lk, causal=causal,
                                               causal_offset=offset, key_keep=key_keep, bias=bias, mask=mask)
        R = B * Hq * Lq
        n_pos = torch.bincount(g_row, minlength=R)
        n_neg = torch.bincount(neg_row, minlength=R)
        usable = (n_pos > 0) & (n_neg > 0)
        qp, kp = self.project(q, k)
        qf, kf = qp.reshape(R, -1), kp.reshape(B * Hq * Lk, -1)

        def sq_dist(row, col):
            return (qf[row] - kf[(row // Lq) * Lk + col]).square().sum(-1)  # kp is per query head

        pos_d2 = sq_dist(g_row, g_col)
        track = self.training if track_threshold is None else track_threshold
        if track and self.predictor == "distance" and self._calibrate_threshold and g_row.numel():
            self._track_threshold(pos_d2.detach())
        mean_pos = qf.new_zeros(R).index_add_(0, g_row, pos_d2) / n_pos.clamp(min=1)
        mean_neg = qf.new_zeros(R).index_add_(0, neg_row, sq_dist(neg_row, neg_col)) / n_neg.clamp(min=1)
        if not bool(usable.any()):
            return (qp.sum() + kp.sum()) * 0.0  # no query to learn from: a zero still connected to W_Q, W_K
        return torch.relu(self.margin + mean_pos - mean_neg)[usable].mean()

    @torch.no_grad()
    def _track_threshold(self, pos_d2: Tensor) -> None:
        """Distance threshold by default: EMA of the 0.95-quantile of the gold pairs' distances."""
        pos_d2 = pos_d2[torch.isfinite(pos_d2)]  # non-finite tokens must not move the threshold
        if pos_d2.numel() == 0:
            return
        value = pos_d2.float().kthvalue(int(THRESHOLD_QUANTILE * (pos_d2.numel() - 1)) + 1).values.sqrt()
        if torch.isinf(self.threshold_):
            self.threshold_.fill_(value)
        else:
            self.threshold_.mul_(self.decay).add_(value * (1 - self.decay))

    # ---------------------------------------------------------------------------------------
    # Forward
    # ---------------------------------------------------------------------------------------

    def needs_first_call(self) -> bool:
        return self.predictor == "clustering" and not bool(self.initialized)

    def computed_pairs(self, q, k, key_keep=None):
        row_ptr, col_index, _ = self.predict(q, k, key_keep)
        B, Hq, Lq, _ = q.shape
        return edges_to_dense_mask(row_ptr, col_index, B, Hq, Lq, k.shape[2]), None

    def cost_options(self, len_q: int, len_k: int, head_dim: int) -> dict:
        from attnpass.prefill import NOMINAL_DENSITY

        if self.predictor == "blocks":  # its pairs per query are fixed: top_blocks * block keys
            return {"predictor": "blocks", "density": min(1.0, self.top_blocks * self.block / max(len_k, 1)),
                    "block": self.block, "sampled_queries": self.sampled_queries}
        return {"predictor": self.predictor, "rank": self.rank, "density": NOMINAL_DENSITY,
                "clusters": self.clusters, "bucket_size": self.bucket_size}

    def cost_options_at_any_length(self, head_dim: int) -> dict | None:
        options = self.cost_options(1, 1, head_dim)
        if self.predictor == "blocks":
            del options["density"]  # top_blocks * block keys of Lk: left out, any share
        return options

    def fitter(self, *, lr, gold, mass, density_weight, budget=None):
        """The projections by Adam on the hinge loss, the clustering predictor's centroids, and with a
        pair `budget` the distance predictor's threshold (`calibrate_fitters.SparsefinderFitter`)."""
        if self.predictor == "blocks":  # nothing learned: it reads the model's own scores
            refuse_budget("sparsefinder (predictor='blocks')", budget)
            return None
        if budget is not None and self.predictor != "distance":
            raise ValueError(f"calibrate: budget= sets the distance predictor's threshold; site {self.spec.name!r} "
                             f"uses predictor={self.predictor!r} (its share of pairs follows from clusters / "
                             "top_clusters or bucket_size)")
        from attnpass.tools.calibrate_fitters import SparsefinderFitter

        return SparsefinderFitter(self, lr=lr, gold=gold, mass=mass, budget=budget)

    def sparse_forward(self, q, k, v, bias=None, mask=None, key_keep=None, dropout_p: float = 0.0,
                       empty_rows: str = "zero"):  # queries with no key get zeros (SiteAttention.forward)
        return self._attend(q, k, v, bias, mask, key_keep, dropout_p, with_stat=False)[0]

    def anchored_forward(self, q, k, v, bias=None, mask=None, key_keep=None, dropout_p: float = 0.0):
        """The blocks predictor at inference on CPU: the chosen blocks, the window and the sinks in one
        `block_flash_attention` call (the same softmax over the same pairs as the anchor's parts
        merged, tested); every other call: `SiteAttention.anchored_forward`."""
        p = dropout_p if self.training else 0.0
        if q.shape[2] == 0 or k.shape[2] == 0 or not self._fused_block_path(q, k, v, bias, mask, p):
            return super().anchored_forward(q, k, v, bias, mask, key_keep, dropout_p)
        B, Lk = k.shape[0], k.shape[2]
        sinks = self.anchor.sink_positions(key_keep, B, Lk, k.device) if self.anchor.sinks else None
        chosen = self.chosen_blocks(q, k, self.method_key_keep(key_keep, k))
        return block_flash_op(q, k, v, chosen, key_keep, sinks, self.block, self.scale(q), self.spec.causal,
                              self.layout_offset(q, k), self.anchor_local())[0]

    def sparse_attention(self, q, k, v, bias, mask, key_keep, dropout_p: float):
        return self._attend(q, k, v, bias, mask, key_keep, dropout_p, with_stat=True)

    def _attend(self, q, k, v, bias, mask, key_keep, dropout_p: float, with_stat: bool):
        """(out, row statistic or None); the quantization predictor's block path returns no
        statistic, so a call that needs one takes the edge path (the same pairs, tested)."""
        self._check_shapes(q, k)
        B, Hq, Lq, _ = q.shape
        Lk = k.shape[2]
        if Lq == 0 or Lk == 0:  # no key to see: zeros, as dense attention gives
            return q.new_zeros(B, Hq, Lq, v.shape[3]), q.new_zeros(B, Hq, Lq, dtype=torch.float32)
        p = dropout_p if self.training else 0.0
        stat = None
        if self.predictor == "blocks":
            chosen = self.chosen_blocks(q, k, key_keep)
            if self._block_flash_serves(q, k, v, bias, mask, p):
                out, stat = block_flash_op(q, k, v, chosen, key_keep, None, self.block, self.scale(q), self.spec.causal,
                                           self.layout_offset(q, k), 0)
            else:  # training, bias, general masks, bands, entmax, Triton: the grouped kernel, the same pairs
                q_index, k_index = self.block_layout(q, k, key_keep, chosen)
                slots, slot_stat = grouped_attention(
                    q, k, v, q_index, k_index, scale=self.scale(q), causal=self.spec.causal,
                    causal_offset=self.layout_offset(q, k), window=self.layout_window(), key_padding_mask=key_keep,
                    bias=bias, pair_mask=mask, dropout_p=p, dropout_seed=self.dropout_seed(p),
                    normalizer=self.normalizer)
                out = slots.flatten(2, 3)[:, :, :Lq]
                stat = slot_stat.flatten(2, 3)[:, :, :Lq]
            if self._collect_metrics:  # the graph of the blocks just used, not a second choice
                row_ptr, col, candidates = self._block_graph(q, k, key_keep, *self.block_layout(q, k, key_keep, chosen))
        elif self.predictor == "quantization" and not use_triton(q) and not with_stat:
            # the buckets' queries and keys as blocks (no per-edge gathers): the CPU path
            out = self._bucket_forward(q, k, v, bias, mask, key_keep, p)
            if self._collect_metrics:
                row_ptr, col, candidates = self.predict(q, k, key_keep)
        else:
            row_ptr, col, candidates = self.predict(q, k, key_keep)
            kernel_bias, edge_mask = _mask_merge(bias, mask, q.dtype if bias is None else bias.dtype)
            if edge_mask is not None:
                row_ptr, col = _drop_masked_edges(row_ptr, col, edge_mask, Hq, Lq)
            out, stat = edge_attention(
                q, k, v, row_ptr, col, scale=self.scale(q), causal=self.spec.causal,
                causal_offset=self.layout_offset(q, k), window=self.layout_window(), key_padding_mask=key_keep,
                bias=kernel_bias,
                dropout_p=p, dropout_seed=self.dropout_seed(p), normalizer=self.normalizer)
        if self._collect_metrics:
            self.last_metrics = sf_metrics.graph_metrics(
                q.detach(), k.detach(), row_ptr, col, scale=self.scale(q), causal=self.spec.causal,
                causal_offset=self.layout_offset(q, k), key_keep=key_keep,
                bias=None if bias is None else bias.detach(), mask=mask,
                predictor_ops=self.predictor_ops(q, k, candidates), **self.gold_rule)
        elif self.training and self.predictor != "blocks":
            self._last_aux_loss = self.projection_loss(q, k, key_keep, None if bias is None else bias.detach(), mask)
            if self.predictor == "clustering":
                self.update_centroids_(q.detach(), k.detach(), key_keep)
        return out, stat

    def _bucket_forward(self, q, k, v, bias, mask, key_keep, dropout_p: float) -> Tensor:
        """The quantization predictor's graph through `quantile_bucket_attention`: the same pairs
        and the same function as `predict` + `edge_attention` (tested), computed as blocks."""
        B, Hq, Lq, _ = q.shape
        offset = self.layout_offset(q, k)
        with torch.no_grad():
            qp, kp = self.project(q, k)
            q_order, key_order = predictors.quantization_orders(qp, kp, key_keep)
            local = predictors.window_slots(B, Hq, Lq, k.shape[2], self.window, self.first_token, causal=self.spec.causal,
                                    causal_offset=offset, key_keep=key_keep, device=q.device)
        return quantile_bucket_attention(
            q, k, v, q_order, key_order, self.bucket_size, local.view(B, Hq, Lq, -1), scale=self.scale(q),
            causal=self.spec.causal, causal_offset=offset, window=self.layout_window(), key_padding_mask=key_keep,
            bias=bias, mask=mask, dropout_p=dropout_p, dropout_seed=self.dropout_seed(dropout_p), normalizer=self.normalizer)


def resolved_options(options: dict) -> dict:
    """The options a site built with `options` runs with: the defaults, the anchor's normaliser, then `options`."""
    return {**DEFAULTS, **_default_normalizer(options), **options}


def _default_normalizer(options: dict) -> dict:
    """With sinks= / local= (parts of one softmax, attnpass.methods.anchor) the default normaliser is
    the softmax, the only one they merge with: a pretrained model's own."""
    return {"normalizer": "softmax"} if Anchor.from_options(options) else {}


def sparsefinder_metrics(sparse_model: nn.Module, args=(), kwargs=None) -> dict:
    """Run one no-grad forward of `sparse_model(*args, **kwargs)` and return Sparsefinder's metrics.

    Returns ``{site module name: metrics dict, ..., "overall": metrics dict}``; each dict holds
    recall, graph_sparsity, exact_fraction, computation_sparsity and the counts behind them
    (`sparsefinder.metrics.GraphMetrics`); "overall" pools the counts of every site. The call
    leaves no training state behind (no aux loss, no centroid update), whatever the model's mode.
    """
    if not isinstance(sparse_model, nn.Module):
        raise TypeError(f"sparsefinder_metrics expects the nn.Module sparsify returned, got {type(sparse_model).__name__}")
    sites = {name: m for name, m in sparse_model.named_modules() if isinstance(m, SparsefinderAttention)}
    if not sites:
        raise ValueError("sparsefinder_metrics: the model has no method='sparsefinder' attention site")
    for m in sites.values():
        m._collect_metrics, m.last_metrics = True, None
    try:
        with torch.no_grad():
            sparse_model(*args, **(kwargs or {}))
    finally:
        for m in sites.values():
            m._collect_metrics = False
    result, total = {}, None
    for name, m in sites.items():
        if m.last_metrics is None:
            continue  # the site was not called by this forward
        result[name] = m.last_metrics.as_dict()
        total = m.last_metrics if total is None else total + m.last_metrics
    if total is None:
        raise ValueError("sparsefinder_metrics: the forward call reached no sparsefinder site")
    result["overall"] = total.as_dict()
    return result
