"""Sanity tests of the model zoo itself (tests/zoo.py), independent of attnpass.

For every case: it builds, runs at (batch 2, length 8) and (3, 12), is deterministic, exports with
``Dim.AUTO`` on its batch/sequence dims, the exported module reproduces eager outputs at the second
shape, and the exported graph contains as many attention computations as ``attention_count`` says,
counted two independent ways:

* raw: every softmax and scaled_dot_product_attention node.  Equal to ``attention_count`` for ZOO;
  for NEGATIVES it legitimately differs (they have softmaxes that are not attention), so each
  negative's raw count is listed in ``NEGATIVE_SOFTMAXES``;
* structural: sdpa nodes, plus softmaxes over the last dim whose input comes (through elementwise,
  view and cast ops) from a product of two activations (matmul/bmm/baddbmm/einsum, no parameter
  operand) and whose output reaches the left operand of such a product.  Must equal
  ``attention_count`` for ZOO and NEGATIVES alike.
"""
from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

try:
    from tests.zoo import NEGATIVES, ZOO, by_name, dynamic_shapes_for
except ImportError:  # run from inside tests/
    from zoo import NEGATIVES, ZOO, by_name, dynamic_shapes_for

ALL = ZOO + NEGATIVES
FIRST, SECOND = (2, 8), (3, 12)

# Softmax nodes of each negative: none of them is attention.
NEGATIVE_SOFTMAXES = {
    "neg-softmax-classifier": 1,
    "neg-moe-router": 1,
    "neg-query-axis-softmax": 1,
    "neg-softmax-gate": 1,
    "neg-mlp": 0,
}

aten = torch.ops.aten
SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
SDPA = {
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_attention_math.default,
}
PRODUCTS = {aten.matmul.default, aten.bmm.default, aten.mm.default, aten.baddbmm.default,
            aten.einsum.default}
# Ops that pass a tensor through unchanged in meaning (shape / dtype / layout / dropout).
PASS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.expand.default, aten.contiguous.default, aten.clone.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.flatten.using_ints, aten.unflatten.int,
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.type_as.default,
    aten.dropout.default, aten.native_dropout.default, aten.alias.default, aten.detach.default,
}
# Elementwise ops a score tensor goes through between QK^T and the softmax (scale, bias, mask).
ELEMENTWISE = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.add.Scalar,
    aten.mul.Scalar, aten.div.Scalar, aten.masked_fill.Scalar, aten.masked_fill.Tensor,
    aten.masked_fill_.Scalar, aten.where.self, aten.where.ScalarOther, aten.add_.Tensor,
}


