"""The reference site modules (attnpass.tools.reference_attention) against masked softmax on keep masks
built here, row by row, from the definitions: the oracle's best ceil(share * n) allowed keys, the
first `sinks` plus the `window` nearest allowed keys; their pair counts, their chunking, their memory,
and the public pipeline on a tiny Llama."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnpass.lowering.torch.dense import dense_attention_math
from attnpass.methods.base import SiteSpec
from attnpass.tools.reference_attention import (
    OracleAttention, SinksLocalAttention, measured_share, sparsify_reference,
)

B = 2
SLACK = 1e-9  # the module's ceil(share * n) reads 0.35 * 20 as 7


def _spec(causal=True, bottom_right=False):
    return SiteSpec(name="site", scale=None, causal=causal, causal_bottom_right=bottom_right)


def _inputs(hq=4, hkv=4, lq=37, lk=37, d=8, padding=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, hq, lq, d, generator=g, dtype=torch.float64)
    k = torch.randn(B, hkv, lk, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, hkv, lk, d, generator=g, dtype=torch.float64)
    keep = None
    if padding:  # batch 0 left-padded (with causal its first rows see nothing), batch 1 a hole and a tail
        keep = torch.ones(B, lk, dtype=torch.bool)
        keep[0, :5] = False
        keep[1, 10:13] = False
        keep[1, -4:] = False
    return q, k, v, keep


def _allowed(q, k, keep, causal, offset):
    """(B, Lq, Lk): the pairs the causal rule and key padding allow."""
    lq, lk = q.shape[2], k.shape[2]
    allowed = torch.ones(B, lq, lk, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(lq, lk, dtype=torch.bool).tril(offset)
    if keep is not None:
        allowed &= keep[:, None, :]
    return allowed


def _scores(q, k):
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5


def _oracle_keep(scores, allowed, share):
    keep = torch.zeros(scores.shape, dtype=torch.bool)
    for b in range(scores.shape[0]):
        for i in range(scores.shape[2]):
            keys = allowed[b, i].nonzero().flatten()
            if len(keys) == 0:
                continue
            budget = max(1, math.ceil(share * len(keys) - SLACK))
            for h in range(scores.shape[1]):
                best = keys[scores[b, h, i, keys].argsort(descending=True)[:budget]]
                keep[b, h, i, best] = True
    return keep


def _sinks_local_keep(allowed, sinks, window, causal):
    """Sinks: the row's first `sinks` allowed keys. Window: `window` consecutive allowed keys, the
    last ones when causal, else centred on the last allowed key at or before floor(i * Lk / Lq)."""
    lq, lk = allowed.shape[1:]
    keep = torch.zeros_like(allowed)
    for b in range(allowed.shape[0]):
        for i in range(lq):
            keys = allowed[b, i].nonzero().flatten().tolist()
            n = len(keys)
            if causal:
                start = max(n - window, 0)
            else:
                anchor = sum(1 for j in keys if j <= i * lk // lq) - 1
                start = min(max(anchor - window // 2, 0), max(n - window, 0))
            for j in keys[:sinks] + keys[start:start + window]:
                keep[b, i, j] = True
    return keep


def _best_window(allowed, sinks, share, causal):
    """The window whose pair count is closest to share * allowed (the smaller one on a tie)."""
    target = share * int(allowed.sum())
    counts = [int(_sinks_local_keep(allowed, sinks, w, causal).sum()) for w in range(allowed.shape[2] + 1)]
    return min(range(len(counts)), key=lambda w: (abs(counts[w] - target), w))


def _masked_attention(scores, keep, v, allowed, empty_rows="zero"):
    v = v.repeat_interleave(scores.shape[1] // v.shape[1], dim=1)
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    probs = probs.masked_fill(~keep.any(-1, keepdim=True), 0.0)
    out = probs @ v
    if empty_rows == "mean":
        empty = ~allowed.any(-1)[:, None, :, None]
        out = torch.where(empty, v.mean(-2, keepdim=True), out)
    return out


CASES = {
    "causal": dict(causal=True),
    "non_causal": dict(causal=False),
    "non_causal_lq_lt_lk": dict(causal=False, lq=13, lk=37),
    "bottom_right": dict(causal=True, bottom_right=True, lq=13, lk=37),
    "causal_padding": dict(causal=True, padding=True),
    "non_causal_padding": dict(causal=False, padding=True),
    "gqa_causal": dict(causal=True, hq=6, hkv=2),
    "gqa_bottom_right_padding": dict(causal=True, bottom_right=True, lq=20, lk=37, hq=6, hkv=2, padding=True),
}


def _case(name):
    c = dict(CASES[name])
    causal, bottom_right = c.pop("causal"), c.pop("bottom_right", False)
    q, k, v, keep = _inputs(**c)
    offset = k.shape[2] - q.shape[2] if bottom_right else 0
    return _spec(causal, bottom_right), (q, k, v, keep), _allowed(q, k, keep, causal, offset)


@pytest.mark.parametrize("empty_rows", ["zero", "mean"])
@pytest.mark.parametrize("share", [0.1, 0.25, 0.35, 0.6])
@pytest.mark.parametrize("name", list(CASES))
def test_oracle_matches_explicit_keep_mask(name, share, empty_rows):
    spec, (q, k, v, keep), allowed = _case(name)
    module = OracleAttention(spec, share=share, chunk=7)
    out = module(q, k, v, key_keep=keep, empty_rows=empty_rows)
    scores = _scores(q, k)
    want_keep = _oracle_keep(scores, allowed, share)
    torch.testing.assert_close(out, _masked_attention(scores, want_keep, v, allowed, empty_rows), atol=1e-10, rtol=1e-10)
    assert module.last_pairs == int(want_keep.sum())
    assert module.last_allowed_pairs == int(allowed.sum()) * q.shape[1]


@pytest.mark.parametrize("sinks", [0, 4, 64])
@pytest.mark.parametrize("share", [0.1, 0.25, 0.35])
@pytest.mark.parametrize("name", list(CASES))
def test_sinks_local_matches_explicit_keep_mask(name, share, sinks):
    spec, (q, k, v, keep), allowed = _case(name)
    module = SinksLocalAttention(spec, share=share, sinks=sinks, chunk=7)
    out = module(q, k, v, key_keep=keep)
    window = _best_window(allowed, sinks, share, spec.causal)
    assert module.last_window == window
    want_keep = _sinks_local_keep(allowed, sinks, window, spec.causal)[:, None].expand(-1, q.shape[1], -1, -1)
    torch.testing.assert_close(out, _masked_attention(_scores(q, k), want_keep, v, allowed), atol=1e-10, rtol=1e-10)
    assert module.last_pairs == int(want_keep.sum())
    assert module.last_allowed_pairs == int(allowed.sum()) * q.shape[1]
    # the window is fitted: the share achieved is the closest one to the target
    assert abs(module.last_share - share) <= abs(int(_sinks_local_keep(allowed, sinks, window + 1, spec.causal).sum())
                                                 / int(allowed.sum()) - share)


def test_sinks_local_fixed_window():
    spec, (q, k, v, keep), allowed = _case("causal_padding")
    module = SinksLocalAttention(spec, sinks=2, window=5)
    out = module(q, k, v, key_keep=keep)
    assert module.last_window == 5
    want_keep = _sinks_local_keep(allowed, 2, 5, True)[:, None].expand(-1, q.shape[1], -1, -1)
    torch.testing.assert_close(out, _masked_attention(_scores(q, k), want_keep, v, allowed), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("empty_rows", ["zero", "mean"])
@pytest.mark.parametrize("cls", [OracleAttention, SinksLocalAttention])
@pytest.mark.parametrize("name", list(CASES))
def test_share_one_is_dense_attention(name, cls, empty_rows):
    spec, (q, k, v, keep), allowed = _case(name)
    module = cls(spec, share=1.0, chunk=5)
    out = module(q, k, v, key_keep=keep, empty_rows=empty_rows)
    offset = module.causal_offset(q, k)
    dense = dense_attention_math(q, k, v, None, None, keep, q.shape[-1] ** -0.5, spec.causal, offset, 0.0, 0, empty_rows)
    torch.testing.assert_close(out, dense, atol=1e-10, rtol=1e-10)
    assert module.last_pairs == module.last_allowed_pairs == int(allowed.sum()) * q.shape[1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("make", [lambda s: OracleAttention(s, share=0.3), lambda s: SinksLocalAttention(s, share=0.3, sinks=3)])
@pytest.mark.parametrize("name", ["causal_padding", "non_causal", "gqa_bottom_right_padding"])
def test_chunk_size_does_not_change_the_result(name, make, dtype):
    """The same pairs kept and the same output up to rounding: BLAS picks its kernel by matrix shape
    (a one-row chunk is a matrix-vector product), which can change the last bit of a score or a sum."""
    spec, (q, k, v, keep), _ = _case(name)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    results = []
    for chunk in (1, 7, q.shape[2], 1000):
        module = make(spec)
        module.chunk = chunk
        results.append((module(q, k, v, key_keep=keep), module.last_pairs, module.last_allowed_pairs))
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for out, pairs, allowed in results[1:]:
        torch.testing.assert_close(out, results[0][0], atol=tol, rtol=tol)
        assert (pairs, allowed) == results[0][1:]


class _Sizes(TorchDispatchMode):
    """The element count of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = (0, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest[0]:
                self.largest = (t.numel(), (str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("cls", [OracleAttention, SinksLocalAttention])
def test_chunked_call_never_allocates_lq_by_lk(cls):
    L = 2048
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, L, 16, generator=g)
    k = torch.randn(1, 1, L, 16, generator=g)
    v = torch.randn(1, 1, L, 16, generator=g)
    keep = torch.ones(1, L, dtype=torch.bool)
    keep[0, :7] = False
    module = cls(_spec(causal=True), share=0.25, chunk=256)
    with torch.no_grad(), _Sizes() as sizes:
        out = module(q, k, v, key_keep=keep)
    assert out.shape == (1, 2, L, 16) and torch.isfinite(out).all()
    assert sizes.largest[0] < L * L, sizes.largest
    assert abs(module.last_share - 0.25) < 0.01


@pytest.mark.parametrize("cls", [OracleAttention, SinksLocalAttention])
def test_bias_and_mask_are_refused(cls):
    spec, (q, k, v, _), _ = _case("causal")
    module = cls(spec)
    with pytest.raises(ValueError, match="additive bias"):
        module(q, k, v, bias=torch.zeros(37, 37, dtype=q.dtype))
    with pytest.raises(ValueError, match="general mask"):
        module(q, k, v, mask=torch.ones(37, 37, dtype=torch.bool))
    assert cls.unsupported_reason(SiteSpec(name="s", scale=None, has_bias=True))
    assert cls.unsupported_reason(_spec()) is None


def test_options_are_checked():
    with pytest.raises(ValueError, match="share"):
        OracleAttention(_spec(), share=0.0)
    with pytest.raises(ValueError, match="share"):
        OracleAttention(_spec(), share=1.5)
    with pytest.raises(ValueError, match="unknown option"):
        OracleAttention(_spec(), sinks=4)
    with pytest.raises(TypeError, match="sinks"):
        SinksLocalAttention(_spec(), sinks=2.5)
    with pytest.raises(ValueError, match="unknown reference"):
        sparsify_reference(torch.nn.Linear(2, 2), (torch.zeros(1, 2),), kind="best")


def test_not_in_the_public_method_registry():
    import attnpass

    assert "oracle" not in attnpass.METHODS and "sinks_local" not in attnpass.METHODS


def test_sparsify_reference_on_tiny_llama():
    """Share 1.0 reproduces the original's logits (padding included); a smaller share changes them
    and keeps the share asked for."""
    from zoo import by_name

    case = by_name("llama-causallm")
    model = case.build()
    args, kwargs = case.inputs(2, 24)
    with torch.no_grad():
        want = model(*args, **kwargs).logits
        for kind in ("oracle", "sinks_local"):
            full = sparsify_reference(model, args, kwargs, kind=kind, share=1.0)
            assert full.method == kind and len(full.site_modules()) == 2 and not full.report.skipped
            torch.testing.assert_close(full(*args, **kwargs).logits, want, atol=1e-5, rtol=1e-5)
            assert measured_share(full) == 1.0
        half = sparsify_reference(model, args, kwargs, kind="oracle", share=0.5)
        got = half(*args, **kwargs).logits
        assert not torch.allclose(got, want, atol=1e-3)
        assert 0.5 <= measured_share(half) < 0.6  # ceil(0.5 * n) per row, at least one
