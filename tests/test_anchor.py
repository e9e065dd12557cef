"""Tests for the sinks= / local= options (attnpass/methods/anchor.py): every method's own pairs,
the first real keys and a causal window, under one softmax.

The reference is written here: a dense float64 softmax whose weights are the number of times the
site computes each pair (routing: a key two clusters of a query share counts twice; everything
else once), from the method's own layout (site_probe.computed_pairs, the method's pairs limited to
the keys the anchor leaves it) and the anchor's pairs built from the definition.
"""
from __future__ import annotations

import pytest
import torch
from memory_probe import no_square_tensor
from test_combiner import reference_attention as combiner_reference_attention

from attnpass.methods import method_class
from attnpass.methods.base import SiteSpec
from attnpass.methods.pairs import group_pairs
from attnpass.tools.site_probe import _method_pairs, allowed_pairs, anchor_pairs

F64 = torch.float64
B, HQ, HKV, D = 2, 4, 2, 16

METHOD_OPTIONS = {
    "combiner": {"block": 8},
    "routing": {"clusters": 4, "local_window": 8},
    "sbm": {"clusters": 4, "seed": 0},
    "sparsefinder": {"normalizer": "softmax", "predictor": "clustering"},
}


def make_site(method: str, L: int, causal: bool = True, bottom_right: bool = False, window: int = 0, **options):
    """A site module in float64; `window`: a causal band site (sliding window)."""
    spec = SiteSpec("layers.0.attn", None, causal=causal, causal_bottom_right=bottom_right, window=window,
                    heads_q=HQ, heads_kv=HKV, head_dim=D, example_len_q=L, example_len_k=L)
    torch.manual_seed(0)
    site = method_class(method)(spec, **{**METHOD_OPTIONS[method], **options}).to(F64)
    site.prefill_queries = 1  # a chunk over cached keys runs the method too
    return site.eval()


def inputs(Lq: int, Lk: int, padded: bool, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, Lq, D, generator=g, dtype=F64)
    k = torch.randn(B, HKV, Lk, D, generator=g, dtype=F64)
    v = torch.randn(B, HKV, Lk, D, generator=g, dtype=F64)
    keep = None
    if padded:  # left padding, the usual batched-generation case
        keep = torch.ones(B, Lk, dtype=torch.bool)
        keep[0, :5] = False
    return {"q": q, "k": k, "v": v, "key_keep": keep}


def pair_counts(site, x: dict) -> torch.Tensor:
    """(B, Hq, Lq, Lk) how often the site computes each pair, from its layout and the definition."""
    q, k = x["q"], x["k"]
    Lq, Lk = q.shape[2], k.shape[2]
    method_x = {**x, "key_keep": site.method_key_keep(x.get("key_keep"), k)}
    if site.method_name == "routing":
        layout = site.layout(q, k, method_x["key_keep"])
        counts = _group_counts(layout.q_index, layout.k_index, Lq, Lk)
        counts += group_pairs(layout.fallback_q_index, layout.fallback_k_index, Lq, Lk,
                               layout.fallback_key_range).to(F64)
    else:
        counts = _method_pairs(site, method_x)[0].to(F64)
    # the method sees only keys before the window (its layout offset) and not the sinks
    method_rule = allowed_pairs(site, method_x)
    if site.spec.causal:
        i = torch.arange(Lq).view(Lq, 1)
        method_rule = method_rule & (torch.arange(Lk).view(1, Lk) <= i + site.layout_offset(q, k))
    counts = counts * method_rule
    anchor = anchor_pairs(site, x) & allowed_pairs(site, x)
    assert not bool((anchor & (counts > 0)).any()), "the anchor's pairs and the method's overlap"
    return counts + anchor.to(F64)


def _group_counts(q_index, k_index, Lq, Lk) -> torch.Tensor:
    """Like methods.pairs.group_pairs, but counting a pair once per group that lists it."""
    N = q_index.shape[0] * q_index.shape[1]
    qi, ki = q_index.reshape(N, -1, q_index.shape[-1]), k_index.reshape(N, -1, k_index.shape[-1])
    counts = torch.zeros(N, Lq, Lk, dtype=F64)
    for n in range(N):
        for g in range(qi.shape[1]):
            rows, cols = qi[n, g][qi[n, g] >= 0], ki[n, g][ki[n, g] >= 0]
            counts[n, rows.view(-1, 1), cols.view(1, -1)] += 1
    return counts.view(*q_index.shape[:2], Lq, Lk)


