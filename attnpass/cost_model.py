"""What each attention method costs: FLOPs and bytes as sympy expressions.

The expressions are in the symbols B (batch), H (query heads), Lq, Lk (query and key lengths),
D (head dim; values have the same dim) and each method's parameter: `c` (routing's cluster
count), `s` (Combiner's block), or SBM's cluster count `k` and edge density `rho` (the expected share
of pairs its graph holds: learned, so it is an input here, not a minimiser); Sparsefinder's
projected rank `r` and the density `rho` of its predicted graph (also an input). They serve three purposes:

- reports: `attnpass.cost(site, "routing")` prints what a site costs dense and sparse;
- defaults: the cluster count and the block size that minimise the FLOPs (solved symbolically
  once, then evaluated per call);
- checks: the tests take limits of these expressions (routing and Combiner-fixed grow as
  L^1.5), and `benchmarks/sparse_attention_speed.py` compares measured growth with them.

Counting conventions (per batch element and query head, then times B*H):
- a multiply-add is 2 FLOPs, so one computed (query, key) pair costs PAIR = 4*D + 5: its logit
  q.k (2D), its share of P.V (2D) and ~5 for the softmax (max, subtract, exp, sum, divide);
- a region summary read by a query costs the same as a key;
- bytes: q, k, v read and the output written once (`itemsize` each, fp32 by default), the
  working copies the sparse kernels gather (q, k, v rows), int64 index tensors (8 bytes per slot),
  and for dense attention the Lq x Lk scores written and read once (what fused kernels avoid).
Routing counts every slot of the tiles its two grouped-kernel calls compute: c clusters of Lq/c
query slots by Lk/c key slots, and the local-window fallback, one tile per block of P = `local_window`
query positions. A block's tile holds the block's fallback queries, those no cluster took (with
balanced top-w every cluster leaves a query out with probability about 1 - 1/c, so about
(1 - 1/c)^c ~ 1/e of them), as rows and the union of their windows as key slots: 2P - 1 for P
consecutive queries, so the fallback costs Lq (2P - 1) / e pairs. The kernel pads every block's
tile to the fullest block's fallback count, which depends on the call (causal: the first positions,
whose clusters hold no earlier key, fall back together), so a call computes more, at most
Lq (2P - 1); the option `fallback_share` sets the tile's rows per block as a share of P (e.g. a
call's own, from `RoutingAttention.layout`). Routing's optional local heads are not counted.
SBM counts phi on every query and key (two D x D layers), the memberships (k per token), fastRG
sampling (three inverse-CDF lookups per edge, log2 of the table size each, and the merge sort of the
edges) and attention over rho * Lq * Lk edges, whose q, k, v rows the edge kernel gathers.
Sparsefinder counts the projections (D -> r for every query and key), its predictor (distance:
all Lq*Lk pairs in r dims; quantization: a sort per projected dim and each query's r buckets;
clustering: every token against every centroid), the merge sort of the predicted pairs and
entmax-1.5 attention over rho * Lq * Lk of them.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import sympy

B, H, Lq, Lk, D = sympy.symbols("B H L_q L_k D", positive=True)
c = sympy.Symbol("c", positive=True)   # routing: clusters
s = sympy.Symbol("s", positive=True)   # combiner: block (axial: columns)
k = sympy.Symbol("k", positive=True)   # sbm: clusters
rho = sympy.Symbol("rho", positive=True)  # sbm / sparsefinder: graph density (share of the Lq*Lk pairs)
r = sympy.Symbol("r", positive=True)   # sparsefinder: projected rank
PAIR = 4 * D + 5
INDEX_BYTES = 8

METHODS = ("dense", "routing", "combiner", "sbm", "sparsefinder")
SPARSEFINDER_PREDICTORS = ("distance", "quantization", "clustering")
COMBINER_VARIANTS = ("fixed", "axial", "logsparse")
_OPTIONS = {"dense": (), "routing": ("clusters", "local_window", "fallback_share"), "combiner": ("variant", "block"),
            "sbm": ("clusters", "density"),
            "sparsefinder": ("predictor", "rank", "density", "clusters", "bucket_size")}
DEFAULT_LOCAL_WINDOW = 64  # routing's default fallback window (attnpass.methods.routing)
# Rows of routing's fallback tile per block of local_window queries, as a share of the block: the
# expected share of queries no cluster takes (see the module docstring; the padded tile holds more).
DEFAULT_FALLBACK_SHARE = sympy.exp(-1)

# Logsparse's FLOPs are minimised by a constant block of ~3 keys (d/ds of Lq*s - (Lq+Lk)*log2(Lk/s)),
# far too small for tiled kernels; this block keeps tiles efficient and is what the default uses.
LOGSPARSE_BLOCK = 64


def _sparsefinder(predictor: str, itemsize: int, clusters, bucket_size) -> tuple[sympy.Expr, sympy.Expr]:
    """(flops, bytes) of Sparsefinder per batch element and query head (see the module docstring)."""
    edges = rho * Lq * Lk
    projection = 2 * D * r * (Lq + Lk)
    if predictor == "distance":
        predict = (3 * r + 1) * Lq * Lk
    elif predictor == "quantization":
        predict = r * (Lq * sympy.log(Lq, 2) + Lk * sympy.log(Lk, 2)) + r * Lq * bucket_size
    elif predictor == "clustering":
        predict = (Lq + Lk) * clusters * (3 * r + 1)
    else:
        raise ValueError(f"unknown sparsefinder predictor {predictor!r}; expected one of {list(SPARSEFINDER_PREDICTORS)}")
    flops = projection + predict + edges * sympy.log(edges, 2) + edges * PAIR
    io = itemsize * (2 * Lq * D + 2 * Lk * D)
    return flops, io + edges * (itemsize * 2 * D + 2 * INDEX_BYTES) + itemsize * 2 * D * r


def _per_head(method: str, variant: str, itemsize: int, local_window: int = DEFAULT_LOCAL_WINDOW,
              fallback_share=DEFAULT_FALLBACK_SHARE) -> tuple[sympy.Expr, sympy.Expr]:
    """(flops, bytes) of one batch element and query head, in the method's parameter symbol."""
    io = itemsize * (2 * Lq * D + 2 * Lk * D)  # read q, k, v; write the output
    if method == "dense":
        return Lq * Lk * PAIR, io + itemsize * 2 * Lq * Lk
    if method == "routing":
        # similarities of every query and key to every centroid, top-w selection (one comparison
        # per candidate), then the kernels' tiles (module docstring): c clusters of Lq/c query by
        # Lk/c key slots, and per block of P = local_window positions the fallback's rows against
        # the 2P - 1 keys of their windows
        fallback_rows, fallback_keys = fallback_share * Lq, (2 * local_window - 1) * Lq / local_window
        pairs = (Lq / c) * (Lk / c) * c + fallback_rows * (2 * local_window - 1)
        flops = 2 * (Lq + Lk) * c * D + (Lq + Lk) * c + pairs * PAIR
        # gathered rows and index slots of both calls (the fallback's key_range: two per row)
        gathered = (itemsize * (Lq + 2 * Lk + fallback_rows + 2 * fallback_keys) * D
                    + INDEX_BYTES * (Lq + Lk + 3 * fallback_rows + fallback_keys))
        return flops, io + gathered + itemsize * c * D
    if method == "sbm":
        edges = rho * Lq * Lk
        sampling = 3 * sympy.log(Lk * k, 2) + sympy.log(edges, 2)  # per edge: lookups + merge sort
        flops = ((Lq + Lk) * (4 * D**2 + 2 * D * k) + 2 * k**2 * D + (Lq + Lk) * k
                 + edges * (sampling + PAIR))
        gathered = edges * (itemsize * 3 * D + 2 * INDEX_BYTES) + 8 * (Lq + Lk) * k  # + float64 CDFs
        return flops, io + gathered + itemsize * (k * D + 2 * D**2)
    regions = Lk / s
    if variant == "fixed":
        # own block directly, one summary per other block; pooling; each summary value is the
        # pooled query's attention over its block (Lk pairs in all)
        flops = Lq * s * PAIR + Lq * regions * PAIR + (Lq + Lk) * D + Lk * PAIR
        summaries = itemsize * 2 * regions * D
    elif variant == "axial":
        # own row directly (s keys), one summary per column (s); summary values: rows x cols
        # regions of up to `rows` keys each
        rows = Lk / s
        flops = Lq * s * PAIR + Lq * s * PAIR + 2 * (Lq + Lk) * D + Lk * rows * PAIR
        summaries = itemsize * 2 * Lk * D
    elif variant == "logsparse":
        # own block directly, one summary per dyadic level; every level's summaries cover Lk keys
        levels = sympy.log(regions, 2)
        flops = Lq * s * PAIR + Lq * levels * PAIR + (Lq + Lk) * levels * D + Lk * levels * PAIR
        summaries = itemsize * 2 * 2 * regions * D
    else:
        raise ValueError(f"unknown combiner variant {variant!r}; expected one of {list(COMBINER_VARIANTS)}")
    gathered = itemsize * (Lq + 2 * Lk) * D + INDEX_BYTES * (Lq + Lk)
    return flops, io + gathered + summaries


