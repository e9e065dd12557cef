"""Tests for the block-sparse flash kernel (lowering/torch/block_flash.py) against a loop-written
float64 definition: query i of block t attends, under one softmax, to the keys of t's chosen key
blocks that exist, are kept, are not sinks, and (causal) lie at or before its limit i + causal_offset;
with the anchor's parts, also to the kept keys in (limit, limit + local] and to the sinks at or
before its limit."""
from __future__ import annotations

import itertools

import pytest
import torch
from memory_probe import no_square_tensor

from attnpass.lowering.torch.block_flash import block_flash_attention


def reference(q, k, v, key_blocks, block, scale, causal, offset, keep, local=0, sinks=None):
    B, Hq, Lq, _ = q.shape
    Hkv, Lk, Hs = k.shape[1], k.shape[2], key_blocks.shape[1]
    out = torch.zeros(B, Hq, Lq, v.shape[-1], dtype=torch.float64)
    lse = torch.zeros(B, Hq, Lq, dtype=torch.float64)
    for b, h, i in itertools.product(range(B), range(Hq), range(Lq)):
        chooser, kv = h * Hs // Hq, h * Hkv // Hq
        kept = [j for j in range(Lk) if keep is None or keep[b, j]]
        sink = [] if sinks is None else [j for j in sinks[b].tolist() if 0 <= j]
        keys = [j for c in key_blocks[b, chooser, i // block].tolist() if c >= 0
                for j in range(c * block, (c + 1) * block)
                if j in kept and j not in sink and (not causal or j <= i + offset)]
        keys += [j for j in kept if i + offset < j <= i + offset + local]
        keys += [j for j in sink if j in kept and (not causal or j <= i + offset)]
        keys = sorted(keys)
        assert len(set(keys)) == len(keys)
        if keys:
            logits = (q[b, h, i].double() @ k[b, kv, keys].double().T) * scale
            out[b, h, i] = logits.softmax(-1) @ v[b, kv, keys].double()
            lse[b, h, i] = logits.logsumexp(-1)
    return out, lse


@pytest.mark.parametrize("Lq, Lk, block, causal, offset, per_query_head, padded, Dv", [
    (70, 70, 8, True, 0, False, False, 16),     # prefill, query heads of a kv head share the blocks
    (70, 70, 8, True, -13, True, True, 16),     # a window's offset (not a multiple of the block), per query head
    (33, 90, 8, True, 57, False, True, 20),     # a chunk over cached keys; v wider than q
    (40, 50, 16, False, 0, False, True, 12),    # bidirectional; v narrower than q
    (64, 64, 16, True, -5, True, False, 16),
    (5, 3, 4, True, -4, False, False, 16),      # the first queries see nothing: zeros and statistic 0
])
def test_equals_the_definition(Lq, Lk, block, causal, offset, per_query_head, padded, Dv):
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, D = 2, 6, 2, 16
    q, k = torch.randn(B, Hq, Lq, D, generator=g), torch.randn(B, Hkv, Lk, D, generator=g)
    v = torch.randn(B, Hkv, Lk, Dv, generator=g)
    Hs, n_qb, n_kb = (Hq if per_query_head else Hkv), -(-Lq // block), -(-Lk // block)
    top = min(3, n_kb)
    key_blocks = torch.stack([torch.randperm(n_kb, generator=g)[:top] for _ in range(B * Hs * n_qb)]).view(B, Hs, n_qb, top)
    key_blocks[0, 0, 0, 0] = -1  # a slot with no block
    keep = torch.rand(B, Lk, generator=g) > 0.2 if padded else None
    out, lse = block_flash_attention(q, k, v, key_blocks, block=block, scale=0.3, causal=causal,
                                     causal_offset=offset, key_padding_mask=keep)
    want_out, want_lse = reference(q, k, v, key_blocks, block, 0.3, causal, offset, keep)
    assert torch.allclose(out.double(), want_out, atol=2e-6) and torch.allclose(lse.double(), want_lse, atol=2e-6)
    if Lk < Lq:
        assert (want_lse == 0).any()  # the case the test is for: some rows see nothing


@pytest.mark.parametrize("Lq, Lk, block, local, n_sinks, per_query_head, padded", [
    (70, 70, 8, 16, 3, False, False),   # the recipe's shape: a window of whole blocks, sinks
    (70, 70, 8, 13, 2, True, True),     # a window not a multiple of the block, left padding moves the sinks
    (40, 90, 8, 20, 4, False, True),    # a chunk over cached keys
    (64, 64, 16, 4, 0, False, False),   # a window shorter than a block, no sinks
    (48, 48, 8, 0, 3, False, True),     # sinks alone
    (30, 30, 8, 50, 2, False, False),   # a window longer than the sequence
    (24, 24, 8, 0, 4, False, "short"),  # a row with 2 real keys: sink slots -1, padding stays away
])
def test_with_the_anchors_window_and_sinks_equals_the_definition(Lq, Lk, block, local, n_sinks, per_query_head, padded):
    from attnpass.methods.anchor import Anchor

    g = torch.Generator().manual_seed(1)
    B, Hq, Hkv, D = 2, 6, 2, 16
    q, k, v = torch.randn(B, Hq, Lq, D, generator=g), torch.randn(B, Hkv, Lk, D, generator=g), torch.randn(B, Hkv, Lk, D, generator=g)
    Hs, n_qb, n_kb = (Hq if per_query_head else Hkv), -(-Lq // block), -(-Lk // block)
    top = min(4, n_kb)
    key_blocks = torch.stack([torch.randperm(n_kb, generator=g)[:top] for _ in range(B * Hs * n_qb)]).view(B, Hs, n_qb, top)
    keep = None
    if padded:
        keep = torch.ones(B, Lk, dtype=torch.bool)
        keep[1, :Lk - 2 if padded == "short" else 11] = False
    sinks = Anchor(n_sinks, local).sink_positions(keep, B, Lk, "cpu") if n_sinks else None
    offset = Lk - Lq - local  # the method's limit: the site's causal offset less the window
    out, lse = block_flash_attention(q, k, v, key_blocks, block=block, scale=0.3, causal=True, causal_offset=offset,
                                     key_padding_mask=keep, local=local, sinks=sinks)
    want_out, want_lse = reference(q, k, v, key_blocks, block, 0.3, True, offset, keep, local, sinks)
    assert torch.allclose(out.double(), want_out, atol=2e-6) and torch.allclose(lse.double(), want_lse, atol=2e-6)


def test_sinks_at_a_bidirectional_site_are_seen_by_every_query():
    from attnpass.methods.anchor import Anchor

    g = torch.Generator().manual_seed(2)
    B, Hq, Hkv, D, L, block = 2, 4, 2, 8, 40, 8
    q, k, v = torch.randn(B, Hq, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)
    key_blocks = torch.stack([torch.randperm(L // block, generator=g)[:2] for _ in range(B * Hkv * (L // block))])
    key_blocks = key_blocks.view(B, Hkv, L // block, 2)
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[1, :6] = False
    sinks = Anchor(3, 0).sink_positions(keep, B, L, "cpu")
    out, lse = block_flash_attention(q, k, v, key_blocks, block=block, scale=0.3, key_padding_mask=keep, sinks=sinks)
    want_out, want_lse = reference(q, k, v, key_blocks, block, 0.3, False, 0, keep, 0, sinks)
    assert torch.allclose(out.double(), want_out, atol=2e-6) and torch.allclose(lse.double(), want_lse, atol=2e-6)
    with pytest.raises(ValueError, match="causal"):
        block_flash_attention(q, k, v, key_blocks, block=block, scale=0.3, local=4)


def test_wrong_block_shape_is_refused():
    q, k = torch.randn(1, 4, 20, 8), torch.randn(1, 2, 20, 8)
    with pytest.raises(ValueError, match="does not fit"):
        block_flash_attention(q, k, k, torch.zeros(1, 2, 2, 1, dtype=torch.int64), block=8, scale=1.0)


def test_no_square_tensor():
    L, block = 1024, 32
    q, k, v = torch.randn(1, 4, L, 16), torch.randn(1, 2, L, 16), torch.randn(1, 2, L, 16)
    key_blocks = torch.randint(0, L // block, (1, 2, L // block, 4))
    with no_square_tensor(L, L):
        block_flash_attention(q, k, v, key_blocks, block=block, scale=0.25, causal=True, causal_offset=-64)


def test_only_the_blocks_a_query_block_sees_in_part_take_per_query_masks():
    """The recipe's shape (block 32, window 128 after the method's limit): of the window's five key
    blocks, the three inner ones are whole for every query; the one at the method's limit and the
    diagonal one are the per-query part."""
    from attnpass.lowering.torch.block_flash import _block_geometry

    assert _block_geometry(32, -128, 128) == ((-3, -2, -1), (-4, 0))
    assert _block_geometry(32, -5, 0) == ((), (-1, 0))      # no window, limits across a block boundary: two blocks
    assert _block_geometry(32, -32, 0) == ((), (-1,))        # no window, aligned: only the diagonal block
