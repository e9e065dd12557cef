"""`export_onnx`: write a sparsified model as an ONNX file that plain onnxruntime runs.

Each rewritten attention site becomes ONE node of the custom domain ``attnpass`` (the op types and
their semantics are in ``attnpass.lowering.onnx``), and the file carries a model-local function
per op whose body uses only standard ONNX ops. The rest of the model is the standard exporter's
output (``torch.onnx.export(..., dynamo=True)``).

Steps and why:

1. The model is sparsified on a copy (or, for a `SparseModel`, deep-copied): the caller's model,
   its parameters, buffers and mode are never changed. The copy is put in eval mode: the export is
   for inference (dropout off, routing centroids frozen). Routing centroids that no call has
   initialised yet are initialised by one eval call of the copy on the example, as the first eager
   call would (export a trained or already-run SparseModel to get its own centroids).
2. Each site module is bound to its method's export form: one custom op per site for methods with a
   method-level node (recorded as one opaque node whatever the method computes inside), or its own
   code left to be traced (Combiner, routing, Sparsefinder's blocks: their kernel calls are the nodes).
3. torch.export (non-strict) of a flat wrapper, with ``Dim.AUTO`` on every dim of every input when
   ``dynamic`` (batch and sequence stay symbolic; fixed sizes specialise), then
   ``torch.onnx.export(exported_program, custom_translation_table=...)`` at ONNX opset 18 WITHOUT
   the exporter's optimiser, which inlines every function; `_tidy` runs its clean-up passes instead.
4. The bodies are appended as model-local functions after all exporter passes, and the result is
   checked: the attnpass nodes each site exports (`nodes_per_site`), ``onnx.checker.check_model(full_check=True)``.
"""
from __future__ import annotations

import copy
import os

import torch
import torch.utils._pytree as pytree
from torch import nn

from attnpass.frontend.capture import check_call_inputs
from attnpass.sparse_module import SparseModel


def export_onnx(model: nn.Module, args=(), kwargs=None, f: str | os.PathLike | None = None, *,
                method: str | None = None, dynamic: bool = True, check: bool = True, **options):
    """Export `model` with its attention rewritten to `method` as an ONNX model; returns the
    ``onnx.ModelProto`` and writes it to `f` when given.

    `model` is either an ordinary module (sparsified on a copy with `method`, default "dense", and
    `options`, as `attnpass.sparsify`) or a `SparseModel` (exported as it is, e.g. after training;
    then `method` must be None or its own method, and no options). `args`/`kwargs` are an example
    call. With `dynamic` the batch and sequence axes stay symbolic, so the file runs at other
    sizes. `check` runs ``onnx.checker.check_model(full_check=True)`` on the result.
    """
    import onnx

    from attnpass import api
    from attnpass.lowering import onnx as lowering

    args, kwargs = check_call_inputs(model, args, kwargs)
    if isinstance(model, SparseModel):
        if method is not None and method != model.method:
            raise ValueError(f"export_onnx: got a SparseModel rewritten with method {model.method!r} and "
                             f"method={method!r}; pass method=None to export it as it is")
        if options:
            raise ValueError(f"export_onnx: options {sorted(options)} apply when sparsifying; this SparseModel "
                             "is exported as it is")
        method = model.method
        lowering.check_method(method, options, sparse_model=True)  # each site is checked when bound
        sparse = copy.deepcopy(model)
    else:
        method = "dense" if method is None else method
        lowering.check_method(method, options)  # before the (slow) capture
        sparse = api.sparsify(model, args, kwargs, method=method, **options)

    sparse.eval()
    if sparse._programs.get(False) is None:
        sparse._capture_mode(False, args, kwargs)  # the eval graph, captured outside the export trace
    sites = sparse.site_modules()
    if any(lowering.needs_first_call(m) for m in sites.values()):
        with torch.no_grad():  # routing: centroids from the example's tokens, as the first eager call would
            sparse(*args, **kwargs)
    for module in sites.values():
        lowering.bind_export_forward(module)

    flat, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    tensors = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)]
    wrapper = _Flat(sparse, spec, flat, tensors)
    example = tuple(flat[i] for i in tensors)
    shapes = (tuple({d: torch.export.Dim.AUTO for d in range(flat[i].dim())} for i in tensors),) if dynamic else None
    # sizes of 0 or 1 at the example are not specialised: a layout size that is 1 at a short example (e.g.
    # routing's one fallback block below local_window tokens) must stay symbolic for the file to run longer
    import torch.fx.experimental._config as fx_config

    with torch.no_grad(), fx_config.patch(backed_size_oblivious=True):
        try:
            program = torch.export.export(wrapper, example, dynamic_shapes=shapes, strict=False)
        except Exception as e:  # noqa: BLE001 - say which step failed
            raise RuntimeError(f"export_onnx: torch.export of the sparsified {type(model).__name__} failed: "
                               f"{type(e).__name__}: {_first_line(e)}") from e
        onnx_program = torch.onnx.export(
            program, (), dynamo=True, custom_translation_table=lowering.translation_table(),
            opset_version=lowering.ONNX_OPSET, optimize=False, input_names=_input_names(spec, flat, tensors),
            verbose=False,
        )
    _tidy(onnx_program.model)
    proto = lowering.attach_functions(onnx_program.model_proto)

    count = sum(1 for n in proto.graph.node if n.domain == lowering.DOMAIN)
    expected = sum(lowering.nodes_per_site(m) for m in sites.values())
    if count != expected:
        raise RuntimeError(f"export_onnx: expected {expected} {lowering.DOMAIN} nodes for {len(sites)} site(s), found "
                           f"{count} in the written graph")
    large = proto.ByteSize() > 2**31 - 2**20  # protobuf's 2 GB limit: weights go to an external file
    if f is not None:
        onnx.save_model(proto, os.fspath(f), save_as_external_data=large)
    if check:
        if large and f is None:
            raise ValueError("export_onnx: the model is over 2 GB, so check_model needs it on disk: pass f=")
        # by path for a large model (the checker cannot take a proto over 2 GB)
        onnx.checker.check_model(os.fspath(f) if large else proto, full_check=True)
    return proto


