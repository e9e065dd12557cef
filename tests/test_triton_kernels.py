"""The Triton kernels equal the PyTorch kernels, forward and backward, run on CPU by
Triton's interpreter (TRITON_INTERPRET=1) through the public ops under ``force_triton()``.

Each case runs the op twice on the same inputs — PyTorch kernels, then Triton (with the backward
inside ``force_triton`` too) — and compares outputs, row statistics and every input gradient:
fp32 to 1e-4 relative, bf16 to 1e-2. Cases cover what the methods use: causal with offset,
key padding, GQA, cross-attention (Lq != Lk), lengths that are not multiples of the block,
rows split over several tiles (block cap lowered to 16), empty slots and empty rows, broadcast
bias / pair_mask, key_range, summaries with a summary mask, per-edge bias, dropout, both
normalisers, and the row statistic's own gradient. ``LAUNCHES`` proves the Triton path ran. Every kind
also compiles through the CUDA backend (no GPU needed): the interpreter alone misses GPU-only errors.
"""
from __future__ import annotations

import inspect
import os
import sys

import pytest
import torch

from attnpass.lowering.torch.edge_attention import edge_attention, edges_from_pairs
from attnpass.lowering.torch.grouped_attention import grouped_attention
from tests.memory_probe import no_square_tensor

pytest.importorskip("triton")  # an optional extra; CI installs it with .[test]

from attnpass.lowering.triton import constexprs, dispatch, force_triton, specialise  # noqa: E402


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """Triton's CPU interpreter for every test here."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def _rel(got, expected) -> float:
    scale = expected.double().abs().max().item() or 1.0
    return (got.double() - expected.double()).abs().max().item() / scale


def _run(op, inputs: dict, grad_names, settings: dict, stat_grad: bool, triton: bool):
    """(out, row_stat, {name: grad}) of one op call with autograd; optionally all on Triton."""
    leaves = {n: t.detach().clone().requires_grad_(n in grad_names) if t is not None else None
              for n, t in inputs.items()}
    torch.manual_seed(0)
    with force_triton(triton):
        out, stat = op(**leaves, **settings)
        g = torch.Generator().manual_seed(1)
        loss = (out.float() * torch.randn(out.shape, generator=g)).sum()
        if stat_grad:
            loss = loss + (stat * torch.randn(stat.shape, generator=g, dtype=stat.dtype)).sum()
        loss.backward()
    return out.detach(), stat.detach(), {n: leaves[n].grad for n in grad_names}


def _compare(op, inputs, grad_names, settings, stat_grad=False, tol=1e-4):
    before = sum(dispatch.LAUNCHES.values())
    ref = _run(op, inputs, grad_names, settings, stat_grad, triton=False)
    mid = sum(dispatch.LAUNCHES.values())
    got = _run(op, inputs, grad_names, settings, stat_grad, triton=True)
    assert mid == before and sum(dispatch.LAUNCHES.values()) == mid + 2, "Triton forward + backward must both run"
    assert _rel(got[0], ref[0]) <= tol, f"out: {_rel(got[0], ref[0])}"
    assert _rel(got[1], ref[1]) <= tol, f"row_stat: {_rel(got[1], ref[1])}"
    for name in grad_names:
        assert ref[2][name] is not None and got[2][name] is not None, name
        assert ref[2][name].abs().max() > 0, f"d{name} is zero: the case would not test it"
        assert _rel(got[2][name], ref[2][name]) <= tol, f"d{name}: {_rel(got[2][name], ref[2][name])}"
    return ref, got


def _qkv(B, Hq, Hkv, Lq, Lk, D, Dv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Lq, D, generator=g).to(dtype), torch.randn(B, Hkv, Lk, D, generator=g).to(dtype),
            torch.randn(B, Hkv, Lk, Dv, generator=g).to(dtype))


def _groups(B, H, G, W, L, seed, empty=0.0):
    """(B, H, G, W) distinct positions per group, a share of slots empty (-1)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(L, generator=g)[:W] for _ in range(B * H * G)]).view(B, H, G, W)
    return idx.masked_fill(torch.rand(idx.shape, generator=g) < empty, -1)


