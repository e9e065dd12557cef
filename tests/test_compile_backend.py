"""torch.compile(model, backend="attnpass"): the compiled model computes what eager / sparsify compute,
gradients included; new lengths do not recompile each time; the report says what was rewritten and
skipped; an already sparsified model is lowered without a second rewrite; stateful methods asked of
the backend directly fail with a pointer to the documented way; the entry point works without
importing attnpass; nn.MultiheadAttention / nn.Transformer* layers, whose attention dynamo keeps as
one call (F.multi_head_attention_forward, or the encoder layer's fused no_grad fast path), are
inlined and rewritten as sparsify rewrites them.

Most equality tests run the graph between sites with aot_eager (same AOT autograd path as Inductor,
no C++ compile); a few use Inductor itself.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch._dynamo

import attnpass
from attnpass.backends.compile import _opaque_attention
from attnpass.frontend.detect import module_path
from attnpass.frontend.inline_mha import inline_mha
from tests.helpers import max_relative_error, same_state, snapshot, tensors
from tests.zoo import by_name

# the nn.* cases: dynamo keeps F.multi_head_attention_forward as one call, which the backend inlines
ZOO = ["bert-eager", "gpt2-eager", "llama-eager", "t5-eager", "hand-matmul-div-mask",
       "nn-transformer-encoder", "nn-mha-noweights"]
TOL = 2e-5


def _loss(out) -> torch.Tensor:
    return sum((t.double() ** 2).mean() for t in tensors(out) if t.is_floating_point())


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(got: dict, expected: dict):
    assert got.keys() == expected.keys() and got, (sorted(got)[:5], sorted(expected)[:5])
    # relative to the largest gradient: some are exactly 0 in exact arithmetic (k's bias) and ~1e-10 here
    scale = max(e.abs().max().item() for e in expected.values())
    worst = max((got[k] - expected[k]).abs().max().item() for k in got) / scale
    assert worst < 1e-5, worst


def _compile(model, method, inner="aot_eager", **options):
    torch._dynamo.reset()
    compiler = attnpass.backend(method=method, inner=inner, **options)
    return torch.compile(model, backend=compiler), compiler


def _run_and_backprop(model, args, kwargs):
    out = model(*args, **kwargs)
    _loss(out).backward()
    return out


@pytest.mark.parametrize("name", ZOO)
def test_dense_equals_eager_with_gradients(name):
    case = by_name(name)
    eager, compiled_src = case.build(), case.build()
    args, kwargs = case.inputs(2, 8)
    compiled, compiler = _compile(compiled_src, "dense")
    got = _run_and_backprop(compiled, args, kwargs)
    expected = _run_and_backprop(eager, args, kwargs)
    assert len(compiler.report.rewritten) == case.attention_count, compiler.report
    assert max_relative_error(got, expected) < TOL
    _assert_same_grads(_grads(compiled_src), _grads(eager))


# nn-mha-weights: need_weights=True, the averaged weights dropped by the model (dead code, as in sparsify)
@pytest.mark.parametrize("name", ZOO + ["nn-mha-weights"])
def test_combiner_equals_sparsify_with_gradients(name):
    case = by_name(name)
    model, compiled_src = case.build(), case.build()
    args, kwargs = case.inputs(2, 8)
    reference = attnpass.sparsify(model, args, kwargs, method="combiner", block=3)
    compiled, compiler = _compile(compiled_src, "combiner", block=3)
    got = _run_and_backprop(compiled, args, kwargs)
    expected = _run_and_backprop(reference, args, kwargs)
    # the backend rewrites (and declines) exactly the sites sparsify does
    assert sorted(compiler.report.rewritten) == sorted(s.name for s in reference.sites), compiler.report
    assert sorted(s.name for s in compiler.report.skipped) == sorted(s.name for s in reference.report.skipped)
    assert compiler.report.rewritten, compiler.report
    assert max_relative_error(got, expected) < TOL
    _assert_same_grads(_grads(compiled_src), _grads(reference))


def test_combiner_differs_from_dense_so_the_comparison_can_fail():
    case = by_name("bert-eager")
    args, kwargs = case.inputs(2, 12)
    compiled, _ = _compile(case.build(), "combiner", block=3)
    with torch.no_grad():
        assert max_relative_error(compiled(*args, **kwargs), case.build()(*args, **kwargs)) > 1e-3


def test_inductor_dense_and_combiner_with_gradients():
    case = by_name("hand-matmul-div-mask")
    args, kwargs = case.inputs(2, 8)
    for method in ("dense", "combiner"):
        eager, compiled_src = case.build(), case.build()
        reference = eager if method == "dense" else attnpass.sparsify(eager, args, kwargs, method="combiner", block=3)
        options = {} if method == "dense" else {"block": 3}
        compiled, compiler = _compile(compiled_src, method, inner="inductor", **options)
        got = _run_and_backprop(compiled, args, kwargs)
        expected = _run_and_backprop(reference, args, kwargs)
        # both are traced into the one graph Inductor compiles (Combiner's layout is tensor code of L)
        assert len(compiler.report.rewritten) == 1 and compiler.report.graphs[0].pieces == 1
        assert compiler.report.graphs[0].cut_at == []
        assert max_relative_error(got, expected) < TOL, method
        _assert_same_grads(_grads(compiled_src), _grads(reference))


def test_five_lengths_compile_at_most_twice():
    case = by_name("gpt2-eager")
    model = case.build()
    reference = attnpass.sparsify(model, *case.inputs(2, 8), method="combiner")
    # aot_eager: the pieces go through AOT autograd as with Inductor, where a guard on L would come from
    compiled, compiler = _compile(case.build(), "combiner", inner="aot_eager")
    with torch.no_grad():
        for length in (8, 11, 16, 23, 30):
            args, kwargs = case.inputs(2, length)
            assert max_relative_error(compiled(*args, **kwargs), reference(*args, **kwargs)) < TOL, length
    assert compiler.report.compilations <= 2, compiler.report
    assert len(compiler.report.rewritten) == 2 * compiler.report.compilations


def test_routing_bound_to_gpt2_compiles_twice_over_five_lengths_with_its_sites_in_the_graph():
    """A method with state on GPT-2 (Llama: tests/test_compile_generate.py): routing bound to the model
    compiles at most twice over five lengths, the graph with a symbolic length holds the sites (its
    centroids are graph inputs: no cut), and every output equals sparsify()'s with the same centroids."""
    case = by_name("gpt2-eager")
    model = case.build().eval()
    original = copy.deepcopy(model)
    torch._dynamo.reset()
    options = dict(clusters=2, local_window=4)
    compiler = attnpass.backend(method="routing", inner="aot_eager", model=model, **options)
    compiled = torch.compile(model, backend=compiler)
    outs = {}
    with torch.no_grad():
        for length in (8, 11, 16, 23, 30):
            outs[length] = compiled(*case.inputs(2, length)[0], **case.inputs(2, length)[1])
    graphs = compiler.report.graphs
    assert len(graphs) == 2 and graphs[0].eager_until_initialised, compiler.report  # the first call initialises
    assert all(not g.cut_at and g.pieces == 1 and len(g.rewritten) == 2 for g in graphs), compiler.report
    reference = attnpass.sparsify(original, *case.inputs(2, 8), method="routing", **options)
    reference.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        for length, out in outs.items():
            args, kwargs = case.inputs(2, length)
            assert max_relative_error(out, reference(*args, **kwargs)) < TOL, length
            assert max_relative_error(out, original(*args, **kwargs)) > 1e-3, length  # not dense


