"""ONNX export of Sparsefinder's block predictor (lowering/onnx/blocks.py): the site's own inference
code traced by the standard exporter, its choice and its attention as two attnpass nodes.

What is pinned down:
- each node's body against its PyTorch op in float64 (causal with the anchor's window and sinks,
  bidirectional with sinks, without an anchor, left padding, shared and per-head choice, lengths not
  a multiple of the block, a sequence shorter than top_blocks blocks): the same chosen blocks, and
  outputs and logsumexps equal to rounding;
- whole models (Llama config: causal, GQA, the README's recipe with sinks and a window; BERT:
  bidirectional, sinks; GPT-2): two nodes per site, onnxruntime equals the PyTorch sparse model
  within 1e-4 at three sizes other than the export's, on padded batches whose padding is one
  repeated token, and on a batch of one repeated token (every block score ties);
- no L x L value in the written file at two lengths.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from helpers import max_relative_error
from test_onnx_export import feeds, runtime_shapes, session, square_values
from zoo import by_name

import attnpass
from attnpass.lowering.onnx import attach_functions
from attnpass.lowering.onnx.common import DOMAIN, ONNX_OPSET
from attnpass.lowering.torch.block_flash import block_flash_op
from attnpass.methods.base import SiteSpec
from attnpass.methods.sparsefinder import SparsefinderAttention
from attnpass.methods.sparsefinder import blocks as blocks_module

B, HQ, HKV, D, BLOCK, TOP, SAMPLES, SCALE = 2, 4, 2, 16, 8, 3, 4, 0.25
_ELEM = {np.dtype("float64"): onnx.TensorProto.DOUBLE, np.dtype("bool"): onnx.TensorProto.BOOL,
         np.dtype("int64"): onnx.TensorProto.INT64}


def one_node(op_type: str, inputs: dict, attributes: dict, outputs: dict) -> onnx.ModelProto:
    """A model of one attnpass node fed by graph inputs; `outputs`: name -> (elem type, rank)."""
    graph_inputs = [onnx.helper.make_tensor_value_info(n, _ELEM[v.dtype], v.shape) for n, v in inputs.items()]
    node = onnx.helper.make_node(op_type, list(inputs), list(outputs), domain=DOMAIN, **attributes)
    graph = onnx.helper.make_graph([node], "one_node", graph_inputs, [
        onnx.helper.make_tensor_value_info(n, t, [None] * rank) for n, (t, rank) in outputs.items()])
    model = attach_functions(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", ONNX_OPSET)]))
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("L, causal, anchor, share, padded", [
    (61, True, dict(sinks=2, local=12), True, True), (70, True, dict(sinks=3, local=13), False, False),
    (45, False, dict(sinks=2), True, True), (40, True, {}, True, True), (33, False, {}, False, False),
    (20, True, dict(sinks=1, local=5), True, False),  # 3 key blocks: as many as top_blocks
    (13, True, dict(sinks=2, local=4), True, True),   # 2 key blocks, fewer than top_blocks
])
def test_the_nodes_equal_the_pytorch_ops(L, causal, anchor, share, padded):
    spec = SiteSpec("s", None, causal=causal, heads_q=HQ, heads_kv=HKV, head_dim=D, example_len_q=L, example_len_k=L)
    site = SparsefinderAttention(spec, predictor="blocks", normalizer="softmax", block=BLOCK, top_blocks=TOP,
                                 sampled_queries=SAMPLES, kv_heads_share=share, **anchor).double().eval()
    g = torch.Generator().manual_seed(L)
    q, k, v = (torch.randn(B, h, L, D, generator=g, dtype=torch.float64) for h in (HQ, HKV, HKV))
    keep = torch.ones(B, L, dtype=torch.bool)
    if padded:
        keep[1, :5] = False
    method_keep, offset = site.method_key_keep(keep, k), site.layout_offset(q, k)
    chosen = blocks_module.choose_blocks_op(q, k, method_keep, SCALE, BLOCK, TOP, SAMPLES, causal, offset, 0, share)
    assert (chosen >= 0).any()
    x = dict(q=q.numpy(), k=k.numpy(), key_keep=method_keep.numpy(), offset=np.array(offset))
    model = one_node("ChooseBlocks", x, dict(scale=SCALE, block=BLOCK, top_blocks=TOP, samples=SAMPLES,
                                             causal=int(causal), window=0, share=int(share)),
                     {"chosen": (onnx.TensorProto.INT64, 4)})
    got = session(model).run(None, x)[0]
    assert np.array_equal(np.sort(got, -1), np.sort(chosen.numpy(), -1))  # the same set per query block

    sinks = site.anchor.sink_positions(keep, B, L, k.device) if site.anchor.sinks else None
    out, lse = block_flash_op(q, k, v, chosen, keep, sinks, BLOCK, SCALE, causal, offset, site.anchor_local())
    x = dict(q=q.numpy(), k=k.numpy(), v=v.numpy(), chosen=chosen.numpy(), key_keep=keep.numpy(),
             sinks=(torch.full((B, 1), -1) if sinks is None else sinks).numpy(), offset=np.array(offset))
    model = one_node("BlockAttention", x, dict(scale=SCALE, block=BLOCK, causal=int(causal), local=site.anchor_local()),
                     {"out": (onnx.TensorProto.DOUBLE, 4), "lse": (onnx.TensorProto.DOUBLE, 3)})
    got_out, got_lse = session(model).run(None, x)
    assert np.abs(got_out - out.numpy()).max() < 1e-12 and np.abs(got_lse - lse.numpy()).max() < 1e-12


RECIPES = {"llama-eager": dict(sinks=2, local=4), "bert-sdpa": dict(sinks=2), "gpt2-sdpa": dict(sinks=1, local=6)}
SMALL = dict(predictor="blocks", block=4, top_blocks=2, sampled_queries=2)


@pytest.fixture(scope="module")
def exported():
    """case -> (the written model, the PyTorch sparse model, the dense rewrite), exported at (2, 12)."""
    out = {}
    for name, anchor in RECIPES.items():
        case = by_name(name)
        model = case.build()
        args, kwargs = case.inputs(2, 12)
        options = dict(SMALL, **anchor)
        sparse = attnpass.sparsify(model, args, kwargs, method="sparsefinder", **options).eval()
        proto = attnpass.export_onnx(model, args, kwargs, method="sparsefinder", **options)
        out[name] = proto, sparse, attnpass.sparsify(model, args, kwargs, method="dense").eval()
    return out


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_exported_model_equals_the_sparse_model_at_other_sizes(exported, name):
    proto, sparse, dense = exported[name]
    assert Counter(n.op_type for n in proto.graph.node if n.domain == DOMAIN) == {"ChooseBlocks": 2,
                                                                                   "BlockAttention": 2}
    sess, case = session(proto), by_name(name)
    for batch, length in [(3, 16), (1, 40), (2, 57)]:
        _, kwargs = case.inputs(batch, length)  # padded rows hold one repeated pad token
        same = dict(kwargs, input_ids=torch.full_like(kwargs["input_ids"], 7))  # every block score ties
        for inputs in (kwargs, same):
            with torch.no_grad():
                expected = sparse(**inputs)
                if length == 57 and inputs is kwargs:  # the comparison can fail: here it is not the dense model
                    assert max_relative_error(expected, dense(**inputs)) > 1e-3
            got = [torch.from_numpy(x) for x in sess.run(None, feeds(sess, inputs))]
            assert max_relative_error(got, expected) < 1e-4, (batch, length)


def test_no_square_tensor_in_the_export(exported):
    proto, case = exported["gpt2-sdpa"][0], by_name("gpt2-sdpa")
    lengths = (24, 40)
    assert square_values(*[runtime_shapes(proto, case.inputs(2, n)[1]) for n in lengths], lengths) == []
