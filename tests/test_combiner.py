"""Tests for method="combiner" (attnpass/methods/combiner/).

The layout is checked by counting, from its index tensors alone, how often each (query, key) pair
is reached (directly or through a summary): exactly once if allowed, never otherwise. The numbers
are checked against a dense reference written here from the paper's definition (regions derived
per query in plain Python), in float64, forward and backward.
"""
from __future__ import annotations

import math

import pytest
import torch
from attnpass.lowering.torch.dense import dense_attention_math
from hypothesis import given, settings
from hypothesis import strategies as st
from memory_probe import no_square_tensor

from attnpass import cost_model
from attnpass.methods import method_class
from attnpass.methods.base import SiteSpec
from attnpass.methods.combiner import CombinerAttention
from attnpass.methods.combiner.layout import (
    build_layout,
    queries_by_position,
    region_key_batches,
    region_summaries,
)

F64 = torch.float64
VARIANTS = ("fixed", "axial", "logsparse")


def site(causal=False, bottom_right=False, **options) -> CombinerAttention:
    spec = SiteSpec("layers.0.attn", None, causal=causal, causal_bottom_right=bottom_right)
    module = CombinerAttention(spec, **options)
    module.prefill_queries = 1  # every call runs the method, also a short chunk over cached keys
    return module


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max().clamp(min=1e-300)).item()


# ----------------------------------------------------------------------------------------------
# 1. Coverage: every allowed pair reached exactly once, from the layout's index tensors
# ----------------------------------------------------------------------------------------------


def coverage_count(layout, key_keep: torch.Tensor) -> torch.Tensor:
    """(Lq, Lk) number of times each pair is reached, as the kernel would compute it."""
    Lq, Lk = layout.len_q, layout.len_k
    members = torch.zeros(layout.num_regions, Lk, dtype=torch.bool)
    for first, keys in region_key_batches(layout):
        for n, row in enumerate(keys):
            row = row[row >= 0]
            assert row.unique().numel() == row.numel(), "a region lists a key twice"
            members[first + n, row] = True
    count = torch.zeros(Lq, Lk, dtype=torch.int64)
    for g in range(layout.num_groups):
        qs = layout.q_index[g][layout.q_index[g] >= 0]
        ks = layout.k_index[g][layout.k_index[g] >= 0]
        # direct pairs: the kernel applies key padding and the causal rule
        ok = key_keep[ks].view(1, -1).expand(len(qs), -1)
        if layout.causal:
            ok = ok & (ks.view(1, -1) <= qs.view(-1, 1) + layout.causal_offset)
        count[qs.view(-1, 1), ks.view(1, -1)] += ok.to(torch.int64)
        # summaries: a region reaches its real keys (a region with none is masked out)
        for r in layout.summary_region[g][layout.summary_region[g] >= 0]:
            count[qs] += (members[r] & key_keep).to(torch.int64)
    return count


@settings(max_examples=300, deadline=None)
@given(
    variant=st.sampled_from(VARIANTS),
    len_q=st.integers(1, 40),
    len_k=st.integers(1, 40),
    block=st.integers(1, 45),
    causal=st.booleans(),
    bottom_right=st.booleans(),
    padding_seed=st.one_of(st.none(), st.integers(0, 2**16)),
)
def test_every_allowed_pair_is_reached_exactly_once(variant, len_q, len_k, block, causal, bottom_right, padding_seed):
    offset = len_k - len_q if causal and bottom_right else 0
    layout = build_layout(variant, len_q, len_k, block, causal, offset)
    if padding_seed is None:
        key_keep = torch.ones(len_k, dtype=torch.bool)
    else:
        key_keep = torch.rand(len_k, generator=torch.Generator().manual_seed(padding_seed)) < 0.7
    allowed = key_keep.view(1, -1).expand(len_q, -1)
    if causal:
        allowed = allowed & (torch.arange(len_k).view(1, -1) <= torch.arange(len_q).view(-1, 1) + offset)
    count = coverage_count(layout, key_keep)
    assert torch.equal(count, allowed.to(torch.int64)), f"{layout}\ncount\n{count}\nallowed\n{allowed.int()}"
    # each query sits in exactly one slot, and query_slot finds it
    assert torch.equal(layout.q_index.view(-1)[layout.query_slot], torch.arange(len_q))
    assert (layout.q_index >= 0).sum() == len_q
    if variant == "logsparse":
        assert layout.summary_region.shape[1] <= 2 * math.log2(max(layout.num_blocks, 1)) + 2


