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

This module holds the shared vocabulary (the symbols, PAIR, INDEX_BYTES, `Cost`) and the entry
points; each method's own formulas, with what they count, live next to the method, in the module
its `SiteAttention` class names as `cost_formulas` (attnpass/methods/<method>/cost.py). Such a
module defines:

- `OPTIONS`: the option names `cost_expr` / `cost` take for the method (besides `itemsize`);
- `LEGEND`: what the method's own symbols in its formulas stand for (e.g. "c clusters"; "" none);
- `per_head(itemsize, options) -> (params, flops, bytes)`: the cost of one batch element and
  query head, the given options substituted (the others left as the method's symbols: `given`),
  and the parameters `Cost.params` reports;
and where it has them (absent: nothing to check, fill in or optimise):
- `check_options(options)`: its checks of the option values (the names are checked here);
- `default_options(len_q, len_k, head_dim, options) -> options`: the options with the parameters
  the method would choose itself filled in (the lengths are None when unknown);
- `optimum(variant) -> expression`: the parameter value minimising its FLOPs, as an expression of
  Lq, Lk, D (`minimiser`).
"""
from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass, field

import sympy
import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false

# Every registered method has a cost model (its class names its formulas: SiteAttention.cost_formulas).
from attnpass.methods import METHODS
from attnpass.methods.symbolic import read_size

B, H, Lq, Lk, D = sympy.symbols("B H L_q L_k D", positive=True)
c = sympy.Symbol("c", positive=True)   # routing: clusters
s = sympy.Symbol("s", positive=True)   # combiner: block (axial: columns)
k = sympy.Symbol("k", positive=True)   # sbm: clusters
rho = sympy.Symbol("rho", positive=True)  # sbm / sparsefinder: graph density (share of the Lq*Lk pairs)
r = sympy.Symbol("r", positive=True)   # sparsefinder: projected rank
PAIR = 4 * D + 5
INDEX_BYTES = 8



def _formulas(method: str):
    """The module of `method`'s cost formulas (its class's `cost_formulas`)."""
    if method not in METHODS:
        raise ValueError(f"no cost model for method {method!r}; known: {list(METHODS)}")
    return _formulas_module(method)


@functools.cache  # decode steps ask the cost model at every site call (attnpass.prefill)
def _formulas_module(method: str):
    from attnpass.methods import method_class  # here: the methods import this module at load time

    return importlib.import_module(method_class(method).cost_formulas)


def io_bytes(itemsize: int) -> sympy.Expr:
    """Bytes every method moves per batch element and query head: q, k, v read and the output written."""
    return itemsize * (2 * Lq * D + 2 * Lk * D)


def given(flops: sympy.Expr, nbytes: sympy.Expr, options: dict, symbols: dict, params: dict | None = None):
    """(params, flops, bytes) with each option in `symbols` (name -> its symbol) that is given (not
    None) substituted for its symbol and recorded in `params`."""
    params = {} if params is None else params
    for name, symbol in symbols.items():
        value = options.get(name)
        if value is not None:
            params[name] = value
            flops, nbytes = flops.subs(symbol, value), nbytes.subs(symbol, value)
    return params, flops, nbytes


def minimiser(flops: sympy.Expr, symbol: sympy.Symbol, label: str) -> sympy.Expr:
    """The positive root of d flops / d symbol = 0 (exactly one expected), simplified."""
    roots = [root for root in sympy.solve(sympy.diff(flops, symbol), symbol) if root.is_positive is not False]
    if len(roots) != 1:
        raise RuntimeError(f"expected one positive minimiser for {label}, got {roots}")
    return sympy.simplify(roots[0])


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
    return _formulas(method).OPTIONS if method in METHODS else ()


def symbol_legend(method: str) -> str:
    """What `method`'s own symbols in its formulas stand for (e.g. "c clusters"); "" for none or an unknown method."""
    return _formulas(method).LEGEND if method in METHODS else ""


def _check_options(method: str, options: dict):
    """Raise for an unknown method or option, or a bad option value; the method's formulas module."""
    formulas = _formulas(method)
    unknown = sorted(set(options) - set(formulas.OPTIONS) - {"itemsize"})
    if unknown:
        raise ValueError(f"cost model of {method!r} got unknown option(s) {unknown}; it takes {list(formulas.OPTIONS)}")
    if hasattr(formulas, "check_options"):
        formulas.check_options(options)
    return formulas


def cost_expr(method: str, **options) -> Cost:
    """The cost of `method` as expressions of B, H, Lq, Lk, D and the method's parameter.

    Options: routing `clusters`, `local_window` and `fallback_share` (rows of the fallback tiles as a share
    of the queries; default 1/e), combiner `variant` and `block`, sbm `clusters` and `density`
    (ints/floats or sympy expressions; left as the symbols c / s / k / rho when absent), and `itemsize` (bytes per
    element, default 4). Each method's `OPTIONS` (`cost_options`) lists its own.
    """
    formulas = _check_options(method, options)
    params, flops, nbytes = formulas.per_head(options.get("itemsize", 4), options)
    return Cost(method, B * H * flops, B * H * nbytes, params)


