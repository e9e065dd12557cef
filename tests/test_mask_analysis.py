"""Acceptance 4: where a model builds an L x L mask from a causal flag and a padding vector, the
site records that structure, and the rewritten graph no longer holds any L x L tensor."""
from __future__ import annotations

import pytest
import torch

import attnpass
from tests.zoo import by_name

EXPECTED = {
    "gpt2-eager": "causal+key_padding",
    "gpt2-sdpa": "causal+key_padding",
    "llama-eager": "causal+key_padding",
    "llama-sdpa": "causal+key_padding",
    "bert-eager": "key_padding",
    "bert-sdpa": "key_padding",
    "nn-mha-weights": "key_padding",
    "nn-mha-noweights": "key_padding",
    "hand-sdpa-causal": "causal",
}


def _square_nodes(gm: torch.fx.GraphModule, site) -> list[str]:
    """Nodes whose recorded value ends in the site's (Lq, Lk) dims: an L x L tensor."""
    out = []
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() >= 2:
            if (str(val.shape[-2]), str(val.shape[-1])) == (str(site.len_q), str(site.len_k)):
                out.append(f"{node.name}{tuple(val.shape)}")
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_structure_is_recovered_and_no_square_tensor_remains(name):
    case = by_name(name)
    model = case.build()
    args, kwargs = case.inputs(2, 8)
    sparse = attnpass.sparsify(model, args, kwargs)
    assert [s.mask for s in sparse.sites] == [EXPECTED[name]] * case.attention_count, str(sparse.report)
    gm = sparse._programs[False].gm
    assert isinstance(sparse.sites[0].len_q, torch.SymInt)
    assert _square_nodes(gm, sparse.sites[0]) == [], "L x L tensors left in the rewritten graph"


class _Masked(torch.nn.Module):
    def __init__(self, rule):
        super().__init__()
        self.rule = rule

    def forward(self, q, k, v):
        i = torch.arange(q.shape[-2])[:, None]
        j = torch.arange(k.shape[-2])[None, :]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.rule(i, j))


@pytest.mark.parametrize("rule,mask", [
    (lambda i, j: (i - j).abs() <= 1, "band (window 2)"),   # a bidirectional band: |i - j| < 2
    (lambda i, j: ((i * j) % 3 != 1) | (i == j), "general"),  # no structure
], ids=["bidirectional-band", "unstructured"])
def test_a_band_is_found_and_any_other_mask_stays_general_both_exact(rule, mask):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 4, generator=g) for _ in range(3))
    sparse = attnpass.sparsify(_Masked(rule), (q, k, v))
    assert sparse.sites[0].mask == mask
    q2, k2, v2 = (torch.randn(3, 3, 13, 4, generator=g) for _ in range(3))
    torch.testing.assert_close(sparse(q2, k2, v2), _Masked(rule)(q2, k2, v2), rtol=1e-5, atol=1e-6)


def test_key_padding_polarity_is_read_from_the_input():
    # nn.MultiheadAttention: True = padding (ignore); HF: 1 = real token
    mha = attnpass.find_attention(*_call("nn-mha-noweights"))
    assert mha.sites[0].mask_info.padding_keep_zero is True
    bert = attnpass.find_attention(*_call("bert-eager"))
    assert bert.sites[0].mask_info.padding_keep_zero is False


def _call(name):
    case = by_name(name)
    args, kwargs = case.inputs(2, 8)
    return case.build(), args, kwargs


def test_general_pieces_of_a_3d_site_keep_their_broadcasting():
    class Bmm3D(torch.nn.Module):
        """(B*H, L, D) attention; a 2-D additive band mask added *before* the scale (coef 0.5),
        and a 2-D bool mask filled after it."""

        def forward(self, q, k, v):
            n = q.shape[1]
            i = torch.arange(n)[:, None]
            j = torch.arange(n)[None, :]
            band = torch.where((i - j).abs() <= 2, 0.0, float("-inf"))
            scores = (torch.bmm(q, k.transpose(1, 2)) + band) * 0.5
            scores = scores.masked_fill(j > i + 1, float("-inf"))
            return torch.bmm(torch.softmax(scores, dim=-1), v)

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 9, 4, generator=g) for _ in range(3))
    sparse = attnpass.sparsify(Bmm3D(), (q, k, v))
    site = sparse.sites[0]
    assert site.mask == "general" and site.mask_info.general_bias[0].coef == 0.5
    q2, k2, v2 = (torch.randn(4, 13, 4, generator=g) for _ in range(3))
    torch.testing.assert_close(sparse(q2, k2, v2), Bmm3D()(q2, k2, v2), rtol=1e-5, atol=1e-6)