def reference(site, x: dict) -> torch.Tensor:
    if site.method_name == "combiner" and site.method_has_pairs():
        return combiner_reference(site, x)
    q, k, v = x["q"], x["k"].repeat_interleave(HQ // HKV, 1), x["v"].repeat_interleave(HQ // HKV, 1)
    counts = pair_counts(site, x)
    scores = (q @ k.transpose(-1, -2)) * site.scale(q)
    weights = torch.where(counts > 0, counts * torch.exp(scores - scores.amax(-1, keepdim=True)), 0.0)
    total = weights.sum(-1, keepdim=True)
    return torch.where(total > 0, weights / total.clamp(min=1e-300), 0.0) @ v


def combiner_reference(site, x: dict) -> torch.Tensor:
    """test_combiner's reference from the paper's definition, on the keys the anchor leaves the
    method, with the anchor's keys added to each query's direct keys."""
    q, k = x["q"], x["k"]
    anchor = anchor_pairs(site, x) & allowed_pairs(site, x)

    def extra_keys(b, i):
        return anchor[b, 0, i].nonzero().view(-1).tolist()

    offset, window = site.causal_offset(q, k), site.spec.window
    band = (offset - window, offset + (1 if site.spec.causal else window)) if window else None
    return combiner_reference_attention(
        q, k, x["v"], site.method_key_keep(x.get("key_keep"), k), site.variant, site.block, site.spec.causal,
        site.layout_offset(q, k), extra_keys, band)


@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_each_method_is_one_softmax_over_its_pairs_sinks_and_window(method, padded):
    site = make_site(method, 96, sinks=3, local=12)
    x = inputs(96, 96, padded)
    got = site(x["q"], x["k"], x["v"], key_keep=x["key_keep"])
    want = reference(site, x)
    rows = slice(5, None) if padded else slice(None)  # batch row 0's padded queries see nothing real
    assert torch.allclose(got[:, :, rows], want[:, :, rows], atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("method", ["combiner", "routing"])
def test_a_chunk_over_cached_keys_keeps_the_window_at_the_bottom_right(method):
    site = make_site(method, 80, bottom_right=True, sinks=2, local=10)
    x = inputs(24, 80, padded=False)
    got = site(x["q"], x["k"], x["v"])
    assert torch.allclose(got, reference(site, x), atol=1e-10, rtol=1e-9)


def test_every_query_gets_its_sinks_and_its_window():
    """The counts the reference uses: each allowed sink and window key exactly once per query."""
    site = make_site("sbm", 64, sinks=4, local=8)
    x = inputs(64, 64, padded=True)
    site(x["q"], x["k"], x["v"], key_keep=x["key_keep"])
    counts = pair_counts(site, x)
    i = torch.arange(64).view(64, 1)
    j = torch.arange(64).view(1, 64)
    first_real = torch.tensor([5, 0]).view(B, 1, 1, 1)
    expected = ((j >= first_real) & (j < first_real + 4) & (j <= i)) | ((j <= i) & (j > i - 8) & (j >= first_real))
    assert torch.equal(anchor_pairs(site, x)[:, :1] & allowed_pairs(site, x)[:, :1], expected)
    assert bool((counts[:, :1] >= expected).all()) and bool((counts <= 1).all())


def test_with_a_full_method_the_sum_of_parts_is_the_dense_attention_forward_and_backward():
    """Combiner with one block computes every pair: the merge must give dense causal attention, and
    its gradient through each part's logsumexp must be the dense gradient."""
    site = make_site("combiner", 64, block=64, sinks=4, local=16)
    x = inputs(64, 64, padded=False)
    q, k, v = (x[n].clone().requires_grad_() for n in "qkv")
    got = site(q, k, v)
    rep = HQ // HKV
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)
    assert torch.allclose(got, want, atol=1e-12)
    grad = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    for a, b in zip(got_grads, want_grads):
        assert torch.allclose(a, b, atol=1e-10)


def test_sinks_only_on_a_bidirectional_site():
    site = make_site("combiner", 48, causal=False, block=48, sinks=3)
    x = inputs(48, 48, padded=True)
    got = site(x["q"], x["k"], x["v"], key_keep=x["key_keep"])
    mask = x["key_keep"].view(B, 1, 1, 48)
    rep = HQ // HKV
    want = torch.nn.functional.scaled_dot_product_attention(
        x["q"], x["k"].repeat_interleave(rep, 1), x["v"].repeat_interleave(rep, 1), attn_mask=mask)
    assert torch.allclose(got, want, atol=1e-12)


def test_the_anchored_path_builds_no_square_tensor():
    L = 1024
    site = make_site("routing", L, clusters=16, local_window=32, sinks=4, local=64).float()
    q, k, v = (torch.randn(1, HQ if n == "q" else HKV, L, D, requires_grad=True) for n in "qkv")
    with no_square_tensor(L, L):
        site(q, k, v).sum().backward()


@pytest.mark.parametrize("options, error, match", [
    ({"sinks": -1}, ValueError, "sinks=-1"),
    ({"local": 2.5}, TypeError, "local=2.5"),
    ({"local": True}, TypeError, "local=True"),
])
def test_option_errors(options, error, match):
    with pytest.raises(error, match=match):
        method_class("routing").validate_options(**options)


def test_the_anchor_takes_the_softmax_by_default_and_refuses_an_entmax_normaliser():
    with pytest.raises(ValueError, match="normalizer='softmax'"):
        method_class("sparsefinder").validate_options(sinks=4, normalizer="entmax15")
    method_class("sparsefinder").validate_options(sinks=4)
    assert make_site("sparsefinder", 32, sinks=4).normalizer == "softmax"
    spec = SiteSpec("s", None, causal=True, heads_q=HQ, heads_kv=HKV, head_dim=D)
    assert method_class("sparsefinder")(spec).normalizer == "entmax15"  # the paper's, without an anchor


def test_a_window_is_declined_where_there_is_no_causal_order():
    for spec in (SiteSpec("s", None, causal=False), SiteSpec("s", None, causal=True, cross=True)):
        for method in METHOD_OPTIONS:
            reason = method_class(method).unsupported_reason(spec, local=8)
            assert reason is not None and "local=" in reason
    assert method_class("combiner").unsupported_reason(SiteSpec("s", None, causal=False), sinks=8) is None


def test_dropout_keeps_the_merge_unbiased():
    """Training with dropout: the mean over many draws approaches the dropout-free output."""
    site = make_site("combiner", 32, block=8, sinks=2, local=4).train()
    x = inputs(32, 32, padded=False)
    clean = site.eval()(x["q"], x["k"], x["v"])
    site.train()
    draws = torch.stack([site(x["q"], x["k"], x["v"], dropout_p=0.3) for _ in range(400)])
    assert not torch.allclose(draws[0], clean)
    assert (draws.mean(0) - clean).abs().mean() < 0.05 * clean.abs().mean()


@pytest.mark.parametrize("len_q, len_k, offset, local, sinks, padded", [
    (100, 100, 0, 16, 3, False), (100, 100, 0, 16, 3, True), (37, 120, 83, 10, 4, True),
    (5, 5, 0, 64, 2, False), (300, 300, 0, 200, 0, True), (300, 300, 0, 20, 8, True),
])
def test_the_inference_path_on_the_flash_kernel_equals_the_grouped_kernels(len_q, len_k, offset, local, sinks, padded):
    """Without a gradient the sinks and window are one flash-kernel part; with one, two grouped
    calls: the merged results agree (float64), chunk edges, padding and sinks inside the window included."""
    from attnpass.methods.anchor import Anchor, merge_parts, with_mass

    x = inputs(len_q, len_k, padded)
    v = with_mass(x["v"])
    anchor = Anchor(sinks, local)
    call = dict(key_keep=x["key_keep"], bias=None, mask=None, scale=0.3, causal=True, offset=offset,
                dropout_p=0.0, dropout_seed=0)
    with torch.no_grad():
        fast = anchor.parts(x["q"], x["k"], v, **call)
    grouped = anchor.parts(x["q"].clone().requires_grad_(), x["k"], v, **call)
    assert len(fast) == 1 and len(grouped) == (2 if sinks else 1)
    assert torch.allclose(merge_parts(fast), merge_parts(grouped), atol=1e-12)


def test_the_flash_part_is_an_op_whose_fake_kernel_states_its_outputs():
    """`attnpass::anchor_flash` (what lets an anchored site trace with symbolic lengths): shapes, dtypes
    and strides of its fake kernel equal the real outputs', with and without sinks (torch.library.opcheck)."""
    from attnpass.methods.anchor import anchor_flash

    for len_q, len_k, offset, padded, with_sinks in ((100, 100, 0, True, True), (37, 120, 83, False, False)):
        x = inputs(len_q, len_k, padded)
        sinks = torch.tensor([[0, 1, 2]] * x["q"].shape[0]) if with_sinks else None
        v = torch.cat([x["v"], x["v"].new_ones(*x["v"].shape[:-1], 1)], dim=-1)
        torch.library.opcheck(anchor_flash, (x["q"], x["k"], v, x["key_keep"], 0.3, offset, 16, sinks, 0))


def test_through_sparsify_and_the_compile_backend_on_a_causal_lm():
    """The options reach every site both ways, and both compute the same function (not the original's)."""
    import attnpass
    from helpers import tiny_gpt2

    torch.manual_seed(0)
    model = tiny_gpt2().eval()
    ids = torch.randint(0, 50, (2, 40))
    options = dict(method="combiner", block=8, sinks=2, local=6)
    sparse = attnpass.sparsify(model, kwargs=dict(input_ids=ids), **options)
    assert all(m.anchor.sinks == 2 and m.anchor.local == 6 for m in sparse.site_modules().values())
    compiled = tiny_gpt2().eval()
    compiled.load_state_dict(model.state_dict())
    compiled.forward = torch.compile(compiled.forward, backend=attnpass.backend(model=compiled, **options))
    with torch.no_grad():
        want, got, original = (m(input_ids=ids)[0] for m in (sparse, compiled, model))
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(want, original, atol=1e-3)


def test_the_prefill_decision_counts_the_anchors_keys():
    """A chunk over cached keys that the method alone would run sparse is a decode step (exact
    dense attention) once its window costs nearly what attending to every key does."""
    spec = SiteSpec("s", None, causal=True, causal_bottom_right=True, heads_q=HQ, heads_kv=HKV, head_dim=D,
                    example_len_q=64, example_len_k=64)
    plain = method_class("combiner")(spec).to(F64)
    anchored = method_class("combiner")(spec, sinks=4, local=1024).to(F64)
    x = inputs(64, 1100, padded=False)
    q, k, v = x["q"], x["k"], x["v"]
    assert not plain.is_decode_step(q, k) and anchored.is_decode_step(q, k)
    rep = HQ // HKV
    mask = torch.ones(64, 1100, dtype=torch.bool).tril(1100 - 64)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)
    assert torch.allclose(anchored(q, k, v), want, atol=1e-12)


