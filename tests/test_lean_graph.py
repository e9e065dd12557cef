"""The graph a program runs leaves out export's no-op calls, and computes exactly what the captured one does."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.fx as fx

import attnpass
from attnpass.frontend.lean_graph import lean_graph

aten = torch.ops.aten


class NoOpsAndLookalikes(torch.nn.Module):
    """Calls that do nothing at run time next to the same calls that do something."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(6))

    def forward(self, x):
        same = x.to(torch.float32) * self.weight          # no-op: x is float32
        halved = x.to(torch.float16).to(torch.float32)    # both conversions change the value's dtype
        whole = same[0:]                                  # a view of all of it
        alias = same[:, :6]                               # the same, written as an alias
        part = same[:, 1:4]                               # a real slice
        tail = same[:, :5]                                # stops before the end
        return whole + halved, part * 2, tail.sum(-1) + alias.sum(-1)


def _exported(module, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(module, args, strict=False).module()


def _targets(graph: fx.Graph) -> list:
    return [n.target for n in graph.nodes if n.op == "call_function"]


def test_removes_only_calls_that_return_their_input():
    x = torch.randn(3, 6)
    gm = _exported(NoOpsAndLookalikes(), x)
    before = _targets(gm.graph)
    assert aten._assert_tensor_metadata.default in before
    lean = copy.deepcopy(gm)
    removed = lean_graph(lean.graph)
    lean.recompile()
    after = _targets(lean.graph)
    assert removed == len(before) - len(after) > 0
    assert aten._assert_tensor_metadata.default not in after
    # the float32 -> float32 conversion went; float16 and back stayed
    assert before.count(aten.to.dtype) - after.count(aten.to.dtype) == 1
    assert after.count(aten.to.dtype) == 2
    # the whole-tensor slice and the alias went, the two real slices stayed
    assert before.count(aten.slice.Tensor) == 3 and after.count(aten.slice.Tensor) == 2
    assert aten.alias.default in before and aten.alias.default not in after
    for _ in range(2):
        x = torch.randn(3, 6)
        for want, got in zip(gm(x), lean(x)):
            assert torch.equal(want, got)


def test_decode_graph_runs_lean_and_equals_the_original():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 100, (1, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse = attnpass.sparsify(model, kwargs={"input_ids": ids}, method="dense")
        with torch.no_grad():
            want = model.generate(ids, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
            got = sparse.generate(ids, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(want.sequences, got.sequences)
    for a, b in zip(want.scores, got.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    leaner = 0
    for program in sparse._signatures.values():
        captured, running = _targets(program.gm.graph), _targets(program._boxed_graph().graph)
        assert aten._assert_tensor_metadata.default not in running
        assert aten.lift_fresh_copy.default not in running
        leaner += len(captured) - len(running)
    assert leaner > 0


def test_weights_of_another_dtype_are_refused_in_one_line():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 100, (1, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse = attnpass.sparsify(model, kwargs={"input_ids": ids}, method="dense")
    sparse.to(torch.bfloat16)
    with pytest.raises(TypeError, match=r"model\.embed_tokens\.weight is torch\.bfloat16 now.*captured with torch\.float32"):
        sparse(input_ids=ids)
