"""Property-based tests of the Triton kernels, run on CPU by Triton's interpreter.

The problems are those of tests/test_fuzz_kernels.py (imported, not copied: B, Hq, Hkv for GQA,
Lq != Lk, D, Dv, causal rule and offset, key padding, bias, empty rows, group and slot counts,
summaries, normaliser, the CPU kernels' tile budget), plus what only matters to the Triton path:
the dispatcher's tile cap (``dispatch.MAX_BLOCK`` lowered to 16 or 32 so rows, groups and summary
lists span several tiles), wide rows and groups to make that happen, head dims above 16 (a 32-wide
head-dim block, partly masked), bfloat16 next to float32 / float64, forced empty groups, per-edge bias, pair_mask,
key_range, stride-0 summaries, the row statistic's own gradient, and dropout.

Every case runs the op forward and backward on the same float64 leaves, cast to the drawn dtype:
once on the PyTorch kernels and once on the Triton kernels (``force_triton()``, backward
included), with the same dropout seed. It checks

* Triton against PyTorch in the drawn dtype: output, row_stat and every input gradient (q, k, v,
  bias, summaries, edge_bias), relative to the largest magnitude: float64 <= 1e-9, float32 <= 1e-4,
  bfloat16 <= 1e-2; over that in float32 / bfloat16 only if Triton is within 2x of the PyTorch
  kernels' own error against the float64 run (gradients that cancel, see ``_close``);
* one dense-reference check per case in float64 (the kernels' test files' dense references on
  the same pairs, dropout applied to the dense probabilities with ``dropout_keep``'s pair hash):
  the PyTorch kernels always, and the Triton run itself when the drawn dtype is float64 — so a
  Triton dropout mask that differs from the CPU hash on any pair of non-negligible probability
  fails, as does any drift shared by both paths;
* rows without an allowed pair are exactly zero; the Triton forward and backward both launched
  (``dispatch.LAUNCHES``) and nothing fell back to the PyTorch kernels (``dispatch.FALLBACKS``).

Only one interpreted run per case: under Triton's interpreter a kernel is 100-1000x slower than
the PyTorch kernels (about 0.5-1.8 s per case here, against 4-20 ms).

Two profiles: the default runs 8 derandomised cases per kernel (CI, about 20 s); the long one runs
chunks of ATTNPASS_FUZZ_TRITON_EXAMPLES cases with distinct --hypothesis-seed values, one kernel per
process (the command and the results so far are in docs/reliability.md).
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnpass.lowering.torch.edge_attention as ea
import attnpass.lowering.torch.grouped_attention as ga
from attnpass.lowering.torch.common import dropout_keep
from tests.test_edge_attention import allowed_mask, random_csr
from tests.test_edge_attention import dense_reference as edge_reference
from tests.test_fuzz_kernels import grouped_problems, make_tensors, problems, random_slots
from tests.test_grouped_attention import dense_reference as grouped_reference

pytest.importorskip("triton")  # an optional extra; CI installs it with .[test]

from attnpass.lowering.triton import dispatch, force_triton  # noqa: E402

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
TOL = {F64: 1e-9, F32: 1e-4, BF16: 1e-2}
EXAMPLES = int(os.environ.get("ATTNPASS_FUZZ_TRITON_EXAMPLES", "8"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 100,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SCALE = 0.8
CHUNK_DEFAULTS = {m.__name__: m._CHUNK_ELEMENTS for m in (ea, ga)}  # the CPU kernels' tile budgets


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """Triton's CPU interpreter for every test here (as in tests/test_triton_kernels.py)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


# --------------------------------------------------------------------------------------------
# Triton-relevant draws on top of test_fuzz_kernels' problems
# --------------------------------------------------------------------------------------------


def triton_draws(draw, p: dict) -> dict:
    """Tile cap, dtype, head dim past one tile, dropout, stat gradient: shared by both kernels."""
    p.update(
        dtype=draw(st.sampled_from([F64, F32, BF16])), max_block=draw(st.sampled_from([16, 32, 64])),
        dropout_p=draw(st.sampled_from([0.0, 0.3])), dropout_seed=draw(st.integers(0, 2**62)),
        stat_grad=draw(st.booleans()),
    )
    if draw(st.integers(0, 5)) == 0:  # sometimes a head dim that needs a 32-wide (padded) tile
        p["D"] = draw(st.integers(17, 24))
    return p


@st.composite
def edge_problems(draw):
    p = triton_draws(draw, draw(problems()))
    if draw(st.booleans()):  # wide rows: degrees up to Lk span several tiles under a cap of 16 / 32
        # on few rows: the interpreter's time grows with the number of rows (one program each)
        p.update(B=1, Hkv=1, Hq=draw(st.integers(1, 2)), Lq=draw(st.integers(2, 4)), Lk=draw(st.integers(17, 40)))
    p["edge_bias"] = draw(st.booleans())
    return p