def _tensors(out) -> list[torch.Tensor]:
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _forward(model, case, batch, length):
    args, kwargs = case.inputs(batch, length)
    with torch.no_grad():
        out = model(*args, **kwargs)
    if case.default_call:  # a causal LM called with its defaults: logits and the cache's keys/values
        assert out.cache is not None and len(out.cache.layers) == case.attention_count, type(out)
        return [out.logits] + [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
    # plain tensors only: no ModelOutput, no Cache objects, no None
    assert isinstance(out, torch.Tensor) or (
        isinstance(out, tuple) and all(isinstance(t, torch.Tensor) for t in out)), type(out)
    return _tensors(out)


def _assert_same(got, expected, exact=False):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and g.dtype == e.dtype
        if exact:
            assert torch.equal(g, e)
        else:
            torch.testing.assert_close(g, e)


def _graph_nodes(ep):
    """call_function nodes of the exported program, including nested graphs (e.g. set_grad regions)."""
    for gm in ep.graph_module.modules():
        if isinstance(gm, torch.fx.GraphModule):
            yield from (n for n in gm.graph.nodes if n.op == "call_function")


def raw_attention_count(ep) -> int:
    return sum(n.target in SOFTMAX or n.target in SDPA for n in _graph_nodes(ep))


def _parameter_names(ep) -> set[str]:
    sig = ep.graph_signature
    return set(sig.inputs_to_parameters) | set(sig.inputs_to_buffers) | set(
        getattr(sig, "inputs_to_lifted_tensor_constants", {}))


def _product_operands(node):
    if node.target is aten.einsum.default:
        return list(node.args[1])
    if node.target is aten.baddbmm.default:
        return [node.args[1], node.args[2]]
    return [node.args[0], node.args[1]]


def _is_activation_product(node, params) -> bool:
    if node.target not in PRODUCTS:
        return False
    for op in _product_operands(node):
        # an operand that is (a view of) a parameter means a projection, not QK^T
        while isinstance(op, torch.fx.Node) and op.target in PASS:
            op = op.args[0]
        if isinstance(op, torch.fx.Node) and (op.op == "get_attr" or op.name in params):
            return False
    return True


def _from_product(node, params, depth=0) -> bool:
    """Does `node` come from an activation x activation product through elementwise/pass ops?"""
    if not isinstance(node, torch.fx.Node) or depth > 20:
        return False
    if _is_activation_product(node, params):
        return True
    if node.target in PASS:
        return _from_product(node.args[0], params, depth + 1)
    if node.target in ELEMENTWISE:
        return any(_from_product(a, params, depth + 1) for a in node.args if isinstance(a, torch.fx.Node))
    return False


def _feeds_product_lhs(node, params, depth=0) -> bool:
    if depth > 20:
        return False
    for user in node.users:
        if user.target in PRODUCTS and _is_activation_product(user, params) \
                and _product_operands(user)[0] is node:
            return True
        if user.target in PASS and user.args[0] is node and _feeds_product_lhs(user, params, depth + 1):
            return True
        # SEW-D zeroes the masked probabilities again after the softmax
        if user.target in (aten.masked_fill_.Scalar, aten.masked_fill.Scalar) and user.args[0] is node \
                and _feeds_product_lhs(user, params, depth + 1):
            return True
        if user.op == "call_function" and getattr(user.target, "__name__", "") == "getitem" \
                and _feeds_product_lhs(user, params, depth + 1):  # native_dropout -> (out, mask)
            return True
    return False


def structural_attention_count(ep) -> int:
    params = _parameter_names(ep)
    count = 0
    for n in _graph_nodes(ep):
        if n.target in SDPA:
            count += 1
        elif n.target in SOFTMAX:
            ndim = n.meta["val"].dim()
            last_dim = n.args[1] in (-1, ndim - 1)
            count += last_dim and _from_product(n.args[0], params) and _feeds_product_lhs(n, params)
    return count


def _export(model, case):
    args, kwargs = case.inputs(*FIRST)
    return torch.export.export(model, args, kwargs, strict=False,
                               dynamic_shapes=dynamic_shapes_for(case, (FIRST, SECOND)))


@pytest.mark.parametrize("case", ALL, ids=lambda c: c.name)
def test_builds_runs_and_is_deterministic(case):
    m1, m2 = case.build(), case.build()
    assert not m1.training and not m2.training
    for batch, length in (FIRST, SECOND):
        a1, k1 = case.inputs(batch, length)
        a2, k2 = case.inputs(batch, length)
        _assert_same(_tensors((a1, k1)), _tensors((a2, k2)), exact=True)  # inputs deterministic
        out1, out2 = _forward(m1, case, batch, length), _forward(m2, case, batch, length)
        assert out1, "no output tensors"
        assert all(t.shape[0] == batch for t in out1)
        assert all(torch.isfinite(t).all() for t in out1 if t.is_floating_point())
        _assert_same(out1, out2, exact=True)  # two builds, identical outputs
    # the sequence dim follows `length` where the case is dynamic
    if case.dynamic:
        s1 = [t.shape for t in _forward(m1, case, 2, 8)]
        s2 = [t.shape for t in _forward(m1, case, 2, 10)]
        assert s1 != s2


@pytest.mark.parametrize("case", ALL, ids=lambda c: c.name)
def test_exports_with_dynamic_shapes_and_counts_attention(case):
    if case.default_call:  # the output holds a DynamicCache: export needs transformers' pytree registration
        from transformers.integrations.executorch import register_dynamic_cache_export_support

        register_dynamic_cache_export_support()
    model = case.build()
    ep = _export(model, case)
    exported = ep.module()
    for batch, length in (SECOND, FIRST):
        _assert_same(_forward(exported, case, batch, length), _forward(model, case, batch, length))

    structural = structural_attention_count(ep)
    raw = raw_attention_count(ep)
    assert structural == case.attention_count, (structural, raw)
    if case in NEGATIVES:
        assert case.attention_count == 0
        assert raw == NEGATIVE_SOFTMAXES[case.name]
    else:
        assert raw == case.attention_count


def test_zoo_index():
    names = [c.name for c in ALL]
    assert len(set(names)) == len(names)
    assert all(by_name(n).name == n for n in names)
    assert set(NEGATIVE_SOFTMAXES) == {c.name for c in NEGATIVES}
    assert all(c.attention_count > 0 for c in ZOO)
    with pytest.raises(KeyError):
        by_name("no-such-model")


def test_minilm_has_real_weights_and_tokenizer():
    """The packaged checkpoint and tokenizer load offline, and the weights are the trained ones:
    mean-pooled embeddings put a paraphrase closer than an unrelated sentence."""
    try:
        from tests.zoo import minilm_tokenizer
    except ImportError:
        from zoo import minilm_tokenizer
    model = by_name("minilm-l6-v2-sdpa").build()
    sentences = ["A man is playing a guitar.", "Someone plays the guitar.",
                 "The stock market fell sharply today."]
    enc = minilm_tokenizer()(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])[0]
    mask = enc["attention_mask"][..., None].float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert (emb[0] @ emb[1]) > (emb[0] @ emb[2]) + 0.3
