"""Band (sliding-window) sites: mask analysis recognises the band, and every method computes its own
pairs intersected with it, exactly, without an L x L tensor.

Mistral-style models mask `kv_idx > q_idx - window` on top of the causal rule; ModernBERT's local
layers `|q_idx - kv_idx| <= window'` on both sides. Mask analysis proves
the band past every constant of the mask's subgraph (attnpass/frontend/mask_analysis.py); the site's
`SiteSpec.window` then reaches the kernels' `window` argument. The references are test_anchor's: a
float64 dense softmax over the pairs the method lists, intersected with the site's allowed pairs
(`site_probe.allowed_pairs`, which holds the band); Combiner's is test_combiner's definition-level
reference with the band applied to direct keys and to whole regions.
"""
from __future__ import annotations

import pytest
import torch
from memory_probe import no_square_tensor
from test_anchor import METHOD_OPTIONS, inputs, make_site, reference
from test_routing import reference as routing_reference

from tests.helpers import tensors
from tests.zoo import by_name

import attnpass
from attnpass.lowering.torch.edge_attention import edge_attention
from attnpass.lowering.torch.grouped_attention import grouped_attention

F64 = torch.float64


def band_attention(q, k, v, window, offset=0, key_keep=None, causal=True):
    """Dense float64 softmax over keys at distance < window from i + offset (causal: j in
    (i + offset - window, i + offset]); empty rows give 0."""
    Hq, Hkv, Lq, Lk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    k, v = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
    i, j = torch.arange(Lq).view(-1, 1), torch.arange(Lk).view(1, -1)
    allowed = (j <= i + offset) & (j > i + offset - window) if causal else (j - i - offset).abs() < window
    if key_keep is not None:
        allowed = allowed & key_keep.view(-1, 1, 1, Lk)
    scores = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).masked_fill(~allowed, float("-inf"))
    return torch.nan_to_num(torch.softmax(scores, -1), nan=0.0) @ v


# -- the kernels' window ------------------------------------------------------------------------

@pytest.mark.parametrize("causal,offset", [(True, 0), (True, 5), (False, 0)],
                         ids=["causal", "causal-bottom-right", "bidirectional"])
def test_kernels_hold_every_pair_to_the_band(causal, offset):
    """All pairs listed, the window drops those outside the band: equal to dense band attention."""
    x = inputs(20, 20 + offset, padded=True)
    q, k, v, keep = x["q"], x["k"], x["v"], x["key_keep"]
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    want = band_attention(q, k, v, 6, offset, keep, causal)
    q_index = torch.arange(Lq).view(1, 1, 1, Lq).expand(B, Hq, 1, Lq)
    k_index = torch.arange(Lk).view(1, 1, 1, Lk).expand(B, Hq, 1, Lk)
    grouped, _ = grouped_attention(q, k, v, q_index, k_index, scale=q.shape[-1] ** -0.5, causal=causal,
                                   causal_offset=offset, window=6, key_padding_mask=keep)
    row_ptr = torch.arange(0, B * Hq * Lq * Lk + 1, Lk)
    col = torch.arange(Lk).repeat(B * Hq * Lq)
    edges, _ = edge_attention(q, k, v, row_ptr, col, scale=q.shape[-1] ** -0.5, causal=causal, causal_offset=offset,
                              window=6, key_padding_mask=keep)
    real = slice(5, None)  # batch row 0's first queries see only padding
    for got in (grouped.view(B, Hq, Lq, -1), edges):
        assert torch.allclose(got[:, :, real], want[:, :, real], atol=1e-12)
        assert torch.allclose(got[1], want[1], atol=1e-12)


def test_the_triton_path_hands_a_band_to_the_pytorch_kernels():
    """The Triton kernels take no window: a band call falls back (counted), with the same result."""
    pytest.importorskip("triton")
    from attnpass.lowering.triton import dispatch
    from attnpass.lowering.triton.switch import force_triton

    x = inputs(20, 20, padded=False)
    q, k, v = x["q"], x["k"], x["v"]
    B, Hq, Lq, _ = q.shape
    row_ptr = torch.arange(0, B * Hq * Lq * Lq + 1, Lq)
    col = torch.arange(Lq).repeat(B * Hq * Lq)
    before = dispatch.FALLBACKS["a band window"]
    with force_triton():
        got, _ = edge_attention(q, k, v, row_ptr, col, scale=q.shape[-1] ** -0.5, causal=True, window=6)
    assert dispatch.FALLBACKS["a band window"] == before + 1
    assert torch.allclose(got, band_attention(q, k, v, 6), atol=1e-12)


# -- every method on a band site ----------------------------------------------------------------

