"""Tests for Sparsefinder's blocks predictor (attnpass/methods/sparsefinder/blocks.py).

Two independent statements are checked against the module: which key blocks a query block gets
(`chosen_blocks`, written here from the definition with loops and float64, every query's logits
computed in full), and what the site computes on them (a dense float64 softmax over exactly those
pairs, restricted by the site's causal rule, padding and the anchor)."""
from __future__ import annotations

import math

import pytest
import torch
from memory_probe import no_square_tensor
from test_anchor import pair_counts

import attnpass
from attnpass.methods.base import SiteSpec
from attnpass.methods.sparsefinder import SparsefinderAttention
from attnpass.methods.sparsefinder import blocks as blocks_module

F64 = torch.float64
B, HQ, HKV, D = 2, 4, 2, 16


def make_site(L: int, causal: bool = True, **options) -> SparsefinderAttention:
    spec = SiteSpec("layers.0.attn", None, causal=causal, heads_q=HQ, heads_kv=HKV, head_dim=D,
                    example_len_q=L, example_len_k=L)
    options = {"predictor": "blocks", "normalizer": "softmax", "block": 8, "top_blocks": 3, "sampled_queries": 4,
               **options}
    site = SparsefinderAttention(spec, **options).to(F64).eval()
    site.prefill_queries = 1
    return site


def inputs(Lq: int, Lk: int, padded: bool = False, seed: int = 1, requires_grad: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=g, dtype=F64, requires_grad=requires_grad)
               for h, n in ((HQ, Lq), (HKV, Lk), (HKV, Lk)))
    keep = None
    if padded:  # left padding
        keep = torch.ones(B, Lk, dtype=torch.bool)
        keep[0, :5] = False
    return {"q": q, "k": k, "v": v, "key_keep": keep}


