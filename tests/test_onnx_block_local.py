"""ONNX export of routing sites with block-local heads (option ``local_heads``): the
``attnpass.RoutingWithLocalHeads`` body (and ``attnpass.BlockLocal`` when every head is local)
against the PyTorch routing op in float64, and a whole BERT / GPT-2 export at two sizes.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

import attnpass
import attnpass.lowering.onnx.routing  # noqa: F401 - registers torch.ops.attnpass.routing
from attnpass.lowering.onnx.common import DOMAIN
from test_onnx_export import (
    assert_matches_at_run_sizes, random_qkv, runtime_shapes, session, single_node_model, square_values,
)
from zoo import by_name


@pytest.mark.parametrize("causal,cross,hkv,with_bias,with_mask,window,local", [
    (False, False, 4, False, False, 4, 2),
    (True, False, 2, True, False, 3, 2),
    (False, True, 1, False, True, 5, 4),
    (True, True, 4, True, True, 4, 1),
    (True, False, 2, True, True, 6, 4),
    (False, False, 4, True, False, 20, 3),
])
def test_local_heads_node_equals_the_pytorch_routing(causal, cross, hkv, with_bias, with_mask, window, local):
    lq, lk = (9, 14) if cross else (17, 17)
    g, q, k, v, keep = random_qkv(21, 2, 4, hkv, lq, lk)
    bias = torch.randn(2, 4, lq, lk, generator=g, dtype=torch.float64) if with_bias else None
    mask = torch.rand(1, 1, lq, lk, generator=g) > 0.2 if with_mask else None
    centroids = None if local == 4 else torch.randn(4 - local, 3, 8, generator=g, dtype=torch.float64)
    expected = torch.ops.attnpass.routing(q, k, v, bias, mask, keep, centroids, 0.25, causal, cross, cross, window,
                                          local)
    inputs = dict(q=q, k=k, v=v, bias=torch.zeros(1, 1, 1, 1, dtype=torch.float64) if bias is None else bias,
                  mask=torch.ones(1, 1, 1, 1, dtype=torch.bool) if mask is None else mask, key_keep=keep)
    attributes = dict(scale=0.25, causal=int(causal), bottom_right=int(cross))
    if centroids is None:
        model = single_node_model("BlockLocal", {n: t.numpy() for n, t in inputs.items()},
                                  dict(attributes, window=window))
    else:
        inputs.update(query_keep=torch.ones(2, lq, dtype=torch.bool) if cross else keep, centroids=centroids)
        model = single_node_model("RoutingWithLocalHeads", {n: t.numpy() for n, t in inputs.items()},
                                  dict(attributes, local_window=window, local_heads=local))
    got = session(model).run(None, {n: t.numpy() for n, t in inputs.items()})[0]
    assert np.abs(got - expected.numpy()).max() < 1e-12
    # the local heads really are local: a query's output ignores keys outside its blocks
    far = v.clone()
    far[:, :, -1] += 100.0  # the last key, outside the first query block's reach when L > 3 windows
    if local and 3 * window < lk and not cross:
        moved = torch.ops.attnpass.routing(q, k, far, bias, mask, keep, centroids, 0.25, causal, cross, cross,
                                           window, local)
        assert torch.equal(moved[:, :local, 0], expected[:, :local, 0])
        assert not torch.equal(moved, expected)


def test_block_local_body_has_no_square_value():
    def shapes(length):
        _, q, k, v, keep = random_qkv(22, 2, 4, 2, length, length)
        inputs = dict(q=q, k=k, v=v, bias=torch.zeros(1, 1, 1, 1, dtype=torch.float64),
                      mask=torch.ones(1, 1, 1, 1, dtype=torch.bool), key_keep=keep)
        model = single_node_model("BlockLocal", {n: t.numpy() for n, t in inputs.items()},
                                  dict(scale=0.25, causal=0, bottom_right=0, window=8))
        return runtime_shapes(model, inputs)

    assert square_values(shapes(64), shapes(128), (64, 128)) == []


@pytest.mark.parametrize("name,local", [("bert-eager", 2), ("gpt2-sdpa", 4)])
def test_model_with_local_heads_exports_and_matches(name, local):
    case = by_name(name)
    model = case.build()
    args, kwargs = case.inputs(2, 12)
    sparse = attnpass.sparsify(model, args, kwargs, method="routing", clusters=3, local_heads=local,
                               local_window=4).eval()
    with torch.no_grad():
        sparse(*args, **kwargs)  # centroids from the first call
    proto = attnpass.export_onnx(sparse, args, kwargs)
    op = "BlockLocal" if local == 4 else "RoutingWithLocalHeads"
    assert Counter(n.op_type for n in proto.graph.node if n.domain == DOMAIN) == {op: case.attention_count}
    sess = session(proto)
    assert_matches_at_run_sizes(sess, sparse, case)