# --------------------------------------------------------------------------------------------
# Grouped attention
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("multi_tile", [False, True])
def test_grouped_softmax_causal_padding_gqa_cross_dropout(monkeypatch, multi_tile):
    if multi_tile:
        monkeypatch.setattr(dispatch, "MAX_BLOCK", 16)  # Wq=Wk=20 -> two tiles each way
    B, Hq, Hkv, Lq, Lk = 2, 4, 2, 22, 25
    q, k, v = _qkv(B, Hq, Hkv, Lq, Lk, 8, 5)
    G, W = 2, 20
    q_index = _groups(B, Hq, G, W, Lq, 1, empty=0.1)
    k_index = _groups(B, Hq, G, W, Lk, 2, empty=0.1)
    q_index[0, 0, 0, :] = -1                      # a group with no query
    k_index[1, 1, 1, :] = -1                      # a group with no key: its queries get zeros
    keep = torch.rand(B, Lk, generator=torch.Generator().manual_seed(3)) > 0.3
    keep[:, 0] = True
    inputs = dict(q=q, k=k, v=v, q_index=q_index, k_index=k_index, key_padding_mask=keep)
    settings = dict(scale=0.4, causal=True, causal_offset=-2, dropout_p=0.25, dropout_seed=1234)
    ref, _ = _compare(grouped_attention, inputs, ("q", "k", "v"), settings)
    assert (ref[1] == 0).any(), "the case has empty rows"


def test_grouped_softmax_bias_pair_mask_key_range_and_stat_grad():
    B, Hq, Hkv, L = 1, 2, 2, 19
    q, k, v = _qkv(B, Hq, Hkv, L, L, 16, 16, seed=4)
    G, W = 3, 11
    q_index, k_index = _groups(B, Hq, G, W, L, 5), _groups(B, Hq, G, W, L, 6, empty=0.2)
    g = torch.Generator().manual_seed(7)
    bias = torch.randn(Hq, 1, L, generator=g)                    # broadcast over batch and queries
    pair_mask = torch.rand(B, 1, L, L, generator=g) > 0.2
    low = torch.randint(0, 6, (B, Hq, G, W), generator=g)
    key_range = torch.stack([low, low + 10], dim=-1)
    inputs = dict(q=q, k=k, v=v, q_index=q_index, k_index=k_index, bias=bias, pair_mask=pair_mask,
                  key_range=key_range)
    _compare(grouped_attention, inputs, ("q", "k", "v", "bias"), dict(scale=0.3), stat_grad=True)


def test_grouped_softmax_with_summaries_as_combiner_uses_them():
    B, Hq, Hkv, L, D = 2, 2, 1, 24, 8
    q, k, v = _qkv(B, Hq, Hkv, L, L, D, 4, seed=8)
    G, W, S = 4, 6, 3
    pos = torch.arange(L).view(G, W)
    q_index, k_index = pos.expand(B, Hq, G, W), pos.expand(B, Hq, G, W)
    g = torch.Generator().manual_seed(9)
    # expanded (stride-0) summaries over the groups, as Combiner's fixed variant passes them
    summary_k = torch.randn(B, Hq, 1, S, D, generator=g).expand(B, Hq, G, S, D)
    summary_v = torch.randn(B, Hq, G, S, 4, generator=g)
    summary_mask = torch.arange(S).view(1, 1, 1, 1, S) < torch.arange(G).view(1, 1, G, 1, 1)  # group g sees g
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[1, -5:] = False
    inputs = dict(q=q, k=k, v=v, q_index=q_index, k_index=k_index, key_padding_mask=keep,
                  summary_k=summary_k, summary_v=summary_v, summary_mask=summary_mask)
    settings = dict(scale=0.35, causal=True, dropout_p=0.2, dropout_seed=77)
    _compare(grouped_attention, inputs, ("q", "k", "v", "summary_k", "summary_v"), settings)