# A sliding window longer or shorter than the example: tests/test_band.py (found as a band, exact past it)


def test_a_window_past_the_probe_limit_stays_general(monkeypatch):
    """A mask holding a constant beyond what the probes can reach is kept as a tensor, with the reason."""
    from attnpass.frontend import mask_analysis

    monkeypatch.setattr(mask_analysis, "LONGEST_PROBE", 20)

    class Windowed(torch.nn.Module):
        def forward(self, q, k, v):
            i = torch.arange(q.shape[-2])[:, None]
            j = torch.arange(k.shape[-2])[None, :]
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (j > i - 30))

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 4, generator=g) for _ in range(3))
    sparse = attnpass.sparsify(Windowed(), (q, k, v))
    assert sparse.sites[0].mask == "general"
    assert "probe limit" in " ".join(sparse.sites[0].notes)


def _qwen2(impl):
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, use_cache=False, attn_implementation=impl)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.Qwen2Model(config).eval()


def _left_padded(batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, : length // 3] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("impl, rule", [("eager", "mean"), ("sdpa", "zero")])
def test_queries_with_no_key_get_what_the_original_computes(impl, rule):
    """Left padding leaves the padded queries of a causal model with no key: an additive finfo.min
    mask (eager) averages V over all keys there, SDPA with a bool mask gives zeros. The structure
    is kept (no L x L mask) and the rule recorded; the dense rewrite is exact on every row."""
    model = _qwen2(impl)
    sparse = attnpass.sparsify(model, kwargs=_left_padded(2, 16))
    assert [(s.mask, s.mask_info.empty_rows) for s in sparse.sites] == [("causal+key_padding", rule)] * 2
    for batch, length in ((2, 16), (3, 21)):
        call = _left_padded(batch, length, seed=length)
        with torch.no_grad():
            torch.testing.assert_close(sparse(**call)[0], model(**call)[0], atol=1e-5, rtol=1e-5)


def _qkv_left_padded():
    """q, k, v (2, 3, 9, 4) and a padding mask whose row 0 has 3 padding keys on the left: under a
    causal rule its first 3 queries see no key."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 4, generator=g) for _ in range(3))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    return q, k, v, mask


def test_a_model_that_unmasks_rows_with_no_key_stays_general_and_exact():
    """Causal + key padding everywhere except that a query with no key sees every key (what
    transformers did for old torch versions): that is not the structure, so the mask stays a tensor."""

    class Unmasking(torch.nn.Module):
        def forward(self, q, k, v, attention_mask):
            lq, lk = q.shape[-2], k.shape[-2]
            allowed = torch.ones(lq, lk, dtype=torch.bool).tril() & attention_mask.bool()[:, None, None, :]
            allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)

    q, k, v, mask = _qkv_left_padded()
    model = Unmasking()
    sparse = attnpass.sparsify(model, (q, k, v, mask))
    assert sparse.sites[0].mask == "general"
    torch.testing.assert_close(sparse(q, k, v, mask), model(q, k, v, mask), atol=1e-6, rtol=1e-6)


def test_eager_minus_inf_masks_note_the_nan_they_give_at_queries_with_no_key():
    class MinusInf(torch.nn.Module):
        def forward(self, q, k, v, attention_mask):
            scores = q @ k.transpose(-2, -1) * 0.5
            causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
            allowed = causal & attention_mask.bool()[:, None, None, :]
            return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v

    q, k, v, mask = _qkv_left_padded()
    model = MinusInf()
    sparse = attnpass.sparsify(model, (q, k, v, mask))
    site = sparse.sites[0]
    assert (site.mask, site.mask_info.empty_rows) == ("causal+key_padding", "zero")
    assert any("NaN" in n for n in site.notes)
    got, expected = sparse(q, k, v, mask), model(q, k, v, mask)
    assert torch.isnan(expected[0, :, :3]).all() and (got[0, :, :3] == 0).all()
    torch.testing.assert_close(got[:, :, 3:], expected[:, :, 3:], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["vit-sdpa", "vit-eager"])
def test_an_all_true_mask_is_no_mask_and_every_method_takes_the_site(name):
    """transformers builds an all-True (B, 1, L, L) mask for ViT under export: that is "none", so
    Combiner (which declines general masks) serves it, and no L x L mask is left in the graph."""
    case = by_name(name)
    model = case.build()
    args, kwargs = case.inputs(2, 8)
    dense = attnpass.sparsify(model, args, kwargs)
    assert [s.mask for s in dense.sites] == ["none"] * case.attention_count
    other_args, other_kwargs = case.inputs(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(dense(*other_args, **other_kwargs)[0], model(*other_args, **other_kwargs)[0],
                                   atol=1e-5, rtol=1e-5)
    combiner = attnpass.sparsify(model, args, kwargs, method="combiner")
    assert combiner.report.skipped == [] and len(combiner.sites) == case.attention_count
    bool_square = [n for n in dense._programs[False].gm.graph.nodes
                   if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dtype == torch.bool
                   and n.meta["val"].dim() == 4]
    assert bool_square == []


class _TwoFills(torch.nn.Module):
    """Padding filled with -1e4, the future with -inf: a query whose visible keys are all padding
    gets a softmax uniform over those keys only, neither zeros nor the mean of V."""

    def forward(self, q, k, v, keep):
        scores = torch.matmul(q, k.transpose(-1, -2)) / 2.0
        scores = scores.masked_fill(keep[:, None, None, :] == 0, -1e4)
        lq, lk = scores.shape[-2:]
        future = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
        return torch.matmul(scores.softmax(-1), v)


def test_a_site_whose_rule_at_queries_with_no_key_is_unknown_is_skipped_not_guessed():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 8, 4, generator=g) for _ in range(3))
    keep = torch.ones(2, 8, dtype=torch.long)
    keep[0, :3] = 0  # left padding: queries 0-2 of row 0 see only padded keys
    report = attnpass.find_attention(_TwoFills(), (q, k, v, keep))
    assert not report.sites
    assert "no allowed key" in report.skipped[0].reason
    with pytest.raises(attnpass.api.NoAttentionFound, match="no allowed key"):
        attnpass.sparsify(_TwoFills(), (q, k, v, keep))


class _XSoftmaxAttention(torch.nn.Module):
    """SEW-D / DeBERTa-v2's XSoftmax spelling: scores filled with a lifted constant tensor
    (`torch.tensor(finfo.min)`), softmax, then the masked probabilities set to 0 again in place; the
    mask is query-and-key padding, so a padded query has no key and its output is 0."""

    def forward(self, q, k, v, keep):
        pair = (keep[:, None, :, None] * keep[:, None, None, :]).bool()
        rmask = ~pair
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        probs = torch.softmax(scores.masked_fill(rmask, torch.tensor(torch.finfo(q.dtype).min)), -1)
        probs.masked_fill_(rmask, 0)
        return probs @ v


def test_probabilities_zeroed_after_the_softmax_give_zero_rows_and_are_exact():
    g = torch.Generator().manual_seed(0)

    def call(batch, length):
        q, k, v = (torch.randn(batch, 2, length, 4, generator=g) for _ in range(3))
        keep = torch.ones(batch, length, dtype=torch.long)
        keep[-1, -3:] = 0
        return q, k, v, keep

    sparse = attnpass.sparsify(_XSoftmaxAttention(), call(2, 9))
    site = sparse.sites[0]
    assert site.mask_info.empty_rows == "zero", str(sparse.report)
    args = call(3, 13)
    want = _XSoftmaxAttention()(*args)
    assert torch.count_nonzero(want[-1, :, -3:]) == 0  # the padded queries' rows
    torch.testing.assert_close(sparse(*args), want, rtol=1e-5, atol=1e-6)
