"""Tests for attnpass.lowering.torch.grouped_attention (grouped / block-sparse attention kernel)."""
from __future__ import annotations

import math

import entmax
import pytest
import torch

from attnpass.lowering.torch import grouped_attention as ga
from attnpass.lowering.torch.grouped_attention import grouped_attention, scatter_slots
from memory_probe import no_square_tensor

F64 = torch.float64
TENSOR_ARGS = ("q", "k", "v", "q_index", "k_index", "key_padding_mask", "bias", "summary_k",
               "summary_v", "summary_mask")


# ----------------------------------------------------------------------------------------------
# Problem construction
# ----------------------------------------------------------------------------------------------


def make_q_index(B, H, L, G, W, gen):
    """Per (b, h): one token in no group, two tokens in two groups each, the rest once, -1 padding.

    Slots are filled in order (so tokens rest[0], rest[1] sit in group 0 and again in the last
    group), then the slots within each group and the group order are shuffled.
    """
    out = torch.full((B, H, G * W), -1, dtype=torch.int64)
    for b in range(B):
        for h in range(H):
            perm = torch.randperm(L, generator=gen)
            rest = perm[1:]  # perm[0] is in no group
            tokens = torch.cat([rest, rest[:2]])
            assert tokens.numel() <= G * W and W > 2
            out[b, h, : tokens.numel()] = tokens
    out = out.view(B, H, G, W)
    slot_perm = torch.argsort(torch.rand(B, H, G, W, generator=gen), dim=-1)
    out = out.gather(-1, slot_perm)
    group_perm = torch.argsort(torch.rand(B, H, G, generator=gen), dim=-1)
    return out.gather(2, group_perm.unsqueeze(-1).expand(B, H, G, W)).contiguous()


def make_k_index(B, H, L, G, W, gen):
    """Random distinct keys per group (W-2 to W of them), -1 padding at random slots."""
    out = torch.full((B, H, G, W), -1, dtype=torch.int64)
    for b in range(B):
        for h in range(H):
            for g in range(G):
                n = int(torch.randint(W - 2, W + 1, (), generator=gen))
                keys = torch.randperm(L, generator=gen)[:n]
                slots = torch.randperm(W, generator=gen)[:n]
                out[b, h, g, slots] = keys
    return out


