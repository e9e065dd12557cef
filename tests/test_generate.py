"""Generation on a sparsified causal LM: transformers' generate() runs the rewritten graphs, the
prompt through the method's sparse sites (prefill), each decode step as exact dense attention over
the KV cache, which is reused from step to step."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers

import attnpass
from attnpass.methods import SiteSpec, method_class
from attnpass.sparse_module import CaptureNotice
from tests.zoo import by_name

GREEDY = dict(do_sample=False, output_scores=True, return_dict_in_generate=True)


def _sparsify(model, kwargs, method, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptureNotice)
        return attnpass.sparsify(model, kwargs=kwargs, method=method, **options)


def _generate(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptureNotice)
        return model.generate(**kwargs, **GREEDY)


@pytest.fixture(scope="module")
def llama():
    case = by_name("llama-causallm")
    model = case.build()
    _, kwargs = case.inputs(2, 24)
    # left padding, as generation batches are padded
    kwargs = {name: t.flip(-1) for name, t in kwargs.items()}
    assert not bool(kwargs["attention_mask"][:, -1:].eq(0).any()) and not bool(kwargs["attention_mask"].all())
    return model, kwargs


def test_dense_generate_returns_the_originals_tokens_and_scores(llama):
    model, kwargs = llama
    sparse = _sparsify(model, kwargs, "dense")
    ref = model.generate(**kwargs, max_new_tokens=6, **GREEDY)
    before = len(sparse._signatures)
    out = _generate(sparse, **kwargs, max_new_tokens=6)
    assert torch.equal(out.sequences, ref.sequences)
    for got, want in zip(out.scores, ref.scores, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert len(sparse._signatures) - before == 2  # one prefill graph and one decode graph, not one per step


def _greedy_loop(sparse, model, ids, steps):
    """Prefill on the sparse model, then decode token by token; at each decode step the original
    model, given a copy of the same cache, gives the reference (dense attention over the cache)."""
    config = model.config
    cache = transformers.DynamicCache(config=config)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptureNotice)
        logits = sparse(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]
        prefill = logits
        pairs = []
        for _ in range(steps):
            token = logits.argmax(-1, keepdim=True)
            ref = model(input_ids=token, cache=copy.deepcopy(cache), use_cache=True).logits[:, -1]
            logits = sparse(input_ids=token, cache=cache, use_cache=True).logits[:, -1]
            pairs.append((logits, ref))
    return prefill, pairs


# "sparsefinder:blocks": Sparsefinder with its block predictor (README's pretrained-LM recipe, small blocks)
OPTIONS = {"combiner": {"block": 8}, "sparsefinder:blocks": {"predictor": "blocks", "block": 4, "top_blocks": 2,
                                                            "sampled_queries": 2, "sinks": 1, "local": 4}}


@pytest.mark.parametrize("method", ["routing", "combiner", "sparsefinder", "sbm", "sparsefinder:blocks"])
def test_the_prompt_runs_sparse_and_decode_steps_run_dense_over_the_cache(llama, method):
    model, _ = llama
    ids = torch.randint(1, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))  # no pad id
    sparse = _sparsify(model, dict(input_ids=ids), method.split(":")[0], **OPTIONS.get(method, {}))
    out = _generate(sparse, input_ids=ids, max_new_tokens=4)
    with torch.no_grad():
        forward = sparse(input_ids=ids).logits[:, -1]
        original = model(input_ids=ids).logits[:, -1]
    # the first generated token's scores are the sparse model's forward at the last prompt position ...
    torch.testing.assert_close(out.scores[0], forward, rtol=0, atol=1e-5)
    assert (out.scores[0] - original).abs().max() > 1e-3  # ... which is not the original's
    prefill, steps = _greedy_loop(sparse, model, ids, 3)
    torch.testing.assert_close(prefill, out.scores[0], rtol=0, atol=1e-5)
    for (got, ref), score in zip(steps, out.scores[1:], strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)  # exact dense attention over the cache
        torch.testing.assert_close(score, got, rtol=0, atol=1e-5)


def test_batched_generation_with_left_padding_serves_every_row(llama):
    model, kwargs = llama
    sparse = _sparsify(model, kwargs, "combiner", block=8)
    out = _generate(sparse, **kwargs, max_new_tokens=3)
    assert out.sequences.shape == (2, kwargs["input_ids"].shape[1] + 3)
    assert all(bool(torch.isfinite(s).all()) for s in out.scores)


def test_a_chunk_over_the_cache_is_prefill_from_prefill_queries_on(llama):
    """Multi-turn use of the cache: a new chunk of at least `prefill_queries` tokens runs the
    method over the cached keys (causal bottom-right); a shorter one runs dense attention."""
    model, _ = llama
    ids = torch.randint(1, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1))
    prompt, long_chunk, short_chunk = ids[:, :40], ids[:, 40:52], ids[:, 52:54]
    sparse = _sparsify(model, dict(input_ids=prompt), "combiner", block=4, prefill_queries=8)
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptureNotice)
        sparse(input_ids=prompt, cache=cache, use_cache=True)
        ref = model(input_ids=long_chunk, cache=copy.deepcopy(cache), use_cache=True).logits
        got = sparse(input_ids=long_chunk, cache=cache, use_cache=True).logits
        assert (got - ref).abs().max() > 1e-3  # sparse over 40 cached + 12 new keys
        ref = model(input_ids=short_chunk, cache=copy.deepcopy(cache), use_cache=True).logits
        got = sparse(input_ids=short_chunk, cache=cache, use_cache=True).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)  # 2 < prefill_queries: dense over the cache
    assert cache.get_seq_length() == 54


@pytest.mark.parametrize("method", ["routing", "combiner", "sparsefinder", "sbm", "sparsefinder:blocks"])
def test_the_cost_model_makes_one_query_over_a_long_cache_a_decode_step(method):
    spec = SiteSpec(name="s", scale=None, causal=True, causal_bottom_right=True, heads_q=4, heads_kv=4,
                    head_dim=16, example_len_q=512, example_len_k=512)
    options = {"predictor": "blocks"} if method == "sparsefinder:blocks" else {}
    module = method_class(method.split(":")[0])(spec, **options)
    q_one, q_prompt, keys = torch.zeros(1, 4, 1, 16), torch.zeros(1, 4, 2048, 16), torch.zeros(1, 4, 2048, 16)
    assert module.is_decode_step(q_one, keys)
    assert not module.is_decode_step(q_prompt, keys)  # no cached keys: always the method
    cross = method_class(method.split(":")[0])(SiteSpec(name="x", scale=None, cross=True, heads_q=4, heads_kv=4,
                                                        head_dim=16, example_len_q=512, example_len_k=512), **options)
    assert not cross.is_decode_step(q_one, keys)  # cross-attention is not a cache continuation


@pytest.mark.parametrize("method, options", [
    ("routing", {"clusters": 64}), ("routing", {"clusters": 8}), ("combiner", {"block": 64}), ("combiner", {"block": 8}),
    ("combiner", {}), ("sbm", {}), ("sbm", {"clusters": 32, "max_density": 0.02}), ("sparsefinder", {}),
    ("sparsefinder", {"predictor": "quantization"}), ("sparsefinder", {"predictor": "distance"}),
    ("sparsefinder", {"predictor": "blocks"}), ("sparsefinder", {"predictor": "blocks", "block": 16, "top_blocks": 2})])
def test_a_decode_step_known_without_its_key_length_is_one_at_every_key_length(method, options):
    """The cost model's decision for a static query count, without the key length (what a decode graph
    knows): where it says decode, every key length past the queries is a decode step for the eager rule
    too, with the options the method sets from the lengths there (Combiner's default block, the blocks
    predictor's density; checked on a grid up to 10^7 keys); and it says so for one query, so the
    one-query decode graph of every method runs the dense op (and compiles whole) without prefill_queries."""
    from attnpass.prefill import sparse_never_pays, sparse_pays

    spec = SiteSpec(name="s", scale=None, causal=True, causal_bottom_right=True, heads_q=4, heads_kv=4,
                    head_dim=64, example_len_q=512, example_len_k=512)
    module = method_class(method)(spec, **options)
    cost = module.cost_options_at_any_length(64)
    counts = (1, 2, 3, 5, 8, 16, 32, 64, 128, 512)
    decided = [n for n in counts if sparse_never_pays(method, n, 64, cost)]
    assert 1 in decided and decided != list(counts)  # long chunks stay the method's
    for n in decided:
        for m in [1, 2, 7, 100, 4095] + [10 ** e for e in range(4, 8)]:
            assert not sparse_pays(method, n, n + m, 64, module.cost_options(n, n + m, 64)), (n, m)
    cache = torch.zeros(1, 4, 9, 64)
    assert module.decode_step_without_lengths(torch.zeros(1, 4, 1, 64), cache)
    assert module.traces_symbolically(torch.zeros(1, 4, 1, 64), cache, cache)
    assert not module.decode_step_without_lengths(torch.zeros(1, 4, 512, 64), torch.zeros(1, 4, 600, 64))
    # a prompt (its queries are its keys) is no decode step, however few its queries
    assert not module.decode_step_without_lengths(torch.zeros(1, 4, 1, 64), torch.zeros(1, 4, 1, 64))


def test_the_length_free_proof_refuses_what_it_cannot_bound():
    """`prefill._nonnegative` is a proof, not a grid: a term it cannot bound below (a negative one with
    a free option, a log whose argument shrinks) gives no answer, and a true affine bound gives one."""
    import sympy

    from attnpass.prefill import _nonnegative

    x, s = sympy.Symbol("past", nonnegative=True), sympy.Symbol("s", positive=True)
    assert _nonnegative(3 * x + 1 + x / s + sympy.sqrt(x) * s, x)
    assert _nonnegative(2 * x + 1 + x * sympy.log(x / 10 + sympy.Rational(1, 5)), x)  # >= (2 + log 0.2) x + 1
    assert not _nonnegative(3 * x + 1 - x / s, x)  # s may be small
    assert not _nonnegative(x + 1 + 2 * x * sympy.log(x / 10 + sympy.Rational(1, 5)), x)  # (1 + 2 log 0.2) x < 0
    assert not _nonnegative(x - 1, x)
    assert not _nonnegative(5 * x + 1 - sympy.log(1 + x), x)  # true, but its negative log is not bounded here


def test_prefill_queries_is_checked_before_the_capture(llama):
    model, kwargs = llama
    with pytest.raises(ValueError, match=r"prefill_queries=0 must be None .* or an int >= 1"):
        attnpass.sparsify(model, kwargs=kwargs, method="routing", prefill_queries=0)


def test_a_model_without_generation_gets_transformers_own_error():
    case = by_name("bert-sdpa")
    model = case.build()
    _, kwargs = case.inputs(2, 8)
    sparse = attnpass.sparsify(model, kwargs=kwargs)
    with pytest.raises(AttributeError) as ours:
        sparse.generate(kwargs["input_ids"])
    with pytest.raises(AttributeError) as theirs:
        model.generate(kwargs["input_ids"])
    assert str(ours.value) == str(theirs.value)
    assert "forward" not in sparse._source.__dict__  # nothing left patched


def test_a_long_prompts_graphs_are_captured_on_a_short_one_and_sampling_draws_as_the_originals():
    from attnpass.short_call import SHORT_CALL_TOKENS as GENERATION_CAPTURE_TOKENS

    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(1, 50, (2, 3 * GENERATION_CAPTURE_TOKENS))
    mask = torch.ones_like(ids)
    mask[1, :20] = 0  # left padding
    sparse = _sparsify(model, {"input_ids": ids[:, :16]}, "dense")
    sample = dict(do_sample=True, top_k=0, max_new_tokens=5, attention_mask=mask)
    torch.manual_seed(1)
    ref = model.generate(ids, **sample)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptureNotice)
        out = sparse.generate(ids, **sample)
    assert torch.equal(out, ref)  # the capture's short generation drew nothing from the random state
    captured = {id(p): p for p in sparse._signatures.values()}.values()
    lengths = [leaf.shape[-1] for p in captured for leaf in torch.utils._pytree.tree_leaves(p.ep.example_inputs)
               if isinstance(leaf, torch.Tensor) and leaf.dtype == torch.long and leaf.dim() == 2]
    # no graph captured at the long prompt (the decode graph's mask covers the short prompt plus one token)
    assert lengths and max(lengths) <= GENERATION_CAPTURE_TOKENS + 1
