"""Which dims of the example call `capture.export_model` keeps symbolic, and how.

Three rules on top of `Dim.AUTO` (which keeps a dim symbolic wherever the model allows it):

* A size-1 batch is not a fixed size. `Dim.AUTO` specialises every dim of size 0 or 1, so a
  batch-1 example would give a graph that only runs at batch 1 (and mask analysis could not probe
  other batches). When every tensor input has a leading dim of size 1, the capture runs on the
  example repeated twice along dim 0 instead (the graph is the same function; only its example
  differs). Other size-1 dims (a length-1 example) are left to `Dim.AUTO`: which of them the model
  could vary is not known, and a length-1 example cannot tell masks apart anyway.
* `static`: dims a first capture found to be a site's heads or head dim (raw q/k/v inputs leave
  them free) are captured static: sparse methods size their state by them.
* `ties`: dims that must be one symbol (q's and k's length when q and k are separate inputs of
  equal example length: the site is then self-attention). The graph gets a check
  (`check_equal_dims`) so that a call breaking the tie fails with one line, before any op runs.

Dims are named by (leaf, dim): `leaf` indexes `pytree.tree_leaves((args, kwargs))`, which is also
the order of the program's user inputs.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.export import Dim

InputDim = tuple[int, int]  # (leaf index, dim)


def double_unit_batch(args: tuple, kwargs: dict) -> tuple[tuple, dict, bool]:
    """The example repeated twice along dim 0 if every tensor input (of rank >= 1) has dim 0 of size 1."""
    flat, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    tensors = [t for t in flat if isinstance(t, torch.Tensor) and t.dim() > 0]
    if not tensors or any(t.shape[0] != 1 for t in tensors):
        return args, kwargs, False
    flat = [t.repeat(2, *([1] * (t.dim() - 1))) if isinstance(t, torch.Tensor) and t.dim() > 0 else t for t in flat]
    doubled_args, doubled_kwargs = pytree.tree_unflatten(flat, spec)
    return doubled_args, doubled_kwargs, True


def dynamic_shapes(args: tuple, kwargs: dict, static=frozenset(), ties=()) -> torch.export.ShapesCollection:
    """`Dim.AUTO` on every dim of every tensor input, except `static` dims (left out: static) and
    `ties` (each group one named `Dim`)."""
    named = {}
    for g, group in enumerate(ties):
        dim = Dim(f"attnpass_tied_{g}")
        named.update({d: dim for d in group})
    shapes = torch.export.ShapesCollection()
    for i, t in enumerate(pytree.tree_leaves((tuple(args), dict(kwargs)))):
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            shapes[t] = {d: named.get((i, d), Dim.AUTO) for d in range(t.dim()) if (i, d) not in static}
    return shapes


def _symbol(d):
    return d.node.expr if isinstance(d, torch.SymInt) else None


def input_dims(program, symbols) -> set[InputDim]:
    """The user-input dims of `program` whose size is one of the sympy `symbols`."""
    placeholders = {n.name: n for n in program.gm.graph.nodes if n.op == "placeholder"}
    out = set()
    for i, name in enumerate(program.user_input_names):
        val = placeholders[name].meta.get("val") if name in placeholders else None
        if isinstance(val, torch.Tensor):
            out |= {(i, d) for d, size in enumerate(val.shape) if _symbol(size) in symbols}
    return out


def float_last_dims(program) -> set[InputDim]:
    """The symbolic last dim of every floating-point user input of rank >= 3."""
    placeholders = {n.name: n for n in program.gm.graph.nodes if n.op == "placeholder"}
    out = set()
    for i, name in enumerate(program.user_input_names):
        val = placeholders[name].meta.get("val") if name in placeholders else None
        if isinstance(val, torch.Tensor) and val.dim() >= 3 and val.is_floating_point() and _symbol(val.shape[-1]) is not None:
            out.add((i, val.dim() - 1))
    return out


def free_symbols(*sizes) -> set:
    out = set()
    for s in sizes:
        if isinstance(s, torch.SymInt):
            out |= set(s.node.expr.free_symbols)
    return out


def raw_input(node) -> fx.Node | None:
    """The graph input `node` is a layout/elementwise function of alone (no projection, no other
    tensor on the way), if it is one with a symbolic size (a user input, not a parameter)."""
    for _ in range(32):
        if not isinstance(node, fx.Node):
            return None
        val = node.meta.get("val", node.meta.get("example_value"))
        if node.op == "placeholder":
            symbolic = isinstance(val, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in val.shape)
            return node if symbolic else None
        if node.op not in ("call_function", "call_method"):
            return None
        tensors = [a for a in node.all_input_nodes
                   if isinstance(a.meta.get("val", a.meta.get("example_value")), torch.Tensor)]
        if len(tensors) != 1:
            return None
        node = tensors[0]
    return None


@fx.node.has_side_effect
def check_equal_dims(*tensors_and_dims, names: tuple[str, ...] = ()):
    """Raise one line unless every (tensor, dim) pair has the same size (the captured graph assumes it)."""
    pairs = list(zip(tensors_and_dims[::2], tensors_and_dims[1::2]))
    sizes = [t.shape[d] for t, d in pairs]
    for s in sizes[1:]:
        torch._check_value(s == sizes[0], lambda: _tie_message(names, pairs, sizes))


def _tie_message(names, pairs, sizes) -> str:
    dims = " and ".join(f"dim {d} of {n!r}" for n, (_, d) in zip(names, pairs))
    return (f"attnpass: {dims} had one size in the example call, so this model's attention was captured as "
            f"self-attention (Lq == Lk); got sizes {', '.join(map(str, sizes))}. Sparsify with an example call "
            "whose lengths differ to serve unequal lengths")


def insert_tie_checks(program, ties) -> None:
    """Put `check_equal_dims` for each tie group at the top of the program's graph."""
    if not ties:
        return
    graph = program.gm.graph
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    for group in ties:
        args, names = [], []
        for i, d in sorted(group):
            name = program.user_input_names[i]
            args += [placeholders[name], d]
            names.append(name)
        with graph.inserting_after(last):
            last = graph.call_function(check_equal_dims, tuple(args), {"names": tuple(names)})
    program.gm.recompile()
