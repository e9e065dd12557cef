"""SBM's deterministic inference graph (eval_graph="clusters"): the rule against a brute-force
construction from the dense P, exactness of the site's output on it, determinism, that training
still samples, options, and no L x L tensor.
"""
from __future__ import annotations


import pytest
import torch

from attnpass.lowering.torch.edge_attention import edges_to_dense_mask
from attnpass.methods.sbm import SBMAttention
from attnpass.methods.sbm.cluster_graph import cluster_graph
from attnpass.methods.sbm.sampling import fallback_keys
from memory_probe import no_square_tensor
from tests.helpers import max_relative_error
from tests.test_sbm import CASES, dense_on_last_graph, dense_p, make_site, random_memberships, spec

F64 = torch.float64


def brute_force_graph(y_q, y_k, block, top, heads, causal, offset, key_keep):
    """(N, Lq, Lk) bool: the rule of sbm.cluster_graph spelled out over the dense P."""
    N, Lq, k = y_q.shape
    Lk = y_k.shape[1]
    P = dense_p(y_q, y_k, block)
    keep = torch.ones(N, Lk, dtype=torch.bool) if key_keep is None else key_keep.repeat_interleave(heads, 0)
    graph = torch.zeros(N, Lq, Lk, dtype=torch.bool)
    own = fallback_keys(Lq, Lk, causal, offset, key_keep)
    own = own.repeat_interleave(heads, 0) if key_keep is not None else own.expand(N, -1)
    for n in range(N):
        hard = [int(torch.argmax(y_k[n, j])) if keep[n, j] else -1 for j in range(Lk)]
        for i in range(Lq):
            mass = [sum(float(P[n, i, j]) for j in range(Lk) if hard[j] == c) for c in range(k)]
            chosen = sorted(range(k), key=lambda c: (-mass[c], c))[:top]
            for j in range(Lk):
                visible = not causal or j <= i + offset
                if hard[j] in chosen and visible:
                    graph[n, i, j] = True
            if own[n, i] >= 0:
                graph[n, i, int(own[n, i])] = True
    return graph


@pytest.mark.parametrize("causal, offset, padding, top", [
    (False, 0, False, 1), (False, 0, True, 2), (True, 0, True, 1), (True, 3, False, 3), (True, -2, True, 2),
])
def test_cluster_graph_equals_the_rule_over_the_dense_p(causal, offset, padding, top):
    gen = torch.Generator().manual_seed(7)
    B, heads, Lq, Lk, k = 2, 2, 9, 12, 5
    y_q, y_k, block = random_memberships(B * heads, Lq, Lk, k, gen)
    keep = None
    if padding:
        keep = torch.ones(B, Lk, dtype=torch.bool)
        keep[1, -4:] = False
        keep[0, 2] = False
        y_k = y_k * keep.repeat_interleave(heads, 0).unsqueeze(-1).to(F64)
    graph = cluster_graph(y_q, y_k, block, top=top, heads=heads, causal=causal, causal_offset=offset, key_keep=keep)
    got = edges_to_dense_mask(graph.row_ptr, graph.col_index, B, heads, Lq, Lk).view(B * heads, Lq, Lk)
    want = brute_force_graph(y_q, y_k, block, top, heads, causal, offset, keep)
    assert torch.equal(got, want)
    assert not bool(graph.sampled.any())
    # more clusters per query give a superset
    if top > 1:
        smaller = cluster_graph(y_q, y_k, block, top=top - 1, heads=heads, causal=causal, causal_offset=offset,
                                key_keep=keep)
        fewer = edges_to_dense_mask(smaller.row_ptr, smaller.col_index, B, heads, Lq, Lk).view(B * heads, Lq, Lk)
        assert bool((fewer & ~got).sum() == 0) and fewer.sum() < got.sum()


def test_ties_go_to_the_lowest_cluster_index():
    """Identical key rows and equal masses: the key takes cluster 0, the query the lowest clusters."""
    N, Lq, Lk, k = 1, 3, 4, 4
    y_q = torch.full((N, Lq, k), 0.5, dtype=F64)
    y_k = torch.full((N, Lk, k), 0.5, dtype=F64)
    block = torch.full((N, k, k), 1.0 / (k * k), dtype=F64)
    graph = cluster_graph(y_q, y_k, block, top=1, heads=1, causal=False, causal_offset=0, key_keep=None)
    # every key is in cluster 0, which is the query's choice: the complete graph
    assert graph.nnz == Lq * Lk


