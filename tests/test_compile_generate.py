"""Generation through the compile backend bound to the model (`attnpass.backend(method=..., model=m)`):
`model.forward = torch.compile(model.forward, backend=...)`, then transformers' generate(). The
prompt runs through the method's sites, each decode step as exact dense attention over the KV
cache; each site's module is created once, attached to the model (so its state is in
`state_dict()`), and reused by every later graph; compilations are bounded and no graph breaks.

The graph between sites runs with aot_eager (the AOT autograd path Inductor takes, no C++ compile),
and with Inductor in the generation test of routing and combiner.
"""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
import transformers
from torch import nn
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import is_fake

import attnpass
from attnpass.sparse_module import CaptureNotice
from tests.zoo import VOCAB, by_name

GREEDY = dict(do_sample=False, output_scores=True, return_dict_in_generate=True)
LENGTHS = (20, 24, 29, 33, 40)  # prompt lengths; 40 + new tokens stays below the config's 64 positions
OPTIONS = {"routing": {"clusters": 4}, "combiner": {"block": 8}, "sparsefinder": {}, "sbm": {},
           "routing:recipe": {"clusters": 4, "queries": "nearest", "keys": "members", "sampled_queries": 1,
                              "refit_steps": 2, "sinks": 1, "local": 2, "local_window": 8},
           "sparsefinder:blocks": {"predictor": "blocks", "block": 4, "top_blocks": 2, "sampled_queries": 2},
           "sparsefinder:recipe": {"predictor": "blocks", "block": 4, "top_blocks": 2, "sampled_queries": 2, "sinks": 2,
                                   "local": 4}}
# Methods whose prompt graphs keep their sites (SiteAttention.traces_symbolically: the block recipe's
# softmax on the flash op, Combiner's and routing's layouts as tensor code of L, routing's centroids
# graph inputs); the others (the blocks with entmax-1.5, Sparsefinder's default without an anchor, run
# the grouped kernel; SBM) cut the prompt graph at the sites
TRACED_AT_PROMPTS = ("sparsefinder:recipe", "combiner", "routing", "routing:recipe")
# ... where the first graph runs eagerly at its first call, which initialises the method's state
FIRST_CALL_INITIALISES = ("routing", "routing:recipe")
# Every method's decode steps are known as such without the key length (the cost model proves that one
# query never pays at any key length, `prefill.sparse_never_pays`): every decode graph runs the dense op whole
TRACED_AT_DECODE = tuple(OPTIONS)


def _method(label: str) -> str:
    """The method of an OPTIONS label ("sparsefinder:blocks" is Sparsefinder with its block predictor)."""
    return label.split(":")[0]


def _llama():
    model = by_name("llama-causallm").build()
    return model.eval()


def _bind(model, method, inner="aot_eager", **options):
    """Compile `model.forward` in place with a backend bound to `model`."""
    torch._dynamo.reset()
    counters.clear()
    compiler = attnpass.backend(method=method, inner=inner, model=model, **options)
    model.forward = torch.compile(model.forward, backend=compiler)
    return compiler


def _prompt(length, batch=2, seed=None):
    generator = torch.Generator().manual_seed(length if seed is None else seed)
    return torch.randint(1, VOCAB, (batch, length), generator=generator)  # no pad id (0)


def _kinds(report) -> list[str]:
    """Each compiled graph as "prefill" or "decode": a decode graph's sites take one query."""
    kinds = []
    for graph in report.graphs:
        shapes = {row["Lq x Lk"].split(" x ")[0] for row in graph.rewritten}
        assert len(shapes) == 1, report
        kinds.append("decode" if shapes == {"1"} else "prefill")
    return kinds