@dataclass(frozen=True)
class Cost:
    """FLOPs and bytes of one attention site under one method."""

    method: str
    flops: sympy.Expr
    bytes: sympy.Expr
    params: dict = field(default_factory=dict)

    def evaluate(self, **values) -> tuple[float, float]:
        """(flops, bytes) as numbers, substituting symbols by name: B, H, Lq, Lk, D, c, s."""
        subs = {_SYMBOLS[name]: value for name, value in values.items() if name in _SYMBOLS}
        unknown = set(values) - set(_SYMBOLS)
        if unknown:
            raise ValueError(f"unknown symbol(s) {sorted(unknown)}; expected {sorted(_SYMBOLS)}")
        flops, nbytes = self.flops.subs(subs), self.bytes.subs(subs)
        free = (flops.free_symbols | nbytes.free_symbols)
        if free:
            raise ValueError(f"cannot evaluate {self.method} cost: no value for {sorted(map(str, free))}")
        return float(flops), float(nbytes)

    def __str__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        # expand_log keeps logsparse's log2 terms readable (simplify folds them into one log)
        flops = sympy.factor_terms(sympy.expand_log(self.flops, force=True))
        return f"{self.method}{f' ({params})' if params else ''}: flops {flops}, bytes {sympy.factor_terms(self.bytes)}"