def test_input_model_is_not_mutated():
    case = by_name("gpt2-eager")
    model = case.build()
    before, modules = snapshot(model), [n for n, _ in model.named_modules()]
    compiled, compiler = _compile(model, "combiner")
    _run_and_backprop(compiled, *case.inputs(2, 8))
    assert compiler.report.rewritten
    assert same_state(model, before)
    assert [n for n, _ in model.named_modules()] == modules  # no site module attached to the user's model


def test_explain_names_rewritten_and_skipped_sites():
    case = by_name("t5-eager")
    args, kwargs = case.inputs(2, 8)
    report = attnpass.explain(case.build(), args, kwargs, method="combiner")
    cross = ["model.decoder.block.0.layer.1.EncDecAttention", "model.decoder.block.1.layer.1.EncDecAttention"]
    assert sorted(report.rewritten) == cross
    skipped = {s.name: s.reason for s in report.skipped}
    assert len(skipped) == 4 and all("bias" in reason for reason in skipped.values()), skipped
    assert "model.encoder.block.0.layer.0.SelfAttention" in skipped
    text = str(report)
    assert all(name in text for name in cross + list(skipped))


def test_backend_logs_rewritten_sites(caplog):
    case = by_name("hand-matmul-div-mask")
    compiled, _ = _compile(case.build(), "dense", inner="eager")
    with caplog.at_level("INFO", logger="attnpass.backends.compile"), torch.no_grad():
        compiled(*case.inputs(2, 8)[0])
    assert any("rewrote <root>" in r.getMessage() and "dense" in r.getMessage() for r in caplog.records)


