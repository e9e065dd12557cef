"""The quantile-bucket kernel (lowering/torch/bucket_attention.py) against dense attention on the same pairs.

The reference builds each query's candidate set from the definition directly (query rank i in
bucket floor(i * n_b / Lq), key rank j in bucket floor(j / bucket_size), a pair when the buckets
match in any view; plus the extra keys), as a dense Lq x Lk mask, and runs dense softmax / entmax
on it (tests/test_edge_attention.dense_reference).
"""
from __future__ import annotations

import math

import pytest
import torch

from attnpass.lowering.torch.bucket_attention import bucket_layout, quantile_bucket_attention
from attnpass.lowering.torch.edge_attention import edge_attention
from attnpass.methods.sparsefinder import predictors
from memory_probe import no_square_tensor
from tests.test_edge_attention import dense_reference, make_qkv, rel_err

F64 = torch.float64


def random_orders(B, H, r, Lq, Lk, gen, key_keep=None):
    """Random per-view rankings (real keys first) from random projections, as the predictor makes them."""
    qp = torch.randn(B, H, Lq, r, generator=gen, dtype=F64)
    kp = torch.randn(B, H, Lk, r, generator=gen, dtype=F64)
    return predictors.quantization_orders(qp, kp, key_keep)


def random_extras(B, H, Lq, Lk, W, gen):
    """W distinct random keys per query, some slots empty (-1)."""
    if W == 0 or Lk == 0:
        return torch.full((B, H, Lq, 0), -1, dtype=torch.int64)
    cols = torch.rand(B, H, Lq, Lk, generator=gen).argsort(-1)[..., :W]
    return torch.where(torch.rand(B, H, Lq, min(W, Lk), generator=gen) < 0.3, -1, cols)


def reference_pairs(q_order, key_order, bucket_size, extra_cols, key_keep, Lk):
    """(B, H, Lq, Lk) bool: the candidate pairs by the definition, brute force."""
    B, H, r, Lq = q_order.shape
    n_real = torch.full((B,), Lk) if key_keep is None else key_keep.sum(-1)
    pairs = torch.zeros(B, H, Lq, Lk, dtype=torch.bool)
    for b in range(B):
        n_b = math.ceil(int(n_real[b]) / bucket_size)
        for h in range(H):
            for d in range(r):
                q_bucket = torch.empty(Lq, dtype=torch.int64)
                q_bucket[q_order[b, h, d]] = torch.arange(Lq) * n_b // Lq
                k_bucket = torch.full((Lk,), -1, dtype=torch.int64)
                real = key_order[b, h, d, :int(n_real[b])]
                k_bucket[real] = torch.arange(real.numel()) // bucket_size
                pairs[b, h] |= (q_bucket.view(-1, 1) == k_bucket.view(1, -1)) & (k_bucket >= 0)
    if extra_cols is not None and extra_cols.shape[-1]:
        hit = torch.zeros(B, H, Lq, Lk + 1, dtype=torch.bool)  # column Lk collects the empty slots
        hit.scatter_(-1, torch.where(extra_cols >= 0, extra_cols, Lk), True)
        pairs |= hit[..., :Lk]
    return pairs


def allowed(pairs, causal, causal_offset, key_keep, mask):
    B, H, Lq, Lk = pairs.shape
    out = pairs.clone()
    if causal:
        out &= torch.arange(Lk).view(1, -1) <= torch.arange(Lq).view(-1, 1) + causal_offset
    if key_keep is not None:
        out &= key_keep.view(B, 1, 1, Lk)
    if mask is not None:
        out &= mask
    return out


CASES = {
    # name: (B, Hq, Hkv, Lq, Lk, r, bucket, extras, causal, offset, padding, bias, mask)
    "plain": (1, 2, 2, 33, 33, 3, 4, 0, False, 0, False, None, False),
    "one_view": (1, 2, 2, 20, 20, 1, 5, 0, False, 0, False, None, False),
    "extras": (2, 2, 2, 30, 30, 4, 4, 3, False, 0, False, None, False),
    "causal": (1, 2, 2, 31, 31, 3, 4, 2, True, 0, False, None, False),
    "causal_offset_neg": (1, 2, 1, 25, 29, 2, 3, 2, True, -2, False, None, False),
    "padding_uneven": (3, 2, 2, 27, 27, 3, 4, 2, False, 0, True, None, False),
    "cross_long_queries": (2, 2, 1, 61, 9, 2, 4, 1, False, 0, False, None, False),
    "cross_long_keys": (2, 2, 2, 6, 47, 3, 5, 1, False, 0, False, None, False),
    "bucket_beyond_keys": (1, 2, 2, 12, 10, 2, 16, 0, False, 0, False, None, False),
    "gqa_bias_mask": (2, 4, 2, 23, 23, 3, 4, 2, False, 0, False, "1HLK", True),
    "everything": (3, 4, 2, 26, 30, 4, 3, 3, True, 3, True, "B11K", True),
}


