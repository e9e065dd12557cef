"""The transformers classes that spell attention their own way (tests/zoo.py `_spelling_cases`):
BLOOM (baddbmm with ALiBi on (B*H, L, D), viewed to (B, H, L, L) for the mask and softmax and back
for the bmm with V), DeBERTa / DeBERTa-v2 (disentangled scores: content·content plus gathered
content·position and position·content terms), ProphetNet (einsum scores plus a bias gathered from a
relative-position bucket table, over (B, ngram, H, L, 2L) predict streams) and LongT5 (blocked local
and transient-global attention over 5-D einsums).

The exact dense rewrite of each at two shapes is tests/test_zoo_rewrite.py's; here every method runs
on each of them or declines a site with a reason that names what it cannot carry, and a blocked
site keeps its blocks: the canonical op sees (B * blocks, H, block, 3 * block (+ globals)), never
(B, H, L, L)."""
from __future__ import annotations

import re
import warnings

import pytest
import torch

import attnpass
from tests.helpers import max_relative_error, tensors
from tests.zoo import LONGT5_RADIUS, by_name

CASES = ["bloom-eager", "deberta-v2-eager", "deberta-eager", "sew-d-eager", "prophetnet-eager", "longt5-local-eager",
         "longt5-tglobal-eager"]
# what a method may decline a site for: the additive bias (ALiBi, relative-position terms, DeBERTa's
# c2p / p2c) or the mask kept as a tensor
STRUCTURE = ("additive bias", "mask")


def _call(model, args, kwargs):
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # a per-size capture's notice (LongT5 transient-global)
        return tensors(model(*args, **kwargs))


@pytest.mark.parametrize("method", attnpass.METHODS)
@pytest.mark.parametrize("name", CASES)
def test_every_method_runs_or_declines_with_a_reason(name, method):
    case = by_name(name)
    model = case.build()
    args, kwargs = case.inputs(2, 8)
    try:
        sparse = attnpass.sparsify(model, args, kwargs, method=method)
    except attnpass.NoAttentionFound as e:  # every site declined: each with its reason
        message = str(e)
        reasons = re.findall(rf"method {method!r}: ([^;]*)", message)  # "<site>: method 'm': <reason>; ..."
        assert len(reasons) == case.attention_count, message
        assert all(any(word in r for word in STRUCTURE) for r in reasons), message
        return
    report = sparse.report
    assert len(report.sites) + len(report.skipped) == case.attention_count, str(report)
    for skipped in report.skipped:
        assert skipped.reason.startswith(f"method {method!r}") and any(w in skipped.reason for w in STRUCTURE), str(report)
    second = (3, 12) if case.dynamic else (3, 8)
    for batch, length in [(2, 8), second]:
        a, kw = case.inputs(batch, length)
        got, expected = _call(sparse, a, kw), _call(model, a, kw)
        assert [t.shape for t in got] == [t.shape for t in expected]
        assert all(torch.isfinite(t).all() for t in got), f"{name} / {method} at B={batch} L={length}"


BLOCK = LONGT5_RADIUS + 1


@pytest.mark.parametrize("name, length, globals_", [("longt5-local-eager", 58, 0), ("longt5-tglobal-eager", 40, 10)])
def test_blocked_sites_keep_their_blocks(name, length, globals_):
    """LongT5's encoder sites are found, served as B * blocks attentions of one block's queries against
    its 3 blocks of keys (plus the global aggregates), exact, also at a length of many blocks."""
    case = by_name(name)
    model = case.build()
    args, kwargs = case.inputs(2, 8)
    sparse = attnpass.sparsify(model, args, kwargs, method="dense")
    blocked = [s for s in sparse.sites if s.layout.startswith("B*N")]
    kind = "LongT5LocalAttention" if globals_ == 0 else "LongT5TransientGlobalAttention"
    assert [s.module_type for s in blocked] == [kind] * 2, str(sparse.report)
    seen = []
    for module in sparse.site_modules().values():
        module.register_forward_pre_hook(lambda m, a: seen.append((tuple(a[0].shape), tuple(a[1].shape))))
    ids = torch.randint(3, 99, (2, length), generator=torch.Generator().manual_seed(length))
    call = dict(input_ids=ids, attention_mask=torch.ones(2, length, dtype=torch.long),
                decoder_input_ids=ids[:, :6])
    call["attention_mask"][1, length - 7:] = 0
    got, expected = _call(sparse, (), call), _call(model, (), call)
    assert max(max_relative_error(g, e) for g, e in zip(got, expected)) <= 1e-5
    blocks = -(-length // BLOCK)
    q_shape, k_shape = (2 * blocks, 4, BLOCK, 8), (2 * blocks, 4, 3 * BLOCK + globals_, 8)
    assert seen.count((q_shape, k_shape)) == 2, seen  # the two encoder layers, O(L * block) each
    assert all(q[2] != length for q, _ in seen), seen  # no site attends over the encoder's L x L


class _InPlace(torch.nn.Module):
    """`scores += bias` (LongT5's spelling) is attention; `bias += scores` writes the scores into a
    tensor the model reads again (here it returns it), which a rewrite would leave unwritten."""

    def __init__(self, scores_written: bool):
        super().__init__()
        self.scores_written = scores_written

    def forward(self, q, k, v):
        bias = torch.arange(k.shape[2], dtype=q.dtype) / k.shape[2]
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]).clone()
        scores = q @ k.transpose(-1, -2)
        if self.scores_written:
            scores += bias
            return scores.softmax(-1) @ v, bias
        bias += scores
        return bias.softmax(-1) @ v, bias


def test_in_place_add_is_read_as_the_model_writes_it():
    g = torch.Generator().manual_seed(0)
    qkv = tuple(torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    sparse = attnpass.sparsify(_InPlace(True), qkv, method="dense")
    assert len(sparse.sites) == 1 and sparse.sites[0].mask_info.general_bias, str(sparse.report)
    qkv = tuple(torch.randn(3, 4, 11, 8, generator=g) for _ in range(3))
    assert max(max_relative_error(a, b) for a, b in zip(_call(sparse, qkv, {}), _call(_InPlace(True), qkv, {}))) <= 1e-5
    report = attnpass.find_attention(_InPlace(False), qkv)
    assert not report.sites and [s.reason for s in report.skipped] == ["scores added in place into another tensor (term += scores)"]