def _sparsified_with_the_same_state(original, model, ids, method):
    """`attnpass.sparsify` of a copy of the original, with the backend's site state loaded into it:
    a strict load, so the keys are the same as those the bound backend attached."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptureNotice)
        sparse = attnpass.sparsify(copy.deepcopy(original), kwargs=dict(input_ids=ids), method=_method(method),
                                   **OPTIONS[method])
    sparse.load_state_dict(model.state_dict(), strict=True)
    return sparse


# Inductor (the default inner compiler) for routing and combiner: it lays the prefill's keys out in
# another order than eager, which the backend undoes so the decode graph is not compiled again
@pytest.mark.parametrize("method, inner", [("routing", "aot_eager"), ("combiner", "aot_eager"),
                                           ("sparsefinder", "aot_eager"), ("sbm", "aot_eager"),
                                           ("sparsefinder:blocks", "aot_eager"), ("sparsefinder:recipe", "aot_eager"),
                                           ("routing:recipe", "aot_eager"),
                                           ("routing", "inductor"), ("combiner", "inductor")])
def test_generate_runs_the_prompt_sparse_and_decode_dense_with_bounded_compilations(method, inner, monkeypatch):
    if method == "routing:recipe":  # member samples need a far block of keys: blocks of 4 at these lengths
        from attnpass.methods.routing import member_keys

        monkeypatch.setattr(member_keys, "NEED_BLOCK", 4)
    model = _llama()
    original = copy.deepcopy(model)
    compiler = _bind(model, _method(method), inner=inner, **OPTIONS[method])
    outs = {}
    with torch.no_grad():
        for length in LENGTHS:
            outs[length] = model.generate(input_ids=_prompt(length), max_new_tokens=3, **GREEDY)
    # compilations: graphs handed to the backend (= dynamo's unique graphs), by kind
    kinds = _kinds(compiler.report)
    assert kinds.count("prefill") <= 2 and kinds.count("decode") <= 2, (kinds, compiler.report)
    assert compiler.report.compilations == counters["stats"]["unique_graphs"] == len(kinds)
    assert not counters["graph_break"], dict(counters["graph_break"])  # one graph per forward call
    assert not compiler.report.skipped, compiler.report
    assert all(len(g.rewritten) == 2 for g in compiler.report.graphs)  # both layers, in every graph
    # one module per site, attached to the model and shared by every graph
    modules = compiler.site_modules()
    assert sorted(modules) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert {r["module"] for g in compiler.report.graphs for r in g.rewritten} == {
        f"{name}.attnpass" for name in modules}
    for index, (graph, kind) in enumerate(zip(compiler.report.graphs, kinds)):
        traced = method in (TRACED_AT_DECODE if kind == "decode" else TRACED_AT_PROMPTS)
        assert graph.cut_at == ([] if traced else sorted(modules)), (kind, graph)
        assert graph.pieces == (1 if traced else 3), (kind, graph)
        initialising = index == 0 and method in FIRST_CALL_INITIALISES
        assert graph.eager_until_initialised == (sorted(modules) if initialising else []), (kind, graph)

    # the first generated step's scores are the sparse model's forward at the last prompt position
    sparse = _sparsified_with_the_same_state(original, model, _prompt(LENGTHS[0]), method)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptureNotice)
        for length, out in outs.items():
            ids = _prompt(length)
            forward = sparse(input_ids=ids).logits[:, -1]
            torch.testing.assert_close(out.scores[0], forward, rtol=0, atol=1e-5)
            assert (out.scores[0] - original(input_ids=ids).logits[:, -1]).abs().max() > 1e-3  # not dense

    # later steps: dense attention over the cache (the original given a copy of the same cache)
    ids, out = _prompt(LENGTHS[-1]), outs[LENGTHS[-1]]
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]
        torch.testing.assert_close(logits, out.scores[0], rtol=0, atol=1e-5)
        for score in out.scores[1:]:
            token = logits.argmax(-1, keepdim=True)
            ref = original(input_ids=token, cache=copy.deepcopy(cache), use_cache=True).logits[:, -1]
            logits = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1]
            torch.testing.assert_close(logits, ref, rtol=0, atol=1e-5)
            torch.testing.assert_close(score, logits, rtol=0, atol=1e-5)


def test_dense_generation_is_one_compiled_piece_per_graph_and_the_original_tokens():
    """The dense op traces with symbolic lengths: no graph is cut at its sites (prompt or decode step),
    and generation returns the original's tokens and scores."""
    model = _llama()
    original = copy.deepcopy(model)
    compiler = _bind(model, "dense")
    with torch.no_grad():
        for length in LENGTHS:
            ids = _prompt(length)
            out = model.generate(input_ids=ids, max_new_tokens=3, **GREEDY)
            ref = original.generate(input_ids=ids, max_new_tokens=3, **GREEDY)
            assert torch.equal(out.sequences, ref.sequences), length
            for got, expected in zip(out.scores, ref.scores):
                torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    kinds = _kinds(compiler.report)
    assert kinds.count("prefill") <= 2 and kinds.count("decode") <= 2, (kinds, compiler.report)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert all(g.pieces == 1 and not g.cut_at and len(g.rewritten) == 2 for g in compiler.report.graphs)


