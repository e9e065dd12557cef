"""Property-based tests of the CPU sparse kernels against dense references on the same pairs.

Hypothesis draws the shapes and settings (B, Hq, Hkv, Lq, Lk, D, Dv, group and slot counts, bucket
views / sizes / extra keys, causal rule and offset, key padding, bias, mask, summary keys, empty
rows, normaliser, tile budget) and a seed for the tensors; every case compares forward and
gradients with the dense references of the kernels' own test files, in float64 (exact to 1e-9) and
float32 (1e-4 against float64).

Two profiles: the default runs a few dozen cases per kernel (CI); the long one is

    ATTNPASS_FUZZ_EXAMPLES=10000 python -m pytest -q tests/test_fuzz_kernels.py

and its last result is in docs/reliability.md.
"""
from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnpass.lowering.torch.edge_attention as ea
import attnpass.lowering.torch.grouped_attention as ga
from attnpass.lowering.torch.bucket_attention import quantile_bucket_attention
from tests.test_bucket_attention import allowed as bucket_allowed
from tests.test_bucket_attention import random_extras, random_orders, reference_pairs
from tests.test_edge_attention import allowed_mask, random_csr
from tests.test_edge_attention import dense_reference as edge_reference
from tests.test_grouped_attention import dense_reference as grouped_reference

