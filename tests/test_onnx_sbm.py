"""The ONNX body of SBM's deterministic inference graph (node ``attnpass.SBM``) against the PyTorch
site in float64: outputs, the pair set itself, exact ties, GQA / cross-attention / causal offsets /
bias / mask / padding, no L x L value, and the refusal of the sampled eval graph.
(Whole models with SBM are in test_onnx_export.py's matrix.)
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import attnpass
import attnpass.lowering.onnx.sbm  # noqa: F401 - registers torch.ops.attnpass.sbm
from attnpass.lowering.torch.edge_attention import edges_to_dense_mask
from attnpass.methods.base import SiteSpec
from attnpass.methods.sbm import SBMAttention
from test_onnx_export import (
    assert_output_and_pairs, random_qkv, runtime_shapes, session, single_node_model, square_values,
)
from helpers import max_relative_error
from zoo import by_name


def sbm_site(seed: int, hkv: int, causal: bool, cross: bool, top: int, clusters: int = 5) -> SBMAttention:
    """A float64 eval SBM site (eval_graph="clusters") with random trained-looking parameters."""
    g = torch.Generator().manual_seed(seed)
    spec = SiteSpec(name="t", scale=0.25, causal=causal, causal_bottom_right=cross, heads_q=4, heads_kv=hkv,
                    head_dim=8, cross=cross)
    site = SBMAttention(spec, clusters=clusters, eval_graph="clusters", eval_clusters=top).double().eval()
    with torch.no_grad():
        for p in site.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return site


def node_inputs(site, q, k, v, keep, bias=None, mask=None) -> dict:
    first, _, second = site.phi
    inputs = dict(q=q, k=k, v=v, bias=torch.zeros(1, 1, 1, 1, dtype=torch.float64) if bias is None else bias,
                  mask=torch.ones(1, 1, 1, 1, dtype=torch.bool) if mask is None else mask, key_keep=keep,
                  clusters=site.clusters, phi_w1=first.weight, phi_b1=first.bias, phi_w2=second.weight,
                  phi_b2=second.bias)
    return {name: t.detach().numpy() for name, t in inputs.items()}


def sbm_node(site, inputs: dict):
    return single_node_model("SBM", inputs, dict(scale=0.25, causal=int(site.spec.causal),
                                                 bottom_right=int(site.spec.causal_bottom_right),
                                                 eval_clusters=site.eval_clusters))


@pytest.mark.parametrize("causal,cross,hkv,with_bias,with_mask,top", [
    (False, False, 4, False, False, 1),
    (True, False, 2, True, False, 2),
    (False, True, 1, False, True, 1),
    (True, True, 4, True, True, 3),
    (True, False, 4, True, True, 2),
])
def test_sbm_node_equals_the_pytorch_site_and_attends_over_the_same_pairs(causal, cross, hkv, with_bias, with_mask,
                                                                          top):
    lq, lk = (9, 14) if cross else (17, 17)
    g, q, k, v, keep = random_qkv(4, 2, 4, hkv, lq, lk)
    bias = torch.randn(2, 1, lq, lk, generator=g, dtype=torch.float64) if with_bias else None
    mask = torch.rand(1, 4, lq, lk, generator=g) > 0.2 if with_mask else None
    site = sbm_site(5, hkv, causal, cross, top)
    site.keep_graph = True
    first, _, second = site.phi
    with torch.no_grad():
        expected = torch.ops.attnpass.sbm(q, k, v, bias, mask, keep, site.clusters, first.weight, first.bias,
                                          second.weight, second.bias, 0.25, causal, cross, cross, top)
        assert torch.equal(site(q, k, v, bias, mask, keep), expected)  # the custom op is the site's computation
    graph = site.last_graph
    pairs = edges_to_dense_mask(graph.row_ptr, graph.col_index, 2, 4, lq, lk)
    assert 0 < pairs.sum() < pairs.numel()  # a real selection, not every pair

    if mask is not None:
        pairs &= mask
    if causal:
        offset = lk - lq if cross else 0
        pairs &= torch.arange(lk).view(1, -1) <= torch.arange(lq).view(-1, 1) + offset
    pairs &= keep.view(2, 1, 1, lk)
    assert_output_and_pairs(lambda x, _: session(sbm_node(site, x)).run(None, x)[0],
                            node_inputs(site, q, k, v, keep, bias, mask), "softmax", expected, pairs)


def test_exact_ties_follow_the_same_rule():
    """Identical key tokens have identical memberships, and a duplicated cluster embedding gives two
    columns with equal memberships and equal masses: both sides take the lowest index."""
    g, q, k, v, keep = random_qkv(9, 2, 4, 4, 11, 11)
    k[:, :, 3:7] = k[:, :, 3:4]
    site = sbm_site(10, 4, False, False, 1)
    with torch.no_grad():
        site.clusters[:, 2] = site.clusters[:, 0]
        expected = site(q, k, v, key_keep=keep)
    inputs = node_inputs(site, q, k, v, keep)
    got = session(sbm_node(site, inputs)).run(None, inputs)[0]
    assert np.abs(got - expected.numpy()).max() < 1e-12


@pytest.mark.parametrize("top,expect_square", [(2, False), (16, True)])
def test_sbm_body_is_as_wide_as_its_chosen_clusters(top, expect_square):
    """Tokens near 8 of 16 well-separated cluster embeddings (phi the identity on them): 8 hard
    clusters of L/8 keys, no value with two axes >= L at L 64 and 128; a query taking all 16
    clusters attends to every key, and the same check finds the L x L value."""
    def shapes(length):
        spec = sbm_site(0, 2, False, False, 1).spec
        site = SBMAttention(spec, clusters=16, eval_graph="clusters", eval_clusters=top).double().eval()
        with torch.no_grad():
            site.clusters.copy_(2.0 * torch.eye(16, 8, dtype=torch.float64).expand(4, 16, 8))
            site.clusters[:, 8:] = -2.0 * torch.eye(8, dtype=torch.float64)
            for layer in (site.phi[0], site.phi[2]):
                layer.weight.copy_(torch.eye(8, dtype=torch.float64))
                layer.bias.zero_()
        g = torch.Generator().manual_seed(1)
        centre = torch.nn.functional.one_hot(torch.arange(length) % 8, 8).double() * 3.0
        q, k = (centre + 0.1 * torch.rand(2, 4 if i == 0 else 2, length, 8, generator=g, dtype=torch.float64)
                for i in range(2))
        v = torch.randn(2, 2, length, 8, generator=g, dtype=torch.float64)
        keep = torch.ones(2, length, dtype=torch.bool)
        inputs = node_inputs(site, q, k, v, keep)
        return runtime_shapes(sbm_node(site, inputs), {n: torch.from_numpy(x) for n, x in inputs.items()})

    assert bool(square_values(shapes(64), shapes(128), (64, 128))) == expect_square


def test_sampled_eval_graph_is_refused_with_the_fix_named():
    case = by_name("bert-eager")
    model = case.build()
    args, kwargs = case.inputs(2, 12)
    with pytest.raises(NotImplementedError, match="pass eval_graph='clusters'"):
        attnpass.export_onnx(model, args, kwargs, method="sbm")
    sparse = attnpass.sparsify(model, args, kwargs, method="sbm", clusters=8)  # eval_graph "sample"
    with pytest.raises(NotImplementedError, match=r"has eval_graph='sample', which cannot be exported.*"
                                                  r"site.eval_graph = 'clusters'"):
        attnpass.export_onnx(sparse, args, kwargs)
    # the fix the message names: the same trained state, exported and computed with the cluster graph
    for site in sparse.site_modules().values():
        site.eval_graph = "clusters"
    sess = session(attnpass.export_onnx(sparse, args, kwargs))
    args, kwargs = case.inputs(3, 16)
    with torch.no_grad():
        expected = sparse.eval()(*args, **kwargs)
    got = [torch.from_numpy(x) for x in sess.run(None, {i.name: kwargs[i.name].numpy() for i in sess.get_inputs()})]
    assert max_relative_error(got, expected) < 1e-4