def test_a_traced_routing_site_reads_its_centroids_at_every_call():
    """Routing's centroids are inputs of the compiled graph: the first graph's first call runs eagerly
    (the sites initialise them), its later calls and the next graph run them in one
    piece (no eager site call), and centroids loaded later reach the graphs without a recompilation:
    they then equal sparsify() with those centroids."""
    model = _llama()
    original = copy.deepcopy(model)
    compiler = _bind(model, "routing", clusters=4, prefill_queries=2)
    ids = _prompt(LENGTHS[3])
    eager_calls = []
    with torch.no_grad():
        model(input_ids=_prompt(LENGTHS[0]))  # the first graph (static length), eagerly: initialises
        def count_eager_call(module, args, out):  # a compiled graph's tracing calls it too, on fakes
            if not is_fake(args[0]):
                eager_calls.append(module.spec.name)

        hooks = [m.register_forward_hook(count_eager_call) for m in compiler.site_modules().values()]
        first_graph_again = model(input_ids=_prompt(LENGTHS[0])).logits  # the same graph, whole
        for length in LENGTHS[1:3]:  # a graph with a symbolic length
            model(input_ids=_prompt(length))
        before = model(input_ids=ids).logits
        first_state = copy.deepcopy(model.state_dict())
        state = model.state_dict()
        for key in [k for k in state if k.endswith("kmeans.centroids")]:
            state[key] = torch.randn(state[key].shape, generator=torch.Generator().manual_seed(len(key)))
        model.load_state_dict(state)
        after = model(input_ids=ids).logits
        for hook in hooks:
            hook.remove()
        sparse = _sparsified_with_the_same_state(original, model, _prompt(LENGTHS[0]), "routing")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CaptureNotice)
            expected = sparse(input_ids=ids).logits
            sparse.load_state_dict(first_state, strict=True)
            expected_first = sparse(input_ids=_prompt(LENGTHS[0])).logits
    graphs = compiler.report.graphs
    assert len(graphs) == 2 and all(g.pieces == 1 and not g.cut_at for g in graphs), compiler.report
    assert graphs[0].eager_until_initialised and not graphs[1].eager_until_initialised, compiler.report
    assert not eager_calls  # every site call after the first ran inside a compiled graph
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert (after - before).abs().max() > 1e-3  # the new centroids route otherwise
    torch.testing.assert_close(after, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(first_graph_again, expected_first, rtol=0, atol=1e-5)


def test_unbound_combiner_decode_steps_are_dense_over_the_cache_too():
    """Without `model=` each graph has its own modules; a decode graph's one-query site is still the
    prompt's causal attention, so its steps run exact dense attention over the cache."""
    model = _llama()
    original = copy.deepcopy(model)
    torch._dynamo.reset()
    compiler = attnpass.backend(method="combiner", inner="aot_eager", block=8)
    model.forward = torch.compile(model.forward, backend=compiler)
    ids = _prompt(40)
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]
        assert (logits - original(input_ids=ids).logits[:, -1]).abs().max() > 1e-3  # the prompt ran sparse
        for _ in range(2):
            token = logits.argmax(-1, keepdim=True)
            ref = original(input_ids=token, cache=copy.deepcopy(cache), use_cache=True).logits[:, -1]
            logits = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1]
            torch.testing.assert_close(logits, ref, rtol=0, atol=1e-5)
    assert set(_kinds(compiler.report)) == {"prefill", "decode"}