_SYMBOLS = {"B": B, "H": H, "Lq": Lq, "Lk": Lk, "D": D, "c": c, "s": s, "k": k, "rho": rho, "r": r}


def cost_options(method: str) -> tuple[str, ...]:
    """The options `cost_expr` / `cost` take for `method` (besides `itemsize`); () for an unknown method."""
    return _OPTIONS.get(method, ())


def _check_options(method: str, options: dict) -> None:
    if method not in METHODS:
        raise ValueError(f"no cost model for method {method!r}; known: {list(METHODS)}")
    unknown = sorted(set(options) - set(_OPTIONS[method]) - {"itemsize"})
    if unknown:
        raise ValueError(f"cost model of {method!r} got unknown option(s) {unknown}; it takes {list(_OPTIONS[method])}")
    variant = options.get("variant", "fixed")
    if method == "combiner" and variant not in COMBINER_VARIANTS:
        raise ValueError(f"unknown combiner variant {variant!r}; expected one of {list(COMBINER_VARIANTS)}")
    share = options.get("fallback_share")
    if isinstance(share, (int, float)) and not 0 <= share <= 1:
        raise ValueError(f"routing's fallback_share={share!r} must be in [0, 1] (a share of the block's queries)")


def cost_expr(method: str, **options) -> Cost:
    """The cost of `method` as expressions of B, H, Lq, Lk, D and the method's parameter.

    Options: routing `clusters`, `local_window` and `fallback_share` (rows of the fallback tile per block, as a
    share of the block; default 1/e), combiner `variant` and `block`, sbm `clusters` and `density`
    (ints/floats or sympy expressions; left as the symbols c / s / k / rho when absent), and `itemsize` (bytes per
    element, default 4).
    """
    _check_options(method, options)
    variant = options.get("variant", "fixed")
    if method == "sparsefinder":
        # the method's own defaults (imported here: the methods import this module at load time)
        from attnpass.methods.sparsefinder import DEFAULTS

        predictor = options.get("predictor") or DEFAULTS["predictor"]
        flops, nbytes = _sparsefinder(predictor, options.get("itemsize", 4), options.get("clusters") or DEFAULTS["clusters"],
                                      options.get("bucket_size") or DEFAULTS["bucket_size"])
        params = {"predictor": predictor}
        for name, symbol, default in (("rank", r, DEFAULTS["rank"]), ("density", rho, None)):
            value = options.get(name, default)
            if value is not None:
                params[name] = value
                flops, nbytes = flops.subs(symbol, value), nbytes.subs(symbol, value)
        return Cost(method, B * H * flops, B * H * nbytes, params)
    share = options.get("fallback_share")
    flops, nbytes = _per_head(method, variant, options.get("itemsize", 4),
                              options.get("local_window") or DEFAULT_LOCAL_WINDOW,
                              DEFAULT_FALLBACK_SHARE if share is None else share)
    params = {}
    if method == "routing" and options.get("clusters") is not None:
        params["clusters"] = options["clusters"]
        flops, nbytes = flops.subs(c, options["clusters"]), nbytes.subs(c, options["clusters"])
    if method == "routing" and share is not None:
        params["fallback_share"] = share
    if method == "sbm":
        for name, symbol in (("clusters", k), ("density", rho)):
            if options.get(name) is not None:
                params[name] = options[name]
                flops, nbytes = flops.subs(symbol, options[name]), nbytes.subs(symbol, options[name])
    if method == "combiner":
        params["variant"] = variant
        if options.get("block") is not None:
            params["block"] = options["block"]
            flops, nbytes = flops.subs(s, options["block"]), nbytes.subs(s, options["block"])
    return Cost(method, B * H * flops, B * H * nbytes, params)