def test_a_row_with_fewer_real_keys_than_sinks_keeps_its_padding_away_from_the_method():
    """Left padding with 2 real keys and sinks=4: the sinks are the 2 real keys (the other 2 slots
    are -1), so the method keeps nothing; padding position 0 must stay dropped."""
    from attnpass.methods.anchor import Anchor

    key_keep = torch.tensor([[False, False, False, True, True], [True, True, True, True, True]])
    anchor = Anchor(sinks=4, local=0)
    assert anchor.sink_positions(key_keep, 2, 5, "cpu").tolist() == [[3, 4, -1, -1], [0, 1, 2, 3]]
    assert anchor.method_key_keep(key_keep, 2, 5, "cpu").tolist() == [[False] * 5, [False] * 4 + [True]]


def test_the_flash_part_is_taken_on_cpu_only():
    """The flash part is CPU's fused kernel (`aten._scaled_dot_product_flash_attention_for_cpu`): on any
    other device (a meta tensor stands for a GPU here) the inference path is the grouped kernels'."""
    from attnpass.methods.anchor import Anchor, with_mass

    x = inputs(40, 40, True)
    anchor = Anchor(2, 8)
    call = dict(bias=None, mask=None, scale=0.3, causal=True, offset=0, dropout_p=0.0, dropout_seed=0)
    with torch.no_grad():
        assert anchor.runs_on_flash(None, None, 0.0, x["q"], x["k"], x["v"])
        assert len(anchor.parts(x["q"], x["k"], with_mass(x["v"]), key_keep=x["key_keep"], **call)) == 1
        meta = {name: t.to("meta") for name, t in x.items()}
        assert not anchor.runs_on_flash(None, None, 0.0, meta["q"], meta["k"], meta["v"])
        assert len(anchor.parts(meta["q"], meta["k"], with_mass(meta["v"]), key_keep=meta["key_keep"], **call)) == 2
