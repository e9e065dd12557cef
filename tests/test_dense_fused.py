"""The canonical dense op `attnpass::attention` runs SDPA's fused CPU kernel (forward and backward)
and still computes exactly the math of `dense_attention_math`, for every masking the op takes,
both empty-row rules, GQA, and dtypes; SDPA's own dropout for dropout_seed < 0."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import attnpass.lowering.torch.dense as _dense  # registers torch.ops.attnpass.attention
from attnpass.lowering.torch.dense import dense_attention_math

op = torch.ops.attnpass.attention

B = 2


def _case(name, dtype, *, hq=4, hkv=4, lq=7, lk=7, d=8, causal=False, offset=0, keep=None, mask=None, bias=None,
          seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, hq, lq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, hkv, lk, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, hkv, lk, d, generator=g, dtype=torch.float64).to(dtype)
    key_keep = None
    if keep == "left":
        key_keep = torch.ones(B, lk, dtype=torch.bool)
        key_keep[0, :3] = False  # left padding: with causal, rows 0..2 of batch 0 see nothing
    elif keep == "all_padded":
        key_keep = torch.ones(B, lk, dtype=torch.bool)
        key_keep[1] = False
        key_keep[0, 1] = False
    m = None
    if mask is not None:
        m = torch.rand(mask(lq, lk), generator=g) > 0.4
        m4 = m.view(*(1,) * (4 - m.dim()), *m.shape)
        m4[..., 1, :] = False  # an empty row whatever else
    bi = None
    if bias is not None:
        bi = (torch.randn(bias(lq, lk), generator=g, dtype=torch.float64)).to(dtype)
    args = (q, k, v, bi, m, key_keep, 0.7 if bias is None else d ** -0.5, causal, offset)
    return pytest.param(args, id=name)


def _cases(dtype):
    return [
        _case("none", dtype),
        _case("causal0", dtype, causal=True),
        _case("causal0_lq_lt_lk", dtype, causal=True, lq=4, lk=9),
        _case("causal_bottom_right", dtype, causal=True, lq=3, lk=8, offset=5),
        _case("decode_lq1", dtype, causal=True, lq=1, lk=8, offset=7),
        _case("decode_lq1_keep", dtype, causal=True, lq=1, lk=8, offset=7, keep="left"),
        _case("causal_negative_offset", dtype, causal=True, lq=8, lk=5, offset=-3),
        _case("keep_left_causal", dtype, causal=True, keep="left"),
        _case("keep_left", dtype, keep="left"),
        _case("keep_all_padded", dtype, keep="all_padded"),
        _case("keep_bottom_right", dtype, causal=True, lq=4, lk=9, offset=5, keep="left"),
        _case("mask_b1", dtype, mask=lambda lq, lk: (B, 1, lq, lk)),
        _case("mask_2d", dtype, mask=lambda lq, lk: (lq, lk)),
        _case("mask_per_head_causal_keep", dtype, mask=lambda lq, lk: (B, 4, lq, lk), causal=True, keep="left"),
        _case("bias", dtype, bias=lambda lq, lk: (1, 4, lq, lk)),
        _case("bias_causal_br", dtype, bias=lambda lq, lk: (B, 1, lq, lk), causal=True, lq=5, lk=9, offset=4),
        _case("bias_mask_keep", dtype, bias=lambda lq, lk: (lq, lk), mask=lambda lq, lk: (B, 1, lq, lk), keep="left"),
        _case("gqa_causal_keep", dtype, hq=9, hkv=3, causal=True, keep="left"),
        _case("gqa_mask_bias", dtype, hq=9, hkv=3, mask=lambda lq, lk: (B, 1, lq, lk), bias=lambda lq, lk: (1, 9, lq, lk)),
    ]


def _grads(fn, args, grad):
    leaves = [t.detach().requires_grad_() for t in args[:3]]
    out = fn(*leaves, *args[3:])
    return (out, *torch.autograd.grad(out, leaves, grad))


@pytest.mark.parametrize("empty_rows", ["zero", "mean"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("args", _cases(torch.float64))
def test_fused_equals_math_forward_and_grads(args, dtype, tol, empty_rows):
    args = tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args)
    fused = lambda *a: op(*a, 0.0, 0, empty_rows, True)  # noqa: E731
    math = lambda *a: dense_attention_math(*a, 0.0, 0, empty_rows)  # noqa: E731
    with torch.no_grad():
        out = fused(*args)
        ref = math(*args)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    grad = torch.randn_like(ref)
    got, want = _grads(fused, args, grad), _grads(math, args, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


def test_cases_have_empty_rows_and_the_rules_differ():
    """The empty-row cases really have empty rows (so the rule tests can fail)."""
    (args,) = _case("keep_left_causal", torch.float64, causal=True, keep="left").values
    zero = op(*args, 0.0, 0, "zero")
    mean = op(*args, 0.0, 0, "mean")
    assert (zero[0, :, :3] == 0).all()
    v = args[2]
    torch.testing.assert_close(mean[0, :, :3], v[0].mean(1, keepdim=True).expand(-1, 3, -1))
    assert not torch.equal(zero, mean)


@pytest.mark.parametrize("empty_rows", ["zero", "mean"])
@pytest.mark.parametrize("name", ["causal_bottom_right", "keep_left_causal", "mask_per_head_causal_keep",
                                  "gqa_causal_keep", "bias_mask_keep", "causal_negative_offset"])
def test_gradcheck_fused_float64(name, empty_rows):
    (args,) = next(c for c in _cases(torch.float64) if c.id == name).values
    q, k, v = (t.detach().clone().requires_grad_() for t in args[:3])
    rest = args[3:]
    assert torch.autograd.gradcheck(lambda q, k, v: op(q, k, v, *rest, 0.0, 0, empty_rows), (q, k, v), fast_mode=True)


def test_bias_gradient_through_sdpa():
    """A bias that requires grad (a learned position bias) gets its gradient (SDPA's own autograd)."""
    (args,) = _case("b", torch.float64, bias=lambda lq, lk: (1, 4, lq, lk), mask=lambda lq, lk: (B, 1, lq, lk)).values
    q, k, v, bias = (t.detach().clone().requires_grad_() for t in args[:4])
    rest = args[4:]
    assert torch.autograd.gradcheck(lambda q, k, v, b: op(q, k, v, b, *rest, 0.0, 0, "mean"), (q, k, v, bias), fast_mode=True)
    got = torch.autograd.grad(op(q, k, v, bias, *rest, 0.0, 0).sum(), bias)[0]
    want = torch.autograd.grad(dense_attention_math(q, k, v, bias, *rest, 0.0, 0).sum(), bias)[0]
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_math_path_gradcheck_and_mean_rule():
    (args,) = _case("keep_left_causal", torch.float64, causal=True, keep="left").values
    q, k, v = (t.detach().clone().requires_grad_() for t in args[:3])
    for rule in ("zero", "mean"):
        assert torch.autograd.gradcheck(lambda q, k, v: dense_attention_math(q, k, v, *args[3:], 0.0, 0, rule), (q, k, v), fast_mode=True)
    # the mean row's gradient reaches v uniformly, q and k not at all
    out = dense_attention_math(q, k, v, *args[3:], 0.0, 0, "mean")
    grad = torch.zeros_like(out)
    grad[0, 0, 0] = 1.0
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    assert (dq == 0).all() and (dk == 0).all()
    torch.testing.assert_close(dv[0, 0], torch.full_like(dv[0, 0], 1 / v.shape[2]))


@pytest.mark.parametrize("name", ["causal0", "keep_left_causal", "gqa_causal_keep", "causal_bottom_right", "mask_b1"])
def test_bf16_semantics(name):
    (args,) = next(c for c in _cases(torch.float64) if c.id == name).values
    args = tuple(t.to(torch.bfloat16) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args)
    q, k, v, bias, mask, keep, scale, causal, offset = args
    # the model's own eager code took the softmax in fp32: exactly the math path
    eager = op(*args, 0.0, 0, "zero", False)
    assert torch.equal(eager, dense_attention_math(*args, 0.0, 0, "zero"))
    # the site was SDPA: SDPA in bf16
    allowed = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool)
    if causal:
        allowed = allowed.tril(offset)
    if mask is not None:
        allowed = allowed & mask
    if keep is not None:
        allowed = allowed & keep[:, None, None, :]
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    fused = op(*args, 0.0, 0, "zero", True)
    assert torch.isfinite(fused).all()
    torch.testing.assert_close(fused, sdpa, atol=1e-2, rtol=0)
    if name == "causal0":
        assert torch.equal(fused, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale))
    # and not the fp32-softmax computation: the two semantics differ in bf16
    assert not torch.equal(fused, eager)