# ----------------------------------------------------------------------------------------------
# 2. Exactness against a dense reference built from the definition
# ----------------------------------------------------------------------------------------------


def reference_regions(variant, len_q, len_k, block, causal, offset):
    """Per query: (direct key list, list of summary regions as tuples of key positions).

    Derived per query from the paper's rules, for queries whose key-space position is in [0, Lk).
    """
    if causal:
        positions = [i + offset for i in range(len_q)]
    elif len_q == len_k:
        positions = list(range(len_q))
    else:
        positions = [i * len_k // len_q for i in range(len_q)]
    n_blocks = -(-len_k // block)

    def keys_of_blocks(first, last):
        return tuple(j for j in range(first * block, min(last * block, len_k)))

    plan = []
    for p in positions:
        assert p < len_k
        if p < 0:  # a causal offset below -i (the layout of a site with a local window): no key
            plan.append(([], []))
            continue
        own = p // block
        direct = [j for j in keys_of_blocks(own, own + 1) if not causal or j <= p]
        if variant == "fixed":
            others = range(own) if causal else [r for r in range(n_blocks) if r != own]
            regions = [keys_of_blocks(r, r + 1) for r in others]
        elif variant == "axial":
            rows = range(own) if causal else [r for r in range(n_blocks) if r != own]
            regions = [tuple(r * block + c for r in rows if r * block + c < len_k) for c in range(block)]
        else:
            padded = 1 << math.ceil(math.log2(n_blocks))
            regions, start = [], 0
            for level in reversed(range(padded.bit_length())):  # prefix [0, own) by the bits of own
                if own >> level & 1:
                    regions.append(keys_of_blocks(start, start + (1 << level)))
                    start += 1 << level
            start = own + 1
            while not causal and start < padded:  # suffix (own, padded) in aligned dyadic spans
                width = start & -start
                regions.append(keys_of_blocks(start, start + width))
                start += width
        plan.append((direct, [r for r in regions if r]))
    return positions, plan


def reference_summary(q, k, v, keep, members, region, scale):
    """(summary key, summary value) of a region for one (b, q head), or None if it has no real key.

    q (Lq, D), k (Lk, D), v (Lk, Dv) of that batch row and head; `members` are the queries whose
    position falls in the region (padding queries already removed).
    """
    real = [j for j in region if keep[j]]
    if not real:
        return None
    pooled_q = q[members].amax(0) if members else torch.zeros(q.shape[1], dtype=q.dtype)
    p = torch.softmax(scale * k[real] @ pooled_q, 0)
    return k[real].amax(0), p @ v[real]


def reference_attention(q, k, v, key_keep, variant, block, causal, offset, extra_keys=None, band=None):
    """Dense float64 Combiner from the definition: one softmax over [direct logits; summary logits].

    extra_keys(b, i): more direct keys of query i in batch row b, under the same softmax (the
    sinks and local window of attnpass.methods.anchor). band (low, high): at a band site, query i
    keeps only direct keys i + low < j < i + high and the summaries of regions lying wholly there."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = D ** -0.5
    keep = torch.ones(B, Lk, dtype=torch.bool) if key_keep is None else key_keep
    positions, plan = reference_regions(variant, Lq, Lk, block, causal, offset)
    rows = []
    for b in range(B):
        for h in range(Hq):
            qh, kh, vh = q[b, h], k[b, h // (Hq // Hkv)], v[b, h // (Hq // Hkv)]
            summaries = {}
            per_query = []
            for i, (direct, regions) in enumerate(plan):
                if band is not None:
                    low, high = i + band[0], i + band[1]
                    direct = [j for j in direct if low < j < high]
                    regions = [r for r in regions if not r or (min(r) > low and max(r) < high)]
                for region in regions:
                    if region not in summaries:
                        members = [m for m in range(Lq) if positions[m] in region
                                   and (key_keep is None or Lq != Lk or keep[b, m])]
                        summaries[region] = reference_summary(qh, kh, vh, keep[b], members, region, scale)
                used = [summaries[r] for r in regions if summaries[r] is not None]
                direct = [j for j in direct if keep[b, j]] + (extra_keys(b, i) if extra_keys else [])
                keys = torch.cat([kh[direct]] + [s[0].view(1, -1) for s in used])
                values = torch.cat([vh[direct]] + [s[1].view(1, -1) for s in used])
                if keys.shape[0] == 0:
                    per_query.append(torch.zeros(v.shape[3], dtype=q.dtype))
                else:
                    per_query.append(torch.softmax(scale * keys @ qh[i], 0) @ values)
            rows.append(torch.stack(per_query))
    return torch.stack(rows).view(B, Hq, Lq, -1)


def key_padding(B, Lk, block):
    """Row 0 pads its tail; row 1 pads a whole block (a region with no real key) and a few more."""
    keep = torch.ones(B, Lk, dtype=torch.bool)
    keep[0, -3:] = False
    keep[1, block:2 * block] = False
    keep[1, 1] = False
    return keep


# (Lq, Lk, causal, bottom_right): self-attention both ways, cross-attention with Lq < Lk and
# Lq > Lk, and causal bottom-right with Lq < Lk (a decoder chunk over a longer cache).
SHAPES = [(13, 13, False, False), (13, 13, True, False), (9, 14, False, False), (17, 11, False, False),
          (7, 14, True, True)]


@pytest.mark.parametrize("offset", [-10, -2, 0])
def test_queries_by_position_with_queries_before_every_key(offset):
    """The table of the queries at each key position: a query whose position lies before the keys
    (a causal offset below -i) is in no row, down to none at all."""
    table = queries_by_position(3, 5, True, offset)
    expected = [[pos - offset] if 0 <= pos - offset < 3 else [-1] for pos in range(5)]  # query i at i + offset
    assert table.tolist() == expected


@pytest.mark.parametrize("variant,block", [("fixed", 4), ("axial", 4), ("logsparse", 3), ("logsparse", 2)])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"Lq{s[0]}-Lk{s[1]}-{'causal' if s[2] else 'bidir'}")
@pytest.mark.parametrize("padded", [False, True], ids=["no_padding", "key_padding"])
def test_matches_dense_reference_forward_and_backward(variant, block, shape, padded):
    Lq, Lk, causal, bottom_right = shape
    gen = torch.Generator().manual_seed(Lq * 100 + Lk)
    B, Hq, Hkv, D, Dv = 2, 4, 2, 5, 3
    q = torch.randn(B, Hq, Lq, D, dtype=F64, generator=gen, requires_grad=True)
    k = torch.randn(B, Hkv, Lk, D, dtype=F64, generator=gen, requires_grad=True)
    v = torch.randn(B, Hkv, Lk, Dv, dtype=F64, generator=gen, requires_grad=True)
    key_keep = key_padding(B, Lk, block) if padded else None
    module = site(causal, bottom_right, variant=variant, block=block)

    out = module(q, k, v, key_keep=key_keep)
    ref = reference_attention(q, k, v, key_keep, variant, block, causal, module.causal_offset(q, k))
    assert out.shape == ref.shape and out.dtype == F64
    assert rel_err(out, ref) <= 1e-10

    grad_out = torch.randn(out.shape, dtype=F64, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert rel_err(g, r) <= 1e-10, f"d{name}"


# ----------------------------------------------------------------------------------------------
# 3. gradcheck, 4. the one-region anchor
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(variant, causal):
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 2, 7, 3, dtype=F64, generator=gen, requires_grad=True)
    k = torch.randn(1, 1, 7, 3, dtype=F64, generator=gen, requires_grad=True)
    v = torch.randn(1, 1, 7, 2, dtype=F64, generator=gen, requires_grad=True)
    key_keep = torch.tensor([[True, True, False, True, True, True, False]])
    module = site(causal, variant=variant, block=2)
    assert torch.autograd.gradcheck(lambda q, k, v: module(q, k, v, key_keep=key_keep), (q, k, v))


# (Lq, Lk, causal, bottom_right), including causal calls whose queries fall outside the keys:
# bottom-right with Lq > Lk (the first queries see no key) and top-left with Lq > Lk (the last
# queries see every key).
ONE_REGION_SHAPES = [(11, 11, False, False), (6, 11, False, False), (11, 11, True, False), (6, 11, True, True),
                     (15, 11, True, True), (15, 11, True, False)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("block", [11, 50])
@pytest.mark.parametrize("shape", ONE_REGION_SHAPES, ids=str)
def test_one_region_is_dense_attention(variant, block, shape):
    Lq, Lk, causal, bottom_right = shape
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, Lq, 6, dtype=F64, generator=gen)
    k = torch.randn(2, 2, Lk, 6, dtype=F64, generator=gen)
    v = torch.randn(2, 2, Lk, 4, dtype=F64, generator=gen)
    key_keep = key_padding(2, Lk, 3)
    module = site(causal, bottom_right, variant=variant, block=block)
    out = module(q, k, v, key_keep=key_keep)
    dense = dense_attention_math(q, k, v, None, None, key_keep, 6 ** -0.5, causal, module.causal_offset(q, k), 0.0, 0)
    assert rel_err(out, dense) <= 1e-12


def test_combiner_is_not_dense_attention_with_several_regions():
    """The anchor above must not pass because summaries are ignored or exact: with several
    regions the result differs from dense attention."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 16, 4, dtype=F64, generator=gen) for _ in range(3))
    dense = dense_attention_math(q, k, v, None, None, None, 0.5, False, 0, 0.0, 0)
    for variant in VARIANTS:
        assert rel_err(site(variant=variant, block=4)(q, k, v), dense) > 1e-3


# ----------------------------------------------------------------------------------------------
# 5. No L x L tensor; fixed shares its summaries as a stride-0 view
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("causal", [False, True])
def test_no_square_tensor(variant, causal):
    L = 256
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, L, 4, generator=gen, requires_grad=True)
    k = torch.randn(1, 1, L, 4, generator=gen, requires_grad=True)
    v = torch.randn(1, 1, L, 4, generator=gen, requires_grad=True)
    key_keep = torch.ones(1, L, dtype=torch.bool)
    key_keep[0, -5:] = False
    module = site(causal, variant=variant, block=16)
    with no_square_tensor(L, L):
        out = module(q, k, v, key_keep=key_keep)
        out.sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None


def test_fixed_summaries_are_a_stride0_view():
    q, k, v = (torch.randn(1, 2, 64, 4) for _ in range(3))
    layout = build_layout("fixed", 64, 64, 8, False, 0)
    summary_k, summary_v, _ = region_summaries(q, k, v, None, layout, 0.5)
    assert summary_k.shape == (1, 2, 8, 8, 4) and summary_k.stride(2) == 0 and summary_v.stride(2) == 0


# ----------------------------------------------------------------------------------------------
# Dtypes, dropout, default block
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_low_precision_output_dtype_and_accuracy(dtype, tol, variant):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 30, 8, dtype=F64, generator=gen) for _ in range(3))
    module = site(True, variant=variant, block=5)
    exact = module(q, k, v)
    out = module(q.to(dtype), k.to(dtype), v.to(dtype))
    assert out.dtype == dtype
    assert rel_err(out.to(F64), exact) <= tol