def _case(name, normalizer, gen, dtype=F64):
    B, Hq, Hkv, Lq, Lk, r, bucket, W, causal, offset, padding, bias_shape, use_mask = CASES[name]
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, 8, 6, gen, dtype=dtype)
    key_keep = None
    if padding:
        key_keep = torch.rand(B, Lk, generator=gen) > 0.3
        key_keep[0] = True                      # batch rows with different real-key counts
        key_keep[-1, : Lk // 2] = False
    q_order, key_order = random_orders(B, Hq, r, Lq, Lk, gen, key_keep)
    extras = random_extras(B, Hq, Lq, Lk, W, gen) if W else None
    bias = None
    if bias_shape == "1HLK":
        bias = torch.randn(1, Hq, Lq, Lk, generator=gen, dtype=F64).to(dtype).requires_grad_()
    elif bias_shape == "B11K":
        bias = torch.randn(B, 1, 1, Lk, generator=gen, dtype=F64).to(dtype).requires_grad_()
    mask = torch.rand(B, 1, Lq, Lk, generator=gen) > 0.2 if use_mask else None
    inputs = dict(q=q, k=k, v=v, q_order=q_order, key_order=key_order, bucket_size=bucket, extra_cols=extras)
    settings = dict(scale=8 ** -0.5, causal=causal, causal_offset=offset, key_padding_mask=key_keep, bias=bias,
                    mask=mask, normalizer=normalizer)
    pairs = allowed(reference_pairs(q_order, key_order, bucket, extras, key_keep, Lk), causal, offset, key_keep, mask)
    return inputs, settings, pairs


@pytest.mark.parametrize("normalizer", ["softmax", "entmax15"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_dense_attention_on_the_same_pairs(name, normalizer):
    gen = torch.Generator().manual_seed(hash(name) % 1000)
    inputs, settings, pairs = _case(name, normalizer, gen)
    q = inputs["q"] * (3.0 if normalizer == "entmax15" else 1.0)  # peaked: entmax has real zeros
    inputs["q"] = q.detach().requires_grad_()
    out = quantile_bucket_attention(**inputs, **settings)
    ref, _ = dense_reference(inputs["q"], inputs["k"], inputs["v"], pairs, scale=settings["scale"],
                             bias=settings["bias"], normalizer=normalizer)
    assert rel_err(out, ref) <= 1e-10
    leaves = [inputs["q"], inputs["k"], inputs["v"]] + ([settings["bias"]] if settings["bias"] is not None else [])
    grad_out = torch.randn(out.shape, generator=gen, dtype=F64)
    got = torch.autograd.grad(out, leaves, grad_out)
    want = torch.autograd.grad(ref, leaves, grad_out)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-10


@pytest.mark.parametrize("normalizer", ["softmax", "entmax15"])
def test_same_function_as_the_edge_kernel_on_the_predictors_csr(normalizer):
    """Through Sparsefinder's own predictor: quantization slots + window, deduped into a CSR."""
    gen = torch.Generator().manual_seed(3)
    B, H, Lq, Lk, r, bucket = 2, 2, 40, 40, 4, 4
    q, k, v = make_qkv(B, H, H, Lq, Lk, 8, 8, gen)
    qp, kp = torch.randn(B, H, Lq, r, generator=gen, dtype=F64), torch.randn(B, H, Lk, r, generator=gen, dtype=F64)
    key_keep = torch.ones(B, Lk, dtype=torch.bool)
    key_keep[1, -7:] = False
    common = dict(causal=True, causal_offset=0, key_keep=key_keep)
    local = predictors.window_slots(B, H, Lq, Lk, 2, True, **common)
    row_ptr, col = predictors.csr_from_slots(torch.cat([predictors.quantization_slots(qp, kp, bucket, **common), local], -1))
    q_order, key_order = predictors.quantization_orders(qp, kp, key_keep)
    settings = dict(scale=0.3, causal=True, causal_offset=0, key_padding_mask=key_keep, normalizer=normalizer,
                    dropout_p=0.25, dropout_seed=11)
    out = quantile_bucket_attention(q, k, v, q_order, key_order, bucket, local.view(B, H, Lq, -1), **settings)
    want, _ = edge_attention(q, k, v, row_ptr, col, **settings)
    assert rel_err(out, want) <= 1e-10  # same pairs, same dropout mask (the shared pair hash)


@pytest.mark.parametrize("normalizer", ["softmax", "entmax15"])
def test_gradcheck(normalizer):
    gen = torch.Generator().manual_seed(5)
    B, Hq, Hkv, Lq, Lk = 2, 2, 1, 7, 9  # small: gradcheck perturbs every input entry
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, 3, 2, gen)
    key_keep = torch.ones(B, Lk, dtype=torch.bool)
    key_keep[1, :2] = False
    q_order, key_order = random_orders(B, Hq, 2, Lq, Lk, gen, key_keep)
    extras = random_extras(B, Hq, Lq, Lk, 2, gen)
    bias = torch.randn(B, 1, 1, Lk, generator=gen, dtype=F64, requires_grad=True)
    mask = torch.rand(B, 1, Lq, Lk, generator=gen) > 0.2

    def f(q, k, v, bias):
        return quantile_bucket_attention(q, k, v, q_order, key_order, 2, extras, scale=0.7, causal=True,
                                         causal_offset=2, key_padding_mask=key_keep, bias=bias, mask=mask,
                                         normalizer=normalizer)

    assert torch.autograd.gradcheck(f, (q * 2, k, v, bias))


def test_rows_without_allowed_keys_are_zero_not_nan():
    gen = torch.Generator().manual_seed(7)
    B, H, L = 2, 2, 12
    q, k, v = make_qkv(B, H, H, L, L, 4, 4, gen)
    key_keep = torch.ones(B, L, dtype=torch.bool)
    key_keep[1] = False  # a batch row with no real key at all
    mask = torch.ones(B, H, L, L, dtype=torch.bool)
    mask[0, 0, :5] = False  # queries whose every candidate is masked
    q_order, key_order = random_orders(B, H, 2, L, L, gen, key_keep)
    for normalizer in ("softmax", "entmax15"):
        out = quantile_bucket_attention(q, k, v, q_order, key_order, 3, scale=0.5, key_padding_mask=key_keep,
                                        mask=mask, normalizer=normalizer)
        assert torch.isfinite(out).all()
        assert (out[1] == 0).all() and (out[0, 0, :5] == 0).all()
        out.sum().backward()
        assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
        q.grad = k.grad = v.grad = None
    # not one real key in the whole batch: zeros that backward still runs through
    nothing = torch.zeros(B, L, dtype=torch.bool)
    q_order, key_order = random_orders(B, H, 2, L, L, gen, nothing)
    out = quantile_bucket_attention(q, k, v, q_order, key_order, 3, scale=0.5, key_padding_mask=nothing)
    out.sum().backward()
    assert (out == 0).all() and (q.grad == 0).all() and (v.grad == 0).all()


def test_bf16_close_to_fp32():
    gen = torch.Generator().manual_seed(2)
    inputs, settings, _ = _case("gqa_bias_mask", "entmax15", gen)

    def run(dtype):
        tensors = {n: inputs[n].detach().to(dtype) for n in ("q", "k", "v")}
        return quantile_bucket_attention(**{**inputs, **tensors}, **{**settings, "bias": settings["bias"].detach().to(dtype)})

    out = run(torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), run(torch.float32)) < 3e-2


def test_bucket_layout_splits_query_ranks_evenly():
    for Lq, n_real, bs in [(33, 33, 4), (61, 9, 4), (6, 47, 5), (12, 10, 16), (7, 0, 3), (100, 100, 1)]:
        n_b, block_rank, query_bucket = bucket_layout(Lq, n_real, bs)
        assert n_b == math.ceil(n_real / bs)
        if n_b == 0:
            continue
        assert torch.equal(query_bucket, torch.arange(Lq) * n_b // Lq)
        # every rank sits exactly once, in its own bucket
        ranks = block_rank[block_rank >= 0]
        assert torch.equal(ranks.sort().values, torch.arange(Lq))
        bucket_of_slot = torch.arange(n_b).view(-1, 1).expand_as(block_rank)[block_rank >= 0]
        assert torch.equal(query_bucket[ranks], bucket_of_slot)
        assert block_rank.shape[1] == math.ceil(Lq / n_b)


@pytest.mark.parametrize("normalizer", ["softmax", "entmax15"])
def test_memory_never_quadratic(normalizer):
    gen = torch.Generator().manual_seed(4)
    B, H, L, D = 1, 2, 1024, 16
    q, k, v = make_qkv(B, H, H, L, L, D, D, gen, dtype=torch.float32)
    bias = torch.randn(1, 1, 1, L, generator=gen, requires_grad=True)
    key_keep = torch.ones(B, L, dtype=torch.bool)
    key_keep[:, -10:] = False
    q_order, key_order = random_orders(B, H, 4, L, L, gen, key_keep)
    extras = predictors.window_slots(B, H, L, L, 3, True, key_keep=key_keep).view(B, H, L, -1)
    with no_square_tensor(L, L):
        out = quantile_bucket_attention(q, k, v, q_order, key_order, 16, extras, scale=0.25, key_padding_mask=key_keep,
                                        bias=bias, dropout_p=0.1, dropout_seed=3, normalizer=normalizer)
        out.sum().backward()
    assert bias.grad.shape == bias.shape and torch.isfinite(q.grad).all()


def test_bad_inputs_are_named():
    gen = torch.Generator().manual_seed(1)
    B, H, L = 1, 2, 8
    q, k, v = make_qkv(B, H, H, L, L, 4, 4, gen)
    q_order, key_order = random_orders(B, H, 2, L, L, gen)
    run = dict(scale=1.0)
    bad_order = q_order.clone()
    bad_order[0, 0, 0, 0] = bad_order[0, 0, 0, 1]
    with pytest.raises(ValueError, match="q_order must be a permutation"):
        quantile_bucket_attention(q, k, v, bad_order, key_order, 2, **run)
    with pytest.raises(ValueError, match="different view counts"):
        quantile_bucket_attention(q, k, v, q_order, key_order[:, :, :1], 2, **run)
    key_keep = torch.ones(B, L, dtype=torch.bool)
    key_keep[0, key_order[0, 0, 0, 0]] = False  # the first-ranked key is padding
    with pytest.raises(ValueError, match="real keys .* before the padding keys"):
        quantile_bucket_attention(q, k, v, q_order, key_order, 2, key_padding_mask=key_keep, **run)
    twice = torch.tensor([3, 3, -1]).expand(B, H, L, 3)
    with pytest.raises(ValueError, match="repeats a key within a row"):
        quantile_bucket_attention(q, k, v, q_order, key_order, 2, twice, **run)
    with pytest.raises(ValueError, match="bucket_size must be an int >= 1"):
        quantile_bucket_attention(q, k, v, q_order, key_order, 0, **run)
    with pytest.raises(ValueError, match="not broadcastable"):
        quantile_bucket_attention(q, k, v, q_order, key_order, 2, bias=torch.zeros(3, L), **run)
    with pytest.raises(ValueError, match="unknown normalizer"):
        quantile_bucket_attention(q, k, v, q_order, key_order, 2, normalizer="sparsemax", **run)


def test_entmax15_threshold_of_wide_rows_equals_the_entmax_package():
    """Rows wider than 32 are solved on their top 16 first, and on the full sort when more than 16
    entries lie within 1 of the maximum: both branches, -inf entries and all -inf rows."""
    from entmax import entmax15

    from attnpass.lowering.torch import row_normalizers as rn

    gen = torch.Generator().manual_seed(0)
    for width in (33, 70, 257):
        for spread in (0.05, 0.5, 2.0, 20.0):  # flat rows need the full sort, peaked ones do not
            x = torch.randn(300, width, generator=gen, dtype=F64) * spread
            x[::5, width // 2:] = -math.inf
            x[7] = -math.inf
            x[11, :20] = x[11, 0]  # 20 tied maxima
            probs = rn.probs_from_stat(x, rn.entmax15_stat(x), "entmax15")
            want = entmax15(x.nan_to_num(neginf=-1e30), dim=-1)
            want[7] = 0
            assert (probs - want).abs().max() < 1e-12