def test_encoder_fast_path_and_multi_head_attention_forward_are_inlined_with_metadata():
    case = by_name("nn-transformer-encoder")
    graphs = []

    def keep(gm, example_inputs):
        before = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        inlined, declined = inline_mha(gm)
        graphs.append((before, gm, len(inlined), declined))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():  # eval + no_grad: PyTorch's fused fast path, one native op per layer
        torch.compile(case.build(), backend=keep)(*case.inputs(2, 8)[0])
    (before, gm, inlined, declined), = graphs
    assert before.count(torch._transformer_encoder_layer_fwd) == 2, before
    assert inlined == 4 and not declined  # 2 fast-path layers lowered, their 2 attention calls inlined
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert not {torch._transformer_encoder_layer_fwd, torch.nn.functional.multi_head_attention_forward} & {
        n.target for n in calls}
    assert all("example_value" in n.meta for n in calls)
    paths = {module_path(n)[0] for n in calls if n.target is torch.ops.aten.scaled_dot_product_attention.default}
    assert paths == {"encoder.layers.0.self_attn", "encoder.layers.1.self_attn"}, paths


def test_encoder_fast_path_with_an_unknown_mask_type_is_reported_not_guessed():
    case = by_name("nn-transformer-encoder")
    found = []

    def keep(gm, example_inputs):
        runnable = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))  # the graph as dynamo made it
        layer = next(n for n in gm.graph.nodes if n.target is torch._transformer_encoder_layer_fwd)
        assert layer.args[19] == 1  # mask_type: key padding
        layer.update_arg(19, 0)  # a mask type `merge_masks` never produces
        inlined, declined = inline_mha(gm)
        found.append((len(inlined), _opaque_attention(gm, declined)))
        return runnable.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(case.build(), backend=keep)(*case.inputs(2, 8)[0])
    (inlined, skipped), = found
    assert inlined == 2  # the other layer: lowered, then its attention inlined
    assert [(s.name, s.pattern) for s in skipped] == [("encoder.layers.0", "_transformer_encoder_layer_fwd")]
    assert "mask type 0" in skipped[0].reason and "fast path" in skipped[0].reason, skipped[0].reason


class _MHAReturningWeights(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x, key_padding_mask):
        return self.attn(x, x, x, key_padding_mask=key_padding_mask)  # (output, averaged weights)


def test_mha_returning_its_weights_is_skipped_as_sparsify_skips_it():
    torch.manual_seed(0)
    model = _MHAReturningWeights().eval()
    args, kwargs = by_name("nn-mha-weights").inputs(2, 8)
    expected = attnpass.find_attention(model, args, kwargs)
    compiled, compiler = _compile(model, "combiner", inner="eager", block=3)
    got = compiled(*args, **kwargs)
    assert not compiler.report.rewritten and not expected.sites
    assert [(s.name, s.reason) for s in compiler.report.skipped] == [(s.name, s.reason) for s in expected.skipped]
    assert "also used" in compiler.report.skipped[0].reason
    assert max_relative_error(got, model(*args, **kwargs)) < TOL