@pytest.mark.parametrize("case", list(CASES))
def test_site_output_equals_dense_attention_on_the_cluster_graph(case):
    site, (q, k, v), kw = make_site(case)
    site.eval_graph, site.eval_clusters = "clusters", 2
    site.eval()
    out = site(q, k, v, **kw)
    graph = site.last_graph
    assert max_relative_error(out, dense_on_last_graph(site, q, k, v, kw)) <= 1e-10
    offset = (k.shape[2] - q.shape[2]) if site.spec.causal_bottom_right else 0
    # the graph is the rule's, from the site's own memberships
    with torch.no_grad():
        y_q, y_k, block = site.memberships(q, k, kw["key_keep"])
    want = cluster_graph(y_q, y_k, block, top=2, heads=q.shape[1], causal=site.spec.causal,
                         causal_offset=offset, key_keep=kw["key_keep"])
    assert torch.equal(graph.row_ptr, want.row_ptr) and torch.equal(graph.col_index, want.col_index)
    # every query whose own position is a visible real key attends to it
    B, Hq, Lq = q.shape[:3]
    own = fallback_keys(Lq, k.shape[2], site.spec.causal, offset, kw["key_keep"])
    dense = edges_to_dense_mask(graph.row_ptr, graph.col_index, B, Hq, Lq, k.shape[2])
    for b in range(B):
        for i in range(Lq):
            j = int(own[min(b, own.shape[0] - 1), i])
            if j >= 0:
                assert bool(dense[b, :, i, j].all())


def test_eval_is_deterministic_independent_of_seed_and_training_still_samples():
    site, (q, k, v), kw = make_site("causal_gqa_padding")
    site.eval_graph = "clusters"
    site.eval()
    a = site(q, k, v, key_keep=kw["key_keep"])
    site.seed = 12345
    b = site(q, k, v, key_keep=kw["key_keep"])
    assert torch.equal(a, b)
    site.train()
    graphs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        site(q, k, v, key_keep=kw["key_keep"])
        graphs.append(site.last_graph)
    assert not torch.equal(graphs[0].col_index, graphs[1].col_index)
    assert all(bool(g.sampled.any()) for g in graphs)


@pytest.mark.parametrize("options, error, match", [
    (dict(eval_graph="mode"), ValueError, r"eval_graph='mode' must be one of \['sample', 'clusters'\]"),
    (dict(eval_clusters=0), ValueError, "eval_clusters=0 must be an int >= 1"),
    (dict(clusters=4, eval_clusters=5), ValueError, "eval_clusters=5 exceeds clusters=4"),
])
def test_option_errors(options, error, match):
    with pytest.raises(error, match=match):
        SBMAttention.validate_options(**options)


def test_no_quadratic_tensor():
    """Tokens near 16 well-separated cluster embeddings (phi the identity on them): 16 hard clusters
    of 64 keys, each query picks its own two, ~1/8 of the pairs."""
    L, D = 1024, 16
    site = SBMAttention(spec(2, 2, D, True, False, L), clusters=D, eval_graph="clusters", eval_clusters=2).eval()
    site.keep_graph = True
    with torch.no_grad():
        site.clusters.copy_(2.0 * torch.eye(D).expand(2, D, D))
        for layer in (site.phi[0], site.phi[2]):
            layer.weight.copy_(torch.eye(D))
            layer.bias.zero_()
    gen = torch.Generator().manual_seed(0)
    centre = torch.nn.functional.one_hot(torch.arange(L) % D, D).float() * 3.0
    q, k, v = (centre + 0.1 * torch.rand(1, 2, L, D, generator=gen) for _ in range(3))
    with torch.no_grad(), no_square_tensor(L, L):
        out = site(q, k, v)
    assert out.shape == (1, 2, L, D) and torch.isfinite(out).all()
    assert site.last_graph.nnz < 2 * L * L / 8