class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.attnpass.attention.default:  # without grad the op's CPU kernel runs: record its ops
            self.calls.append((str(func), [], args))
            with self:
                return _dense._impl(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.calls.append((str(func), [tuple(o.shape) for o in outs if isinstance(o, torch.Tensor)], args))
        return out


@pytest.mark.parametrize("keep", [None, "left"])
def test_fused_kernel_is_taken_and_no_scores_tensor(keep):
    """Causal (+ key padding) at L=64: the flash kernels run forward and backward, and no tensor
    with both an Lq and an Lk axis is ever made (no scores, no Lq x Lk mask)."""
    L = 64
    (args,) = _case("big", torch.float32, hq=9, hkv=3, lq=L, lk=L, causal=True, keep=keep).values
    q, k, v = (t.detach().requires_grad_() for t in args[:3])
    with _Record() as rec:
        out = op(q, k, v, *args[3:], 0.0, 0, "mean")
        out.backward(torch.ones_like(out))
    names = [c[0] for c in rec.calls]
    assert "aten._scaled_dot_product_flash_attention_for_cpu.default" in names
    assert "aten._scaled_dot_product_flash_attention_for_cpu_backward.default" in names
    assert not any("bmm" in n or "softmax" in n or "matmul" in n for n in names), names
    big = [c for c in rec.calls for s in c[1] if len(s) >= 2 and s[-2:] == (L, L)]
    assert not big, big[:3]


def test_bottom_right_mask_is_one_band_not_per_head():
    """Bottom-right causal: the kernel gets one (1, 1, Lq, Lk) mask, no per-head / per-batch copy."""
    (args,) = _case("br", torch.float32, hq=9, hkv=3, lq=16, lk=40, causal=True, offset=24).values
    with _Record() as rec:
        op(*args, 0.0, 0)
    flash = [c for c in rec.calls if "flash_attention_for_cpu" in c[0]]
    assert len(flash) == 1
    masks = [t for t in flash[0][2] if isinstance(t, torch.Tensor) and t.shape[-2:] == (16, 40)]
    assert not any(t.shape[0] * t.shape[1] > 1 for t in masks)


def test_decode_needs_no_mask():
    (args,) = _case("d", torch.float32, causal=True, lq=1, lk=33, offset=32).values
    with _Record() as rec:
        op(*args, 0.0, 0)
    assert not any(c[0] in ("aten.where.self", "aten.tril.default") for c in rec.calls), [c[0] for c in rec.calls]


def test_non_contiguous_inputs_and_output_layout():
    """A model's transposed q/k/v (B, L, H, D in memory): same values, the fake kernel's strides."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, 12, 6, 8, generator=g).transpose(1, 2)
    k = torch.randn(B, 12, 2, 8, generator=g).transpose(1, 2)
    v = torch.randn(B, 12, 2, 8, generator=g).transpose(1, 2)
    keep = torch.ones(B, 12, dtype=torch.bool)
    keep[1, :4] = False
    args = (q, k, v, None, None, keep, 0.3, True, 0, 0.0, 0)
    out = op(*args)
    torch.testing.assert_close(out, dense_attention_math(*args), atol=1e-5, rtol=1e-5)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = op(*args)
    assert fake.stride() == out.stride()


def test_hashed_dropout_stream_kept_for_seed_ge_0():
    (args,) = _case("drop", torch.float32, causal=True, keep="left").values
    a = op(*args, 0.3, 1234)
    assert torch.equal(a, op(*args, 0.3, 1234))
    assert torch.equal(a, dense_attention_math(*args, 0.3, 1234))


def _uniform_dropout_case(lk=64, lq=32):
    # q = k = 0: uniform probabilities 1/Lk; v = identity: the output row is the dropped probabilities
    q = torch.zeros(1, 2, lq, 4)
    k = torch.zeros(1, 2, lk, 4)
    v = torch.eye(lk).expand(1, 2, lk, lk).contiguous()
    return q, k, v


def test_sdpa_dropout_stream_seed_negative():
    p, lk = 0.25, 64
    q, k, v = _uniform_dropout_case(lk)
    a = op(q, k, v, None, None, None, 1.0, False, 0, p, -1)
    b = op(q, k, v, None, None, None, 1.0, False, 0, p, -1)
    assert not torch.equal(a, b)
    assert torch.isfinite(a).all()
    dropped = (a == 0).float().mean().item()
    assert abs(dropped - p) < 0.03, dropped
    kept = a[a != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (lk * (1 - p))))
    # mean over draws ~ the no-dropout output, on a random case with causal + padding
    (args,) = _case("drop", torch.float32, causal=True, keep="left").values
    clean = op(*args, 0.0, 0)
    draws = torch.stack([op(*args, 0.2, -1) for _ in range(400)]).mean(0)
    assert (draws - clean).abs().max() < 0.25
    assert (draws - clean).abs().mean() < 0.05
    # gradients flow through SDPA's own dropout
    qq = args[0].detach().requires_grad_()
    op(qq, *args[1:], 0.2, -1).sum().backward()
    assert torch.isfinite(qq.grad).all() and qq.grad.abs().sum() > 0


def test_dense_method_trains_with_sdpa_dropout():
    from attnpass.methods.base import SiteSpec
    from attnpass.methods.dense import DenseAttention

    module = DenseAttention(SiteSpec(name="s", scale=None, causal=True)).train()
    (args,) = _case("m", torch.float32, causal=True).values
    q, k, v = args[:3]
    with _Record() as rec:
        module(q, k, v, dropout_p=0.1)
    seeds = [c[2][10] for c in rec.calls if c[0] == "attnpass.attention.default"]
    assert seeds == [-1]
    module.eval()
    torch.testing.assert_close(module(q, k, v, dropout_p=0.1), op(q, k, v, None, None, None, 8 ** -0.5, True, 0, 0.0, 0))


def test_bad_empty_rows_rule():
    (args,) = _case("x", torch.float32).values
    with pytest.raises(ValueError, match="empty_rows"):
        op(*args, 0.0, 0, "nan")


def test_one_node_for_export_and_compile_matches_eager():
    class M(torch.nn.Module):
        def forward(self, q, k, v, keep):
            return op(q, k, v, None, None, keep, 0.5, True, 0, 0.0, 0, "mean", True)

    (args,) = _case("e", torch.float32, hq=6, hkv=2, causal=True, keep="left").values
    q, k, v, keep = args[0], args[1], args[2], args[5]
    ep = torch.export.export(M(), (q, k, v, keep))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.attnpass.attention.default) == 1
    assert not any("flash" in str(t) for t in targets)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    compiled = torch.compile(M(), backend="aot_eager", fullgraph=True)
    out = compiled(*leaves, keep)
    grads = torch.autograd.grad(out.sum(), leaves)
    leaves2 = [t.detach().requires_grad_() for t in (q, k, v)]
    ref = M()(*leaves2, keep)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, torch.autograd.grad(ref.sum(), leaves2)):
        torch.testing.assert_close(a, b)