def test_combiner_decode_graphs_with_its_default_block_are_whole_under_either_prefill_rule():
    """Combiner's default block follows the key length (~sqrt(Lk)), yet the cost model proves one query
    dearer than dense attention at every key length and block (`prefill.sparse_never_pays`): with the
    cost model deciding, as with `prefill_queries`, every graph (prompt and decode) compiles whole, and
    both generate the same tokens and scores."""
    outs = {}
    for label, options in (("fixed", {"prefill_queries": 2}), ("cost model", {})):
        model = _llama()
        compiler = _bind(model, "combiner", **options)
        with torch.no_grad():
            outs[label] = [model.generate(input_ids=_prompt(n), max_new_tokens=3, **GREEDY) for n in LENGTHS[:3]]
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert all(g.pieces == 1 and not g.cut_at for g in compiler.report.graphs), compiler.report
        assert "decode" in _kinds(compiler.report) and len(compiler.report.graphs) <= 4
    for fixed, default in zip(outs["fixed"], outs["cost model"]):
        assert torch.equal(fixed.sequences, default.sequences)
        for a, b in zip(fixed.scores, default.scores):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_a_decode_step_before_any_prompt_makes_no_module():
    """Compiled after the prompt ran eagerly: the first graph is a decode step, left as the model
    computes it (dense over the cache); the module is made from the next prompt's graph."""
    model = _llama()
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(input_ids=_prompt(20), cache=cache, use_cache=True).logits[:, -1]
        reference = model(input_ids=logits.argmax(-1, keepdim=True), cache=copy.deepcopy(cache), use_cache=True)
        compiler = _bind(model, "routing", clusters=4)
        got = model(input_ids=logits.argmax(-1, keepdim=True), cache=cache, use_cache=True)
        torch.testing.assert_close(got.logits, reference.logits, rtol=0, atol=1e-5)
        assert not compiler.site_modules() and all("decode step before any prompt" in s.reason
                                                   for s in compiler.report.skipped)
        model.generate(input_ids=_prompt(24), max_new_tokens=2, **GREEDY)
    assert sorted(compiler.site_modules()) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all(m.clusters == 4 for m in compiler.site_modules().values())


def test_state_dict_keeps_the_method_state_and_a_round_trip_restores_the_outputs():
    model = _llama()
    compiler = _bind(model, "routing", clusters=4, prefill_queries=4)
    ids = _prompt(24)
    with torch.no_grad():
        first = model.generate(input_ids=ids, max_new_tokens=3, **GREEDY)
    state = model.state_dict()
    for layer in (0, 1):
        kmeans = f"model.layers.{layer}.self_attn.attnpass.kmeans"
        assert state[f"{kmeans}.centroids"].shape == (4, 4, 8)  # 4 query heads, 4 clusters, head dim 8
        assert bool(state[f"{kmeans}.initialized"]) and state[f"{kmeans}.centroids"].abs().sum() > 0  # from the prompt
    modules = compiler.site_modules()
    assert all(m.prefill_queries == 4 and not m.training for m in modules.values())
    model.train()
    assert all(m.training for m in modules.values())  # attached: they follow the model's mode
    model.eval()
    saved = io.BytesIO()
    torch.save(state, saved)

    # a fresh copy of the model: its modules exist after its first compiled call, which initialises
    # their centroids from another batch; loading the saved state restores the first model's outputs
    fresh = _llama()
    _bind(fresh, "routing", clusters=4, prefill_queries=4)
    with torch.no_grad():
        fresh.generate(input_ids=_prompt(24, seed=99), max_new_tokens=3, **GREEDY)  # creates the modules
        before = fresh.generate(input_ids=ids, max_new_tokens=3, **GREEDY)
        assert (before.scores[0] - first.scores[0]).abs().max() > 1e-3  # other centroids, other output
        saved.seek(0)
        fresh.load_state_dict(torch.load(saved), strict=True)
        again = fresh.generate(input_ids=ids, max_new_tokens=3, **GREEDY)
    assert torch.equal(again.sequences, first.sequences)
    for got, want in zip(again.scores, first.scores, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_left_padded_batch_generates_through_the_sites():
    model = _llama()
    _, kwargs = by_name("llama-causallm").inputs(2, 24)
    kwargs = {name: t.flip(-1) for name, t in kwargs.items()}  # left padding
    assert not bool(kwargs["attention_mask"].all())
    compiler = _bind(model, "routing", clusters=4)
    with torch.no_grad():
        out = model.generate(**kwargs, max_new_tokens=3, **GREEDY)
    assert out.sequences.shape == (2, 27) and all(bool(torch.isfinite(s).all()) for s in out.scores)
    assert not compiler.report.skipped and set(_kinds(compiler.report)) == {"prefill", "decode"}, compiler.report


def test_module_compile_in_place_generates_through_the_backend():
    """`model.compile(backend=...)` (torch.compile of the module's call, in place) serves generate too.
    (`torch.compile(model)` returns a wrapper whose generate() runs the uncompiled model.)"""
    model, reference = _llama(), _llama()
    ids = _prompt(20)
    torch._dynamo.reset()
    compiler = attnpass.backend(method="combiner", inner="aot_eager", model=model, block=8)
    model.compile(backend=compiler)
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=3, **GREEDY)
        sparse = attnpass.sparsify(reference, kwargs=dict(input_ids=ids), method="combiner", block=8)
        torch.testing.assert_close(out.scores[0], sparse(input_ids=ids).logits[:, -1], rtol=0, atol=1e-5)
    assert sorted(compiler.site_modules()) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 48)

    def forward(self, x, causal: bool):
        q, k, v = self.proj(x).view(*x.shape[:2], 3, 2, 8).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).flatten(2)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _Attention()

    def forward(self, x, causal: bool = True):
        return self.attn(x, causal)