def band_reference(site, x: dict) -> torch.Tensor:
    """The method's own pairs intersected with the site's band. Plain routing averages a query's
    clusters: test_routing's reference, with the band as a mask that removes pairs (a cluster slot
    stays, as under a general mask); every other case is test_anchor's one-softmax reference."""
    if site.method_name != "routing" or site.anchor:
        return reference(site, x)
    q, k = x["q"], x["k"]
    band = site.band_mask(q, k).expand(q.shape[0], q.shape[1], -1, -1)
    return routing_reference(site, site.layout(q, k, x["key_keep"]), q, k, x["v"], mask=band, key_keep=x["key_keep"])


@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
@pytest.mark.parametrize("window", [10, 40], ids=["window10", "window40"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_each_method_is_its_layout_intersected_with_the_band(method, window, padded):
    site = make_site(method, 96, window=window)
    x = inputs(96, 96, padded)
    got = site(x["q"], x["k"], x["v"], key_keep=x["key_keep"])
    want = band_reference(site, x)
    rows = slice(5, None) if padded else slice(None)
    assert torch.allclose(got[:, :, rows], want[:, :, rows], atol=1e-10, rtol=1e-9)


def test_sparsefinders_bucket_path_keeps_to_the_band():
    """The quantization predictor runs `quantile_bucket_attention` (no sinks / local): its window too."""
    for causal in (True, False):
        site = make_site("sparsefinder", 96, causal=causal, window=20, predictor="quantization")
        x = inputs(96, 96, padded=False)
        got = site(x["q"], x["k"], x["v"])
        assert torch.allclose(got, band_reference(site, x), atol=1e-10, rtol=1e-9), causal


@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
@pytest.mark.parametrize("sinks", [0, 3], ids=["plain", "sinks"])
def test_a_bidirectional_band_holds_each_method_to_keys_at_distance_below_the_window(method, sinks):
    """ModernBERT-style local layers: |i - j| < window, both sides; sinks only while inside it."""
    site = make_site(method, 96, causal=False, window=20, **({"sinks": sinks} if sinks else {}))
    x = inputs(96, 96, padded=True)
    got = site(x["q"], x["k"], x["v"], key_keep=x["key_keep"])
    assert torch.allclose(got, band_reference(site, x), atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_sinks_and_window_keep_to_the_band(method):
    """A window shorter than the band: sinks are seen only while inside the band."""
    site = make_site(method, 96, window=30, sinks=3, local=8)
    x = inputs(96, 96, padded=True)
    got = site(x["q"], x["k"], x["v"], key_keep=x["key_keep"])
    assert torch.allclose(got[:, :, 5:], reference(site, x)[:, :, 5:], atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_a_window_covering_the_band_is_the_band_attention_exactly(method):
    site = make_site(method, 64, window=12, sinks=2, local=16)
    assert not site.method_has_pairs()
    x = inputs(64, 64, padded=False)
    got = site(x["q"], x["k"], x["v"])
    assert torch.allclose(got, band_attention(x["q"], x["k"], x["v"], 12), atol=1e-12)


@pytest.mark.parametrize("method", ["combiner", "routing"])
def test_the_grouped_path_of_the_anchor_keeps_to_the_band(method):
    """Training (gradients) takes the grouped kernels instead of the flash path: same function."""
    site = make_site(method, 96, window=30, sinks=3, local=8)
    x = inputs(96, 96, padded=False)
    q = x["q"].clone().requires_grad_(True)
    got = site(q, x["k"], x["v"])
    assert torch.allclose(got, reference(site, x), atol=1e-10, rtol=1e-9)


def test_the_sparse_path_builds_no_square_tensor_at_a_band_site():
    site = make_site("routing", 256, window=64, sinks=2, local=16).float()
    x = inputs(256, 256, padded=False)
    with no_square_tensor(256, 256):
        site(x["q"].float(), x["k"].float(), x["v"].float())


# -- through a model ----------------------------------------------------------------------------

def _mistral(window: int, impl: str = "sdpa"):
    import transformers

    config = transformers.MistralConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=window, use_cache=False,
        attn_implementation=impl)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.MistralModel(config).eval()


def _ids(batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, :3] = 0
    return {"input_ids": torch.randint(3, 100, (batch, length), generator=g), "attention_mask": mask}


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("window", [6, 24], ids=["shorter-than-example", "longer-than-example"])
def test_mistral_sites_are_bands_and_dense_is_exact_beyond_the_window(impl, window):
    model = _mistral(window, impl)
    sparse = attnpass.sparsify(model, kwargs=_ids(2, 16))
    assert [s.mask for s in sparse.sites] == [f"causal band (window {window})+key_padding"] * 2, str(sparse.report)
    assert all(m.spec.window == window for m in sparse.site_modules().values())
    for length in (12, 40):
        x = _ids(3, length, seed=length)
        with torch.no_grad():
            torch.testing.assert_close(sparse(**x)[0], model(**x)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["combiner", "routing", "sbm", "sparsefinder"])
def test_every_method_serves_mistral_and_a_covering_window_is_the_original(method):
    """Every method runs at the band sites (none declines them); with sinks + a local window as long as
    the band, the method has nothing left and the model is the original, at lengths past the window."""
    model = _mistral(6)
    options = {"normalizer": "softmax"} if method == "sparsefinder" else {}
    sparse = attnpass.sparsify(model, kwargs=_ids(2, 16), method=method, **options)
    modules = sparse.site_modules().values()
    assert len(modules) == 2 and all(m.method_name == method for m in modules), str(sparse.report)
    x = _ids(3, 40, seed=1)
    with torch.no_grad():
        assert torch.isfinite(sparse(**x)[0]).all()
    covered = attnpass.sparsify(model, kwargs=_ids(2, 16), method=method, sinks=2, local=6, **options)
    with torch.no_grad():
        torch.testing.assert_close(covered(**x)[0][:, 3:], model(**x)[0][:, 3:], atol=1e-5, rtol=1e-5)


def test_the_compile_backend_serves_band_sites():
    """The backend reads the same band: routing with a covering window is the original at L=40."""
    model = _mistral(6)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=attnpass.backend(method="routing", model=model, sinks=2, local=6),
                             dynamic=True)
    x = _ids(3, 40, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**x)[0][:, 3:], model(**x)[0][:, 3:], atol=1e-5, rtol=1e-5)


def test_onnx_exports_a_band_site_dense_and_refuses_a_sparse_node_without_a_band():
    ort = pytest.importorskip("onnxruntime")
    model = _mistral(6)
    x = _ids(2, 16)
    proto = attnpass.export_onnx(model, kwargs=x)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    longer = _ids(3, 40, seed=3)
    feeds = {i.name: longer[i.name].numpy() for i in session.get_inputs()}
    with torch.no_grad():
        want = model(**longer)[0]
    got = torch.from_numpy(session.run(None, feeds)[0])
    torch.testing.assert_close(got[:, 3:], want[:, 3:], atol=1e-4, rtol=1e-4)
    with pytest.raises(NotImplementedError, match="is a band .* has no band in this version"):
        attnpass.export_onnx(model, kwargs=x, method="routing")


@pytest.mark.parametrize("method", attnpass.METHODS)
@pytest.mark.parametrize("name", ["mistral-sliding-sdpa", "modernbert-eager"])
def test_every_method_serves_the_band_sites_of_the_zoo(name, method):
    """tests/zoo.py's band families: no method declines a band site, and each runs at two sizes
    (the dense rewrite's exactness there is tests/test_zoo_rewrite.py's)."""
    case = by_name(name)
    model = case.build()
    sparse = attnpass.sparsify(model, *case.inputs(2, 8), method=method)
    assert not sparse.report.skipped and len(sparse.sites) == case.attention_count, str(sparse.report)
    assert any("band (window" in s.mask for s in sparse.sites), str(sparse.report)
    for batch, length in [(2, 8), (3, 12)]:
        args, kwargs = case.inputs(batch, length)
        with torch.no_grad():
            got = tensors(sparse(*args, **kwargs))
        assert all(torch.isfinite(t).all() for t in got), (name, method, batch, length)


# -- generation with a sliding window -----------------------------------------------------------

def _mistral_lm(window: int = 6):
    import transformers

    config = transformers.MistralConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=window, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.MistralForCausalLM(config).eval()


@pytest.mark.parametrize("method,options", [("dense", {}), ("routing", {"sinks": 2, "local": 6})],
                         ids=["dense", "routing-covering"])
def test_generate_past_the_window_returns_the_originals_tokens(method, options):
    """Left-padded prompts of 20 tokens, window 6: the decode steps run over a plain cache (a sliding
    layer's token count cannot go through a graph) and give the original's greedy tokens."""
    model = _mistral_lm()
    x = _ids(2, 20, seed=4)
    want = model.generate(**x, max_new_tokens=8, do_sample=False)
    sparse = attnpass.sparsify(model, kwargs={k: v[:, :8] for k, v in x.items()}, method=method, **options)
    assert torch.equal(sparse.generate(**x, max_new_tokens=8, do_sample=False), want)


def test_a_returned_sliding_cache_counts_every_token_and_a_cropped_one_is_refused():
    model = _mistral_lm()
    x = _ids(2, 20, seed=5)
    sparse = attnpass.sparsify(model, kwargs={k: v[:, :8] for k, v in x.items()})
    with torch.no_grad():
        cache = sparse(**x, use_cache=True).past_key_values
        assert [layer.cumulative_length for layer in cache.layers] == [20, 20]
        # the original continues from it as from its own
        step = {"input_ids": torch.tensor([[5], [7]]), "attention_mask": torch.cat([x["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)}
        own = model(**x, use_cache=True).past_key_values
        torch.testing.assert_close(model(**step, past_key_values=cache).logits, model(**step, past_key_values=own).logits)
        with pytest.raises(ValueError, match="sliding-window layer .* has dropped keys"):
            sparse(**step, past_key_values=cache)
