"""`attnpass.export_onnx`: ONNX files with one attnpass custom node per site that plain onnxruntime runs.

What is pinned down:
- for BERT, GPT-2, Llama (GQA) configs and the real all-MiniLM-L6-v2, with dense, Combiner,
  routing, Sparsefinder (clustering; their centroids: the model's own after its first call) and
  SBM (eval_graph "clusters", its random clusters and phi): the written file has one
  ``attnpass`` node per site (and no other op of that domain), carries the bodies as model-local
  functions, passes ``check_model(full_check=True)``, runs in onnxruntime at two sequence lengths
  (and batches) other than the export's, and matches the PyTorch rewritten model within 1e-4
  (max relative);
- the node bodies alone against the PyTorch ops on random inputs in float64 (causal with an
  offset, bias, mask, key padding, GQA, explicit and default block, L not a multiple of the block;
  Sparsefinder's softmax / entmax-1.5, windows, first token, top
  clusters 1-3, duplicated centroids, and its predicted pair set itself);
- routing's traced export at model level (padded batches of repeated tokens, local heads, queries
  "nearest", sinks + local, exact ties) equals the model at two lengths other than the export's;
- no L x L tensor in the Combiner and routing exports: every intermediate's run-time shape at two
  lengths (all functions inlined, every value made an output), and the shapes ONNX shape inference
  resolves, have at most one axis growing with L (the same check finds the dense export's scores);
- export leaves the user's model (state, mode) unchanged, takes a SparseModel as it is, refuses
  methods without a lowering with a clear error, and the `attnpass export` command drives it.
"""
from __future__ import annotations

import copy
import textwrap
from collections import Counter

import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
import pytest
import torch

import attnpass
import attnpass.lowering.torch.dense  # noqa: F401 - registers torch.ops.attnpass.attention
from attnpass.tools import cli
import attnpass.lowering.onnx.sparsefinder  # noqa: F401 - registers torch.ops.attnpass.sparsefinder
from attnpass.lowering.onnx.common import DOMAIN, DOMAIN_VERSION, ONNX_OPSET
from helpers import max_relative_error, same_state, snapshot
from zoo import by_name

CASES = ["bert-sdpa", "gpt2-sdpa", "llama-eager", "minilm-l6-v2-sdpa"]
METHODS = ["dense", "combiner", "routing", "sparsefinder", "sbm"]
NODE = {"dense": "Attention", "combiner": "GroupedAttention", "routing": "GroupedAttention",
        "sparsefinder": "Sparsefinder", "sbm": "SBM"}
# Combiner's and routing's own code is traced: two grouped-kernel nodes per site (Combiner: summary values,
# then the main call; routing: the clusters, then the fallback windows)
NODES_PER_SITE = {"combiner": 2, "routing": 2}
OPTIONS = {"sbm": dict(eval_graph="clusters", eval_clusters=2)}
# methods with state of their own: centroids the first call initialises, SBM's random clusters and phi
STATEFUL = ("routing", "sparsefinder", "sbm")
EXPORT_SIZE = (2, 12)
RUN_SIZES = [(3, 16), (1, 40)]