def chosen_blocks(site, q, k, key_keep=None) -> set:
    """{(b, h, query block, key block)} from the definition: per query block, its sampled queries
    (the last, then every block // samples-th before it), each query's logits over the keys it may
    see max-pooled per key block and softmaxed over key blocks; a key block's score is its largest
    share (over the sampled queries of every query head of the kv head, when they share); the
    top_blocks best with a positive score, ties to the lowest block index."""
    Lq, Lk = q.shape[2], k.shape[2]
    P, s, top = site.block, site.sampled_queries, site.top_blocks
    offset = site.layout_offset(q, k)
    n_kb = math.ceil(Lk / P)
    group = HQ // HKV
    chosen = set()
    for b in range(q.shape[0]):
        for h in range(HQ):
            kv = h // group
            choosers = range(kv * group, (kv + 1) * group) if site.kv_heads_share else [h]
            for t in range(math.ceil(Lq / P)):
                rows = {(head, min(t * P + P - 1 - (P // s) * i, Lq - 1)) for i in range(s) for head in choosers}
                score = [0.0] * n_kb
                for head, i in rows:
                    pooled = []
                    for j in range(n_kb):
                        keys = [c for c in range(j * P, min((j + 1) * P, Lk))
                                if (not site.spec.causal or c <= i + offset)
                                and (key_keep is None or bool(key_keep[b, c]))]
                        pooled.append(max((float(q[b, head, i] @ k[b, kv, c]) * site.scale(q) for c in keys),
                                          default=-math.inf))
                    top_logit = max(pooled)
                    if top_logit == -math.inf:
                        continue
                    weights = [math.exp(x - top_logit) for x in pooled]
                    score = [max(a, w / sum(weights)) for a, w in zip(score, weights)]
                ranked = sorted(range(n_kb), key=lambda j: (-score[j], j))[:top]
                chosen |= {(b, h, t, j) for j in ranked if score[j] > 0}
    return chosen


def layout_blocks(site, q, k, key_keep=None) -> set:
    q_index, k_index = site.block_layout(q, k, key_keep)
    P = site.block
    starts = k_index.view(*k_index.shape[:3], -1, P)[..., 0]  # each chosen block's first slot
    return {(b, h, t, int(starts[b, h, t, j]) // P) for b, h, t, j in torch.nonzero(starts >= 0).tolist()}


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("causal, padded, L", [(True, False, 61), (True, True, 64), (False, True, 45)])
def test_the_chosen_blocks_are_the_definitions(causal, padded, L, share):
    site = make_site(L, causal=causal, kv_heads_share=share)
    x = inputs(L, L, padded)
    assert layout_blocks(site, x["q"], x["k"], x["key_keep"]) == chosen_blocks(site, x["q"], x["k"], x["key_keep"])


def test_scoring_in_chunks_chooses_as_in_one_piece(monkeypatch):
    site = make_site(64)
    x = inputs(64, 64)
    whole = site.block_layout(x["q"], x["k"])
    monkeypatch.setattr(blocks_module, "_CHUNK_ELEMENTS", 1)  # one query block per chunk
    assert all(torch.equal(a, b) for a, b in zip(whole, site.block_layout(x["q"], x["k"])))


def _dense_reference(site, x: dict) -> torch.Tensor:
    q, k, v = x["q"], x["k"].repeat_interleave(HQ // HKV, 1), x["v"].repeat_interleave(HQ // HKV, 1)
    counts = pair_counts(site, x)
    assert int(counts.max()) == 1  # blocks are distinct, so no pair is listed twice
    scores = (q @ k.transpose(-1, -2)) * site.scale(q)
    probs = torch.softmax(scores.masked_fill(counts == 0, -math.inf), -1).nan_to_num(0.0)
    return probs @ v


@pytest.mark.parametrize("causal, padded, anchor", [
    (True, False, {}), (True, True, {}), (False, False, {}), (True, True, {"sinks": 3, "local": 12}),
    (True, False, {"sinks": 2, "local": 16}), (False, True, {"sinks": 2}),
])
def test_forward_and_backward_equal_a_dense_softmax_over_the_same_pairs(causal, padded, anchor):
    L = 72
    site = make_site(L, causal=causal, **anchor)
    x = inputs(L, L, padded, requires_grad=True)
    got = site(x["q"], x["k"], x["v"], key_keep=x["key_keep"])
    want = _dense_reference(site, x)
    rows = slice(5, None) if padded else slice(None)  # batch row 0's padded queries see nothing real
    assert torch.allclose(got[:, :, rows], want[:, :, rows], atol=1e-10, rtol=1e-9)
    grad = torch.randn_like(got)
    if padded:  # the padded queries' rows are not compared above
        grad[:, :, :5] = 0
    got_grads = torch.autograd.grad((got * grad).sum(), (x["q"], x["k"], x["v"]))
    want_grads = torch.autograd.grad((want * grad).sum(), (x["q"], x["k"], x["v"]))
    for a, b in zip(got_grads, want_grads):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-8)


def test_it_computes_fewer_pairs_than_dense_and_differs_from_dense():
    L = 96
    site = make_site(L)
    x = inputs(L, L)
    pairs = pair_counts(site, x)
    allowed = torch.ones(L, L, dtype=torch.bool).tril().sum() * B * HQ
    assert int(pairs.sum()) < 0.7 * int(allowed)
    dense = torch.nn.functional.scaled_dot_product_attention(
        x["q"], x["k"].repeat_interleave(2, 1), x["v"].repeat_interleave(2, 1), is_causal=True)
    assert (site(x["q"], x["k"], x["v"]) - dense).abs().max() > 1e-3


def test_with_every_block_chosen_it_is_dense_attention():
    L = 40
    site = make_site(L, top_blocks=5)
    x = inputs(L, L)
    dense = torch.nn.functional.scaled_dot_product_attention(
        x["q"], x["k"].repeat_interleave(2, 1), x["v"].repeat_interleave(2, 1), is_causal=True)
    assert torch.allclose(site(x["q"], x["k"], x["v"]), dense, atol=1e-12)


def test_a_chunk_over_cached_keys_chooses_among_the_keys_it_may_see():
    """Bottom-right causal (a prompt continued over a cache): 24 new queries over 80 keys."""
    spec = SiteSpec("layers.0.attn", None, causal=True, causal_bottom_right=True, heads_q=HQ, heads_kv=HKV,
                    head_dim=D, example_len_q=24, example_len_k=80)
    site = SparsefinderAttention(spec, predictor="blocks", normalizer="softmax", block=8, top_blocks=3,
                                 sampled_queries=4).to(F64).eval()
    site.prefill_queries = 1
    x = inputs(24, 80)
    assert layout_blocks(site, x["q"], x["k"]) == chosen_blocks(site, x["q"], x["k"])
    got = site(x["q"], x["k"], x["v"])  # inference: the flash path
    assert torch.allclose(got, _dense_reference(site, x), atol=1e-10, rtol=1e-9)


def test_no_square_tensor_forward_and_backward():
    L = 1024
    spec = SiteSpec("layers.0.attn", None, causal=True, heads_q=HQ, heads_kv=HKV, head_dim=D,
                    example_len_q=L, example_len_k=L)
    site = SparsefinderAttention(spec, predictor="blocks", normalizer="softmax", block=32, top_blocks=4,
                                 sinks=4, local=64)
    site.prefill_queries = 1
    q, k, v = (torch.randn(1, HQ if n == "q" else HKV, L, D, requires_grad=True) for n in "qkv")
    with no_square_tensor(L, L):
        site(q, k, v).sum().backward()


@pytest.mark.parametrize("options, error, match", [
    ({"predictor": "blocks", "window": 4}, ValueError, "window= does not apply to predictor='blocks'"),
    ({"predictor": "blocks", "rank": 8}, ValueError, "rank= does not apply"),
    ({"predictor": "clustering", "top_blocks": 2}, ValueError, "top_blocks= does not apply to predictor='clustering'"),
    ({"predictor": "blocks", "block": 16, "sampled_queries": 32}, ValueError, "more than the queries of a block"),
    ({"predictor": "blocks", "block": 0}, ValueError, "block=0 must be an int >= 1"),
    ({"predictor": "blocks", "top_blocks": 1.5}, TypeError, "top_blocks=1.5 must be an int"),
    ({"predictor": "blocks", "kv_heads_share": 1}, TypeError, "kv_heads_share=1 must be a bool"),
])
def test_option_errors(options, error, match):
    with pytest.raises(error, match=match):
        SparsefinderAttention.validate_options(**options)


def test_nothing_to_calibrate_and_no_projection_state():
    site = make_site(32)
    assert not [n for n, _ in site.named_parameters()]
    assert site.fitter(lr=1e-3, gold=None, mass=None, density_weight=0.0) is None
    with pytest.raises(ValueError, match="budget="):
        site.fitter(lr=1e-3, gold=None, mass=None, density_weight=0.0, budget=0.2)
    site.train()
    x = inputs(32, 32)
    site(x["q"], x["k"], x["v"])
    assert site.aux_loss() is None


def test_through_sparsify_on_a_causal_lm_all_blocks_is_the_original():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 48))
    want = model(input_ids=ids).logits
    full = attnpass.sparsify(model, kwargs=dict(input_ids=ids), method="sparsefinder", predictor="blocks", block=8, top_blocks=6,
                             sinks=2, local=8, prefill_queries=1)
    assert torch.allclose(full(input_ids=ids).logits, want, atol=1e-4)
    sparse = attnpass.sparsify(model, kwargs=dict(input_ids=ids), method="sparsefinder", predictor="blocks", block=8, top_blocks=1,
                               prefill_queries=1)
    assert (sparse(input_ids=ids).logits - want).abs().max() > 1e-3



def test_an_additive_bias_and_a_general_mask_are_read_at_the_chosen_pairs():
    L = 48
    spec = SiteSpec("layers.0.attn", None, causal=True, has_bias=True, has_mask=True, heads_q=HQ, heads_kv=HKV,
                    head_dim=D, example_len_q=L, example_len_k=L)
    site = SparsefinderAttention(spec, predictor="blocks", normalizer="softmax", block=8, top_blocks=3,
                                 sampled_queries=4).to(F64).eval()
    site.prefill_queries = 1
    x = inputs(L, L)
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(B, 1, L, L, generator=g, dtype=F64)
    mask = torch.rand(1, HQ, L, L, generator=g) > 0.2
    mask[..., 0] = True  # every row keeps a key
    got = site(x["q"], x["k"], x["v"], bias=bias, mask=mask)
    chosen = site.computed_pairs(x["q"], x["k"])[0]  # the pairs the layout lists, before the mask
    q, k, v = x["q"], x["k"].repeat_interleave(2, 1), x["v"].repeat_interleave(2, 1)
    keep = chosen & mask & torch.ones(L, L, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2)) * site.scale(q) + bias
    want = torch.softmax(scores.masked_fill(~keep, -math.inf), -1).nan_to_num(0.0) @ v
    assert torch.allclose(got, want, atol=1e-10, rtol=1e-9)


def _train_steps(seed: int):
    from tests.helpers import tiny_gpt2

    model = tiny_gpt2(dropout=0.1)
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    sparse = attnpass.sparsify(model, kwargs={"input_ids": ids}, method="sparsefinder", predictor="blocks", block=4,
                               top_blocks=2, sampled_queries=2, sinks=1, local=2, prefill_queries=1).train()
    torch.manual_seed(seed)
    results = []
    for step in range(2):
        logits = sparse(input_ids=ids.roll(step, 1))[0]
        logits.square().mean().backward()
        results.append(logits.detach())
    return model, results + [p.grad.clone() for p in sparse.parameters() if p.grad is not None]


def test_training_is_bit_for_bit_deterministic_and_leaves_the_input_model_alone():
    from tests.helpers import same_state, snapshot, tiny_gpt2

    first_model, first = _train_steps(seed=7)
    _, second = _train_steps(seed=7)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    _, other = _train_steps(seed=8)  # dropout draws from the seed
    assert not torch.equal(first[0], other[0])
    assert same_state(first_model, snapshot(tiny_gpt2(dropout=0.1))) and not first_model.training
    assert all(p.grad is None for p in first_model.parameters())


def test_a_block_smaller_than_the_default_sample_is_sampled_whole():
    spec = SiteSpec("layers.0.attn", None, causal=True, heads_q=HQ, heads_kv=HKV, head_dim=D)
    assert SparsefinderAttention(spec, predictor="blocks", normalizer="softmax", block=4).sampled_queries == 4
    assert SparsefinderAttention(spec, predictor="blocks", normalizer="softmax").sampled_queries == 8


def test_the_metrics_count_the_pairs_of_the_blocks_the_call_used():
    L = 64
    site = make_site(L)
    x = inputs(L, L)
    site._collect_metrics = True
    site(x["q"], x["k"], x["v"])
    site._collect_metrics = False
    assert site.last_metrics.predicted == int(site.computed_pairs(x["q"], x["k"])[0].sum())
    assert 0 < site.last_metrics.recall <= 1.0


def test_the_cost_model_reports_the_block_predictors_parameters_and_keeps_decode_dense():
    from attnpass import cost_model
    from attnpass.prefill import sparse_pays

    cost = cost_model.cost(None, "sparsefinder", predictor="blocks", density=0.1)
    assert cost.params == {"predictor": "blocks", "block": 32, "sampled_queries": 8, "density": 0.1}
    options = {"predictor": "blocks", "density": 416 / 4096, "block": 32, "sampled_queries": 8}
    assert sparse_pays("sparsefinder", 4096, 4096, 64, options)  # a long prompt: the blocks pay
    assert not sparse_pays("sparsefinder", 1, 4096, 64, options)  # one query costs a whole block


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("causal, padded, anchor, L", [
    (True, False, {}, 61), (True, True, {}, 72), (False, True, {}, 45), (True, True, {"sinks": 3, "local": 12}, 72),
    (True, False, {"sinks": 2, "local": 13}, 70), (False, True, {"sinks": 2}, 45), (True, True, {"sinks": 9}, 40),
])
def test_inference_runs_the_flash_path_on_the_same_pairs(monkeypatch, causal, padded, anchor, L, share):
    """Without a gradient the site computes on `block_flash_attention` (the grouped kernel is not
    called; the anchor's window and sinks are in the same call, the anchor's own parts are not
    computed), and gives the dense float64 softmax over the pairs the grouped kernel computes in training."""
    from attnpass.methods import anchor as anchor_module, sparsefinder as sparsefinder_module

    site = make_site(L, causal=causal, kv_heads_share=share, **anchor)
    x = inputs(L, L, padded)
    trained = site(**{**x, **{n: t.detach().requires_grad_() for n, t in x.items() if n in "qkv"}}).detach()
    monkeypatch.setattr(sparsefinder_module, "grouped_attention", None)  # a call would fail
    monkeypatch.setattr(anchor_module.Anchor, "parts", None)
    with torch.no_grad():
        got = site(x["q"], x["k"], x["v"], key_keep=x["key_keep"])
    rows = slice(5, None) if padded else slice(None)
    assert torch.allclose(got[:, :, rows], _dense_reference(site, x)[:, :, rows], atol=1e-10, rtol=1e-9)
    assert torch.allclose(got[:, :, rows], trained[:, :, rows], atol=1e-10, rtol=1e-9)


def test_shared_choice_gives_every_query_head_of_a_kv_head_the_same_blocks():
    site = make_site(64, kv_heads_share=True)
    x = inputs(64, 64)
    _, k_index = site.block_layout(x["q"], x["k"])
    assert torch.equal(k_index[:, 0], k_index[:, 1]) and torch.equal(k_index[:, 2], k_index[:, 3])
    alone = make_site(64, kv_heads_share=False).block_layout(x["q"], x["k"])[1]
    assert not torch.equal(alone[:, 0], alone[:, 1])


def test_a_decode_step_reuses_the_cost_function_whatever_the_cache_length():
    """Its density follows the cache length; the prefill decision must not build a new cost function
    per decode step (a sympy lambdify costs milliseconds, per site and token)."""
    from attnpass import prefill

    site = make_site(64, sinks=2, local=8)
    site.prefill_queries = None  # the cost model decides
    q = torch.randn(1, HQ, 1, D, dtype=F64)
    assert site.is_decode_step(q, torch.randn(1, HKV, 300, D, dtype=F64))
    built = prefill._flops.cache_info().misses
    assert all(site.is_decode_step(q, torch.randn(1, HKV, n, D, dtype=F64)) for n in range(301, 306))
    assert prefill._flops.cache_info().misses == built


def test_the_choice_and_the_kernel_are_ops_with_consistent_fake_kernels():
    """`attnpass::choose_blocks` and `attnpass::block_flash_attention`: the fake kernels give the real
    outputs' shapes, dtypes and strides (torch.library.opcheck), short sequences (fewer key blocks
    than top_blocks) and a last block cut short included."""
    from attnpass.lowering.torch.block_flash import block_flash_op

    for L, anchor in ((61, {"sinks": 2, "local": 12}), (20, {})):
        site = make_site(L, **anchor)
        x = inputs(L, L, padded=True)
        keep = site.method_key_keep(x["key_keep"], x["k"])
        args = (x["q"], x["k"], keep, site.scale(x["q"]), site.block, site.top_blocks, site.sampled_queries, True,
                site.layout_offset(x["q"], x["k"]), 0, True)
        torch.library.opcheck(blocks_module.choose_blocks_op, args)
        chosen = blocks_module.choose_blocks_op(*args)
        assert chosen.shape == (B, HKV, -(-L // site.block), min(site.top_blocks, -(-L // site.block)))
        sinks = site.anchor.sink_positions(x["key_keep"], B, L, x["k"].device) if site.anchor.sinks else None
        torch.library.opcheck(block_flash_op, (x["q"], x["k"], x["v"], chosen, x["key_keep"], sinks, site.block,
                                               site.scale(x["q"]), True, site.layout_offset(x["q"], x["k"]),
                                               site.anchor_local()))


def test_the_inference_site_exports_with_a_symbolic_length():
    """torch.export traces the recipe's inference call (choice, window, sinks, kernel) with the length
    symbolic: no guard specialises it, and the exported program equals the module at other lengths.
    (Lengths of at least 2 query blocks: a graph where a block count may be 1 has size-1 guards, as
    every graph over a dim that may broadcast.)"""
    site = make_site(48, sinks=2, local=12)
    x = inputs(48, 48)
    length = torch.export.Dim("L", min=2 * site.block + 1, max=512)
    with torch.no_grad():
        exported = torch.export.export(site, (x["q"], x["k"], x["v"]),
                                       dynamic_shapes=({2: length}, {2: length}, {2: length}))
        targets = {n.target for n in exported.graph.nodes if n.op == "call_function"}
        assert {torch.ops.attnpass.choose_blocks.default, torch.ops.attnpass.block_flash_attention.default} <= targets
        for L in (17, 61, 100):
            y = inputs(L, L, seed=L)
            assert torch.equal(exported.module()(y["q"], y["k"], y["v"]), site(y["q"], y["k"], y["v"])), L