class _Decoder(torch.nn.Module):
    """nn.TransformerDecoder (sequence first, causal self-attention, cross-attention) and an
    nn.MultiheadAttention with its own key and value sizes (separate projection weights)."""

    def __init__(self):
        super().__init__()
        layer = torch.nn.TransformerDecoderLayer(32, 4, dim_feedforward=64, dropout=0.0)
        self.decoder = torch.nn.TransformerDecoder(layer, num_layers=1)
        self.cross = torch.nn.MultiheadAttention(32, 4, kdim=16, vdim=24)

    def forward(self, tgt, memory, kv):
        causal = torch.nn.Transformer.generate_square_subsequent_mask(tgt.shape[0])
        y = self.decoder(tgt, memory, tgt_mask=causal, tgt_is_causal=True)
        return self.cross(y, kv[..., :16], kv, need_weights=False)[0]


def test_decoder_and_separate_projections_equal_eager_with_masks_recovered():
    torch.manual_seed(0)
    model = _Decoder().eval()
    args = (torch.randn(8, 2, 32), torch.randn(12, 2, 32), torch.randn(12, 2, 24))
    compiled, compiler = _compile(model, "dense", inner="eager")
    got = compiled(*args)
    rows = [(r["site"], r["kind"], r["mask"]) for g in compiler.report.graphs for r in g.rewritten]
    assert rows == [("decoder.layers.0.self_attn", "self", "causal"), ("decoder.layers.0.multihead_attn", "cross", "none"),
                    ("cross", "cross", "none")], compiler.report
    assert max_relative_error(got, model(*args)) < TOL


def test_transformer_encoder_new_lengths_compile_at_most_twice():
    case = by_name("nn-transformer-encoder")
    reference = attnpass.sparsify(case.build(), *case.inputs(2, 8), method="combiner")
    compiled, compiler = _compile(case.build(), "combiner", inner="aot_eager")  # AOT could add guards on L
    with torch.no_grad():  # the fast path, lowered and inlined (with grad: the parametrized tests above)
        for length in (8, 11, 16):
            args, kwargs = case.inputs(2, length)
            assert max_relative_error(compiled(*args, **kwargs), reference(*args, **kwargs)) < TOL, length
    assert compiler.report.compilations <= 2, compiler.report
    # the (B*H, 1, L) float mask the function builds from key_padding_mask is read as key padding
    rows = [r for g in compiler.report.graphs for r in g.rewritten]
    assert len(rows) == 2 * compiler.report.compilations and all(r["mask"] == "key_padding" for r in rows), rows


class _EncoderLayers(torch.nn.Module):
    """Fast-path variants: pre-norm with GELU (layer 0), post-norm with ReLU and a causal src_mask
    merged with the padding (layer 1: mask type 2). Layers called directly: nn.TransformerEncoder
    reads its mask with .item() (is it causal?), a graph break that leaves the layers out of any graph."""

    def __init__(self):
        super().__init__()
        self.pre = torch.nn.TransformerEncoderLayer(32, 4, 64, activation="gelu", batch_first=True, norm_first=True)
        self.post = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)

    def forward(self, x, key_padding_mask):
        causal = torch.nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        padding = torch.zeros_like(key_padding_mask, dtype=x.dtype).masked_fill(key_padding_mask, float("-inf"))
        x = self.pre(x, src_key_padding_mask=padding)
        return self.post(x, src_mask=causal, src_key_padding_mask=padding)


def test_encoder_fast_path_under_no_grad_equals_eager_and_sparsify():
    case = by_name("nn-transformer-encoder")
    args, kwargs = case.inputs(2, 8)
    model = case.build()
    reference = attnpass.sparsify(model, args, kwargs, method="combiner", block=3)
    for method, expected in (("dense", model), ("combiner", reference)):
        compiled, compiler = _compile(model, method, inner="eager", **({"block": 3} if method == "combiner" else {}))
        with torch.no_grad():  # the eager model takes PyTorch's fused fast path too
            assert max_relative_error(compiled(*args, **kwargs), expected(*args, **kwargs)) < TOL, method
        assert compiler.report.rewritten == [s.name for s in reference.sites] and not compiler.report.skipped
    torch.manual_seed(0)
    layers = _EncoderLayers().eval()
    compiled, compiler = _compile(layers, "dense", inner="eager")
    with torch.no_grad():
        assert max_relative_error(compiled(*args), layers(*args)) < TOL
    rows = [(r["site"], r["mask"]) for g in compiler.report.graphs for r in g.rewritten]
    assert rows == [("pre.self_attn", "key_padding"), ("post.self_attn", "causal+key_padding")], compiler.report