@pytest.mark.parametrize("multi_tile", [False, True])
def test_grouped_entmax15_causal_padding_bias(monkeypatch, multi_tile):
    if multi_tile:
        monkeypatch.setattr(dispatch, "MAX_BLOCK", 16)
    B, Hq, Hkv, Lq, Lk = 1, 2, 1, 18, 21
    q, k, v = _qkv(B, Hq, Hkv, Lq, Lk, 8, 8, seed=10)
    q = q * 3  # peaked scores: entmax has real zeros
    q_index, k_index = _groups(B, Hq, 1, 18, Lq, 11, empty=0.1), _groups(B, Hq, 1, 20, Lk, 12, empty=0.1)
    keep = torch.rand(B, Lk, generator=torch.Generator().manual_seed(13)) > 0.2
    bias = torch.randn(1, 1, Lq, Lk, generator=torch.Generator().manual_seed(14))
    inputs = dict(q=q, k=k, v=v, q_index=q_index, k_index=k_index, key_padding_mask=keep, bias=bias)
    settings = dict(scale=0.5, causal=True, causal_offset=3, normalizer="entmax15")
    ref, _ = _compare(grouped_attention, inputs, ("q", "k", "v", "bias"), settings, stat_grad=True)
    assert (ref[0] != 0).any()


def test_grouped_bfloat16_within_1e_2():
    q, k, v = _qkv(2, 2, 1, 20, 20, 16, 16, dtype=torch.bfloat16, seed=15)
    idx = torch.arange(20).view(2, 10).expand(2, 2, 2, 10)
    inputs = dict(q=q, k=k, v=v, q_index=idx, k_index=idx)
    _compare(grouped_attention, inputs, ("q", "k", "v"), dict(scale=0.25, causal=True), tol=1e-2)


# --------------------------------------------------------------------------------------------
# Edge (CSR) attention
# --------------------------------------------------------------------------------------------


def _graph(B, Hq, Lq, Lk, density, seed):
    """Random CSR with varying degrees and some rows without any edge."""
    g = torch.Generator().manual_seed(seed)
    R = B * Hq * Lq
    dense = torch.rand(R, Lk, generator=g) < density * torch.rand(R, 1, generator=g) * 2
    dense[::7] = False
    row, col = dense.nonzero().unbind(1)
    return edges_from_pairs(row, col, R)


@pytest.mark.parametrize("normalizer", ["softmax", "entmax15"])
def test_edge_kernels_causal_padding_gqa_cross_bias_edge_bias(monkeypatch, normalizer):
    monkeypatch.setattr(dispatch, "MAX_BLOCK", 16)  # rows of up to ~30 edges span two tiles
    B, Hq, Hkv, Lq, Lk = 1, 2, 1, 9, 31
    q, k, v = _qkv(B, Hq, Hkv, Lq, Lk, 8, 6, seed=16)
    row_ptr, col_index = _graph(B, Hq, Lq, Lk, 0.5, 17)
    assert int(row_ptr.diff().max()) > 16
    g = torch.Generator().manual_seed(18)
    keep = torch.rand(B, Lk, generator=g) > 0.2
    bias = torch.randn(Hq, Lq, 1, generator=g)  # broadcast over keys (and batch)
    edge_bias = torch.randn(col_index.shape, generator=g)
    inputs = dict(q=q * 2, k=k, v=v, row_ptr=row_ptr, col_index=col_index, key_padding_mask=keep, bias=bias,
                  edge_bias=edge_bias)
    settings = dict(scale=0.5, causal=True, causal_offset=20, normalizer=normalizer)
    _compare(edge_attention, inputs, ("q", "k", "v", "bias", "edge_bias"), settings, stat_grad=True)


def test_edge_softmax_dropout_as_sbm_uses_it():
    B, Hq, Hkv, L = 2, 2, 2, 10
    q, k, v = _qkv(B, Hq, Hkv, L, L, 4, 4, seed=19)
    row_ptr, col_index = _graph(B, Hq, L, L, 0.4, 20)
    edge_bias = torch.zeros(col_index.shape)  # SBM's straight-through logit: zero, differentiable
    inputs = dict(q=q, k=k, v=v, row_ptr=row_ptr, col_index=col_index, edge_bias=edge_bias)
    settings = dict(scale=0.5, dropout_p=0.3, dropout_seed=5)
    _compare(edge_attention, inputs, ("q", "k", "v", "edge_bias"), settings)


