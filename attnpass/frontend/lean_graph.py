"""The graph a captured program runs: the captured graph without what export leaves in it that
computes nothing.

A decode step of a small LM is a few thousand ATen calls of a few microseconds each, so every call
the graph makes from Python counts against the original model. torch.export leaves calls there that
do no work at run time:
- `_assert_tensor_metadata` checks that a value still has the dtype / device seen at capture (the
  program checks its parameters' dtypes itself, once per call: `Program.run_flat`);
- `to(x, dtype)` where x has that dtype already (`Tensor.to` then returns x itself);
- `slice(x, dim, 0, end)` with end past the dim's size and step 1, and `alias(x)` (views of all of x);
- a fresh copy of a lifted constant, detached in place, that nothing reads (the empty tensors a KV
  cache layer starts from, once `kv_cache.drop_empty_concatenations` removed their use).
The inspected graph (`Program.gm`, which rewrites and reports read) keeps them; only the copy that
runs is lean. Every removal leaves the values the graph returns unchanged (tests/test_lean_graph.py).
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from attnpass.frontend.graph_ops import meta_val

aten = torch.ops.aten

_SLICE_TO_END = 2**62  # export writes "to the end" as a huge int (sys.maxsize)


def lean_graph(graph: fx.Graph) -> int:
    """Remove the no-op calls described in the module docstring from `graph` in place; returns how many."""
    removed = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten._assert_tensor_metadata.default and not node.users:
            graph.erase_node(node)
            removed += 1
        elif _same_value(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            removed += 1
        elif node.target is aten.detach_.default and not node.users:
            fresh = node.args[0]
            if (isinstance(fresh, fx.Node) and fresh.target is aten.lift_fresh_copy.default
                    and list(fresh.users) == [node]):
                graph.erase_node(node)
                graph.erase_node(fresh)
                removed += 2
    return removed


def _same_value(node: fx.Node) -> bool:
    """Does this call return its first argument (or a view of all of it, same shape and strides)?"""
    source = meta_val(node.args[0]) if node.args else None
    if not isinstance(source, torch.Tensor) or node.target not in (aten.to.dtype, aten.alias.default, aten.slice.Tensor):
        return False
    if node.target is aten.alias.default:
        return True
    # every argument by its schema name, defaults filled in
    args = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs
    if node.target is aten.to.dtype:
        return args["dtype"] == source.dtype and not args["copy"] and args["memory_format"] is None
    end, size = args["end"], source.shape[args["dim"]]
    return (args["start"] in (None, 0) and args["step"] == 1
            and (end is None or (isinstance(end, int) and (end >= _SLICE_TO_END or (isinstance(size, int) and end >= size)))))