def test_transformer_encoder_in_train_mode_reads_dropout():
    # train mode takes no fast path: F.multi_head_attention_forward, inlined, dropout read as sparsify reads it
    case = by_name("nn-transformer-encoder")
    report = attnpass.explain(case.build().train(), *case.inputs(2, 8), method="dense")
    assert report.rewritten == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"], report
    assert not report.skipped and all(r["dropout"] == "0.1" for g in report.graphs for r in g.rewritten), report


def test_already_sparse_model_is_lowered_without_a_second_rewrite():
    case = by_name("bert-eager")
    args, kwargs = case.inputs(2, 8)
    sparse = attnpass.sparsify(case.build(), args, kwargs, method="routing", clusters=2)
    with torch.no_grad():
        expected = sparse(*args, **kwargs)  # eager first: routing initialises its centroids
        compiled, compiler = _compile(sparse, "combiner")
        got = compiled(*args, **kwargs)
    assert not compiler.report.rewritten, compiler.report
    assert any("grouped_attention" in op for op in compiler.report.already_sparse), compiler.report
    assert max_relative_error(got, expected) < TOL


@pytest.mark.parametrize("method", ["routing"])
def test_stateful_method_asked_directly_points_to_sparsify(method):
    with pytest.raises(ValueError, match=r"learned state.*attnpass\.sparsify"):
        attnpass.backend(method=method)


def test_bad_arguments_fail_early():
    with pytest.raises(ValueError, match="inner"):
        attnpass.backend(inner="tvm")
    with pytest.raises(ValueError, match="combiner"):
        attnpass.backend(method="combiner", blocks=4)
    with pytest.raises(ValueError, match="unknown method"):
        attnpass.backend(method="flash")


