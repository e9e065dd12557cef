"""Which calls of a site count as prefill (sparse) and which as decode (exact dense over the cache).

A causal self-attention site continuing over cached keys (Lq new queries, Lk = cached + new keys,
Lq < Lk) is a decode step when its few queries gain nothing from a sparse layout: the method's
work on the keys (routing's cluster assignment, Combiner's region summaries, SBM's and
Sparsefinder's projections) then costs more than attending to every cached key. The cost model
(`attnpass.cost_model`) decides per call: the call is prefill when the method's FLOPs at (Lq, Lk)
are below dense attention's. `sparsify(..., prefill_queries=n)` fixes the threshold instead (a
call over cached keys with fewer than n queries is decode). A call with no cached keys (Lq == Lk)
always runs the method the user asked for.
"""
from __future__ import annotations

import functools

import sympy

from attnpass import cost_model

# Methods whose pair count is learned (SBM's density, Sparsefinder's predicted graph) are costed at
# this share of the pairs: their key-side work, not their pairs, decides a decode step.
NOMINAL_DENSITY = 0.1


@functools.cache
def _flops(method: str, options: tuple) -> callable:
    """FLOPs of one batch element and query head as a Python function of (Lq, Lk, D, density).
    The density stays an argument: a method whose density follows the length (Sparsefinder's
    blocks: a fixed number of keys per query) would otherwise build a new function every decode step."""
    expr = cost_model.cost_expr(method, **dict(options)).flops.subs({cost_model.B: 1, cost_model.H: 1})
    return sympy.lambdify((cost_model.Lq, cost_model.Lk, cost_model.D, cost_model.rho), expr, "math")


def sparse_pays(method: str, len_q: int, len_k: int, head_dim: int, options: dict, anchor_keys: int = 0) -> bool:
    """Whether `method` (with its cost-model `options`) costs fewer FLOPs than dense attention here;
    `anchor_keys`: the sinks and window each query also attends (attnpass.methods.anchor), costed
    as dense attention over that many keys."""
    options = dict(options)
    density = options.pop("density", NOMINAL_DENSITY)  # read only by a method whose cost has one
    dense = _flops("dense", ())
    anchor = dense(len_q, min(anchor_keys, len_k), head_dim, 0.0) if anchor_keys else 0.0
    method_flops = _flops(method, tuple(sorted(options.items())))(len_q, len_k, head_dim, density)
    return method_flops + anchor < dense(len_q, len_k, head_dim, 0.0)


@functools.cache
def _never_pays(method: str, options: tuple, len_q: int, head_dim: int) -> bool:
    options = dict(options)
    values = {cost_model.B: 1, cost_model.H: 1, cost_model.Lq: len_q, cost_model.D: head_dim}
    if "density" in options:
        values[cost_model.rho] = options.pop("density")
    extra = (cost_model.cost_expr(method, **options).flops - cost_model.cost_expr("dense").flops).subs(values)
    past = sympy.Symbol("past", nonnegative=True)  # Lk = len_q + 1 + past
    return _nonnegative(sympy.expand(extra.subs(cost_model.Lk, len_q + 1 + past)), past)


def _nonnegative(expr: sympy.Expr, x: sympy.Symbol) -> bool:
    """A sound (not complete) proof that `expr` >= 0 for every x >= 0 and every positive value of its
    other symbols (an option left out, e.g. Combiner's block): its terms affine in x, summed, are >= 0
    at x = 0 and in slope, and each other term is >= 0 or bounded below by an affine one. False when
    no such proof is found."""
    affine = sympy.Integer(0)
    for term in sympy.Add.make_args(expr):
        term = _affine_lower_bound(term, x)
        if term is None:
            return False
        affine += term
    affine = sympy.expand(affine)
    return bool(affine.subs(x, 0) >= 0) and bool(affine.coeff(x, 1) >= 0)


def _affine_lower_bound(term: sympy.Expr, x: sympy.Symbol) -> sympy.Expr | None:
    """`term` if it is affine in x with numbers; 0 if it is >= 0 (sympy's assumptions: the symbols are
    positive); for g * log(a x + b) with g >= 0, a >= 0, b > 0 (a sort's n log n cost of a count that
    may be below 1), the bound g * log(b) when that is affine; else None."""
    if term.free_symbols <= {x} and term.is_polynomial(x) and sympy.degree(term, x) <= 1:
        return term
    if term.is_nonnegative:
        return sympy.Integer(0)
    logs = [log for log in term.atoms(sympy.log) if x in log.free_symbols]
    if len(logs) == 1:
        (log,) = logs
        factor, argument = sympy.simplify(term / log), log.args[0]
        if (factor.is_nonnegative and argument.is_polynomial(x) and sympy.degree(argument, x) <= 1
                and argument.coeff(x, 1) >= 0 and argument.subs(x, 0) > 0):
            bound = sympy.expand(factor * sympy.log(argument.subs(x, 0)))
            if bound.free_symbols <= {x} and bound.is_polynomial(x) and sympy.degree(bound, x) <= 1:
                return bound
    return None


def sparse_never_pays(method: str, len_q: int, head_dim: int, options: dict) -> bool:
    """Whether `sparse_pays` is False at every key length Lk > len_q, whatever the anchor (its keys only
    add to the method's cost): the method's FLOPs minus dense attention's, at these queries, are proven
    >= 0 for every such Lk (`_nonnegative`). `options` may leave out an option the method sets from the
    lengths (Combiner's default block, the blocks predictor's density): the proof then holds for any
    positive value of it."""
    return _never_pays(method, tuple(sorted(options.items())), len_q, head_dim)


def check_prefill_queries(value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"prefill_queries={value!r} must be None (the cost model decides) or an int >= 1")