@st.composite
def triton_grouped_problems(draw):
    p = triton_draws(draw, draw(grouped_problems()))
    if draw(st.booleans()):  # wide groups: query and key slots over several tiles (in few programs)
        p.update(B=1, Hkv=1, Hq=draw(st.integers(1, 2)), G=draw(st.integers(1, 2)),
                 Lq=draw(st.integers(17, 30)), Lk=draw(st.integers(17, 40)))
        p["Wq"], p["Wk"] = draw(st.integers(17, p["Lq"])), draw(st.integers(17, p["Lk"]))
    if p["S"] and draw(st.integers(0, 3)) == 0:  # a summary list longer than one summary tile
        p.update(S=draw(st.integers(17, 20)), B=1, Hkv=1, Hq=min(p["Hq"], 2), G=min(p["G"], 2))
    p.update(empty_group=draw(st.sampled_from([None, "queries", "keys"])),
             pair_mask=draw(st.sampled_from([None, "full", "rows"])), key_range=draw(st.booleans()),
             expanded_summaries=draw(st.booleans()))
    return p


# --------------------------------------------------------------------------------------------
# Running and comparing
# --------------------------------------------------------------------------------------------


def _run(op, inputs: dict, *, kind: str, settings_: dict, dtype, triton: bool, stat_grad: bool, monkeypatch,
         chunk_module, chunk):
    """(out, row_stat, {name: grad of the float64 leaf}) of one forward + backward in `dtype`."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()
              if t is not None and t.is_floating_point()}
    args = {n: (leaves[n] if dtype == F64 else leaves[n].to(dtype)) if n in leaves else t
            for n, t in inputs.items()}
    # reset too when None: the monkeypatch fixture is shared by all of a test's examples
    monkeypatch.setattr(chunk_module, "_CHUNK_ELEMENTS", chunk or CHUNK_DEFAULTS[chunk_module.__name__])
    before, fallbacks = dict(dispatch.LAUNCHES), sum(dispatch.FALLBACKS.values())
    with force_triton(triton):
        out, stat = op(**args, **settings_)
        g = torch.Generator().manual_seed(1)
        loss = (out.to(F64) * torch.randn(out.shape, generator=g, dtype=F64)).sum()
        if stat_grad:
            loss = loss + (stat.to(F64) * torch.randn(stat.shape, generator=g, dtype=F64)).sum()
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    launched = {name: n - before.get(name, 0) for name, n in dispatch.LAUNCHES.items() if n != before.get(name, 0)}
    assert sum(dispatch.FALLBACKS.values()) == fallbacks, f"fell back to PyTorch: {dict(dispatch.FALLBACKS)}"
    if triton:
        assert launched == {f"{kind}_fwd": 1, f"{kind}_bwd": 1}, f"Triton launches: {launched}"
    else:
        assert not launched, f"the PyTorch run launched Triton kernels: {launched}"
    out, stat = out.detach(), stat.detach()
    assert torch.isfinite(out).all() and torch.isfinite(stat).all()
    return out, stat, {n: (torch.zeros_like(leaves[n]) if d is None else d) for n, d in zip(leaves, grads)}


def _rel(got, want) -> float:
    """max |got - want| / max |want| (absolute when `want` is all zero: then `got` must be ~0 too)."""
    got, want = got.to(F64), want.to(F64)
    if not want.numel():
        return 0.0
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    return err / scale if scale > 0 else err


def _close(what: str, got, want, tol: float, exact=None, cpu=None):
    err = _rel(got, want)
    if err <= tol:
        return
    # Over `tol` is accepted only where rounding in the dtype explains it: a gradient that is a
    # small difference of large terms (e.g. dq of a nearly one-hot softmax row, found by this
    # fuzzer at 1.08e-4 in float32) has a relative rounding error far above the dtype's epsilon
    # on both paths. Then Triton must be as close to the float64 result `exact` as the PyTorch
    # kernels in the same dtype are (within 2x).
    if exact is not None:
        own, theirs = _rel(got, exact), _rel(cpu, exact)
        assert own <= 2 * theirs, (f"{what}: relative error {err:.3g} > {tol:g}, and {own:.3g} from float64 "
                                   f"against the PyTorch kernels' {theirs:.3g}")
        return
    raise AssertionError(f"{what}: relative error {err:.3g} > {tol:g}")


def _agree(label: str, got, want, tol: float, exact=None):
    """Outputs, row_stat and gradients of two runs; `exact`: the float64 run (rounding allowance)."""
    pairs = [("out", got[0], want[0], None if exact is None else exact[0]),
             ("row_stat", got[1], want[1], None if exact is None else exact[1])]
    pairs += [(f"d{n}", got[2][n], want[2][n], None if exact is None else exact[2][n]) for n in want[2]]
    for name, a, b, e in pairs:
        _close(f"{label} {name}", a, b, tol, exact=e, cpu=b)


def _check_all(op, kind, inputs, settings_, p, monkeypatch, chunk_module, dense):
    """Triton vs PyTorch in the drawn dtype, and the float64 runs vs the dense reference `dense`."""
    run = dict(kind=kind, settings_=settings_, stat_grad=p["stat_grad"], monkeypatch=monkeypatch,
               chunk_module=chunk_module, chunk=p["chunk"])
    monkeypatch.setattr(dispatch, "MAX_BLOCK", p["max_block"])
    want, nonempty = dense(inputs)
    cpu64 = _run(op, inputs, dtype=F64, triton=False, **run)
    _agree("PyTorch float64 vs dense", cpu64, want, TOL[F64])
    # One interpreted run per case (the interpreter is 100-1000x slower than the PyTorch kernels):
    # in the drawn dtype against the PyTorch kernels in that dtype; when it is float64, also
    # against the dense reference directly.
    dtype = p["dtype"]
    cpu = cpu64 if dtype == F64 else _run(op, inputs, dtype=dtype, triton=False, **run)
    tri = _run(op, inputs, dtype=dtype, triton=True, **run)
    _agree(f"{dtype} Triton vs PyTorch", tri, cpu, TOL[dtype], exact=None if dtype == F64 else cpu64)
    assert torch.all(tri[0][~nonempty] == 0) and torch.all(tri[1][~nonempty] == 0), "empty rows must be zero"
    if dtype == F64:
        _agree("Triton float64 vs dense", tri, want, TOL[F64])


def _dense_grads(inputs: dict, forward, stat_grad: bool):
    """(out, row_stat, grads) of a dense float64 reference `forward(leaves)`, with the runs' loss."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()
              if t is not None and t.is_floating_point()}
    out, stat, nonempty = forward({**inputs, **leaves})
    g = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=g, dtype=F64)).sum()
    if stat_grad:
        loss = loss + (stat * torch.randn(stat.shape, generator=g, dtype=F64)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return (out.detach(), stat.detach(), {n: (torch.zeros_like(leaves[n]) if d is None else d)
                                          for n, d in zip(leaves, grads)}), nonempty


def _keep(p, coords):
    """Dense inverted-dropout multipliers of lowering/torch/common.py (1 without dropout)."""
    if not p["dropout_p"]:
        return 1.0
    return dropout_keep(p["dropout_seed"], p["dropout_p"], coords, F64)


# --------------------------------------------------------------------------------------------
# Edge (CSR) attention
# --------------------------------------------------------------------------------------------


@FUZZ
@given(p=edge_problems())
def test_edge_attention_triton_fuzz(p, monkeypatch):
    gen = torch.Generator().manual_seed(p["seed"])
    q, k, v, kpm, bias = make_tensors(p, gen)
    B, Hq, Hkv, Lq, Lk = p["B"], p["Hq"], p["Hkv"], p["Lq"], p["Lk"]
    row_ptr, col_index = random_csr(B * Hq * Lq, Lk, gen, shuffle=bool(p["seed"] % 2))
    edge_bias = torch.randn(col_index.shape, generator=gen, dtype=F64) if p["edge_bias"] else None
    inputs = dict(q=q, k=k, v=v, row_ptr=row_ptr, col_index=col_index, key_padding_mask=kpm, bias=bias,
                  edge_bias=edge_bias)
    settings_ = dict(scale=SCALE, causal=p["causal"], causal_offset=p["offset"], dropout_p=p["dropout_p"],
                     dropout_seed=p["dropout_seed"], normalizer=p["normalizer"])
    mask = allowed_mask(row_ptr, col_index, B, Hq, Lq, Lk, p["causal"], p["offset"], kpm)
    rows = torch.repeat_interleave(torch.arange(B * Hq * Lq), row_ptr.diff())

    def dense(t):
        full_bias = 0.0 if t["bias"] is None else t["bias"]
        if t["edge_bias"] is not None:  # the per-edge logits scattered to their (row, key) pairs
            flat = torch.zeros(B * Hq * Lq * Lk, dtype=F64).index_put((rows * Lk + col_index,), t["edge_bias"])
            full_bias = full_bias + flat.view(B, Hq, Lq, Lk)
        # v = identity gives the dense probabilities, so dropout can act on them before the values
        eye = torch.eye(Lk, dtype=F64).expand(B, Hkv, Lk, Lk)
        probs, stat = edge_reference(t["q"], t["k"], eye, mask, scale=SCALE, bias=full_bias,
                                     normalizer=p["normalizer"])
        keep = _keep(p, (torch.arange(B * Hq).view(B, Hq, 1, 1), torch.arange(Lq).view(1, 1, Lq, 1),
                         torch.arange(Lk).view(1, 1, 1, Lk)))
        return (probs * keep) @ t["v"].repeat_interleave(Hq // Hkv, dim=1), stat, mask.any(-1)

    _check_all(ea.edge_attention, "edge", inputs, settings_, p, monkeypatch, ea,
               lambda t: _dense_grads(t, dense, p["stat_grad"]))


# --------------------------------------------------------------------------------------------
# Grouped attention
# --------------------------------------------------------------------------------------------


@FUZZ
@given(p=triton_grouped_problems())
def test_grouped_attention_triton_fuzz(p, monkeypatch):
    gen = torch.Generator().manual_seed(p["seed"])
    q, k, v, kpm, bias = make_tensors(p, gen)
    B, Hq, Hkv, Lq, Lk, G, Wq, S = p["B"], p["Hq"], p["Hkv"], p["Lq"], p["Lk"], p["G"], p["Wq"], p["S"]
    q_index = random_slots(B, Hq, G, Wq, Lq, gen, 0.8)
    k_index = random_slots(B, Hq, G, p["Wk"], Lk, gen, 0.7)
    if p["empty_group"] == "queries":
        q_index[0, -1, 0] = -1
    elif p["empty_group"] == "keys":
        k_index[-1, 0, -1] = -1
    inputs = dict(q=q, k=k, v=v, q_index=q_index, k_index=k_index, key_padding_mask=kpm, bias=bias)
    if S:
        groups = 1 if p["expanded_summaries"] else G  # stride-0 over groups, as Combiner-fixed passes them
        inputs.update(summary_k=torch.randn(B, Hq, groups, S, p["D"], generator=gen, dtype=F64),
                      summary_v=torch.randn(B, Hq, groups, S, p["Dv"], generator=gen, dtype=F64),
                      summary_mask=torch.rand(B, Hq, G, Wq, S, generator=gen) < 0.7)
    if p["pair_mask"] == "full":
        inputs["pair_mask"] = torch.rand(B, 1, Lq, Lk, generator=gen) < 0.8
    elif p["pair_mask"] == "rows":
        inputs["pair_mask"] = torch.rand(Hq, Lq, 1, generator=gen) < 0.8
    if p["key_range"]:
        low = torch.randint(0, Lk, (B, Hq, G, Wq), generator=gen)
        inputs["key_range"] = torch.stack([low, low + torch.randint(0, Lk, low.shape, generator=gen)], dim=-1)
    settings_ = dict(scale=SCALE, causal=p["causal"], causal_offset=p["offset"], dropout_p=p["dropout_p"],
                     dropout_seed=p["dropout_seed"], normalizer=p["normalizer"])
    op = ga.grouped_attention
    if S and p["expanded_summaries"]:
        def op(summary_k, summary_v, **kw):  # the leaves are (B, Hq, 1, S, .); the op sees them expanded
            return ga.grouped_attention(summary_k=summary_k.expand(B, Hq, G, S, -1),
                                        summary_v=summary_v.expand(B, Hq, G, S, -1), **kw)

    def dense(t):
        # v = [I | 0] and summary_v = [0 | I] make the slots' outputs their probability rows over
        # the Lk keys and the S summaries, so dropout can act on them before the values.
        width = Lk + S
        sk = sv = None
        if S:
            sk = t["summary_k"].expand(B, Hq, G, S, -1)
            sv = t["summary_v"].expand(B, Hq, G, S, -1)
        eye = torch.eye(width, dtype=F64)
        probs, stat, nonempty = grouped_reference(
            t["q"], t["k"], eye[:Lk].expand(B, Hkv, Lk, width), q_index, k_index, scale=SCALE,
            causal=p["causal"], causal_offset=p["offset"], key_padding_mask=kpm, bias=t["bias"],
            summary_k=sk, summary_v=None if sk is None else eye[Lk:].expand(B, Hq, G, S, width),
            summary_mask=t.get("summary_mask"), pair_mask=t.get("pair_mask"), key_range=t.get("key_range"),
            normalizer=p["normalizer"])
        bh = torch.arange(B * Hq).view(B, Hq, 1, 1, 1)
        qpos = q_index.clamp(min=0).unsqueeze(-1)
        cols = torch.cat([torch.arange(Lk).expand(G, Lk),
                          Lk + torch.arange(G).view(G, 1) * S + torch.arange(S)], dim=1).view(1, 1, G, 1, width)
        probs = probs * _keep(p, (bh, qpos, cols))
        out = probs[..., :Lk] @ t["v"].repeat_interleave(Hq // Hkv, dim=1).unsqueeze(2)
        if S:
            out = out + probs[..., Lk:] @ sv
        return out, stat, nonempty

    _check_all(op, "grouped", inputs, settings_, p, monkeypatch, ga, lambda t: _dense_grads(t, dense, p["stat_grad"]))