def make_case(*, normalizer="softmax", B=2, Hq=4, Hkv=2, Lq=11, Lk=13, D=5, Dv=3, G=3, Wq=5, Wk=6,
              S=2, causal=False, causal_offset=0, padding=True, bias="full", summaries="full",
              summary_mask="full", pair_mask=None, key_range=False, empty_group=True, dtype=F64, seed=0):
    """Inputs (dict of leaves + kwargs) for one configuration; every float tensor requires grad."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).to(dtype).requires_grad_()

    leaves = dict(q=randn(B, Hq, Lq, D), k=randn(B, Hkv, Lk, D), v=randn(B, Hkv, Lk, Dv))
    q_index = make_q_index(B, Hq, Lq, G, Wq, gen)
    k_index = make_k_index(B, Hq, Lk, G, Wk, gen)
    if empty_group:
        k_index[0, 0, 0] = -1  # group 0 of (b=0, h=0) has no direct keys
    kwargs = dict(scale=0.7, causal=causal, causal_offset=causal_offset, normalizer=normalizer)
    if padding:
        kpm = torch.ones(B, Lk, dtype=torch.bool)
        kpm[0, -3:] = False
        kpm[-1, :2] = False
        kwargs["key_padding_mask"] = kpm
    if bias == "full":
        leaves["bias"] = randn(B, Hq, Lq, Lk)
    elif bias == "broadcast":  # per-head key-position bias, broadcast over batch and queries
        leaves["bias"] = randn(Hq, 1, Lk)
    if pair_mask == "full":
        kwargs["pair_mask"] = torch.rand(B, Hq, Lq, Lk, generator=gen) < 0.8
    elif pair_mask == "broadcast":  # one banded pattern for all batches and heads
        kwargs["pair_mask"] = (torch.arange(Lk)[None, :] - torch.arange(Lq)[:, None]).abs() <= Lk // 3
    if key_range:  # a random window [low, high] of key positions per query slot
        low = torch.randint(-1, Lk, (B, Hq, G, Wq), generator=gen)
        high = low + torch.randint(0, Lk // 2, (B, Hq, G, Wq), generator=gen)
        kwargs["key_range"] = torch.stack([low, high], dim=-1)
    if summaries is not None:
        if summaries == "full":
            leaves["summary_k"], leaves["summary_v"] = randn(B, Hq, G, S, D), randn(B, Hq, G, S, Dv)
        else:  # "expanded": shared over groups, as callers pass stride-0 views of (B, Hq, S, D)
            leaves["summary_k_base"], leaves["summary_v_base"] = randn(B, Hq, S, D), randn(B, Hq, S, Dv)
        if summary_mask == "full":
            mask = torch.rand(B, Hq, G, Wq, S, generator=gen) < 0.7
        else:  # broadcast over batch and query slots
            mask = torch.rand(1, Hq, G, 1, S, generator=gen) < 0.7
            mask = mask.expand(B, Hq, G, Wq, S).clone()
        if empty_group:
            mask[0, 0, 0] = False  # ... and no summaries either: empty rows
        kwargs["summary_mask"] = mask if summary_mask == "full" else mask[:1, :, :, :1]
    return dict(leaves=leaves, q_index=q_index, k_index=k_index, kwargs=kwargs)


def call_args(case):
    """(tensors, kwargs) for grouped_attention, building expanded summary views from the leaves."""
    leaves, kwargs = case["leaves"], dict(case["kwargs"])
    B, Hq, G = case["q_index"].shape[:3]
    for name in ("bias", "summary_k", "summary_v"):
        if name in leaves:
            kwargs[name] = leaves[name]
        elif name + "_base" in leaves:
            base = leaves[name + "_base"]
            kwargs[name] = base.unsqueeze(2).expand(B, Hq, G, *base.shape[2:])
    return (leaves["q"], leaves["k"], leaves["v"], case["q_index"], case["k_index"]), kwargs


# ----------------------------------------------------------------------------------------------
# Dense reference: full Lq x Lk scores, masked to exactly the pairs each group defines
# ----------------------------------------------------------------------------------------------


def dense_reference(q, k, v, q_index, k_index, *, scale, causal=False, causal_offset=0,
                    key_padding_mask=None, bias=None, summary_k=None, summary_v=None,
                    summary_mask=None, pair_mask=None, key_range=None, normalizer="softmax", **_):
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G, Wq = q_index.shape[2:]
    kk, vv = k.repeat_interleave(Hq // Hkv, dim=1), v.repeat_interleave(Hq // Hkv, dim=1)
    logits = scale * q @ kk.transpose(-1, -2)
    if bias is not None:
        logits = logits + bias
    base = torch.ones(B, Hq, Lq, Lk, dtype=torch.bool)
    if causal:
        base &= torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + causal_offset
    if key_padding_mask is not None:
        base &= key_padding_mask[:, None, None, :]
    if pair_mask is not None:
        base &= pair_mask
    outs, stats, nonempties = [], [], []
    for g in range(G):
        k_idx = k_index[:, :, g]
        in_group = (torch.nn.functional.one_hot(k_idx.clamp(min=0), Lk) * (k_idx >= 0)[..., None]).sum(-2) > 0
        rows = q_index[:, :, g].clamp(min=0)
        z = logits.gather(2, rows[..., None].expand(-1, -1, -1, Lk))
        m = (base & in_group[:, :, None, :]).gather(2, rows[..., None].expand(-1, -1, -1, Lk))
        if key_range is not None:
            low, high = key_range[:, :, g, :, 0:1], key_range[:, :, g, :, 1:2]
            m = m & (torch.arange(Lk) >= low) & (torch.arange(Lk) <= high)
        values = [vv]
        if summary_k is not None:
            q_rows = q.gather(2, rows[..., None].expand(-1, -1, -1, D))
            z = torch.cat([z, scale * q_rows @ summary_k[:, :, g].transpose(-1, -2)], dim=-1)
            s_mask = torch.ones(B, Hq, Wq, summary_k.shape[3], dtype=torch.bool)
            if summary_mask is not None:
                s_mask = s_mask & summary_mask.expand(B, Hq, G, Wq, -1)[:, :, g]
            m = torch.cat([m, s_mask], dim=-1)
            values.append(summary_v[:, :, g])
        m = m & (q_index[:, :, g] >= 0)[..., None]
        nonempty = m.any(-1)
        z = torch.where(nonempty[..., None], z.masked_fill(~m, -math.inf), 0.0)  # no NaN on empty rows
        if normalizer == "softmax":
            p = torch.softmax(z, dim=-1)
            stat = torch.logsumexp(z, dim=-1)
        else:
            p = entmax.entmax15(z, dim=-1)
            support = p > 0  # on the support p = (z/2 - tau)^2, so tau = z/2 - sqrt(p)
            tau_each = z / 2 - torch.sqrt(torch.where(support, p, 1.0))
            stat = torch.where(support, tau_each, 0.0).sum(-1) / support.sum(-1).clamp(min=1)
        p = p * nonempty[..., None]
        out = p[..., :Lk] @ vv
        if summary_k is not None:
            out = out + p[..., Lk:] @ values[1]
        outs.append(out)
        stats.append(torch.where(nonempty, stat, 0.0))
        nonempties.append(nonempty)
    return torch.stack(outs, 2), torch.stack(stats, 2), torch.stack(nonempties, 2)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-300)).item()


def grads_of(case, out, stat, g_out, g_stat):
    leaves = case["leaves"]
    names = list(leaves)
    grads = torch.autograd.grad((out * g_out).sum() + (stat * g_stat).sum(), [leaves[n] for n in names])
    return dict(zip(names, grads))


# ----------------------------------------------------------------------------------------------
# 1. Exactness against the dense reference (float64)
# ----------------------------------------------------------------------------------------------

CONFIGS = {
    # cross-attention, GQA, key padding, full bias, per-group summaries with a per-slot mask
    "cross_full": dict(pair_mask="full"),
    # causal self-attention, broadcast bias (its gradient must be reduced), expanded summaries,
    # broadcast summary mask, multi-head (Hq == Hkv), one group per chunk
    "causal_self": dict(causal=True, Lq=12, Lk=12, Hkv=4, bias="broadcast", summaries="expanded",
                        summary_mask="broadcast", pair_mask="broadcast", chunk=1),
    # causal with an offset (decoder over a longer key sequence), no summaries, chunked
    "causal_offset_cross": dict(causal=True, causal_offset=2, bias="full", summaries=None, chunk=200),
    # per-query key windows over the group's keys, with summaries (which the windows do not limit)
    "key_range": dict(key_range=True, Lq=12, Lk=12, chunk=300),
    # causal with a negative offset (strictly-past keys): more empty rows, no bias
    "causal_negative_offset": dict(causal=True, causal_offset=-1, Lq=12, Lk=12, bias=None, padding=False),
}


@pytest.mark.parametrize("normalizer", ga.NORMALIZERS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_dense_reference(config, normalizer, monkeypatch):
    opts = dict(CONFIGS[config])
    chunk = opts.pop("chunk", None)
    if chunk is not None:  # force several chunks of groups (chunk=1 -> one group per chunk)
        monkeypatch.setattr(ga, "_CHUNK_ELEMENTS", chunk)
    case = make_case(normalizer=normalizer, **opts)
    args, kwargs = call_args(case)
    out, stat = grouped_attention(*args, **kwargs)
    ref_out, ref_stat, nonempty = dense_reference(*args, **kwargs)

    assert out.dtype == F64 and out.shape == ref_out.shape
    assert torch.isfinite(out).all() and torch.isfinite(stat).all()
    assert rel_err(out, ref_out) <= 1e-10
    assert rel_err(stat, ref_stat) <= 1e-10
    # Empty query slots and rows with nothing allowed are exactly zero (and there are some).
    assert (~nonempty).any()
    assert (out[~nonempty] == 0).all() and (stat[~nonempty] == 0).all()
    if case["kwargs"].get("summary_mask") is not None and config != "causal_negative_offset":
        assert not nonempty[0, 0, 0].any()  # the group with no keys and no summaries

    gen = torch.Generator().manual_seed(1)
    g_out = torch.randn(out.shape, generator=gen, dtype=F64)
    g_stat = torch.randn(stat.shape, generator=gen, dtype=F64)
    got = grads_of(case, out, stat, g_out, g_stat)
    want = grads_of(case, ref_out, ref_stat, g_out, g_stat)
    for name in want:
        assert want[name].abs().max() > 0, name
        assert got[name].shape == want[name].shape, name
        assert rel_err(got[name], want[name]) <= 1e-10, name


def test_entmax_has_exact_zeros():
    case = make_case(normalizer="entmax15", summaries=None, bias=None, empty_group=False, Wk=6)
    args, kwargs = call_args(case)
    # With one-hot values per key, the output slot *is* the probability row.
    Lk = args[1].shape[2]
    v = torch.eye(Lk, dtype=F64).expand(2, 2, Lk, Lk)
    out, tau = grouped_attention(args[0], args[1], v, *args[3:], **kwargs)
    row_sums = out.sum(-1)
    nonempty = row_sums > 0
    assert torch.allclose(row_sums[nonempty], torch.ones((), dtype=F64), atol=1e-12)
    probs = out[nonempty]
    # Sparse: some allowed keys get exactly zero probability.
    assert (probs == 0).sum() > (probs.shape[0] * (Lk - 6))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_flushed_exp_is_exp_above_the_floor_and_exact_zero_below(dtype):
    from attnpass.lowering.torch.row_normalizers import _DEFAULT_EXP_FLOOR, _EXP_FLOOR, flushed_exp_
    floor = _EXP_FLOOR.get(dtype, _DEFAULT_EXP_FLOOR)
    x = torch.tensor([0.0, -1.5, -30.0, floor + 1.5, floor + 0.5, floor - 5.0, -1e30, -math.inf], dtype=dtype)
    got = flushed_exp_(x.clone())
    assert torch.equal(got[:4], torch.exp(x[:4]))  # bit-identical where kept
    assert (got[4:] == 0).all()  # at most exp(floor + 1), -1e30 and -inf: exactly 0
    # under autograd (out of place): the same values, and exp's gradient where kept, 0 where flushed
    leaf = x.clone().requires_grad_()
    recorded = flushed_exp_(leaf * 1.0)
    assert torch.equal(recorded.detach(), got)
    recorded.sum().backward()
    assert torch.equal(leaf.grad, got)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_softmax_with_finfo_min_bias_and_wide_spread_matches_dense(dtype):
    """Additive finfo.min masks (as Hugging Face builds them) and logits far below the row maximum
    take exp's slow path unless flushed; the result must still be dense attention's."""
    case = make_case(summaries=None, bias="full", padding=False, empty_group=False, dtype=dtype)
    args, kwargs = call_args(case)
    bias = kwargs["bias"].detach().clone()
    gen = torch.Generator().manual_seed(3)
    bias[torch.rand(bias.shape, generator=gen) < 0.3] = torch.finfo(dtype).min
    bias[..., 1] -= 200.0  # one key far below every row's maximum
    kwargs["bias"] = bias
    out, stat = grouped_attention(*args, **kwargs)
    ref_out, ref_stat, nonempty = dense_reference(*args, **kwargs)
    assert torch.isfinite(out).all() and torch.isfinite(stat).all()
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert rel_err(out, ref_out) <= tol and rel_err(stat, ref_stat) <= tol
    # with one-hot values the outputs are the probabilities: exact zeros exactly where dense has them
    # (the finfo.min pairs, and in float32 the key 200 below, whose exp underflows there too)
    Lk = args[1].shape[2]
    eye = torch.eye(Lk, dtype=dtype).expand(args[1].shape[0], args[1].shape[1], Lk, Lk)
    probs, _ = grouped_attention(args[0], args[1], eye, *args[3:], **kwargs)
    ref_probs, _, _ = dense_reference(args[0], args[1], eye, *args[3:], **kwargs)
    assert torch.equal(probs == 0, ref_probs == 0)
    assert (probs == 0).sum() > (ref_probs.numel() // 4)


def test_scatter_slots_mean_over_groups():
    case = make_case(summaries=None, bias=None)
    args, kwargs = call_args(case)
    q_index = args[3]
    out_slots, _ = grouped_attention(*args, **kwargs)
    Lq = args[0].shape[2]
    out, count = scatter_slots(out_slots, q_index, Lq)
    assert out.shape == (*q_index.shape[:2], Lq, out_slots.shape[-1]) and count.dtype == torch.int64

    B, H, G, W = q_index.shape
    want = torch.zeros_like(out)
    want_count = torch.zeros(count.shape, dtype=torch.int64)
    for b in range(B):
        for h in range(H):
            for g in range(G):
                for w in range(W):
                    i = int(q_index[b, h, g, w])
                    if i >= 0:
                        want[b, h, i] += out_slots[b, h, g, w]
                        want_count[b, h, i] += 1
    want = want / want_count.clamp(min=1)[..., None]
    assert torch.equal(count, want_count)
    assert (count == 2).sum() == 2 * B * H and (count == 0).sum() == B * H  # by construction
    assert torch.allclose(out, want, rtol=0, atol=1e-14)
    assert (out[count == 0] == 0).all()

    slots = torch.randn(B, H, G, W, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: scatter_slots(s, q_index, Lq)[0], (slots,))


# ----------------------------------------------------------------------------------------------
# 2. gradcheck (float64, small)
# ----------------------------------------------------------------------------------------------


def small_case(normalizer, **overrides):
    opts = dict(normalizer=normalizer, B=1, Hq=2, Hkv=1, Lq=5, Lk=6, D=3, Dv=2, G=2, Wq=4, Wk=4,
                S=2, causal=True, causal_offset=1, seed=3)
    opts.update(overrides)
    return make_case(**opts)


def gradcheck_case(case, **extra):
    args, kwargs = call_args(case)
    kwargs.update(extra)
    leaves = case["leaves"]
    names = list(leaves)

    def fn(*tensors):
        sub = dict(case, leaves=dict(zip(names, tensors)))
        a, kw = call_args(sub)
        kw.update(extra)
        return grouped_attention(*a, **kw)

    return torch.autograd.gradcheck(fn, tuple(leaves[n] for n in names), atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("normalizer", ga.NORMALIZERS)
def test_gradcheck(normalizer, monkeypatch):
    monkeypatch.setattr(ga, "_CHUNK_ELEMENTS", 1)  # two chunks: exercises the scatter across chunks
    assert gradcheck_case(small_case(normalizer))
    assert gradcheck_case(small_case(normalizer, summaries="expanded", bias="broadcast", causal=False))


# ----------------------------------------------------------------------------------------------
# 3. bf16
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalizer", ga.NORMALIZERS)
def test_bf16_matches_fp32(normalizer):
    case = make_case(normalizer=normalizer, B=2, Hq=4, Hkv=2, Lq=64, Lk=64, D=32, Dv=32, G=4, Wq=17,
                     Wk=16, S=4, causal=True, dtype=torch.float32)
    args, kwargs = call_args(case)
    kwargs["scale"] = 32 ** -0.5

    def cast(t, dtype):
        return t.detach().to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t

    def run(dtype, via=None):
        a = [cast(cast(t, via or dtype), dtype) for t in args]
        kw = {k: cast(cast(v, via or dtype), dtype) for k, v in kwargs.items()}
        with torch.no_grad():
            return grouped_attention(*a, **kw)

    out16, stat16 = run(torch.bfloat16)
    assert out16.dtype == torch.bfloat16 and stat16.dtype == torch.float32
    assert torch.isfinite(out16).all()
    # Against fp32 on the same (bf16-representable) inputs: only the kernel's arithmetic differs.
    out32, stat32 = run(torch.float32, via=torch.bfloat16)
    assert rel_err(out16.float(), out32) <= 1e-2
    assert rel_err(stat16, stat32) <= 1e-4  # the row statistic is accumulated in float32
    # Against the fp32 result on the original inputs: includes input quantisation.
    out32, _ = run(torch.float32)
    assert rel_err(out16.float(), out32) <= 1e-2


# ----------------------------------------------------------------------------------------------
# 4. Dropout
# ----------------------------------------------------------------------------------------------


def one_hot_value_case(normalizer, p, seed):
    """Run with one-hot values (direct keys then summaries), so each output slot is its (dropped)
    probability row over Lk + S columns."""
    case = make_case(normalizer=normalizer, bias="full", empty_group=False)
    args, kwargs = call_args(case)
    q, k, _, q_index, k_index = args
    B, Hq, G, Wq = q_index.shape
    Hkv, Lk, S = k.shape[1], k.shape[2], kwargs["summary_k"].shape[3]
    eye = torch.eye(Lk + S, dtype=F64)
    v = eye[:Lk].expand(B, Hkv, Lk, Lk + S)
    summary_v = eye[Lk:].expand(B, Hq, G, S, Lk + S)
    kwargs = dict(kwargs, summary_v=summary_v)
    return grouped_attention(q, k, v, q_index, k_index, dropout_p=p, dropout_seed=seed, **kwargs)[0]


@pytest.mark.parametrize("normalizer", ga.NORMALIZERS)
def test_dropout_is_inverted_dropout_on_probabilities(normalizer):
    p = 0.3
    clean = one_hot_value_case(normalizer, 0.0, None).detach()
    dropped = one_hot_value_case(normalizer, p, 1234).detach()
    nonzero = clean > 0
    kept = dropped[nonzero] != 0
    # Every probability is either dropped to 0 or scaled by exactly 1 / (1 - p) ...
    assert (dropped[~nonzero] == 0).all()
    assert torch.allclose(dropped[nonzero][kept], clean[nonzero][kept] / (1 - p), rtol=1e-13, atol=0)
    # ... and about a fraction p of them is dropped (n ~ 700 pairs: 5 sigma ~ 0.09).
    frac = 1 - kept.double().mean().item()
    assert abs(frac - p) < 0.09, frac
    # Summary columns are dropped too.
    Lk = clean.shape[-1] - 2  # one-hot columns: Lk keys then S = 2 summaries
    assert (dropped[..., Lk:][clean[..., Lk:] > 0] == 0).any()


@pytest.mark.parametrize("normalizer", ga.NORMALIZERS)
def test_dropout_expectation_is_clean_output(normalizer):
    case = make_case(normalizer=normalizer, summaries="full")
    args, kwargs = call_args(case)
    with torch.no_grad():
        clean = grouped_attention(*args, **kwargs)[0]
        runs = torch.stack([grouped_attention(*args, **kwargs, dropout_p=0.2, dropout_seed=s)[0]
                            for s in range(400)])
    mean = runs.mean(0)
    single = rel_err(runs[0], clean)
    assert single > 0.1  # one run is visibly perturbed ...
    assert rel_err(mean, clean) < 0.1 * single  # ... the average over seeds converges to the clean output


def test_dropout_seed_determinism():
    case = make_case(normalizer="softmax")
    args, kwargs = call_args(case)
    with torch.no_grad():
        a = grouped_attention(*args, **kwargs, dropout_p=0.5, dropout_seed=7)
        b = grouped_attention(*args, **kwargs, dropout_p=0.5, dropout_seed=7)
        c = grouped_attention(*args, **kwargs, dropout_p=0.5, dropout_seed=8)
        big = grouped_attention(*args, **kwargs, dropout_p=0.5, dropout_seed=7 + 2**40)  # high bits count
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], big[0])
        assert torch.equal(a[1], c[1])  # row_stat is computed before dropout
        # The mask does not depend on how groups are chunked.
        ga_chunk, ga._CHUNK_ELEMENTS = ga._CHUNK_ELEMENTS, 1
        try:
            chunked = grouped_attention(*args, **kwargs, dropout_p=0.5, dropout_seed=7)
        finally:
            ga._CHUNK_ELEMENTS = ga_chunk
        assert torch.equal(a[0], chunked[0])
        # seed=None draws from torch's global RNG: reproducible under torch.manual_seed.
        torch.manual_seed(0)
        d = grouped_attention(*args, **kwargs, dropout_p=0.5)
        torch.manual_seed(0)
        e = grouped_attention(*args, **kwargs, dropout_p=0.5)
        f = grouped_attention(*args, **kwargs, dropout_p=0.5)
        assert torch.equal(d[0], e[0]) and not torch.equal(e[0], f[0])


@pytest.mark.parametrize("normalizer", ga.NORMALIZERS)
def test_dropout_gradcheck(normalizer):
    assert gradcheck_case(small_case(normalizer), dropout_p=0.3, dropout_seed=99)


# ----------------------------------------------------------------------------------------------
# 5. Memory: nothing Lq x Lk, forward or backward
# ----------------------------------------------------------------------------------------------


def memory_case(normalizer, L=1024, W=32, Hq=2, D=16, S=4):
    gen = torch.Generator().manual_seed(0)
    G = L // W
    q = torch.randn(1, Hq, L, D, generator=gen, requires_grad=True)
    k = torch.randn(1, 1, L, D, generator=gen, requires_grad=True)
    v = torch.randn(1, 1, L, D, generator=gen, requires_grad=True)
    index = torch.stack([torch.randperm(L, generator=gen) for _ in range(Hq)]).view(1, Hq, G, W)
    sk_base = torch.randn(1, Hq, S, D, generator=gen, requires_grad=True)
    sv_base = torch.randn(1, Hq, S, D, generator=gen, requires_grad=True)
    kwargs = dict(
        scale=D ** -0.5, causal=True, normalizer=normalizer, dropout_p=0.1, dropout_seed=5,
        key_padding_mask=torch.rand(1, L, generator=gen) > 0.1,
        bias=torch.randn(1, Hq, 1, L, generator=gen, requires_grad=True),
        summary_k=sk_base.unsqueeze(2).expand(1, Hq, G, S, D),
        summary_v=sv_base.unsqueeze(2).expand(1, Hq, G, S, D),
        summary_mask=torch.rand(1, Hq, G, W, S, generator=gen) > 0.5,
    )
    return (q, k, v, index, index), kwargs


def test_memory_probe_catches_dense_attention():
    (q, k, *_), _ = memory_case("softmax")
    with pytest.raises(AssertionError, match="quadratic"):
        with no_square_tensor(1024, 1024):
            q @ k.transpose(-1, -2)


@pytest.mark.parametrize("normalizer", ga.NORMALIZERS)
def test_no_square_tensor_forward_backward(normalizer):
    args, kwargs = memory_case(normalizer)
    q_index = args[3]
    B, Hq, G, W = q_index.shape
    tile = B * Hq * G * W * W  # the logits of all groups (they fit one chunk at this size)
    with torch.no_grad():
        # The custom op hides its internals from dispatch modes, so run the kernel bodies directly.
        with no_square_tensor(1024, 1024) as probe:
            out, stat = ga.forward_torch(*args, **kwargs)
            g_out, g_stat = torch.randn_like(out), torch.randn_like(stat)
            grads = ga.backward_torch(g_out, g_stat, stat, *args, **kwargs, bias_grad=True, summary_grad=True)
        assert probe.numel >= tile  # the probe did see the tiles (it is not blind to the internals)
        assert all(g.numel() > 0 for g in grads)
        # A caller-provided Lq x Lk bias is only gathered from in the forward pass.
        full_bias = torch.randn(B, Hq, 1024, 1024)
        with no_square_tensor(1024, 1024):
            ga.forward_torch(*args, **dict(kwargs, bias=full_bias))
    # End to end through the op and autograd as well.
    with no_square_tensor(1024, 1024):
        out, stat = grouped_attention(*args, **kwargs)
        (out.sum() + stat.sum()).backward()
    assert args[0].grad is not None and kwargs["bias"].grad.shape == kwargs["bias"].shape


# ----------------------------------------------------------------------------------------------
# 6. torch.export and opcheck
# ----------------------------------------------------------------------------------------------


class Tiny(torch.nn.Module):
    def forward(self, q, k, v, q_index, k_index, bias, summary_k, summary_v):
        out, _ = grouped_attention(q, k, v, q_index, k_index, scale=0.5, causal=True, bias=bias,
                                   summary_k=summary_k, summary_v=summary_v, normalizer="entmax15")
        return scatter_slots(out, q_index, q.shape[2])[0]


def test_torch_export_single_node():
    case = make_case(dtype=torch.float32, padding=False)
    args, kwargs = call_args(case)
    inputs = tuple(t.detach() for t in args) + tuple(kwargs[n].detach() for n in ("bias", "summary_k", "summary_v"))
    ep = torch.export.export(Tiny(), inputs)
    nodes = [n for n in ep.graph.nodes if n.op == "call_function"
             and n.target is torch.ops.attnpass.grouped_attention.default]
    assert len(nodes) == 1
    assert not any("grouped_attention_backward" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(*inputs), Tiny()(*inputs))


def opcheck_samples():
    full = make_case(seed=4)
    args, kwargs = call_args(full)
    yield args, kwargs
    args, kwargs = call_args(make_case(normalizer="entmax15", summaries="expanded", bias="broadcast", seed=5))
    yield args, dict(kwargs, dropout_p=0.25, dropout_seed=11, causal=True, causal_offset=-1)
    args, kwargs = call_args(make_case(bias=None, summaries=None, padding=False, dtype=torch.float32, seed=6))
    yield args, kwargs


def test_opcheck():
    for args, kwargs in opcheck_samples():
        torch.library.opcheck(torch.ops.attnpass.grouped_attention.default, args, kwargs)


def test_opcheck_backward_op():
    args, kwargs = call_args(make_case(normalizer="entmax15", seed=7))
    out, stat = grouped_attention(*args, **kwargs)
    tensors = [a.detach() if torch.is_tensor(a) else a for a in args]
    tensors += [kwargs.pop(n, None) for n in TENSOR_ARGS[5:]]
    tensors = [t.detach() if torch.is_tensor(t) else t for t in tensors]
    torch.library.opcheck(
        torch.ops.attnpass.grouped_attention_backward.default,
        (torch.randn_like(out), torch.randn_like(stat), stat.detach(), *tensors),
        dict(kwargs, bias_grad=True, summary_grad=True),
    )


# ----------------------------------------------------------------------------------------------
# 7. Input validation
# ----------------------------------------------------------------------------------------------


def _bad(**changes):
    def apply(args, kwargs):
        args = dict(zip(("q", "k", "v", "q_index", "k_index"), args))
        for name, fn in changes.items():
            if name in args:
                args[name] = fn(args[name])
            else:
                kwargs[name] = fn(kwargs.get(name))
        return tuple(args.values()), kwargs

    return apply


BAD_INPUTS = {
    "heads": (_bad(k=lambda k: torch.cat([k, k[:, :1]], 1), v=lambda v: torch.cat([v, v[:, :1]], 1)), ValueError, "multiple of key/value heads"),
    "index_dtype": (_bad(q_index=lambda i: i.int()), TypeError, "q_index must be int64"),
    "index_groups": (_bad(k_index=lambda i: i[:, :, :2]), ValueError, "G=3 groups but k_index has 2"),
    "index_shape": (_bad(q_index=lambda i: i[:, :1]), ValueError, "q_index must be"),
    "head_dim": (_bad(k=lambda k: k[..., :4]), ValueError, "head dims differ"),
    "kv_length": (_bad(v=lambda v: v[:, :, :5]), ValueError, "disagree on Hkv or Lk"),
    "qkv_dtype": (_bad(v=lambda v: v.float()), TypeError, "share a dtype"),
    "normalizer": (_bad(normalizer=lambda _: "sparsemax"), ValueError, "unknown normalizer 'sparsemax'"),
    "dropout_high": (_bad(dropout_p=lambda _: 1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    "dropout_negative": (_bad(dropout_p=lambda _: -0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
    "padding_dtype": (_bad(key_padding_mask=lambda m: m.float()), TypeError, "key_padding_mask must be bool"),
    "padding_shape": (_bad(key_padding_mask=lambda m: m[:, :5]), ValueError, "key_padding_mask must be"),
    "bias_shape": (_bad(bias=lambda b: b[..., :5]), ValueError, "bias shape .* not broadcastable"),
    "key_range_shape": (_bad(key_range=lambda _: torch.zeros(2, 4, 3, 5, 3, dtype=torch.int64)), ValueError, "key_range must be"),
    "key_range_dtype": (_bad(key_range=lambda _: torch.zeros(2, 4, 3, 5, 2)), TypeError, "key_range must be int64"),
    "pair_mask_dtype": (_bad(pair_mask=lambda _: torch.ones(11, 13)), TypeError, "pair_mask must be bool"),
    "summary_pair": (_bad(summary_v=lambda _: None), ValueError, "given together"),
    "summary_shape": (_bad(summary_k=lambda s: s[..., :4]), ValueError, "summary_k must be"),
    "summary_v_shape": (_bad(summary_v=lambda s: s[:, :, :, :1]), ValueError, "summary_v must be"),
    "summary_mask_shape": (_bad(summary_mask=lambda m: m[..., :1, :, :].expand(2, 4, 1, 5, 2)[:, :, :, :3]),
                           ValueError, "summary_mask shape"),
    "summary_mask_dtype": (_bad(summary_mask=lambda m: m.int()), TypeError, "summary_mask must be bool"),
}


@pytest.mark.parametrize("problem", list(BAD_INPUTS))
def test_clear_errors(problem):
    change, error, message = BAD_INPUTS[problem]
    args, kwargs = call_args(make_case())
    args, kwargs = change(args, dict(kwargs))
    with pytest.raises(error, match=message):
        grouped_attention(*args, **kwargs)


def test_op_requires_seed_with_dropout():
    args, kwargs = call_args(make_case(bias=None, summaries=None))
    kpm = kwargs.pop("key_padding_mask")
    with pytest.raises(ValueError, match="dropout_seed is required"):
        torch.ops.attnpass.grouped_attention(*args, kpm, dropout_p=0.1, **kwargs)


def test_scatter_slots_errors():
    slots = torch.zeros(1, 2, 3, 4, 5)
    index = torch.zeros(1, 2, 3, 4, dtype=torch.int64)
    with pytest.raises(TypeError, match="q_index must be int64"):
        scatter_slots(slots, index.int(), 10)
    with pytest.raises(ValueError, match="must equal out_slots.shape"):
        scatter_slots(slots, index[:, :, :2], 10)
    with pytest.raises(ValueError, match="out_slots must be"):
        scatter_slots(slots[0], index, 10)