F64 = torch.float64
EXAMPLES = int(os.environ.get("ATTNPASS_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 100,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.to(F64) - b.to(F64)).abs().max() / b.to(F64).abs().max().clamp(min=1e-30)).item()


@st.composite
def problems(draw):
    """Shapes and settings shared by both kernels."""
    hkv = draw(st.integers(1, 2))
    return dict(
        B=draw(st.integers(1, 2)), Hkv=hkv, Hq=hkv * draw(st.integers(1, 2)),
        Lq=draw(st.integers(1, 10)), Lk=draw(st.integers(1, 10)), D=draw(st.integers(1, 6)),
        Dv=draw(st.integers(1, 4)), causal=draw(st.booleans()), offset=draw(st.integers(-3, 3)),
        padding=draw(st.booleans()), bias=draw(st.sampled_from([None, "full", "keys"])),
        normalizer=draw(st.sampled_from(["softmax", "entmax15"])),
        dtype=draw(st.sampled_from([F64, torch.float32])), chunk=draw(st.sampled_from([None, 7, 300])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_tensors(p, gen):
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).requires_grad_()

    q, k, v = randn(p["B"], p["Hq"], p["Lq"], p["D"]), randn(p["B"], p["Hkv"], p["Lk"], p["D"]), \
        randn(p["B"], p["Hkv"], p["Lk"], p["Dv"])
    kpm = None
    if p["padding"]:
        kpm = torch.rand(p["B"], p["Lk"], generator=gen) < 0.7
    bias = None
    if p["bias"] == "full":
        bias = randn(p["B"], p["Hq"], p["Lq"], p["Lk"])
    elif p["bias"] == "keys":
        bias = randn(p["Hq"], 1, p["Lk"])
    return q, k, v, kpm, bias


def check(out, stat, ref_out, ref_stat, leaves, dtype, out_terms=None):
    """Output (and row statistic, unless both are None) and their gradients against the reference.

    `out_terms`: in float32, the reference output with every value replaced by its magnitude (the size
    of the terms each output sums): an output that cancels to far below them carries float32 rounding
    of the terms, not of the result."""
    tol = 1e-9 if dtype == F64 else 1e-4
    if stat is None:  # a kernel without a row statistic: a zero one keeps the checks below uniform
        stat, ref_stat = out.new_zeros(()), ref_out.new_zeros(())
    assert torch.isfinite(out).all() and torch.isfinite(stat).all()
    if dtype == F64:
        assert rel_err(out, ref_out) <= tol
    else:
        assert (out.to(F64) - ref_out).abs().max() <= tol * max(ref_out.abs().max(), out_terms.abs().max())
    if dtype == F64:
        assert rel_err(stat, ref_stat) <= tol
    else:  # the statistic (logsumexp, entmax's threshold) of the drawn O(1) scores can cancel to near 0:
        # it carries float32 rounding of the scores, not of itself
        assert (stat.to(F64) - ref_stat).abs().max() <= tol * max(ref_stat.abs().max(), 1.0)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    got = torch.autograd.grad((out.to(F64) * g).sum() + stat.to(F64).sum(), leaves, allow_unused=True)
    want = torch.autograd.grad((ref_out * g).sum() + ref_stat.sum(), leaves, allow_unused=True,
                               retain_graph=dtype != F64)
    # float32: the size of the terms each gradient sums (the upstream's magnitudes); a gradient that
    # cancels to far below them (e.g. a value row two queries read with opposite upstream signs) carries
    # float32 rounding of the terms, not of the result
    terms = want if dtype == F64 else torch.autograd.grad((ref_out * g.abs()).sum() + ref_stat.sum(), leaves,
                                                          allow_unused=True)
    for a, b, size in zip(got, want, terms):
        if b is None or b.abs().max() == 0:
            assert a is None or a.abs().max() <= tol
        elif dtype == F64:
            assert rel_err(a, b) <= 10 * tol
        else:
            assert (a - b).abs().max() <= 10 * tol * max(b.abs().max(), size.abs().max())


def _cast(tensors, dtype):
    """The kernel's inputs in `dtype`, still connected to the float64 leaves (grads compared there)."""
    return [t if t is None or dtype == F64 else t.to(dtype) for t in tensors]


@FUZZ
@given(p=problems())
def test_edge_attention_fuzz(p, monkeypatch):
    if p["chunk"] is not None:
        monkeypatch.setattr(ea, "_CHUNK_ELEMENTS", p["chunk"])
    gen = torch.Generator().manual_seed(p["seed"])
    q, k, v, kpm, bias = make_tensors(p, gen)
    R = p["B"] * p["Hq"] * p["Lq"]
    row_ptr, col_index = random_csr(R, p["Lk"], gen, shuffle=bool(p["seed"] % 2))
    mask = allowed_mask(row_ptr, col_index, p["B"], p["Hq"], p["Lq"], p["Lk"], p["causal"], p["offset"], kpm)
    qc, kc, vc, bc = _cast([q, k, v, bias], p["dtype"])
    out, stat = ea.edge_attention(qc, kc, vc, row_ptr, col_index, scale=0.8, causal=p["causal"],
                                  causal_offset=p["offset"], key_padding_mask=kpm, bias=bc,
                                  normalizer=p["normalizer"])
    ref_out, ref_stat = edge_reference(q, k, v, mask, scale=0.8, bias=bias, normalizer=p["normalizer"])
    terms = edge_reference(q, k, v.abs(), mask, scale=0.8, bias=bias, normalizer=p["normalizer"])[0]
    assert torch.all(out[~mask.any(-1)] == 0)
    check(out, stat, ref_out, ref_stat, [t for t in (q, k, v, bias) if t is not None], p["dtype"], terms)


@st.composite
def grouped_problems(draw):
    p = draw(problems())
    p.update(G=draw(st.integers(1, 3)), Wq=draw(st.integers(1, 5)), Wk=draw(st.integers(1, 6)),
             S=draw(st.sampled_from([0, 1, 2])))
    return p


def random_slots(B, H, G, W, L, gen, fill):
    """(B, H, G, W) positions, distinct within a group, -1 padding; about `fill` of slots used."""
    out = torch.full((B, H, G, W), -1, dtype=torch.int64)
    for idx in range(B * H * G):
        b, h, g = idx // (H * G), (idx // G) % H, idx % G
        n = min(W, L, int(torch.binomial(torch.tensor(float(W)), torch.tensor(fill), generator=gen)))
        out[b, h, g, torch.randperm(W, generator=gen)[:n]] = torch.randperm(L, generator=gen)[:n]
    return out


@FUZZ
@given(p=grouped_problems())
def test_grouped_attention_fuzz(p, monkeypatch):
    if p["chunk"] is not None:
        monkeypatch.setattr(ga, "_CHUNK_ELEMENTS", p["chunk"])
    gen = torch.Generator().manual_seed(p["seed"])
    q, k, v, kpm, bias = make_tensors(p, gen)
    B, Hq, G = p["B"], p["Hq"], p["G"]
    q_index = random_slots(B, Hq, G, p["Wq"], p["Lq"], gen, 0.8)
    k_index = random_slots(B, Hq, G, p["Wk"], p["Lk"], gen, 0.7)
    kwargs = dict(scale=0.8, causal=p["causal"], causal_offset=p["offset"], key_padding_mask=kpm,
                  normalizer=p["normalizer"])
    summary_k = summary_v = None
    if p["S"]:
        summary_k = torch.randn(B, Hq, G, p["S"], p["D"], generator=gen, dtype=F64).requires_grad_()
        summary_v = torch.randn(B, Hq, G, p["S"], p["Dv"], generator=gen, dtype=F64).requires_grad_()
        kwargs["summary_mask"] = torch.rand(B, Hq, G, p["Wq"], p["S"], generator=gen) < 0.7
    qc, kc, vc, bc, skc, svc = _cast([q, k, v, bias, summary_k, summary_v], p["dtype"])
    out, stat = ga.grouped_attention(qc, kc, vc, q_index, k_index, bias=bc, summary_k=skc, summary_v=svc, **kwargs)
    ref_out, ref_stat, nonempty = grouped_reference(q, k, v, q_index, k_index, bias=bias, summary_k=summary_k,
                                                    summary_v=summary_v, **kwargs)
    terms = grouped_reference(q, k, v.abs(), q_index, k_index, bias=bias, summary_k=summary_k,
                              summary_v=None if summary_v is None else summary_v.abs(), **kwargs)[0]
    assert torch.all(out[~nonempty] == 0)
    leaves = [t for t in (q, k, v, bias, summary_k, summary_v) if t is not None]
    check(out, stat, ref_out, ref_stat, leaves, p["dtype"], terms)


@st.composite
def bucket_problems(draw):
    p = draw(problems())
    # r * bucket + extras reaches past 32 candidates, where entmax-1.5 first solves on the top 16
    p.update(r=draw(st.integers(1, 4)), bucket=draw(st.integers(1, 12)), W=draw(st.integers(0, 3)),
             mask=draw(st.booleans()))
    return p


@FUZZ
@given(p=bucket_problems())
def test_quantile_bucket_attention_fuzz(p):
    gen = torch.Generator().manual_seed(p["seed"])
    q, k, v, kpm, bias = make_tensors(p, gen)
    B, Hq, Lq, Lk = p["B"], p["Hq"], p["Lq"], p["Lk"]
    q_order, key_order = random_orders(B, Hq, p["r"], Lq, Lk, gen, kpm)
    extras = random_extras(B, Hq, Lq, Lk, p["W"], gen) if p["W"] else None
    mask = torch.rand(B, 1, Lq, Lk, generator=gen) < 0.8 if p["mask"] else None
    qc, kc, vc, bc = _cast([q, k, v, bias], p["dtype"])
    out = quantile_bucket_attention(qc, kc, vc, q_order, key_order, p["bucket"], extras, scale=0.8,
                                    causal=p["causal"], causal_offset=p["offset"], key_padding_mask=kpm, bias=bc,
                                    mask=mask, normalizer=p["normalizer"])
    pairs = bucket_allowed(reference_pairs(q_order, key_order, p["bucket"], extras, kpm, Lk), p["causal"],
                           p["offset"], kpm, mask)
    ref_out, _ = edge_reference(q, k, v, pairs, scale=0.8, bias=bias, normalizer=p["normalizer"])
    terms = edge_reference(q, k, v.abs(), pairs, scale=0.8, bias=bias, normalizer=p["normalizer"])[0]
    assert torch.all(out[~pairs.any(-1)] == 0)
    check(out, None, ref_out, None, [t for t in (q, k, v, bias) if t is not None], p["dtype"], terms)