@functools.cache
def optimal_parameter(method: str, variant: str | None = None) -> sympy.Expr:
    """The parameter value minimising the method's FLOPs, as an expression of Lq, Lk, D.

    Solved with sympy (the positive root of d flops / d parameter = 0). For logsparse that root is
    a constant block of ~3 keys, replaced by LOGSPARSE_BLOCK (see attnpass.methods.combiner.cost).
    """
    optimum = getattr(_formulas(method), "optimum", None) if method in METHODS else None
    value = optimum(variant or "fixed") if optimum is not None else None
    if value is None:
        raise ValueError(f"method {method!r} has no parameter to optimise")
    return value


@functools.cache
def _optimum_function(method: str, variant: str, module: str = "math"):
    # on tensors, a constant's sqrt (axial's sqrt(2)) is taken as a float64 tensor too
    modules = [{"sqrt": lambda x: torch.sqrt(torch.as_tensor(x, dtype=torch.float64))}, "torch"] \
        if module == "torch" else module
    return sympy.lambdify((Lq, Lk, D), optimal_parameter(method, variant), modules)


def _clamped(value: float, len_k: int) -> int:
    return min(max(round(value), 1), max(int(len_k), 1))


def _clamped_optimum(method: str, variant: str, len_q, len_k, head_dim, upper):
    """The optimum rounded and clamped to [1, max(upper, 1)]. With symbolic lengths (torch.export,
    torch.compile) it is computed as a tensor and read back as an unbacked int with those bounds
    asserted: sqrt(L) is no polynomial of L, and sizes built from a backed expression of it leave
    guards the shape solver cannot discharge."""
    if all(type(x) is int for x in (len_q, len_k, head_dim, upper)):
        return _clamped(_optimum_function(method, variant)(len_q, len_k, head_dim), upper)

    args = [torch.full((), x, dtype=torch.float64) for x in (len_q, len_k, head_dim)]
    value = torch.as_tensor(_optimum_function(method, variant, "torch")(*args), dtype=torch.float64)
    bound = torch.sym_max(upper, 1)
    chosen = torch.minimum(value.round().clamp(min=1), torch.full((), bound, dtype=torch.float64))
    chosen = read_size(chosen.to(torch.int64), 1, bound)
    if guard_or_false(upper >= 1):  # stated against the length itself, so later sizes can use it
        torch._check(chosen <= upper)
    return chosen


def default_clusters(len_q: int, len_k: int, head_dim: int) -> int:
    """Routing's cluster count minimising its FLOPs at these lengths (about sqrt(L))."""
    return _clamped_optimum("routing", "fixed", len_q, len_k, head_dim, torch.sym_min(len_q, len_k))


def default_block(len_q: int, len_k: int, head_dim: int, variant: str = "fixed") -> int:
    """Combiner's block minimising its FLOPs at these lengths (fixed: sqrt(Lk); axial: sqrt(Lk^2 / 2Lq))."""
    _check_options("combiner", {"variant": variant})
    return _clamped_optimum("combiner", variant, len_q, len_k, head_dim, len_k)


def _defaults(formulas, len_q, len_k, head_dim, options: dict) -> dict:
    fill = getattr(formulas, "default_options", None)
    return fill(len_q, len_k, head_dim, dict(options)) if fill is not None else dict(options)


def _site_dim(value, symbol: sympy.Symbol):
    """A site's dim as an int when it is one, else the symbol (symbolic sizes print like s41)."""
    return int(value) if isinstance(value, int) else symbol


def cost(site=None, method: str = "dense", **options) -> Cost:
    """The cost of serving `site` (an `AttentionSite` from `find_attention`, or None) with `method`.

    The site's concrete dims are substituted (symbolic ones stay symbols). A parameter not given is
    set to the default the method would use (`default_options` of its formulas: routing's clusters
    and Combiner's block when the lengths are known, SBM's cluster count always).
    """
    formulas = _check_options(method, options)
    values = {}
    if site is not None:
        values = {B: _site_dim(site.batch, B), H: _site_dim(site.heads_q, H), Lq: _site_dim(site.len_q, Lq),
                  Lk: _site_dim(site.len_k, Lk), D: _site_dim(site.head_dim, D)}
    lengths_known = all(isinstance(values.get(x), int) for x in (Lq, Lk, D))
    lengths = (values[Lq], values[Lk], values[D]) if lengths_known else (None, None, None)
    result = cost_expr(method, **_defaults(formulas, *lengths, options))
    subs = {k: v for k, v in values.items() if isinstance(v, int)}
    return Cost(result.method, result.flops.subs(subs), result.bytes.subs(subs), result.params)


def growth_exponent(method: str, lengths=(1024, 16384), head_dim: int = 64, **options) -> float:
    """Slope of log(FLOPs) against log(L) between two lengths (Lq = Lk = L, default parameters)."""
    formulas = _formulas(method)
    flops = []
    for n in lengths:
        opts = _defaults(formulas, n, n, head_dim, options)
        flops.append(cost_expr(method, **opts).evaluate(B=1, H=1, Lq=n, Lk=n, D=head_dim)[0])
    return math.log(flops[1] / flops[0]) / math.log(lengths[1] / lengths[0])