@functools.cache
def optimal_parameter(method: str, variant: str | None = None) -> sympy.Expr:
    """The parameter value minimising the method's FLOPs, as an expression of Lq, Lk, D.

    Solved with sympy (the positive root of d flops / d parameter = 0). For logsparse that root is
    a constant block of ~3 keys, replaced by LOGSPARSE_BLOCK (see there).
    """
    variant = variant or "fixed"
    if method == "combiner" and variant == "logsparse":
        return sympy.Integer(LOGSPARSE_BLOCK)
    symbol = {"routing": c, "combiner": s}.get(method)
    if symbol is None:
        raise ValueError(f"method {method!r} has no parameter to optimise")
    flops, _ = _per_head(method, variant, 4)
    roots = [r for r in sympy.solve(sympy.diff(flops, symbol), symbol) if r.is_positive is not False]
    if len(roots) != 1:
        raise RuntimeError(f"expected one positive minimiser for {method}/{variant}, got {roots}")
    return sympy.simplify(roots[0])


@functools.cache
def _optimum_function(method: str, variant: str):
    return sympy.lambdify((Lq, Lk, D), optimal_parameter(method, variant), "math")


def _clamped(value: float, len_k: int) -> int:
    return min(max(round(value), 1), max(int(len_k), 1))


def default_clusters(len_q: int, len_k: int, head_dim: int) -> int:
    """Routing's cluster count minimising its FLOPs at these lengths (about sqrt(L))."""
    return _clamped(_optimum_function("routing", "fixed")(len_q, len_k, head_dim), min(len_q, len_k))


def default_block(len_q: int, len_k: int, head_dim: int, variant: str = "fixed") -> int:
    """Combiner's block minimising its FLOPs at these lengths (fixed: sqrt(Lk); axial: sqrt(Lk^2 / 2Lq))."""
    _check_options("combiner", {"variant": variant})
    return _clamped(_optimum_function("combiner", variant)(len_q, len_k, head_dim), len_k)


def _site_dim(value, symbol: sympy.Symbol):
    """A site's dim as an int when it is one, else the symbol (symbolic sizes print like s41)."""
    return int(value) if isinstance(value, int) else symbol


def cost(site=None, method: str = "dense", **options) -> Cost:
    """The cost of serving `site` (an `AttentionSite` from `find_attention`, or None) with `method`.

    The site's concrete dims are substituted (symbolic ones stay symbols). When the lengths are
    known and the method's parameter is not given, it is set to the default the method would use.
    """
    _check_options(method, options)
    values = {}
    if site is not None:
        values = {B: _site_dim(site.batch, B), H: _site_dim(site.heads_q, H), Lq: _site_dim(site.len_q, Lq),
                  Lk: _site_dim(site.len_k, Lk), D: _site_dim(site.head_dim, D)}
    lengths_known = all(isinstance(values.get(x), int) for x in (Lq, Lk, D))
    options = dict(options)
    if lengths_known and method == "routing" and options.get("clusters") is None:
        options["clusters"] = default_clusters(values[Lq], values[Lk], values[D])
    if method == "sbm" and options.get("clusters") is None:
        from attnpass.methods.sbm import DEFAULT_CLUSTERS  # here: the methods import this module

        options["clusters"] = DEFAULT_CLUSTERS
    if lengths_known and method == "combiner" and options.get("block") is None:
        options["block"] = default_block(values[Lq], values[Lk], values[D], options.get("variant", "fixed"))
    result = cost_expr(method, **options)
    subs = {k: v for k, v in values.items() if isinstance(v, int)}
    return Cost(result.method, result.flops.subs(subs), result.bytes.subs(subs), result.params)


def growth_exponent(method: str, lengths=(1024, 16384), head_dim: int = 64, **options) -> float:
    """Slope of log(FLOPs) against log(L) between two lengths (Lq = Lk = L, default parameters)."""
    flops = []
    for n in lengths:
        opts = dict(options)
        if method == "routing" and opts.get("clusters") is None:
            opts["clusters"] = default_clusters(n, n, head_dim)
        if method == "combiner" and opts.get("block") is None:
            opts["block"] = default_block(n, n, head_dim, opts.get("variant", "fixed"))
        flops.append(cost_expr(method, **opts).evaluate(B=1, H=1, Lq=n, Lk=n, D=head_dim)[0])
    return math.log(flops[1] / flops[0]) / math.log(lengths[1] / lengths[0])