def test_registered_backend_name_works_without_importing_attnpass():
    code = textwrap.dedent("""
        import sys, torch
        class Attention(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.qkv = torch.nn.Linear(16, 48)
            def forward(self, x):
                q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
                return (torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1) @ v).sum()
        torch.manual_seed(0)
        model, x = Attention(), torch.randn(2, 10, 16)
        assert "attnpass" not in sys.modules
        out = torch.compile(model, backend="attnpass")(x)
        backend = sys.modules["attnpass.backends.compile"]
        assert backend._default.report.rewritten == ["<root>"], backend._default.report
        import attnpass
        expected = attnpass.sparsify(model, (x,), method="combiner")(x)
        assert torch.allclose(out, expected, atol=1e-5), (out, expected)
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                            cwd="/")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


class _PartlyDisabled(torch.nn.Module):
    """Two attention blocks; dynamo is told not to compile the second (torch.compiler.disable), so
    it runs outside every graph the backend sees. torch.export traces through both."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.second = torch.nn.MultiheadAttention(16, 2, batch_first=True)

    @torch.compiler.disable
    def _second(self, x):
        return self.second(x, x, x, need_weights=False)[0]

    def forward(self, x):
        x = self.first(x, x, x, need_weights=False)[0]
        return self._second(x)


class _CausalEncoder(torch.nn.Module):
    """nn.TransformerEncoder called with a causal mask but no is_causal: it checks the mask with
    .item(); dynamo then runs the layers outside its graphs and torch.export cannot capture it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x, is_causal=None):
        mask = torch.nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.encoder(x, mask=mask, is_causal=is_causal)


def test_explain_names_sites_that_never_reached_the_backend():
    model = _PartlyDisabled()
    x = torch.randn(2, 8, 16)
    report = attnpass.explain(model, (x,))
    assert report.rewritten == ["first"]
    assert [s.name for s in report.not_reached] == ["second"]
    assert "never reached the backend" in report.not_reached[0].reason and "second" in str(report)
    # when torch.export cannot capture the model either, the report says the list is unavailable
    encoder = attnpass.explain(_CausalEncoder(), (x,))
    assert not encoder.rewritten and not encoder.not_reached
    assert any("could not be listed" in n for n in encoder.notes) and "note:" in str(encoder)
    # with is_causal=True there is no .item() check: both layers reach the backend and are rewritten
    told = attnpass.explain(_CausalEncoder(), (x,), {"is_causal": True})
    assert told.rewritten == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"] and not told.not_reached


class _BaddbmmKeywords(torch.nn.Module):
    """BLOOM's spelling: baddbmm(alibi, batch1=q, batch2=kᵀ, beta=, alpha=), a finfo.min fill, a
    float32 softmax, bmm with v; dynamo keeps the keyword arguments."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x, alibi):
        b, length, _ = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, 4, 8).permute(2, 0, 3, 1, 4).reshape(3, b * 4, length, 8)
        scores = torch.baddbmm(alibi, batch1=q, batch2=k.transpose(1, 2), beta=1.0, alpha=8 ** -0.5)
        future = torch.ones(length, length, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
        probs = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.bmm(probs, v)


def test_keyword_argument_spellings_are_rewritten_under_compile():
    torch._dynamo.reset()
    model = _BaddbmmKeywords().eval()
    x, alibi = torch.randn(2, 10, 32), torch.randn(8, 1, 10)
    backend = attnpass.backend(method="dense", inner="eager")
    got = torch.compile(model, backend=backend)(x, alibi)
    assert sum(len(g.rewritten) for g in backend.report.graphs) == 1, str(backend.report)
    torch.testing.assert_close(got, model(x, alibi), atol=1e-5, rtol=1e-5)


def test_a_graph_the_backend_cannot_rewrite_runs_unchanged(monkeypatch):
    """Whatever goes wrong inside the pass, the user's graph is compiled as it was, with a warning
    and the reason in the report."""
    import attnpass.backends.compile as cb

    def broken(*args, **kwargs):
        raise IndexError("simulated failure inside the pass")

    monkeypatch.setattr(cb, "rewrite_site", broken)
    torch._dynamo.reset()
    model = _BaddbmmKeywords().eval()
    x, alibi = torch.randn(2, 10, 32), torch.randn(8, 1, 10)
    backend = attnpass.backend(method="dense", inner="eager")
    with pytest.warns(UserWarning, match="compiled unchanged"):
        got = torch.compile(model, backend=backend)(x, alibi)
    torch.testing.assert_close(got, model(x, alibi), atol=1e-6, rtol=1e-6)
    skipped = [s for g in backend.report.graphs for s in g.skipped]
    assert any("simulated failure" in s.reason for s in skipped)
    assert sum(len(g.rewritten) for g in backend.report.graphs) == 0


def test_a_static_length_up_to_the_probe_limit_is_read_as_causal(monkeypatch):
    """A graph compiled for one length holds that length as a constant of its mask; a window as long
    cannot be told from causal only at other lengths, which this graph never runs at. So a causal
    mask of a static length up to the probe limit is read as causal (here the limit lowered to 30 and
    a static length of 30: before, a constant of 30 asked for a probe at 32, past the limit), and
    Combiner rewrites the sites; past the limit (20) the probes are what the limit bounds, so the
    mask stays general and Combiner declines, as before."""
    from attnpass.frontend import mask_analysis

    case = by_name("llama-eager")
    args, kwargs = case.inputs(1, 30)
    for limit, rewritten in ((30, True), (20, False)):
        monkeypatch.setattr(mask_analysis, "LONGEST_PROBE", limit)
        compiled, compiler = _compile(case.build(), "combiner", block=4)
        with torch.no_grad():
            compiled(*args, **kwargs)
        assert bool(compiler.report.rewritten) == rewritten, compiler.report
        assert len(compiler.report.rewritten if rewritten else compiler.report.skipped) == case.attention_count