class _Flat(nn.Module):
    """model(*args, **kwargs) called with the example's tensor leaves as positional inputs (export
    cannot take dynamic shapes for a `**kwargs` forward); non-tensor leaves are constants."""

    def __init__(self, model: nn.Module, spec, flat: list, tensors: list[int]):
        super().__init__()
        self.model = model
        self.spec = spec
        self.constants = [None if i in tensors else x for i, x in enumerate(flat)]
        self.tensors = tensors

    def forward(self, *inputs):
        leaves = list(self.constants)
        for i, x in zip(self.tensors, inputs):
            leaves[i] = x
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return self.model(*args, **kwargs)


def _input_names(spec, flat: list, tensors: list[int]) -> list[str]:
    """ONNX input names from the call's structure: kwargs by key, positional args as input_<i>."""
    paths, _ = pytree.tree_flatten_with_path(pytree.tree_unflatten(list(range(len(flat))), spec))
    names = {}
    for path, index in paths:
        keys = [getattr(p, "key", getattr(p, "idx", None)) for p in path]
        top, rest = keys[0], keys[1:]
        name = (f"input_{rest[0]}" if top == 0 else str(rest[0])) + "".join(f"_{k}" for k in rest[1:])
        names[index] = name
    return [names[i] for i in tensors]


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _tidy(model) -> None:
    """onnxscript's optimiser passes on the exported IR (constants folded, unused nodes and functions
    removed, constants lifted, duplicates merged), in place, without inlining the attnpass functions
    and without its pattern-rewrite rules: on a traced layout's thousands of small nodes those rules
    cost as much as the whole export, and what they do (no-op and cast eliminations, slice and reshape
    merges) onnxruntime's graph optimiser does when it loads the file."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common_passes
    from onnxscript.optimizer import fold_constants

    fold_constants(model, onnx_shape_inference=True)
    ir.passes.Sequential(
        common_passes.RemoveUnusedNodesPass(),
        common_passes.RemoveUnusedFunctionsPass(),
        common_passes.RemoveUnusedOpsetsPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.LiftSubgraphInitializersToMainGraphPass(),
        common_passes.DeduplicateInitializersPass(),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.OutputFixPass(),
        common_passes.NameFixPass(),
    )(model)