def session(proto: onnx.ModelProto, optimize: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def feeds(sess: ort.InferenceSession, kwargs: dict) -> dict:
    return {i.name: kwargs[i.name].numpy() for i in sess.get_inputs()}


def assert_matches_at_run_sizes(sess: ort.InferenceSession, sparse, case) -> None:
    """onnxruntime's outputs equal the PyTorch rewritten model's within 1e-4 (max relative) at the
    RUN_SIZES (batch, length), which differ from the export's."""
    for batch, length in RUN_SIZES:
        args, kwargs = case.inputs(batch, length)
        with torch.no_grad():
            expected = sparse(*args, **kwargs)
        got = [torch.from_numpy(x) for x in sess.run(None, feeds(sess, kwargs))]
        assert max_relative_error(got, expected) < 1e-4, (batch, length)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(case, method) -> (written file, the PyTorch rewritten model in eval mode), exported once."""
    folder = tmp_path_factory.mktemp("onnx")
    out = {}
    torch.manual_seed(0)  # the stateful methods' state, whichever tests ran before on this worker
    for name in CASES:
        case = by_name(name)
        model = case.build()
        args, kwargs = case.inputs(*EXPORT_SIZE)
        for method in METHODS:
            path = folder / f"{name}-{method}.onnx"
            sparse = attnpass.sparsify(model, args, kwargs, method=method, **OPTIONS.get(method, {})).eval()
            if method in STATEFUL:
                # state drawn from torch's RNG (at sparsify or the first call): export this model
                # as it is, so the file holds the very state the reference uses
                with torch.no_grad():
                    sparse(*args, **kwargs)
                attnpass.export_onnx(sparse, args, kwargs, f=path)
            else:  # the plain-model path: export_onnx sparsifies its own copy
                attnpass.export_onnx(model, args, kwargs, f=path, method=method)
            out[name, method] = path, sparse
    return out


# --------------------------------------------------------------------------------------------
# whole models
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", CASES)
def test_file_has_one_custom_node_per_site_and_their_bodies(exported, name, method):
    path, sparse = exported[name, method]
    proto = onnx.load(path)
    custom = Counter(n.op_type for n in proto.graph.node if n.domain == DOMAIN)
    per_site = NODES_PER_SITE.get(method, 1)
    assert custom == {NODE[method]: per_site * by_name(name).attention_count} == {
        NODE[method]: per_site * len(sparse.site_modules())}
    functions = {(f.domain, f.name): f for f in proto.functions}
    assert (DOMAIN, NODE[method]) in functions
    for f in functions.values():  # bodies: standard ops, or helper functions that are themselves in the file
        assert all(n.domain in ("", "ai.onnx") or (n.domain, n.op_type) in functions for n in f.node)
    imports = {o.domain: o.version for o in proto.opset_import}
    assert imports[DOMAIN] == DOMAIN_VERSION and imports[""] == ONNX_OPSET
    onnx.checker.check_model(proto, full_check=True)
    node = [n for n in proto.graph.node if n.domain == DOMAIN][per_site - 1]  # the first site's (main) call
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["causal"] == int(name.startswith(("gpt2", "llama")))
    spec = next(iter(sparse.site_modules().values())).spec
    assert attrs["scale"] == pytest.approx(spec.scale if spec.scale is not None else spec.head_dim ** -0.5, rel=1e-6)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", CASES)
def test_onnxruntime_matches_the_rewritten_model_at_other_sizes(exported, name, method):
    path, sparse = exported[name, method]
    assert_matches_at_run_sizes(session(onnx.load(path)), sparse, by_name(name))


# --------------------------------------------------------------------------------------------
# no L x L tensor
# --------------------------------------------------------------------------------------------


def _with_every_value_as_output(proto: onnx.ModelProto) -> onnx.ModelProto:
    model = onnx.inliner.inline_local_functions(proto)
    have = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for name in node.output:
            if name and name not in have:
                model.graph.output.append(onnx.ValueInfoProto(name=name))
                have.add(name)
    return model


def runtime_shapes(proto: onnx.ModelProto, kwargs: dict) -> dict[str, tuple]:
    """The shape of every intermediate value (functions inlined) in one onnxruntime run."""
    sess = session(_with_every_value_as_output(proto), optimize=False)
    values = sess.run(None, feeds(sess, kwargs))
    return {o.name: np.shape(v) for o, v in zip(sess.get_outputs(), values)}


def inferred_shapes(proto: onnx.ModelProto, batch: int, length: int) -> dict[str, tuple]:
    """ONNX shape inference (with data propagation) at concrete input sizes; unknown dims are None."""
    model = onnx.inliner.inline_local_functions(proto)
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        dims[0].dim_value, dims[1].dim_value = batch, length
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    out = {}
    for value in list(model.graph.value_info) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        out[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    return out


def square_values(short: dict, long: dict, lengths: tuple[int, int]) -> list[str]:
    """Values with two axes that grow with L and are >= L at both lengths (an L x L tensor)."""
    found = []
    for name in short.keys() & long.keys():
        a, b = short[name], long[name]
        if len(a) != len(b):
            continue
        growing = [i for i in range(len(a)) if a[i] is not None and b[i] is not None
                   and a[i] >= lengths[0] and b[i] >= lengths[1] and b[i] > a[i]]
        if len(growing) >= 2:
            found.append(f"{name} {a} -> {b}")
    return found


# Routing's fallback windows hold min(local_window, L) keys (64 by default): below that length a
# window is every key, by design, so routing is checked at lengths above it (MiniLM takes 512).
@pytest.mark.parametrize("name,lengths,methods", [
    ("gpt2-sdpa", (24, 40), ("combiner",)),
    ("minilm-l6-v2-sdpa", (72, 96), ("combiner", "routing")),
])
def test_no_square_tensor_in_the_sparse_exports(exported, name, lengths, methods):
    case = by_name(name)
    for method, expect_square in [(m, False) for m in methods] + [("dense", True)]:
        proto = onnx.load(exported[name, method][0])
        run = [runtime_shapes(proto, case.inputs(2, n)[1]) for n in lengths]
        found = square_values(*run, lengths)
        assert bool(found) == expect_square, (method, found[:5])
        inferred = [inferred_shapes(proto, 2, n) for n in lengths]
        assert len(inferred[0]) > 50
        if not expect_square:
            assert square_values(*inferred, lengths) == []


# --------------------------------------------------------------------------------------------
# the node bodies against the PyTorch ops (float64, one node per model)
# --------------------------------------------------------------------------------------------


def single_node_model(node_op, inputs: dict, attributes: dict) -> onnx.ModelProto:
    """A model with one attnpass node fed by graph inputs, plus the bodies as local functions."""
    from attnpass.lowering.onnx import attach_functions

    elem = {np.dtype("float64"): onnx.TensorProto.DOUBLE, np.dtype("float32"): onnx.TensorProto.FLOAT,
            np.dtype("bool"): onnx.TensorProto.BOOL, np.dtype("int64"): onnx.TensorProto.INT64}
    graph_inputs = [onnx.helper.make_tensor_value_info(k, elem[v.dtype], v.shape) for k, v in inputs.items()]
    node = onnx.helper.make_node(node_op, list(inputs), ["out"], domain=DOMAIN, **attributes)
    graph = onnx.helper.make_graph([node], "one_node", graph_inputs,
                                   [onnx.helper.make_tensor_value_info("out", elem[inputs["q"].dtype], [None] * 4)])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", ONNX_OPSET)])
    model = attach_functions(model)
    onnx.checker.check_model(model, full_check=True)
    return model


# ONNX float attributes are float32: scales exactly representable in float32 keep float64 exact.
def random_qkv(seed: int, B: int, hq: int, hkv: int, lq: int, lk: int, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, hq, lq, d, generator=g, dtype=torch.float64)
    k = torch.randn(B, hkv, lk, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, hkv, lk, d + 2, generator=g, dtype=torch.float64)
    keep = torch.ones(B, lk, dtype=torch.bool)
    keep[-1, lk - lk // 3:] = False
    keep[0, 1] = False
    return g, q, k, v, keep


def assert_output_and_pairs(run, inputs: dict, normalizer: str, expected: torch.Tensor, pairs: torch.Tensor) -> None:
    """run(inputs, normalizer) -> a node's output (numpy). It equals `expected` (float64, < 1e-12);
    and with one-hot values (v[j] = e_j), no bias and softmax each output row is the row's
    probabilities, > 0 exactly on the pairs the body attends over, which must be `pairs`
    ((B, H, Lq, Lk) bool, the PyTorch side's pairs after masks)."""
    assert np.abs(run(inputs, normalizer) - expected.numpy()).max() < 1e-12
    B, H, _, lk = pairs.shape
    hkv = inputs["v"].shape[1]
    one_hot = dict(inputs, v=torch.eye(lk, dtype=torch.float64).expand(B, hkv, lk, lk).numpy(),
                   bias=np.zeros((1, 1, 1, 1)))
    probs = run(one_hot, "softmax")
    assert pairs.sum() > 0 and np.array_equal(probs > 0, pairs.numpy())


@pytest.mark.parametrize("causal,offset,hkv,with_bias,with_mask", [
    (False, 0, 4, False, False), (True, 0, 2, True, False), (True, 3, 1, False, True), (True, -2, 4, True, True),
])
def test_attention_node_equals_the_dense_op(causal, offset, hkv, with_bias, with_mask):
    lq, lk = 7, 7 + max(offset, 0)
    g, q, k, v, keep = random_qkv(1, 2, 4, hkv, lq, lk)
    bias = torch.randn(1, 4, lq, lk, generator=g, dtype=torch.float64) if with_bias else torch.zeros((), dtype=torch.float64)
    mask = torch.rand(2, 1, lq, lk, generator=g) > 0.3 if with_mask else torch.ones((), dtype=torch.bool)
    expected = torch.ops.attnpass.attention(q, k, v, bias if with_bias else None, mask if with_mask else None, keep,
                                            0.375, causal, offset, 0.0, 0)
    inputs = dict(q=q, k=k, v=v, bias=bias, mask=mask, key_keep=keep, causal_offset=torch.tensor(offset))
    inputs = {name: t.numpy() for name, t in inputs.items()}
    model = single_node_model("Attention", inputs, dict(scale=0.375, causal=int(causal)))
    got = session(model).run(None, inputs)[0]
    assert np.abs(got - expected.numpy()).max() < 1e-12


def sparsefinder_site(seed: int, hkv: int, causal: bool, cross: bool, normalizer: str, top: int, window, first_token):
    """A float64 eval Sparsefinder site (clustering, 5 centroids of rank 3) with random trained state;
    centroid 3 is a copy of centroid 1, so every token is at the same distance from both (exact ties)."""
    from attnpass.methods.base import SiteSpec
    from attnpass.methods.sparsefinder import SparsefinderAttention

    g = torch.Generator().manual_seed(seed)
    spec = SiteSpec(name="t", scale=0.25, causal=causal, causal_bottom_right=cross, heads_q=4, heads_kv=hkv,
                    head_dim=8, cross=cross)
    site = SparsefinderAttention(spec, predictor="clustering", rank=3, clusters=5, top_clusters=top, window=window,
                                 first_token=first_token, normalizer=normalizer).double().eval()
    with torch.no_grad():
        site.w_q.copy_(torch.randn(4, 8, 3, generator=g, dtype=torch.float64))
        site.w_k.copy_(torch.randn(4, 8, 3, generator=g, dtype=torch.float64))
        centroids = torch.randn(4, 5, 3, generator=g, dtype=torch.float64)
        centroids[:, 3] = centroids[:, 1]
        site.centroids.copy_(centroids)
        site.initialized.fill_(True)
    return site


def sparsefinder_node(site, inputs: dict, normalizer: str) -> onnx.ModelProto:
    return single_node_model("Sparsefinder", inputs, dict(
        scale=0.25, causal=int(site.spec.causal), bottom_right=int(site.spec.causal_bottom_right),
        entmax15=int(normalizer == "entmax15"), top_clusters=site.top_clusters,
        window=-1 if site.window is None else site.window, first_token=int(site.first_token)))


@pytest.mark.parametrize("causal,cross,hkv,with_bias,with_mask,normalizer,top,window,first_token", [
    (False, False, 4, False, False, "entmax15", 2, 1, True),
    (True, False, 2, True, False, "softmax", 2, 2, False),
    (False, True, 1, False, True, "entmax15", 1, None, True),
    (True, True, 4, True, True, "softmax", 3, 0, True),
    (True, False, 4, True, True, "entmax15", 2, 3, True),
])
def test_sparsefinder_node_equals_the_pytorch_sparsefinder_and_predicts_the_same_pairs(
        causal, cross, hkv, with_bias, with_mask, normalizer, top, window, first_token):
    from attnpass.lowering.torch.edge_attention import edges_to_dense_mask

    lq, lk = (9, 14) if cross else (17, 17)
    g, q, k, v, keep = random_qkv(4, 2, 4, hkv, lq, lk)
    bias = torch.randn(2, 1, lq, lk, generator=g, dtype=torch.float64) if with_bias else None
    mask = torch.rand(1, 4, lq, lk, generator=g) > 0.2 if with_mask else None
    site = sparsefinder_site(5, hkv, causal, cross, normalizer, top, window, first_token)
    with torch.no_grad():
        expected = torch.ops.attnpass.sparsefinder(
            q, k, v, bias, mask, keep, site.w_q, site.w_k, site.centroids, 0.25, causal, cross, cross, normalizer,
            "clustering", 16, top, -1 if window is None else window, first_token)
        assert torch.equal(site(q, k, v, bias, mask, keep), expected)  # the custom op is the site's computation
    row_ptr, col, candidates = site.predict(q, k, keep)
    assert candidates > col.numel()  # some pair is predicted twice (shared clusters, window): dedupe is exercised

    inputs = dict(q=q, k=k, v=v, bias=torch.zeros(1, 1, 1, 1, dtype=torch.float64) if bias is None else bias,
                  mask=torch.ones(1, 1, 1, 1, dtype=torch.bool) if mask is None else mask, key_keep=keep,
                  w_q=site.w_q.detach(), w_k=site.w_k.detach(), centroids=site.centroids)
    inputs = {name: t.numpy() for name, t in inputs.items()}
    pairs = edges_to_dense_mask(row_ptr, col, 2, 4, lq, lk)
    if mask is not None:
        pairs &= mask
    assert_output_and_pairs(lambda x, norm: session(sparsefinder_node(site, x, norm)).run(None, x)[0], inputs,
                            normalizer, expected, pairs)


@pytest.mark.parametrize("causal,cross,hkv,with_bias,with_mask,normalizer,bucket,window,first_token", [
    (False, False, 4, False, False, "entmax15", 4, 1, True),
    (True, False, 2, True, False, "softmax", 3, None, False),
    (False, True, 1, False, True, "entmax15", 2, 2, True),
    (True, True, 4, True, True, "softmax", 5, 0, True),
])
def test_sparsefinder_quantization_node_equals_the_pytorch_site_and_predicts_the_same_pairs(
        causal, cross, hkv, with_bias, with_mask, normalizer, bucket, window, first_token):
    from attnpass.lowering.torch.edge_attention import edges_to_dense_mask
    from attnpass.methods.base import SiteSpec
    from attnpass.methods.sparsefinder import SparsefinderAttention

    lq, lk = (9, 14) if cross else (17, 17)
    g, q, k, v, keep = random_qkv(11, 2, 4, hkv, lq, lk)
    k[:, :, 5:8] = k[:, :, 4:5]  # identical keys: equal coordinates, ordered by position on both sides
    bias = torch.randn(2, 1, lq, lk, generator=g, dtype=torch.float64) if with_bias else None
    mask = torch.rand(1, 4, lq, lk, generator=g) > 0.2 if with_mask else None
    spec = SiteSpec(name="t", scale=0.25, causal=causal, causal_bottom_right=cross, heads_q=4, heads_kv=hkv,
                    head_dim=8, cross=cross)
    site = SparsefinderAttention(spec, predictor="quantization", rank=3, bucket_size=bucket, window=window,
                                 first_token=first_token, normalizer=normalizer).double().eval()
    with torch.no_grad():
        site.w_q.copy_(torch.randn(4, 8, 3, generator=g, dtype=torch.float64))
        site.w_k.copy_(torch.randn(4, 8, 3, generator=g, dtype=torch.float64))
        expected = torch.ops.attnpass.sparsefinder(
            q, k, v, bias, mask, keep, site.w_q, site.w_k, None, 0.25, causal, cross, cross, normalizer,
            "quantization", bucket, 1, -1 if window is None else window, first_token)
        assert torch.equal(site(q, k, v, bias, mask, keep), expected)
    row_ptr, col, candidates = site.predict(q, k, keep)
    assert candidates > col.numel()  # repeats across dims / window: the dedupe is exercised

    def node(inputs, norm):
        return single_node_model("SparsefinderQuantization", inputs, dict(
            scale=0.25, causal=int(causal), bottom_right=int(cross), entmax15=int(norm == "entmax15"),
            bucket_size=bucket, window=-1 if window is None else window, first_token=int(first_token)))

    inputs = dict(q=q, k=k, v=v, bias=torch.zeros(1, 1, 1, 1, dtype=torch.float64) if bias is None else bias,
                  mask=torch.ones(1, 1, 1, 1, dtype=torch.bool) if mask is None else mask, key_keep=keep,
                  w_q=site.w_q.detach(), w_k=site.w_k.detach())
    inputs = {name: t.numpy() for name, t in inputs.items()}
    pairs = edges_to_dense_mask(row_ptr, col, 2, 4, lq, lk)
    if mask is not None:
        pairs &= mask
    assert_output_and_pairs(lambda x, norm: session(node(x, norm)).run(None, x)[0], inputs, normalizer, expected,
                            pairs)


@pytest.mark.parametrize("clusters,expect_square", [(16, False), (1, True)])
def test_sparsefinder_body_is_as_wide_as_its_largest_clusters(clusters, expect_square):
    # The candidate axis is top_clusters x the largest cluster (+ window and first token): with 16
    # centroids over random tokens no value of the body has two axes growing with L (run-time shapes at
    # L 64 and 128); with one cluster the predicted graph is every pair and the same check finds L x L.
    def shapes(length):
        _, q, k, v, keep = random_qkv(6, 2, 4, 2, length, length)
        site = sparsefinder_site(7, 2, False, False, "entmax15", 1, 1, True)
        g = torch.Generator().manual_seed(8)
        with torch.no_grad():
            site.centroids = torch.randn(4, clusters, 3, generator=g, dtype=torch.float64)
        inputs = dict(q=q, k=k, v=v, bias=torch.zeros(1, 1, 1, 1, dtype=torch.float64),
                      mask=torch.ones(1, 1, 1, 1, dtype=torch.bool), key_keep=keep, w_q=site.w_q.detach(),
                      w_k=site.w_k.detach(), centroids=site.centroids)
        model = sparsefinder_node(site, {name: t.numpy() for name, t in inputs.items()}, "entmax15")
        return runtime_shapes(model, inputs)

    assert bool(square_values(shapes(64), shapes(128), (64, 128))) == expect_square


def test_sparsefinder_softmax_export_of_a_fresh_model_and_of_a_run_one(bert):
    # a never-run model: export initialises its own copy's centroids; a run one: its file matches it
    case, model, args, kwargs = bert
    before = snapshot(model)
    proto = attnpass.export_onnx(model, args, kwargs, method="sparsefinder", normalizer="softmax", window=None)
    assert same_state(model, before)
    nodes = [n for n in proto.graph.node if n.domain == DOMAIN]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert len(nodes) == 2 and attrs["entmax15"] == 0 and attrs["window"] == -1 and attrs["first_token"] == 1
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert [initializers[n.input[8]].shape for n in nodes] == [(4, 16, 4)] * 2  # centroids stored in the file

    sparse = attnpass.sparsify(model, args, kwargs, method="sparsefinder", normalizer="softmax", top_clusters=1).eval()
    with torch.no_grad():
        sparse(*args, **kwargs)
    sess = session(attnpass.export_onnx(sparse, args, kwargs))
    assert_matches_at_run_sizes(sess, sparse, case)


def test_sparsefinder_quantization_export_matches_the_model(bert):
    case, model, args, kwargs = bert
    sparse = attnpass.sparsify(model, args, kwargs, method="sparsefinder", predictor="quantization",
                               bucket_size=4).eval()
    proto = attnpass.export_onnx(sparse, args, kwargs)
    assert Counter(n.op_type for n in proto.graph.node if n.domain == DOMAIN) == {"SparsefinderQuantization": 2}
    sess = session(proto)
    assert_matches_at_run_sizes(sess, sparse, case)
    # candidates per query: rank x bucket + window + first token, whatever L: no L x L value
    lengths = (24, 40)
    assert square_values(*[runtime_shapes(proto, case.inputs(2, n)[1]) for n in lengths], lengths) == []


# --------------------------------------------------------------------------------------------
# the caller's model, SparseModel input, errors
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert():
    case = by_name("bert-eager")
    model = case.build()
    return case, model, *case.inputs(*EXPORT_SIZE)


def test_export_leaves_the_model_unchanged_and_takes_a_sparse_model_as_is(bert, tmp_path):
    case, model, args, kwargs = bert
    model.train()
    before = snapshot(model)
    sparse = attnpass.sparsify(model, args, kwargs, method="combiner", block=3)  # train mode, block given
    sparse_before = snapshot(sparse)
    proto = attnpass.export_onnx(sparse, args, kwargs, f=tmp_path / "m.onnx")
    assert model.training and same_state(model, before)
    assert sparse.training and same_state(sparse, sparse_before)
    assert {n.op_type for n in proto.graph.node if n.domain == DOMAIN} == {"GroupedAttention"}
    sess = session(onnx.load(tmp_path / "m.onnx"))  # its outputs depend on the block given (3)
    args, kwargs = case.inputs(2, 20)
    with torch.no_grad():
        expected = copy.deepcopy(sparse).eval()(*args, **kwargs)
    assert max_relative_error([torch.from_numpy(x) for x in sess.run(None, feeds(sess, kwargs))], expected) < 1e-4
    model.eval()


@pytest.mark.parametrize("method,options,message", [
    ("sbm", {}, "method 'sbm' with eval_graph='sample' cannot be exported to ONNX.*pass eval_graph='clusters'"),
    ("sparsefinder", {"predictor": "distance"}, "sparsefinder predictor 'distance' cannot be exported .* all-pairs"),
    ("sparsefinder", {"predictor": "blocks"}, "predictor 'blocks' with normalizer 'entmax15' runs the grouped kernel"),
    ("combiner", {"variant": "axial"}, "combiner variant 'axial' cannot be exported"),
    ("routing", {"sinks": 2}, "routing site .*: sinks= without a local window at a causal site"),
    ("routing", {"keys": "members"}, "routing with keys='members' cannot be exported .*member_key_scores"),
])
def test_methods_without_a_lowering_are_refused_clearly(bert, method, options, message):
    _, model, args, kwargs = bert
    with pytest.raises(NotImplementedError, match=message):
        attnpass.export_onnx(model, args, kwargs, method=method, **options)


def test_a_sparse_model_with_sinks_is_refused_not_exported_without_them(bert):
    _, model, args, kwargs = bert
    sparse = attnpass.sparsify(model, args, kwargs, method="routing", clusters=2, sinks=2)
    with pytest.raises(NotImplementedError, match="sinks= without a local window at a causal site"):
        attnpass.export_onnx(sparse, args, kwargs)
    # Combiner exports its anchor where it runs on the flash op (a window at a causal site), not BERT's sinks alone
    sparse = attnpass.sparsify(model, args, kwargs, method="combiner", sinks=2)
    with pytest.raises(NotImplementedError, match="sinks= without a local window at a causal site"):
        attnpass.export_onnx(sparse, args, kwargs)


def test_combiner_recipe_with_sinks_and_window_on_padded_batches():
    """Combiner with the anchor (README's recipe for a causal LM) on the Llama config (GQA): the site's
    traced code, two GroupedAttention and one BlockAttention node per site; onnxruntime equals the
    PyTorch model at two lengths other than the export's, on left-padded batches whose padding is one
    repeated token, and the anchor changes the output (so the comparison can fail)."""
    case = by_name("llama-eager")
    model = case.build()
    args, kwargs = case.inputs(*EXPORT_SIZE)
    sparse = attnpass.sparsify(model, args, kwargs, method="combiner", block=4, sinks=2, local=5)
    plain = attnpass.sparsify(model, args, kwargs, method="combiner", block=4)
    proto = attnpass.export_onnx(sparse, args, kwargs)
    assert Counter(n.op_type for n in proto.graph.node if n.domain == DOMAIN) == {
        "GroupedAttention": 2 * case.attention_count, "BlockAttention": case.attention_count}
    sess = session(proto)
    for batch, length in RUN_SIZES:
        args, kwargs = case.inputs(batch, length)
        kwargs["attention_mask"][0, :5] = 0          # left padding, one repeated pad token
        kwargs["input_ids"][0, :5] = kwargs["input_ids"][0, 0]
        with torch.no_grad():
            expected = sparse.eval()(*args, **kwargs)
            without = plain.eval()(*args, **kwargs)
        got = [torch.from_numpy(x) for x in sess.run(None, feeds(sess, kwargs))]
        assert max_relative_error(got, expected) < 1e-4, (batch, length)
        assert max_relative_error(got, without) > 1e-3


def left_padded(case, batch: int, length: int):
    """The case's inputs with row 0 left-padded by five copies of one token (row 1 is right-padded)."""
    args, kwargs = case.inputs(batch, length)
    kwargs["attention_mask"][0, :5] = 0
    kwargs["input_ids"][0, :5] = kwargs["input_ids"][0, 0]
    return args, kwargs


# routing's traced code at model level: exported at EXPORT_SIZE, run at two other lengths (the first below,
# the second above local_window when it is 8, so the fallback spans one block, then several)
@pytest.mark.parametrize("name,options,nodes", [
    ("llama-eager", dict(local_window=8), {"GroupedAttention": 2}),                  # causal, GQA
    ("bert-eager", dict(local_window=8), {"GroupedAttention": 2}),                   # encoder
    ("llama-eager", dict(local_heads=2), {"GroupedAttention": 3}),                   # a kv head's queries local
    ("bert-sdpa", dict(local_heads=4, local_window=8), {"GroupedAttention": 1}),     # every head local
    ("llama-eager", dict(queries="nearest", local_window=8), {"GroupedAttention": 2}),
    ("llama-eager", dict(sinks=2, local=5), {"GroupedAttention": 2, "BlockAttention": 1}),  # the recipe's anchor
    ("llama-eager", dict(queries="nearest", refit_steps=2, local_window=8), {"GroupedAttention": 2}),
], ids=["llama", "bert", "llama-local-heads", "bert-all-local", "llama-nearest", "llama-sinks-local", "llama-refit"])
def test_routing_traced_export_equals_the_model_on_padded_batches(name, options, nodes):
    """Routing's own code traced (torch.export keeps L symbolic): onnxruntime equals the PyTorch model
    within 1e-4 at two lengths other than the export's, on batches padded by repeated identical tokens
    (their similarities tie exactly: both sides take the lowest position), with the nodes counted."""
    case = by_name(name)
    model = case.build()
    args, kwargs = left_padded(case, *EXPORT_SIZE)
    torch.manual_seed(0)
    sparse = attnpass.sparsify(model, args, kwargs, method="routing", clusters=2, **options).eval()
    with torch.no_grad():
        sparse(*args, **kwargs)  # the centroids
    proto = attnpass.export_onnx(sparse, args, kwargs)
    assert Counter(n.op_type for n in proto.graph.node if n.domain == DOMAIN) == {
        op: count * case.attention_count for op, count in nodes.items()}
    sess = session(proto)
    for batch, length in [(3, 7), (2, 40)]:
        args, kwargs = left_padded(case, batch, length)
        with torch.no_grad():
            expected = sparse(*args, **kwargs)
        got = [torch.from_numpy(x) for x in sess.run(None, feeds(sess, kwargs))]
        assert max_relative_error(got, expected) < 1e-4, (batch, length)


def test_routing_at_a_site_with_a_bias_is_refused_before_the_export():
    """BLOOM keeps ALiBi as an additive bias at its sites, which GroupedAttention does not read: one clear
    line at bind time, not an exporter failure."""
    case = by_name("bloom-eager")
    args, kwargs = case.inputs(2, 12)
    with pytest.raises(NotImplementedError, match=r"keeps a bias as a tensor \(e.g. ALiBi\).*method='dense'"):
        attnpass.export_onnx(case.build().eval(), args, kwargs, method="routing", clusters=2)


def test_routing_export_takes_the_lowest_position_among_identical_tokens():
    """A site without positions (one nn.MultiheadAttention layer: a later layer's repeated tokens would
    only nearly tie) on a batch whose tokens repeat: queries and keys tie exactly, so a cluster's members
    among them depend on the tie rule (lowest position, in PyTorch as in ONNX TopK); the export equals
    the model at two lengths (a TopK lowering that took the highest position among ties fails here)."""
    case = by_name("nn-mha-noweights")
    model = case.build().eval()

    def inputs(batch, length):
        (x, padding), _ = case.inputs(batch, length)
        x[:, 2:length - 3] = x[:, 2:3]  # identical tokens: more than a cluster takes
        return (x, padding), {}

    args, kwargs = inputs(*EXPORT_SIZE)
    torch.manual_seed(0)
    sparse = attnpass.sparsify(model, args, kwargs, method="routing", clusters=3, local_window=4).eval()
    with torch.no_grad():
        sparse(*args, **kwargs)
    proto = attnpass.export_onnx(sparse, args, kwargs)
    sess = session(proto)
    for batch, length in [(3, 16), (2, 40)]:
        (x, padding), _ = inputs(batch, length)
        with torch.no_grad():
            expected = sparse(x, padding)
        got = torch.from_numpy(sess.run(None, {"input_0": x.numpy(), "input_1": padding.numpy()})[0])
        assert max_relative_error([got], expected) < 1e-4, (batch, length)


def test_a_sparse_model_with_member_routed_keys_is_refused(bert):
    _, model, args, kwargs = bert
    sparse = attnpass.sparsify(model, args, kwargs, method="routing", clusters=2, keys="members")
    with pytest.raises(NotImplementedError, match="keys='members' cannot be exported to ONNX"):
        attnpass.export_onnx(sparse, args, kwargs)


def test_sparse_model_with_another_method_or_options_is_refused(bert):
    _, model, args, kwargs = bert
    sparse = attnpass.sparsify(model, args, kwargs, method="dense")
    with pytest.raises(ValueError, match="rewritten with method 'dense' and method='combiner'"):
        attnpass.export_onnx(sparse, args, kwargs, method="combiner")
    with pytest.raises(ValueError, match=r"options \['block'\] apply when sparsifying"):
        attnpass.export_onnx(sparse, args, kwargs, block=4)


def test_static_routing_export_of_a_fresh_model(bert):
    # a never-run routing model: export initialises the centroids of its own copy from the example
    case, model, args, kwargs = bert
    model.train()
    before = snapshot(model)
    proto = attnpass.export_onnx(model, args, kwargs, method="routing", dynamic=False)
    assert model.training and same_state(model, before)
    model.eval()
    dims = [[d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input]
    assert dims == [list(EXPORT_SIZE)] * 2
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    centroids = [c for name, c in initializers.items() if "kmeans.centroids" in name]  # stored in the file
    assert len(centroids) == 2 and all(c.shape[::2] == (4, 8) and np.abs(c).sum() > 0 for c in centroids)
    sess = session(proto)
    assert np.isfinite(sess.run(None, feeds(sess, kwargs))[0]).all()


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

CLI_MODELS = textwrap.dedent('''
    import torch
    import transformers


    def gpt2():
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        ids = torch.randint(0, 50, (2, 20))
        return transformers.GPT2Model(cfg).eval(), (ids,), {"use_cache": False}
''')


def test_cli_export_writes_a_file_onnxruntime_runs(tmp_path, capsys):
    (tmp_path / "cli_onnx_models.py").write_text(CLI_MODELS)
    target = f"{tmp_path / 'cli_onnx_models.py'}:gpt2"
    out_file = tmp_path / "gpt2.onnx"
    code = cli.main(["export", target, "--method", "combiner", "--opt", "block=4", "-o", str(out_file)])
    out, err = capsys.readouterr()
    assert code == cli.EXIT_OK, err
    assert f"wrote {out_file}: GPT2Model, method combiner, 4 attnpass.GroupedAttention node(s)" in out
    sess = session(onnx.load(out_file))
    ids = torch.randint(0, 50, (3, 33))
    (hidden,) = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})
    assert hidden.shape == (3, 33, 32) and np.isfinite(hidden).all()

    code = cli.main(["export", target, "--method", "sbm", "-o", str(tmp_path / "sbm.onnx")])
    _, err = capsys.readouterr()
    assert code == cli.EXIT_UNAVAILABLE
    assert "method 'sbm' with eval_graph='sample' cannot be exported to ONNX" in err and "nothing was written" in err
    assert not (tmp_path / "sbm.onnx").exists()
    code = cli.main(["export", target, "--method", "sbm", "--opt", "eval_graph=clusters", "--opt", "clusters=8",
                     "-o", str(tmp_path / "sbm.onnx")])
    out, err = capsys.readouterr()
    assert code == cli.EXIT_OK, err
    assert "2 attnpass.SBM node(s)" in out and (tmp_path / "sbm.onnx").exists()