def test_dropout_in_training_only_and_reproducible():
    q, k, v = (torch.randn(1, 2, 20, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    module = site(variant="fixed", block=4).eval()
    clean = module(q, k, v, dropout_p=0.5)
    assert torch.equal(clean, module(q, k, v))
    module.train()
    torch.manual_seed(5)
    first = module(q, k, v, dropout_p=0.5)
    torch.manual_seed(5)
    again = module(q, k, v, dropout_p=0.5)
    assert torch.equal(first, again) and not torch.allclose(first, clean)


def test_layout_cached_in_inference_mode_still_trains():
    module = site(True, variant="axial", block=3)
    q = torch.randn(1, 2, 10, 4)
    with torch.inference_mode():
        module(q, q, q)  # builds and caches this shape's layout
    q = q.clone().requires_grad_()
    module(q, q, q).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_default_block_comes_from_the_cost_model(monkeypatch):
    q, k, v = (torch.randn(1, 1, 30, 4, dtype=F64, generator=torch.Generator().manual_seed(i)) for i in range(3))
    expected = cost_model.default_block(30, 30, 4, "axial")
    assert torch.equal(site(variant="axial")(q, k, v), site(variant="axial", block=expected)(q, k, v))
    monkeypatch.setattr(cost_model, "default_block",
                        lambda len_q, len_k, head_dim, variant: 3 if (len_q, len_k, head_dim, variant) == (30, 30, 4, "axial") else 1)
    assert torch.equal(site(variant="axial")(q, k, v), site(variant="axial", block=3)(q, k, v))
    assert not torch.equal(site(variant="axial", block=3)(q, k, v), site(variant="axial", block=5)(q, k, v))


# ----------------------------------------------------------------------------------------------
# 6. Options and unsupported sites
# ----------------------------------------------------------------------------------------------


def test_registered_as_combiner():
    assert method_class("combiner") is CombinerAttention


@pytest.mark.parametrize("options,error,words", [
    ({"window": 4}, ValueError, ["window"]),
    ({"variant": "strided"}, ValueError, ["variant", "strided"]),
    ({"variant": None}, ValueError, ["variant", "None"]),
    ({"block": 0}, ValueError, ["block", "0"]),
    ({"block": -3}, ValueError, ["block", "-3"]),
    ({"block": True}, TypeError, ["block", "True"]),
    ({"block": "4"}, TypeError, ["block", "'4'"]),
    ({"block": 4.0}, TypeError, ["block", "4.0"]),
])
def test_bad_options_are_named(options, error, words):
    with pytest.raises(error) as info:
        CombinerAttention.validate_options(**options)
    assert all(w in str(info.value) for w in words), str(info.value)
    with pytest.raises(error):
        site(**options)


def test_good_options_accepted():
    for options in ({}, {"variant": "axial"}, {"variant": "logsparse", "block": 1}, {"block": None}):
        CombinerAttention.validate_options(**options)
    assert site(variant="logsparse", block=7).block == 7


@pytest.mark.parametrize("has_bias,has_mask", [(True, False), (False, True), (True, True)])
def test_bias_or_mask_sites_are_declined(has_bias, has_mask):
    spec = SiteSpec("s", None, has_bias=has_bias, has_mask=has_mask)
    reason = CombinerAttention.unsupported_reason(spec, variant="fixed")
    assert reason and "routing" in reason
    assert ("bias" in reason) == has_bias and ("mask" in reason) == has_mask
    assert CombinerAttention.unsupported_reason(SiteSpec("s", None, causal=True, cross=True)) is None


def test_forward_rejects_bias_tensor():
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(ValueError, match="bias or mask"):
        site(block=2)(q, q, q, bias=torch.zeros(4, 4))


@pytest.mark.parametrize("options", [{}, {"block": 10}, {"sinks": 2, "local": 64}], ids=["default-block", "block", "anchor"])
def test_a_causal_site_exports_with_a_symbolic_length_and_equals_eager(options):
    """The fixed layout is tensor code of the lengths (the default block, ~sqrt(L), an unbacked int):
    torch.export keeps L symbolic, and the exported program equals the eager module at lengths other
    than the example's (block and block count differ there)."""
    module = CombinerAttention(SiteSpec("s", None, causal=True, heads_q=4, heads_kv=2, head_dim=16), **options).eval()

    class Call(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.site = module

        def forward(self, q, k, v):
            torch._check(q.shape[2] == k.shape[2])  # one sequence, as in a model (here three inputs)
            return self.site(q, k, v)

    def qkv(length):
        g = torch.Generator().manual_seed(length)
        return (torch.randn(1, 4, length, 16, generator=g), torch.randn(1, 2, length, 16, generator=g),
                torch.randn(1, 2, length, 16, generator=g))

    length = torch.export.Dim("L", min=65, max=8192)
    program = torch.export.export(Call(), qkv(200), dynamic_shapes=({2: length}, {2: length}, {2: length}))
    with torch.no_grad():
        for n in (68, 333, 1000):
            assert torch.equal(program.module()(*qkv(n)), module(*qkv(n))), n
    assert cost_model.default_block(1000, 1000, 16) != cost_model.default_block(200, 200, 16)