def test_edge_entmax15_bfloat16_within_1e_2():
    q, k, v = _qkv(1, 2, 1, 8, 12, 16, 16, dtype=torch.bfloat16, seed=21)
    row_ptr, col_index = _graph(1, 2, 8, 12, 0.6, 22)
    inputs = dict(q=q * 2, k=k, v=v, row_ptr=row_ptr, col_index=col_index)
    _compare(edge_attention, inputs, ("q", "k", "v"), dict(scale=0.5, normalizer="entmax15"), tol=1e-2)


# --------------------------------------------------------------------------------------------
# Generation, dispatch, errors, memory
# --------------------------------------------------------------------------------------------


SPEC_FLAGS = {kind: [k for k, v in d.items() if v is False and k != "one_tile"] for kind, d in specialise.DEFAULTS.items()}
FLAGS = {kind: [k for k, v in constexprs(kind).items() if isinstance(v, bool)] for kind in specialise.DEFAULTS}
POINTERS = {"QI": "*i64", "KI": "*i64", "KR": "*i64", "ROW_PTR": "*i64", "COL": "*i64", "KPM": "*u8",
            "PMASK": "*u8", "SMASK": "*u8", **{name: "*fp32" for name in (
                "Q K V BIAS SK SV SCALARS OUT STAT DO DSTAT DQ DK DV_ DBIAS DSK DSV EBIAS DEDGE".split())}}


def test_constexprs_name_exactly_what_a_spec_turns_on():
    plain = constexprs("grouped_fwd", d=64)
    causal = constexprs("grouped_fwd", d=64, causal=True, normalizer="entmax15", dtype="bfloat16")
    assert set(plain) == set(causal) and not any(plain[f] for f in FLAGS["grouped_fwd"])
    assert [f for f in FLAGS["grouped_fwd"] if causal[f]] == ["CAUSAL", "ENTMAX"]
    assert causal["PRECISION"] == "tf32" and plain["PRECISION"] == "ieee"
    assert constexprs("edge_bwd", dtype="float64")["PRECISION"] == "default"
    assert (plain["BLOCK_D"], constexprs("edge_fwd", d=40, dv=5)["BLOCK_DV"]) == (64, 16)
    # every constexpr a kernel declares is given, and nothing else
    for kind in FLAGS:
        declared = {name for name, param in inspect.signature(specialise.kernel(kind).fn).parameters.items()
                    if param.annotation is not inspect.Parameter.empty}
        assert declared == set(constexprs(kind)), kind
    with pytest.raises(ValueError, match="unknown spec keys"):
        constexprs("grouped_fwd", head_dim=64)
    with pytest.raises(ValueError, match="unknown kind"):
        constexprs("dense_fwd")
    with pytest.raises(ValueError, match="power of two"):
        constexprs("edge_fwd", block_n=24)


# Per kind: every flag on, streamed tiles, each normaliser (half precision); no flag, one tile
# (float32 softmax, float64 entmax): the code paths a GPU build must accept.
GPU_SPECS = [(kind, dict(d=64, dv=48, normalizer=normalizer, dtype=dtype, one_tile=one_tile,
                         **{name: on for name in SPEC_FLAGS[kind]}))
             for kind in FLAGS
             for normalizer, dtype, on, one_tile in [("entmax15", "bfloat16", True, False),
                                                     ("softmax", "float16", True, False),
                                                     ("softmax", "float32", False, True),
                                                     ("entmax15", "float64", False, True)]]