def test_a_site_whose_attention_differs_is_left_unchanged_with_a_warning():
    torch.manual_seed(0)
    model = _Tiny().eval()
    x = torch.randn(2, 12, 16)
    with torch.no_grad():
        dense = model(x, causal=False)
    compiler = _bind(model, "routing", clusters=3)
    with torch.no_grad():
        model(x, causal=True)  # creates the causal site's module
        with pytest.warns(UserWarning, match=r"attn: its attention differs .*causal=False \(built for True\)"):
            got = model(x, causal=False)
    torch.testing.assert_close(got, dense, rtol=0, atol=1e-6)  # left as the model computes it
    (skipped,) = compiler.report.skipped
    assert skipped.name == "attn" and "differs" in skipped.reason
    assert list(compiler.site_modules()) == ["attn"]
    assert [n for n, _ in model.named_modules()] == ["", "attn", "attn.proj", "attn.attnpass", "attn.attnpass.kmeans"]


def test_a_submodule_compiled_alone_is_not_bound_to_the_wrong_path():
    model = _llama()
    torch._dynamo.reset()
    compiler = attnpass.backend(method="routing", inner="aot_eager", model=model, clusters=4)
    inner = torch.compile(model.model, backend=compiler)  # paths relative to model.model, not model
    with torch.no_grad():
        inner(input_ids=_prompt(20))
    assert not compiler.report.rewritten and not compiler.site_modules()
    assert all("not that module in the bound LlamaForCausalLM" in s.reason for s in compiler.report.skipped)


def test_a_graph_of_another_model_is_left_unchanged():
    model, other = _llama(), _llama()
    torch._dynamo.reset()
    compiler = attnpass.backend(method="routing", inner="aot_eager", model=model, clusters=4)
    with torch.no_grad():
        torch.compile(other, backend=compiler)(input_ids=_prompt(20))  # same paths, other parameters
    assert not compiler.report.rewritten and not compiler.site_modules()
    assert all("another model's" in s.reason for s in compiler.report.skipped) and compiler.report.skipped


def test_training_through_the_bound_backend_updates_the_attached_state():
    model = _llama().train()
    compiler = _bind(model, "routing", clusters=4)
    ids = _prompt(24)
    out = model(input_ids=ids, labels=ids)
    module = compiler.site_modules()["model.layers.0.self_attn"]
    centroids = module.kmeans.centroids.clone()
    aux = attnpass.aux_loss(model)  # the commitment loss, found on the model's attached modules
    assert aux.requires_grad and aux > 0
    (out.loss + aux).backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    model(input_ids=ids, labels=ids)
    assert (module.kmeans.centroids - centroids).abs().max() > 0  # an EMA step in train mode
    assert compiler.report.compilations == 1 and not counters["graph_break"]


def test_explain_applies_a_stateful_method_to_a_copy():
    model = _Tiny().eval()
    report = attnpass.explain(model, (torch.randn(2, 12, 16),), method="routing", clusters=3)
    assert report.rewritten == ["attn"] and report.graphs[0].rewritten[0]["module"] == "attn.attnpass"
    assert [n for n, _ in model.named_modules()] == ["", "attn", "attn.proj"]  # the model is not changed


def test_a_stateful_method_without_a_model_says_to_pass_one():
    with pytest.raises(ValueError, match=r"learned state.*model=model"):
        attnpass.backend(method="routing")
    with pytest.raises(ValueError, match=r"prefill_queries=0"):
        attnpass.backend(method="routing", model=_Tiny(), prefill_queries=0)
    sparse = attnpass.sparsify(_Tiny(), (torch.randn(1, 8, 16),))
    with pytest.raises(ValueError, match="already sparsified"):
        attnpass.backend(method="routing", model=sparse)
