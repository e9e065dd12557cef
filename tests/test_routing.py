"""method="routing" (attnpass/methods/routing/, kmeans.py): exactness on its own pattern, state, losses.

The anchor: the module exposes the pairs it computes (`RoutingAttention.layout`); the test rebuilds
routing attention from that layout with plain dense masked softmax per cluster, the average over
the clusters a query landed in, and the local-window fallback for queries with no filled cluster
row, all computed here independently of the grouped kernel. Which rows are empty and which queries
fall back is recomputed here too and checked against the layout. Other tests pin the layout itself
(top-w by similarity, the windows, the local blocks), the k-means state (init, EMA step by hand,
eval leaves it untouched, state_dict round trip), the commitment loss, gradients, memory and options.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from attnpass import cost_model
from attnpass.methods import SiteSpec, method_class
from attnpass.methods.routing import RoutingAttention, RoutingLayout
from tests.memory_probe import no_square_tensor

RoutingClass = method_class("routing")


def make_site(heads_q=2, heads_kv=None, head_dim=8, len_q=24, len_k=None, causal=False, bottom_right=False,
              cross=False, **options) -> RoutingAttention:
    len_k = len_q if len_k is None else len_k
    spec = SiteSpec(name="layer.attn", scale=None, causal=causal, causal_bottom_right=bottom_right,
                    heads_q=heads_q, heads_kv=heads_kv or heads_q, head_dim=head_dim,
                    example_len_q=len_q, example_len_k=len_k, cross=cross)
    module = RoutingClass(spec, **options)
    module.prefill_queries = 1  # every call runs the method, also a short chunk over cached keys
    return module


def make_inputs(B, Hq, Hkv, Lq, Lk, D, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64).to(dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def padding(B, Lk, real_lengths, left=False):
    """key_keep (B, Lk): row b has real_lengths[b] real keys, at the end when left-padded."""
    positions = torch.arange(Lk)
    lengths = torch.tensor(real_lengths).view(B, 1)
    return positions >= Lk - lengths if left else positions < lengths


# --------------------------------------------------------------------------------------------
# Independent dense reference on the module's own pattern
# --------------------------------------------------------------------------------------------


def masked_softmax_attention(scores, allowed, v):
    """softmax over allowed entries (rows with none -> zeros) @ v, dense."""
    probs = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1)
    probs = torch.where(allowed.any(dim=-1, keepdim=True), probs, 0.0)
    return probs @ v


def membership(index_rows, length):
    """(G, W) positions (-1 = none) -> (G, length) bool: which positions each row holds."""
    out = torch.zeros(index_rows.shape[0], length + 1, dtype=torch.bool)
    out.scatter_(1, torch.where(index_rows >= 0, index_rows, length), True)
    return out[:, :length]


def fallback_windows(layout: RoutingLayout, b: int, r: int) -> list[tuple[int, list[int]]]:
    """(query, its window's key positions) for every fallback query of batch row b, routing head r."""
    windows = []
    for g in range(layout.fallback_q_index.shape[2]):
        keys = [j for j in layout.fallback_k_index[b, r, g].tolist() if j >= 0]
        for slot, i in enumerate(layout.fallback_q_index[b, r, g].tolist()):
            low, high = layout.fallback_key_range[b, r, g, slot].tolist()
            if i >= 0:
                windows.append((i, [j for j in keys if low <= j <= high]))
    return windows


def reference(module: RoutingAttention, layout: RoutingLayout, q, k, v, bias=None, mask=None, key_keep=None):
    """Routing attention rebuilt densely from `layout` (see the module docstring)."""
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    scale, offset = module.scale(q), module.causal_offset(q, k)
    # Structure (causal rule + key padding) decides emptiness; the general mask only removes pairs.
    structure = torch.ones(B, Lq, Lk, dtype=torch.bool)
    if module.spec.causal:
        structure &= torch.ones(Lq, Lk, dtype=torch.bool).tril(offset)
    if key_keep is not None:
        structure &= key_keep[:, None, :]
    rows = []
    for h in range(Hq):
        per_batch = []
        for b in range(B):
            scores = q[b, h] @ k[b, h // group].T * scale
            if bias is not None:
                scores = scores + bias.expand(B, Hq, Lq, Lk)[b, h]
            allowed = structure[b] if mask is None else structure[b] & mask.expand(B, Hq, Lq, Lk)[b, h]
            values = v[b, h // group]
            if h < module.local_heads:
                blocks = membership(layout.local_q_index, Lq).unsqueeze(-1) & membership(layout.local_k_index, Lk).unsqueeze(1)
                per_batch.append(masked_softmax_attention(scores, allowed & blocks.any(0), values))
                continue
            r = h - module.local_heads
            in_cluster = (membership(layout.routed_q_index[b, r], Lq).unsqueeze(-1)
                          & membership(layout.k_index[b, r], Lk).unsqueeze(1))       # (c, Lq, Lk)
            filled = (in_cluster & structure[b]).any(-1)                               # (c, Lq)
            outs = masked_softmax_attention(scores, in_cluster & allowed, values)      # (c, Lq, Dv)
            total = (outs * filled.unsqueeze(-1)).sum(0)
            count = filled.sum(0)
            orphans = count == 0
            windows = fallback_windows(layout, b, r)
            assert sorted(i for i, _ in windows) == orphans.nonzero().flatten().tolist()
            window = torch.zeros(Lq, Lk, dtype=torch.bool)
            for i, keys in windows:
                window[i, keys] = True
            fallback = masked_softmax_attention(scores, allowed & window, values)
            per_batch.append(torch.where(orphans.unsqueeze(-1), fallback, total / count.clamp(min=1).unsqueeze(-1)))
        rows.append(torch.stack(per_batch))
    return torch.stack(rows, dim=1)


def relative_error(got, expected):
    return ((got - expected).abs().max() / expected.abs().max()).item()


EXACT_CASES = {
    "bidirectional-padding": {"site": {"heads_q": 2}, "shape": (2, 2, 2, 24, 24), "keep": [24, 17], "clusters": 4},
    "causal-left-padding": {"site": {"heads_q": 2, "causal": True}, "shape": (2, 2, 2, 24, 24), "keep": [24, 17],
                                "left": True, "clusters": 4},
    "causal-gqa-local-bias": {"site": {"heads_q": 4, "heads_kv": 2, "causal": True, "local_heads": 2, "local_window": 4},
                                  "shape": (2, 4, 2, 24, 24), "keep": [20, 24], "clusters": 4, "bias": (2, 4, 24, 24),
                              "mask": (2, 4, 24, 24)},
    "causal-bottom-right-mask": {"site": {"heads_q": 4, "heads_kv": 2, "causal": True, "bottom_right": True, "len_q": 10,
                                               "len_k": 16}, "shape": (2, 4, 2, 10, 16), "keep": [16, 12], "clusters": 3,
                                     "mask": (2, 1, 10, 16)},
    "cross-local-broadcast-bias": {"site": {"heads_q": 2, "cross": True, "len_q": 12, "len_k": 20, "local_heads": 1,
                                                 "local_window": 4}, "shape": (2, 2, 2, 12, 20), "keep": [20, 9],
                                       "clusters": 3, "bias": (1, 2, 12, 20)},
    "causal-left-padding-nearest": {"site": {"heads_q": 2, "causal": True, "queries": "nearest"},
                                    "shape": (2, 2, 2, 24, 24), "keep": [24, 17], "left": True, "clusters": 4},
    "causal-gqa-local-bias-nearest": {"site": {"heads_q": 4, "heads_kv": 2, "causal": True, "local_heads": 2,
                                               "local_window": 4, "queries": "nearest"},
                                      "shape": (2, 4, 2, 24, 24), "keep": [20, 24], "clusters": 4,
                                      "bias": (2, 4, 24, 24), "mask": (2, 4, 24, 24)},
    "causal-padding-members": {"site": {"heads_q": 4, "heads_kv": 2, "causal": True, "queries": "nearest",
                                        "keys": "members", "sampled_queries": 2},
                               "shape": (2, 4, 2, 24, 24), "keep": [24, 17], "left": True, "clusters": 4,
                               "mask": (2, 4, 24, 24)},
    "causal-gqa-padding-members-refit": {"site": {"heads_q": 4, "heads_kv": 2, "causal": True, "queries": "nearest",
                                                  "keys": "members", "sampled_queries": 2, "refit_steps": 2},
                                         "shape": (2, 4, 2, 24, 24), "keep": [24, 17], "left": True, "clusters": 4},
    "cross-members-balanced": {"site": {"heads_q": 2, "cross": True, "len_q": 12, "len_k": 20, "keys": "members",
                                        "sampled_queries": 3}, "shape": (2, 2, 2, 12, 20), "keep": [20, 9],
                               "clusters": 3},
    "causal-train-mode-mask-bias": {"site": {"heads_q": 2, "causal": True}, "shape": (1, 2, 2, 20, 20), "keep": None,
                                        "clusters": 5, "bias": (1, 1, 20, 20), "mask": (1, 2, 20, 20), "train": True},
}


@pytest.mark.parametrize("name", list(EXACT_CASES))
def test_forward_and_gradients_equal_dense_attention_on_the_same_pattern(name):
    case = EXACT_CASES[name]
    torch.manual_seed(1)
    site = dict(case["site"])
    module = make_site(clusters=case["clusters"], **site).train(case.get("train", False))
    B, Hq, Hkv, Lq, Lk = case["shape"]
    q, k, v = make_inputs(B, Hq, Hkv, Lq, Lk, 8, grad=True)
    g = torch.Generator().manual_seed(7)
    key_keep = None if case["keep"] is None else padding(B, Lk, case["keep"], case.get("left", False))
    bias = None if "bias" not in case else torch.randn(case["bias"], generator=g, dtype=torch.float64).requires_grad_()
    mask = None
    if "mask" in case:
        mask = torch.rand(case["mask"], generator=g) > 0.3
    layout = module.layout(q, k, key_keep)
    if module.kmeans is not None:
        # the case must exercise the fallback, and causal cases the structural emptiness too
        assert (layout.fallback_q_index >= 0).any()
        if module.spec.causal and module.causal_offset(q, k) == 0:
            assert (layout.q_index != layout.routed_q_index).any()
    got = module(q, k, v, bias=bias, mask=mask, key_keep=key_keep)
    expected = reference(module, layout, q, k, v, bias, mask, key_keep)
    assert got.dtype == q.dtype and got.shape == (B, Hq, Lq, 8)
    assert relative_error(got, expected) <= 1e-10

    grad_out = torch.randn(got.shape, generator=g, dtype=torch.float64)
    inputs = [t for t in (q, k, v, bias) if t is not None]
    got_grads = torch.autograd.grad(got, inputs, grad_out)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out)
    for a, e in zip(got_grads, expected_grads):
        assert relative_error(a, e) <= 1e-10


def test_clusters_take_their_most_similar_queries_and_real_keys_sorted_by_position():
    torch.manual_seed(0)
    module = make_site(heads_q=4, heads_kv=2, len_q=16, len_k=20, cross=True, clusters=4)
    q, k, _ = make_inputs(2, 4, 2, 16, 20, 8)
    keep = padding(2, 20, [20, 3])  # row 1: fewer real keys than a cluster's 5 slots
    layout = module.layout(q, k, keep)
    centroids = module.kmeans.centroids.double()
    sim_q = torch.einsum("bhld,hcd->bhcl", F.layer_norm(q, (8,)), centroids)
    sim_k = torch.einsum("bhld,hcd->bhcl", F.layer_norm(k, (8,)).repeat_interleave(2, dim=1), centroids)
    sim_k = sim_k.masked_fill(~keep[:, None, None, :], -math.inf)
    for b in range(2):
        for h in range(4):
            for c in range(4):
                routed = layout.routed_q_index[b, h, c].tolist()
                assert routed == sorted(routed) and len(routed) == 4
                assert set(routed) == set(sim_q[b, h, c].topk(4).indices.tolist())
                keys = layout.k_index[b, h, c].tolist()
                if b == 0:
                    assert keys == sorted(keys) and set(keys) == set(sim_k[b, h, c].topk(5).indices.tolist())
                else:  # padding never takes a slot: the 3 real keys, then empty slots
                    assert keys == [0, 1, 2, -1, -1]


def test_clusters_of_their_own_widths_take_their_most_similar_tokens():
    """top_slots with per-cluster widths: cluster c takes its widths[c] most similar kept tokens, equal
    scores lowest position first (scores here are small integers, so ties are many), sorted by position."""
    from attnpass.methods.kmeans import OnlineKMeans

    g = torch.Generator().manual_seed(0)
    sim = torch.randint(0, 4, (2, 3, 4, 20), generator=g).float()
    keep = torch.rand(2, 20, generator=g) > 0.2
    widths = torch.randint(0, 9, (2, 3, 4), generator=g)
    slots = OnlineKMeans.top_slots(sim, 8, keep, widths=widths)
    for b, h, c in itertools.product(range(2), range(3), range(4)):
        kept = [j for j in range(20) if bool(keep[b, j])]
        expected = sorted(sorted(kept, key=lambda j: (-sim[b, h, c, j].item(), j))[:int(widths[b, h, c])])
        assert slots[b, h, c].tolist() == expected + [-1] * (8 - len(expected))


@pytest.mark.parametrize("causal", [False, True])
def test_nearest_routing_puts_every_query_in_its_nearest_cluster_only(causal):
    torch.manual_seed(0)
    module = make_site(heads_q=4, heads_kv=2, len_q=20, causal=causal, clusters=3, queries="nearest")
    q, k, _ = make_inputs(2, 4, 2, 20, 20, 8)
    keep = padding(2, 20, [20, 13], left=True)
    layout = module.layout(q, k, keep)
    sim_q = torch.einsum("bhld,hcd->bhcl", F.layer_norm(q, (8,)), module.kmeans.centroids.double())
    nearest = sim_q.argmax(dim=2)
    for b in range(2):
        for h in range(4):
            for c in range(3):
                routed = [i for i in layout.routed_q_index[b, h, c].tolist() if i >= 0]
                # padded queries too: their outputs are defined, as in dense attention
                assert routed == (nearest[b, h] == c).nonzero().flatten().tolist()


def member_need(q, k, keep, i, block, scale, causal, offset, local):
    """A query's estimated largest log-probability on one block of keys wholly in its method part (mean
    real key's score plus the log of its real keys, normalised over the blocks it sees), over the uniform
    share of those blocks (plus the log of their count), in float64."""
    values, far = [], []
    for first in range(0, k.shape[0], block):
        real = [j for j in range(first, min(first + block, k.shape[0])) if bool(keep[j])]
        if not real or (causal and first > i + offset):
            continue
        mean = k[real].double().mean(dim=0)
        values.append(float(q[i].double() @ mean) * scale + math.log(len(real)))
        far.append(not causal or first + block - 1 <= i + offset - local)
    candidates = [v for v, is_far in zip(values, far) if is_far]
    return max(candidates) - float(torch.tensor(values).logsumexp(0)) + math.log(len(values)) if candidates else -math.inf


@pytest.mark.parametrize("causal, sinks, local, rows_per_chunk, queries", [
    (True, 0, 0, 64, "nearest"), (True, 2, 5, 64, "nearest"), (False, 2, 0, 64, "nearest"),
    (True, 2, 5, 2, "nearest"), (True, 2, 5, 64, "balanced"), (True, 0, 14, 64, "nearest"),
    (True, 0, 14, 64, "balanced")])
def test_member_keys_are_those_the_sampled_members_attend_to_most(causal, sinks, local, rows_per_chunk, queries,
                                                                  monkeypatch):
    """keys='members': each cluster's keys are the top ones by the largest log-probability over its
    sampled members (those estimated to attend most to one far block of keys, ties to the earlier
    position; never one without a far block), of keys the method's layout may give them (the anchor's
    sinks and window left out), rebuilt here row by row in float64; never a key no sample may read.
    Balanced clusters take up to ceil(Lk / c) keys and sample `sampled_queries` members; nearest
    clusters of n members take up to ceil(n Lk / Lq) keys and sample ceil(sampled_queries n c / Lq)
    members. A chunk of 2 rows splits the samples over chunks; blocks of 4 keys give every query
    several far blocks to rank."""
    from attnpass.methods.routing import member_keys

    monkeypatch.setattr(member_keys, "_MEMBER_ROWS_PER_CHUNK", rows_per_chunk)
    monkeypatch.setattr(member_keys, "NEED_BLOCK", 4)
    torch.manual_seed(0)
    L, c, samples = 24, 3, 3
    module = make_site(heads_q=4, heads_kv=2, len_q=L, causal=causal, clusters=c, queries=queries,
                       keys="members", sampled_queries=samples, sinks=sinks, local=local)
    q, k, _ = make_inputs(2, 4, 2, L, L, 8)
    keep = padding(2, L, [24, 19], left=True)
    method_keep = module.method_key_keep(keep, k)
    layout = module.layout(q, k, method_keep)
    scale, offset = module.scale(q), module.causal_offset(q, k)
    rows, row_cluster = module._sampled_members(q, k, layout.routed_q_index, method_keep, causal,
                                                module.layout_offset(q, k))
    sizes, sample_counts = set(), set()
    for b in range(2):
        for h in range(4):
            logits = q[b, h] @ k[b, h // 2].T * scale
            need = {i: member_need(q[b, h], k[b, h // 2], method_keep[b], i, 4, scale, causal, offset, local)
                    for i in range(L)}
            for cluster in range(c):
                members = [i for i in layout.routed_q_index[b, h, cluster].tolist() if i >= 0]
                n = len(members)
                sizes.add(n)
                width, n_sampled = (-(-n * L // L), -(-samples * n * c // L)) if queries == "nearest" \
                    else (-(-L // c), samples)
                sampled = [i for i in sorted(members, key=lambda i: (-need[i], i)) if need[i] > -math.inf][:n_sampled]
                sample_counts.add(len(sampled))
                chosen = rows[b, h][(row_cluster[b, h] == cluster) & (rows[b, h] >= 0)]
                assert sorted(chosen.tolist()) == sorted(sampled)
                score = torch.full((L,), -math.inf, dtype=torch.float64)
                for i in sampled:
                    normaliser = [j for j in range(L) if bool(method_keep[b, j]) and (not causal or j <= i + offset)]
                    log_probs = logits[i] - torch.logsumexp(logits[i, normaliser], dim=0)
                    for j in normaliser:
                        if not causal or j <= i + offset - local:
                            score[j] = max(score[j], log_probs[j])
                score = score.masked_fill(~method_keep[b], -math.inf)
                expected = [j for j in sorted(range(L), key=lambda j: (-score[j].item(), j))[:width]
                            if score[j] > -math.inf]
                got = [j for j in layout.k_index[b, h, cluster].tolist() if j >= 0]
                assert got == sorted(expected)
    assert len(sizes) > 1 or queries == "balanced"  # clusters of unequal sizes were checked
    assert len(sample_counts) > 1 or queries == "balanced"  # and clusters sampled unequally


@pytest.mark.parametrize("keys", ["centroids", "members"])
def test_centroids_cluster_the_keys_only_when_they_route_them(keys):
    """keys='members' chooses a cluster's keys by its members' scores, so its centroids cluster the
    queries alone (a training step moves them by the queries' EMA only); the paper's routing
    clusters queries and keys (GQA: each query head its kv head's keys)."""
    import copy

    from attnpass.methods.kmeans import OnlineKMeans

    options = {"keys": keys, "sampled_queries": 2} if keys == "members" else {}
    module = make_site(heads_q=4, heads_kv=2, len_q=24, causal=True, clusters=3, queries="nearest", **options)
    q, k, v = make_inputs(2, 4, 2, 24, 24, 8)
    module.layout(q, k)  # initialises the centroids
    before = module.kmeans.centroids.clone()
    expected = copy.deepcopy(module)
    tokens = expected.routing_tokens(q, k, None)
    assert torch.equal(tokens[0].x_hat, OnlineKMeans.normalise(q))
    if keys == "members":
        assert len(tokens) == 1
    else:
        assert len(tokens) == 2 and torch.equal(tokens[1].x_hat, OnlineKMeans.normalise(k).repeat_interleave(2, dim=1))
    expected.kmeans.update_(tokens)
    module.train()
    module(q, k, v)
    assert torch.allclose(module.kmeans.centroids, expected.kmeans.centroids, rtol=0, atol=1e-6)
    assert not torch.allclose(module.kmeans.centroids, before)


@pytest.mark.parametrize("need_block", [64, 8])
def test_member_keys_take_strided_inputs(need_block, monkeypatch):
    """A model's q and k are usually transposed views (B, L, H, D -> B, H, L, D): keys='members' gives
    them the layout it gives their contiguous copies (keys padded to whole blocks, and not)."""
    from attnpass.methods.routing import member_keys

    monkeypatch.setattr(member_keys, "NEED_BLOCK", need_block)
    module = make_site(heads_q=4, heads_kv=2, len_q=24, causal=True, clusters=3, queries="nearest",
                       keys="members", sampled_queries=2, sinks=2, local=5)
    q, k, _ = make_inputs(2, 4, 2, 24, 24, 8)
    q_view, k_view = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q_view.is_contiguous()
    expected, got = module.layout(q, k), module.layout(q_view, k_view)
    assert torch.equal(expected.k_index, got.k_index) and torch.equal(expected.q_index, got.q_index)


def test_member_key_choice_scores_are_counted_with_the_pairs(monkeypatch):
    """keys='members' computes scores beyond its pairs to choose the keys: every routing-head query
    scores Lk / NEED_BLOCK pooled blocks, each sampled member all Lk keys. computed_pairs counts them
    (so fidelity's share does); the local heads score nothing."""
    from attnpass.methods.routing import member_keys

    monkeypatch.setattr(member_keys, "NEED_BLOCK", 4)
    L, c, samples = 24, 3, 2
    module = make_site(heads_q=4, heads_kv=2, len_q=L, causal=True, clusters=c, queries="nearest",
                       keys="members", sampled_queries=samples, local_heads=2)
    q, k, _ = make_inputs(2, 4, 2, L, L, 8)
    keep = padding(2, L, [24, 19], left=True)
    layout = module.layout(q, k, keep)
    _, scored = module.computed_pairs(q, k, keep)
    assert scored.shape == (2, 4, L) and (scored[:, :2] == 0).all()
    blocks = L // 4
    for b in range(2):
        for h in range(2):
            sizes = (layout.routed_q_index[b, h] >= 0).sum(-1)
            sampled = int((-(-sizes * samples * c // L)).sum())  # nearest: in proportion to the members
            row = scored[b, 2 + h]
            assert sorted(set(row.tolist())) == [blocks, blocks + L]
            assert int((row == blocks + L).sum()) == sampled
    plain = make_site(heads_q=4, heads_kv=2, len_q=L, causal=True, clusters=c, queries="nearest")
    plain(q, k, k)
    assert plain.computed_pairs(q, k, keep)[1] is None


def test_padded_queries_rank_last_but_keep_their_slots():
    """Self-attention: key padding is query padding. A padded query is taken only by a cluster with
    spare slots, and then it is routed (its output is defined, as in dense attention)."""
    module = make_site(heads_q=1, len_q=12, clusters=2)
    q, k, _ = make_inputs(1, 1, 1, 12, 12, 8)
    keep = padding(1, 12, [3])
    layout = module.layout(q, k, keep)
    for c in range(2):
        routed = layout.routed_q_index[0, 0, c].tolist()
        assert len(routed) == 6 and {0, 1, 2} <= set(routed) and -1 not in routed


def test_fallback_windows_are_the_nearest_real_keys():
    torch.manual_seed(0)
    for causal, len_q, len_k, bottom_right in ((True, 24, 24, False), (False, 24, 24, False),
                                               (True, 10, 16, True), (False, 12, 20, False)):
        module = make_site(heads_q=2, len_q=len_q, len_k=len_k, causal=causal, bottom_right=bottom_right,
                           clusters=6, local_window=5)
        q, k, _ = make_inputs(2, 2, 2, len_q, len_k, 8, seed=3)
        keep = padding(2, len_k, [len_k, len_k - 6])
        keep[1, 2] = False  # a hole inside the sequence too
        layout = module.layout(q, k, keep)
        offset = module.causal_offset(q, k)
        checked = 0
        for b in range(2):
            real = [j for j in range(len_k) if keep[b, j]]
            for h in range(2):
                for i, window in fallback_windows(layout, b, h):
                    if causal:
                        expected = [j for j in real if j <= i + offset][-5:]
                    else:
                        anchor = i * len_k // len_q
                        centre = max(sum(j <= anchor for j in real) - 1, 0)
                        start = min(max(centre - 2, 0), max(len(real) - 5, 0))
                        expected = real[start:start + 5]
                    assert window == expected, (causal, b, h, i)
                    checked += 1
        assert checked > 0


@pytest.mark.parametrize("causal", [False, True])
def test_local_heads_see_their_own_and_neighbouring_blocks(causal):
    module = make_site(heads_q=2, len_q=20, causal=causal, clusters=2, local_heads=2, local_window=4)
    assert module.kmeans is None  # every head is local: no k-means state
    q, k, _ = make_inputs(1, 2, 2, 20, 20, 8)
    layout = module.layout(q, k)
    blocks = membership(layout.local_q_index, 20).unsqueeze(-1) & membership(layout.local_k_index, 20).unsqueeze(1)
    assert (membership(layout.local_q_index, 20).sum(0) == 1).all()  # each query in exactly one block
    pattern = blocks.any(0)
    block = torch.arange(20) // 4
    distance = block.view(-1, 1) - block.view(1, -1)
    expected = (distance >= 0) & (distance <= 1) if causal else distance.abs() <= 1
    if causal:  # the kernel applies j <= i; the blocks need only contain the allowed keys
        pattern &= torch.ones(20, 20, dtype=torch.bool).tril()
        expected &= torch.ones(20, 20, dtype=torch.bool).tril()
    assert torch.equal(pattern, expected)


# --------------------------------------------------------------------------------------------
# Every query gets an output
# --------------------------------------------------------------------------------------------


def lloyd_definition(tokens, keep, start, steps):
    """Lloyd's k-means written out in float64 for one head's tokens (N, D), from `start` (c, D): each real
    token to its most similar centroid (ties to the lower index), each centroid to its tokens' mean."""
    mu = start.double().clone()
    real = [x.double() for x, kept in zip(tokens, keep) if kept]
    for _ in range(steps):
        groups = [[] for _ in range(len(mu))]
        for x in real:
            groups[max(range(len(mu)), key=lambda j: (float(x @ mu[j]), -j))].append(x)
        mu = torch.stack([torch.stack(g).mean(0) if g else m for g, m in zip(groups, mu)])
    return mu


@pytest.mark.parametrize("keys", ["centroids", "members"])
def test_refit_runs_lloyd_steps_on_each_rows_own_tokens_and_leaves_the_state(keys):
    """refit_steps=n: the layout routes by the state's centroids after n Lloyd steps on the call's own
    real tokens (queries, and the keys when the centroids route them), per batch row; the state is
    unchanged in eval, and a training step's EMA assigns by the state's centroids, not the refit's."""
    import copy

    from attnpass.methods.kmeans import OnlineKMeans

    options = {"keys": "members", "sampled_queries": 2} if keys == "members" else {}
    module = make_site(heads_q=4, heads_kv=2, len_q=24, causal=True, clusters=3, queries="nearest",
                       refit_steps=3, **options)
    q, k, v = make_inputs(2, 4, 2, 24, 24, 8)
    keep = padding(2, 24, [24, 15], left=True)
    module.layout(q, k, keep)  # initialises the centroids
    state = {n: t.clone() for n, t in module.state_dict().items()}
    layout = module.layout(q, k, keep)
    assert all(torch.equal(state[n], t) for n, t in module.state_dict().items())
    q_hat, k_hat = OnlineKMeans.normalise(q), OnlineKMeans.normalise(k).repeat_interleave(2, dim=1)
    for b in range(2):
        # the same layout from a module without refit whose state holds this row's refit centroids
        plain = copy.deepcopy(module)
        plain.refit_steps = 0
        for h in range(4):
            tokens, kept = list(q_hat[b, h]), keep[b].tolist()
            if keys == "centroids":
                tokens, kept = tokens + list(k_hat[b, h]), kept + keep[b].tolist()
            expected = lloyd_definition(tokens, kept, state["kmeans.centroids"][h], 3)
            with torch.no_grad():
                plain.kmeans.centroids[h].copy_(expected)
        row = plain.layout(q[b:b + 1], k[b:b + 1], keep[b:b + 1])
        assert not torch.equal(plain.kmeans.centroids, state["kmeans.centroids"])
        for name in ("routed_q_index", "k_index"):  # the batch pads its slots to its widest row
            got, expected = getattr(layout, name)[b], getattr(row, name)[0]
            assert torch.equal(got[..., :expected.shape[-1]], expected) and (got[..., expected.shape[-1]:] == -1).all()

    without = copy.deepcopy(module)
    without.refit_steps = 0
    module.train()(q, k, v, key_keep=keep)
    without.train()(q, k, v, key_keep=keep)
    for name, t in module.state_dict().items():
        assert torch.equal(t, without.state_dict()[name])
        assert name == "kmeans.initialized" or not torch.equal(t, state[name])


def _set_centroids(module, centroids):
    module.kmeans.centroids.copy_(centroids)
    module.kmeans.ema_sum.copy_(centroids)
    module.kmeans.ema_count.fill_(1.0)
    module.kmeans.initialized.fill_(True)


def test_queries_whose_cluster_keys_are_all_later_still_get_an_output():
    """Cluster u holds the early queries but only late keys: under causal every early query's row is
    empty, and the local-window fallback must answer them."""
    L, D = 16, 4
    u, w = torch.tensor([1.0, -1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, -1.0])
    module = make_site(heads_q=1, head_dim=D, len_q=L, causal=True, clusters=2, local_window=3).eval()
    _set_centroids(module, F.layer_norm(torch.stack([u, w]), (D,)).view(1, 2, D))
    g = torch.Generator().manual_seed(0)
    noise = lambda: 0.05 * torch.randn(L // 2, D, generator=g, dtype=torch.float64)
    q = torch.cat([u + noise(), w + noise()]).view(1, 1, L, D)
    k = torch.cat([w + noise(), u + noise()]).view(1, 1, L, D)
    v = torch.randn(1, 1, L, D, generator=g, dtype=torch.float64)
    layout = module.layout(q, k)
    early = layout.routed_q_index[0, 0, 0]
    assert sorted(early.tolist()) == list(range(L // 2)) and (layout.k_index[0, 0, 0] >= L // 2).all()
    assert (layout.q_index[0, 0, 0] == -1).all()  # all their rows emptied by structure
    out = module(q, k, v)
    assert torch.isfinite(out).all() and (out.abs().sum(-1) > 0).all()
    assert relative_error(out, reference(module, layout, q, k, v)) <= 1e-10


@pytest.mark.parametrize("causal", [False, True])
def test_more_clusters_than_tokens_at_run_time(causal):
    module = make_site(heads_q=2, len_q=64, causal=causal, clusters=16).eval()
    q, k, v = make_inputs(2, 2, 2, 64, 64, 8, seed=1)
    module(q, k, v)  # centroids from a long example batch
    q, k, v = make_inputs(2, 2, 2, 5, 5, 8, seed=2)
    keep = padding(2, 5, [5, 3])
    out = module(q, k, v, key_keep=keep)
    real = torch.cat([torch.ones(1, 5, dtype=torch.bool), keep[1:]]).view(2, 1, 5)
    assert torch.isfinite(out).all() and (out.abs().sum(-1) > 0)[real.expand(2, 2, 5)].all()
    assert relative_error(out, reference(module, module.layout(q, k, keep), q, k, v, key_keep=keep)) <= 1e-10


def test_empty_sequences_give_empty_outputs():
    module = make_site(heads_q=2, clusters=2)
    q, k, v = make_inputs(1, 2, 2, 0, 0, 8)
    assert module(q, k, v).shape == (1, 2, 0, 8)


# --------------------------------------------------------------------------------------------
# k-means state
# --------------------------------------------------------------------------------------------


def _state(module):
    return {name: t.clone() for name, t in module.state_dict().items()}


def test_centroids_are_initialised_from_distinct_real_tokens_of_the_first_batch_even_in_eval():
    torch.manual_seed(0)
    module = make_site(heads_q=2, len_q=12, clusters=6).eval()
    assert set(module.state_dict()) == {"kmeans.centroids", "kmeans.ema_sum", "kmeans.ema_count", "kmeans.initialized"}
    assert not module.kmeans.initialized
    q, k, v = make_inputs(1, 2, 2, 12, 12, 8)
    keep = padding(1, 12, [5])
    module(q, k, v, key_keep=keep)
    assert module.kmeans.initialized
    # the EMA starts as if each centroid had been seen once
    assert torch.equal(module.kmeans.ema_sum, module.kmeans.centroids)
    assert (module.kmeans.ema_count == 1).all()
    for h in range(2):
        real = torch.cat([F.layer_norm(q[0, h], (8,))[:5], F.layer_norm(k[0, h], (8,))[:5]]).float()
        padded = torch.cat([F.layer_norm(q[0, h], (8,))[5:], F.layer_norm(k[0, h], (8,))[5:]]).float()
        match = (module.kmeans.centroids[h].unsqueeze(1) - real.unsqueeze(0)).abs().amax(-1) < 1e-6
        assert (match.sum(1) == 1).all() and (match.sum(0) <= 1).all()  # each centroid one real token, distinct
        assert not ((module.kmeans.centroids[h].unsqueeze(1) - padded).abs().amax(-1) < 1e-6).any()
    # fewer real tokens than clusters: drawn with replacement, still only real tokens
    small = make_site(heads_q=2, len_q=12, clusters=6).eval()
    small(q, k, v, key_keep=padding(1, 12, [1]))
    real = torch.stack([F.layer_norm(q[0, :, 0], (8,)), F.layer_norm(k[0, :, 0], (8,))], dim=1).float()  # (H, 2, D)
    assert ((small.kmeans.centroids.unsqueeze(2) - real.unsqueeze(1)).abs().amax(-1) < 1e-6).any(-1).all()
    # a first batch of padding only still initialises (from any tokens): never uninitialised centroids
    empty = make_site(heads_q=2, len_q=12, clusters=6).eval()
    out = empty(q, k, v, key_keep=torch.zeros(1, 12, dtype=torch.bool))
    assert empty.kmeans.initialized and (empty.kmeans.centroids.abs().sum(-1) > 0).all() and torch.isfinite(out).all()


def test_eval_leaves_the_state_bit_identical_and_train_moves_it():
    module = make_site(heads_q=2, clusters=4)
    q, k, v = make_inputs(2, 2, 2, 24, 24, 8)
    module.eval()(q, k, v)
    before = _state(module)
    for _ in range(2):
        module(q, k, v)
    assert all(torch.equal(before[n], t) for n, t in module.state_dict().items())
    assert module.aux_loss() is None
    module.train()(q, k, v)
    after = module.state_dict()
    for name in ("kmeans.centroids", "kmeans.ema_sum", "kmeans.ema_count"):
        assert not torch.equal(before[name], after[name])


def test_one_ema_step_matches_a_hand_computation():
    D, c, decay = 4, 2, 0.9
    module = make_site(heads_q=1, head_dim=D, len_q=3, clusters=c, decay=decay).eval()
    q, k, v = make_inputs(1, 1, 1, 3, 3, D, seed=4)
    keep = torch.tensor([[True, True, False]])
    module(q, k, v, key_keep=keep)  # initialises
    old_mu, old_sum, old_count = (module.kmeans.centroids[0].double(), module.kmeans.ema_sum[0].double(),
                                  module.kmeans.ema_count[0].double())
    module.train()(q, k, v, key_keep=keep)

    def normalised(x):  # layer norm written out
        return (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-5)

    tokens = [normalised(q[0, 0, i]) for i in range(2)] + [normalised(k[0, 0, j]) for j in range(2)]  # real only
    n, sums = torch.zeros(c, dtype=torch.float64), torch.zeros(c, D, dtype=torch.float64)
    for x in tokens:
        nearest = max(range(c), key=lambda j: float(x @ old_mu[j]))
        n[nearest] += 1
        sums[nearest] += x
    count = decay * old_count + (1 - decay) * n
    total = decay * old_sum + (1 - decay) * sums
    assert torch.allclose(module.kmeans.ema_count[0].double(), count, rtol=0, atol=1e-6)
    assert torch.allclose(module.kmeans.ema_sum[0].double(), total, rtol=0, atol=1e-6)
    # float32 state, so 1e-6; the Laplace eps (1e-5) moves these values by about 1e-5
    assert torch.allclose(module.kmeans.centroids[0].double(), total / (count + 1e-5).unsqueeze(-1), rtol=0, atol=1e-6)
    # commitment loss of that call: before the update, over the same real tokens
    expected_loss = 1e-4 * sum(float((x - old_mu[max(range(c), key=lambda j: float(x @ old_mu[j]))]).square().mean())
                               for x in tokens) / len(tokens)
    assert math.isclose(module.aux_loss().item(), expected_loss, rel_tol=1e-5)


def test_state_dict_round_trip_gives_identical_outputs():
    torch.manual_seed(0)
    module = make_site(heads_q=4, heads_kv=2, causal=True, clusters=4, local_heads=2, local_window=4).train()
    q, k, v = make_inputs(2, 4, 2, 24, 24, 8)
    for _ in range(3):
        module(q, k, v)
    fresh = make_site(heads_q=4, heads_kv=2, causal=True, clusters=4, local_heads=2, local_window=4)
    fresh.load_state_dict(module.state_dict())
    other = make_inputs(2, 4, 2, 17, 17, 8, seed=9)
    assert torch.equal(fresh.eval()(*other), module.eval()(*other))


# --------------------------------------------------------------------------------------------
# Commitment loss, gradients, dtypes, dropout, memory
# --------------------------------------------------------------------------------------------


def test_commitment_loss_is_positive_and_reaches_q_and_k():
    module = make_site(heads_q=4, heads_kv=2, clusters=4, commitment=0.5)
    q, k, v = make_inputs(2, 4, 2, 24, 24, 8, grad=True)
    module.eval()(q, k, v)
    assert module.aux_loss() is None  # eval calls leave no loss
    module.train()(q, k, v)
    loss = module.aux_loss()
    assert loss.item() > 0
    dq, dk = torch.autograd.grad(loss, (q, k))
    assert dq.abs().max() > 0 and dk.abs().max() > 0
    module.eval()(q, k, v)
    assert module.aux_loss() is loss  # the last training call's loss is kept


def test_gradcheck_tiny_float64():
    torch.manual_seed(0)
    module = make_site(heads_q=4, heads_kv=2, head_dim=3, len_q=7, causal=True, clusters=2, local_heads=2,
                       local_window=2).eval()
    q, k, v = make_inputs(1, 4, 2, 7, 7, 3, grad=True)
    bias = torch.randn(1, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    keep = padding(1, 7, [6])
    module.layout(q, k, keep)  # initialise first: gradcheck must see one fixed routing
    assert torch.autograd.gradcheck(lambda *t: module(*t, key_keep=keep), (q, k, v, bias), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_low_precision_inputs(dtype):
    module = make_site(heads_q=2, causal=True, clusters=4).train()
    q, k, v = make_inputs(2, 2, 2, 24, 24, 8, dtype=dtype, grad=True)
    keep = padding(2, 24, [24, 15])
    layout = module.layout(q, k, keep)
    out = module(q, k, v, key_keep=keep)
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().sum().backward()
    assert q.grad.dtype == dtype and torch.isfinite(q.grad).all()
    expected = reference(module, layout, *(t.detach().double() for t in (q, k, v)), key_keep=keep)
    assert relative_error(out.double(), expected) < (2e-2 if dtype == torch.bfloat16 else 1e-5)


def test_dropout_only_in_training_and_reproducible():
    module = make_site(heads_q=2, clusters=4)
    q, k, v = make_inputs(1, 2, 2, 24, 24, 8)
    plain = module.eval()(q, k, v)
    assert torch.equal(module(q, k, v, dropout_p=0.5), plain)  # eval: no dropout
    state = _state(module)
    module.train()
    torch.manual_seed(3)
    first = module(q, k, v, dropout_p=0.5)
    module.load_state_dict(state)  # undo the EMA step so the second call routes the same way
    torch.manual_seed(3)
    again = module(q, k, v, dropout_p=0.5)
    assert torch.isfinite(first).all() and not torch.allclose(first, plain)
    assert torch.equal(first, again)


def test_member_keys_build_no_square_tensor_at_512():
    """keys='members' with every member sampled (2 clusters: over 64 members each, so the samples are
    split over chunks too) scores them against every key, never all rows of a head at once."""
    L = 512
    module = make_site(heads_q=4, heads_kv=2, head_dim=16, len_q=L, causal=True, clusters=2, queries="nearest",
                       keys="members", sampled_queries=L, sinks=4, local=16)
    q, k, v = make_inputs(1, 4, 2, L, L, 16, dtype=torch.float32)
    layout = module.layout(q, k)
    assert (layout.routed_q_index >= 0).sum(-1).max() > 64
    with no_square_tensor(L, L):
        out = module(q, k, v)
    assert torch.isfinite(out).all()


def test_no_square_tensor_forward_backward_at_256():
    torch.manual_seed(0)
    L = 256
    module = make_site(heads_q=4, heads_kv=2, head_dim=16, len_q=L, causal=True, local_heads=2,
                       local_window=16).train()
    assert module.clusters > 1  # the default cluster count: a truly sparse layout
    q, k, v = make_inputs(1, 4, 2, L, L, 16, dtype=torch.float32, grad=True)
    keep = padding(1, L, [200])
    with no_square_tensor(L, L):
        out = module(q, k, v, key_keep=keep, dropout_p=0.1)
        (out.sum() + module.aux_loss()).backward()
    assert torch.isfinite(q.grad).all()


# --------------------------------------------------------------------------------------------
# Options and unsupported sites
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, error, words", [
    ({"centroids": 3}, ValueError, "centroids"),
    ({"clusters": 0}, ValueError, "clusters=0"),
    ({"clusters": True}, TypeError, "clusters=True"),
    ({"clusters": 2.0}, TypeError, "clusters=2.0"),
    ({"decay": 0.0}, ValueError, "decay=0.0"),
    ({"decay": 1}, ValueError, "decay=1"),
    ({"decay": float("nan")}, ValueError, "decay=nan"),
    ({"decay": "0.9"}, TypeError, "decay='0.9'"),
    ({"commitment": -1e-4}, ValueError, "commitment=-0.0001"),
    ({"commitment": None}, TypeError, "commitment=None"),
    ({"local_heads": -1}, ValueError, "local_heads=-1"),
    ({"local_heads": False}, TypeError, "local_heads=False"),
    ({"local_window": 0}, ValueError, "local_window=0"),
    ({"local_window": 2.5}, TypeError, "local_window=2.5"),
    ({"queries": "top"}, ValueError, "queries='top'"),
    ({"keys": "nearest"}, ValueError, "keys='nearest'"),
    ({"keys": "members", "sampled_queries": 0}, ValueError, "sampled_queries=0"),
    ({"sampled_queries": 4}, ValueError, "sampled_queries= is read only with keys='members'"),
    ({"refit_steps": -1}, ValueError, "refit_steps=-1"),
    ({"refit_steps": 1.5}, TypeError, "refit_steps=1.5"),
])
def test_bad_options_are_refused_naming_the_option(options, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(")):
        RoutingClass.validate_options(**options)
    with pytest.raises(error, match=words):
        make_site(**options)


def test_good_options_pass():
    RoutingClass.validate_options(clusters=3, decay=0.5, commitment=0, local_heads=0, local_window=None)
    RoutingClass.validate_options(queries="balanced")
    RoutingClass.validate_options(queries="nearest")
    RoutingClass.validate_options(keys="members", sampled_queries=3)
    RoutingClass.validate_options(refit_steps=0)
    RoutingClass.validate_options(refit_steps=2)


@pytest.mark.parametrize("site, words", [
    ({"len_q": 8, "clusters": 9}, ["layer.attn", "clusters=9", "Lq=8", "Lk=8"]),
    ({"len_q": 4, "len_k": 30, "cross": True, "clusters": 5}, ["layer.attn", "clusters=5", "Lq=4", "Lk=30"]),
    ({"heads_q": 2, "local_heads": 3, "clusters": 2}, ["layer.attn", "local_heads=3"]),
    ({"heads_q": 4, "heads_kv": 2, "local_heads": 1, "clusters": 2}, ["layer.attn", "local_heads=1", "2 query heads per kv head"]),
])
def test_site_dependent_option_errors_name_the_site(site, words):
    with pytest.raises(ValueError) as info:
        make_site(**site)
    for word in words:
        assert word in str(info.value)


def test_unsupported_sites_are_given_a_reason():
    unknown_heads = SiteSpec(name="s", scale=None, head_dim=8, example_len_q=8, example_len_k=8)
    unknown_dim = SiteSpec(name="s", scale=None, heads_q=2, example_len_q=8, example_len_k=8)
    unknown_lengths = SiteSpec(name="s", scale=None, heads_q=2, heads_kv=2, head_dim=8)
    assert "head" in RoutingClass.unsupported_reason(unknown_heads, clusters=2)
    assert "head dim" in RoutingClass.unsupported_reason(unknown_dim, clusters=2)
    assert "clusters" in RoutingClass.unsupported_reason(unknown_lengths)
    assert RoutingClass.unsupported_reason(unknown_lengths, clusters=4) is None  # given clusters: fine
    with pytest.raises(ValueError, match="'s'"):
        RoutingClass(unknown_lengths)
    assert RoutingClass(unknown_lengths, clusters=4).clusters == 4


def test_default_clusters_come_from_the_cost_model(monkeypatch):
    assert make_site(len_q=64, len_k=100, cross=True).clusters == cost_model.default_clusters(64, 100, 8)
    monkeypatch.setattr(cost_model, "default_clusters",
                        lambda len_q, len_k, head_dim: 5 if (len_q, len_k, head_dim) == (64, 100, 8) else 50)
    assert make_site(len_q=64, len_k=100, cross=True).clusters == 5
    assert make_site(len_q=3, len_k=100, cross=True).clusters == 3  # never more than the tokens


def test_wrong_head_count_at_run_time_is_refused():
    module = make_site(heads_q=2, clusters=2)
    q, k, v = make_inputs(1, 3, 3, 8, 8, 8)
    with pytest.raises(ValueError, match="2 query heads"):
        module(q, k, v)


@pytest.mark.parametrize("causal, options", [
    (True, {}), (False, {}), (True, {"local_heads": 2}), (False, {"local_heads": 2}),
    (True, {"queries": "nearest"}), (True, {"sinks": 4, "local": 64, "local_heads": 2}),
    (False, {"keys": "members"}), (True, {"refit_steps": 2}),
    (True, {"queries": "nearest", "keys": "members", "sampled_queries": 2, "refit_steps": 2, "sinks": 4, "local": 64}),
], ids=["causal", "bidirectional", "local-heads", "bidirectional-local-heads", "nearest", "anchor", "members", "refit",
        "recipe"])
def test_a_site_exports_with_a_symbolic_length_and_equals_eager(causal, options):
    """The layout is tensor code of the lengths (the fallback's tiles and spans, a nearest cluster's width,
    the member samples: ints read back with bounds; the members' exact scores an op): torch.export keeps
    L symbolic, and the program equals the eager module exactly at other lengths, on a left-padded batch
    (key padding is query padding here)."""
    spec = SiteSpec("s", None, causal=causal, heads_q=4, heads_kv=2, head_dim=16, example_len_q=200, example_len_k=200)
    module = RoutingAttention(spec, clusters=8, **options).eval()

    def inputs(length):
        g = torch.Generator().manual_seed(length)
        keep = torch.ones(2, length, dtype=torch.bool)
        keep[1, :length // 3] = False
        return (torch.randn(2, 4, length, 16, generator=g), torch.randn(2, 2, length, 16, generator=g),
                torch.randn(2, 2, length, 16, generator=g), keep)

    module(*inputs(200)[:3])  # the first call initialises the centroids

    class Call(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.site = module

        def forward(self, q, k, v, keep):
            torch._check(q.shape[2] == k.shape[2])  # one sequence, as in a model (here separate inputs)
            return self.site(q, k, v, key_keep=keep)

    assert module.traces_symbolically(*inputs(200)[:3])
    length = torch.export.Dim("L", min=65, max=8192)
    program = torch.export.export(Call(), inputs(200), dynamic_shapes=({2: length}, {2: length}, {2: length}, {1: length}))
    with torch.no_grad():
        for n in (68, 333, 1000):
            assert torch.equal(program.module()(*inputs(n)), Call()(*inputs(n))), n


def test_what_does_not_trace_says_so():
    """Calls whose layout updates state or reads values in Python are not traced (the compile backend
    cuts the graph there): training, queries other than the keys, sinks without a window. A fresh
    module traces, but says that its first call initialises its state (the backend runs that call's
    graph eagerly)."""
    spec = SiteSpec("s", None, causal=True, heads_q=4, heads_kv=2, head_dim=16, example_len_q=64, example_len_k=64)
    q, k = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16)
    fresh = RoutingAttention(spec, clusters=4).eval()
    assert fresh.traces_symbolically(q, k, k) and fresh.needs_first_call()
    fresh(q, k, k)
    assert fresh.traces_symbolically(q, k, k) and not fresh.needs_first_call()
    assert not fresh.train().traces_symbolically(q, k, k)
    assert not fresh.eval().traces_symbolically(q[:, :, :10], k, k)  # queries are not the keys
    sinks_only = RoutingAttention(spec, clusters=4, sinks=2).eval()
    sinks_only(q, k, k)
    assert not sinks_only.traces_symbolically(q, k, k)


def test_member_key_scores_op_states_its_output_shape():
    """`attnpass::member_key_scores` (keys='members' exact scores, chunked by a data-dependent count):
    its fake kernel agrees with the real one (torch.library.opcheck)."""
    q, k = torch.randn(2, 4, 30, 8), torch.randn(2, 2, 30, 8)
    rows = torch.tensor([[0, 5, 29, -1]]).expand(2, 4, 4).contiguous()
    cluster = torch.tensor([[0, 0, 2, 1]]).expand(2, 4, 4).contiguous()
    keep = torch.ones(2, 30, dtype=torch.bool)
    keep[1, :4] = False
    args = (q, k, rows, cluster, keep, 3, 0.35, True, 0, 0)
    torch.library.opcheck(torch.ops.attnpass.member_key_scores.default, args)
    scores = torch.ops.attnpass.member_key_scores(*args)
    assert scores.shape == (2, 4, 3, 30) and bool(torch.isinf(scores[:, :, 1]).all())  # cluster 1: no sample