@pytest.mark.parametrize("kind, spec", GPU_SPECS, ids=[f"{k}-{s['dtype']}" for k, s in GPU_SPECS])
def test_kernels_compile_for_a_gpu(monkeypatch, tmp_path, kind, spec):
    """The interpreter runs Python, so code a GPU build rejects (a constexpr used as a runtime value,
    a type mismatch across a loop, a dot shape) would pass every other test here: compile each
    kind through Triton's CUDA backend to a cubin (sm_80; no GPU needed to compile)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compile, never load an earlier build
    fn = specialise.kernel(kind)
    consts = constexprs(kind, **spec)
    signature = {name: "constexpr" if name in consts else POINTERS.get(name, "i64") for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                              target=GPUTarget("cuda", 80, 32))
    assert len(compiled.asm["cubin"]) > 10_000


def test_forcing_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    q, k, v = _qkv(1, 1, 1, 4, 4, 4, 4)
    idx = torch.arange(4).view(1, 1, 1, 4)
    with force_triton(), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        grouped_attention(q, k, v, idx, idx, scale=1.0)
    grouped_attention(q, k, v, idx, idx, scale=1.0)  # not forced: the PyTorch kernels, no error


def test_missing_triton_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    q, k, v = _qkv(1, 1, 1, 4, 4, 4, 4)
    row_ptr, col = torch.tensor([0, 2, 3, 3, 4]), torch.tensor([0, 1, 2, 3])
    with force_triton(), pytest.raises(ImportError, match=r"pip install attnpass\[triton\]"):
        edge_attention(q, k, v, row_ptr, col, scale=1.0)


def test_environment_variable_forces_triton_and_cpu_tensors_default_to_pytorch(monkeypatch):
    q, k, v = _qkv(1, 1, 1, 4, 4, 4, 4)
    idx = torch.arange(4).view(1, 1, 1, 4)
    before = dispatch.LAUNCHES["grouped_fwd"]
    grouped_attention(q, k, v, idx, idx, scale=1.0)
    assert dispatch.LAUNCHES["grouped_fwd"] == before
    monkeypatch.setenv("ATTNPASS_TRITON", "1")
    grouped_attention(q, k, v, idx, idx, scale=1.0)
    assert dispatch.LAUNCHES["grouped_fwd"] == before + 1


def test_empty_problems_fall_back_to_the_pytorch_kernels():
    q, k, v = _qkv(1, 1, 1, 4, 4, 4, 4)
    empty = torch.zeros(1, 1, 0, 4, dtype=torch.int64)
    with force_triton():
        out, _ = grouped_attention(q, k, v, empty, empty, scale=1.0)
    assert out.shape == (1, 1, 0, 4, 4) and dispatch.FALLBACKS["empty problem"] >= 1


def test_triton_path_builds_no_square_tensor():
    B, H, L, D, W = 1, 1, 128, 8, 16
    q, k, v = _qkv(B, H, H, L, L, D, D)
    idx = torch.randperm(L).view(1, 1, L // W, W)
    bias = torch.randn(L)  # a key bias: broadcast, never expanded
    col = (torch.arange(L).view(L, 1) + torch.arange(4)).clamp(max=L - 1).reshape(-1)
    col = torch.where(torch.arange(L * 4) % 4 == 0, col, (col + 37) % L)
    row_ptr, col = edges_from_pairs(torch.arange(L).repeat_interleave(4), col, L)
    with force_triton(), no_square_tensor(L, L):
        grouped_attention(q, k, v, idx, idx, scale=0.3, causal=True, bias=bias)
        edge_attention(q, k, v, row_ptr, col, scale=0.3, bias=bias, normalizer="entmax15")


if os.environ.get("ATTNPASS_TRITON_LONG"):  # a slower sweep, off in CI
    @pytest.mark.parametrize("seed", range(6))
    @pytest.mark.parametrize("normalizer", ["softmax", "entmax15"])
    def test_long_profile_random_grouped(seed, normalizer, monkeypatch):
        monkeypatch.setattr(dispatch, "MAX_BLOCK", 16)
        g = torch.Generator().manual_seed(seed)
        B, Hkv = 1 + seed % 2, 1 + seed % 2
        Hq, Lq, Lk = 2 * Hkv, int(torch.randint(5, 40, (), generator=g)), int(torch.randint(5, 40, (), generator=g))
        q, k, v = _qkv(B, Hq, Hkv, Lq, Lk, 8, 8, seed=seed)
        W = min(Lq, Lk, 24)
        inputs = dict(q=q, k=k, v=v, q_index=_groups(B, Hq, 2, W, Lq, seed, 0.2),
                      k_index=_groups(B, Hq, 2, W, Lk, seed + 1, 0.2),
                      key_padding_mask=torch.rand(B, Lk, generator=g) > 0.3)
        _compare(grouped_attention, inputs, ("q", "k", "v"),
                 dict(scale=0.5, causal=bool(seed % 2), causal_offset=seed - 3, normalizer=normalizer,
                      dropout_p=0.1 * (seed % 3), dropout_seed=seed))
