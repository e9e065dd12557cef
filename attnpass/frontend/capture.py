"""Capture a model as an FX graph with `torch.export` (non-strict), and run the captured graph.

`torch.fx.symbolic_trace` fails on Hugging Face models; non-strict export succeeds on all the
models we test. Every dim of every tensor input is marked `Dim.AUTO`, so export keeps a dim
symbolic wherever the model allows (batch, sequence length) and specialises it silently where
the model needs a fixed size (hidden size, image size); `attnpass.frontend.export_shapes` says what is
done on top (a batch-1 example, raw q/k/v inputs).

`Program` runs the *lifted* graph: parameters and buffers are graph inputs, read from an owner
module at every call. That is what lets the returned module train, move between devices and
load state dicts like any module, and what lets a graph captured in eval mode and one captured
in train mode share one set of parameters.
"""
from __future__ import annotations

import copy
import sys
import weakref

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.export import ExportedProgram
from torch.fx.graph import _BoxedCodeGen
from torch.export.graph_signature import InputKind, OutputKind

from attnpass.frontend import export_shapes
from attnpass.kv_cache import needs_cache_unflatten, unflatten_outputs
from attnpass.frontend.lean_graph import lean_graph


class CaptureError(RuntimeError):
    """torch.export could not capture the model; the message says what it reported."""


def check_call_inputs(model, args, kwargs) -> tuple[tuple, dict]:
    """Validate the example call early, with errors that name the problem."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"attnpass expects a torch.nn.Module, got {type(model).__name__}")
    if args is None:
        args = ()
    if isinstance(args, torch.Tensor):
        args = (args,)
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"args must be a tuple of positional inputs for model(*args), got {type(args).__name__}")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise TypeError(f"kwargs must be a dict of keyword inputs for model(**kwargs), got {type(kwargs).__name__}")
    if not any(isinstance(t, torch.Tensor) for t in pytree.tree_leaves((tuple(args), kwargs))):
        raise ValueError("args/kwargs hold no tensor: give an example input the model can run on")
    return tuple(args), dict(kwargs)


_cache_pytrees_registered = False


def register_cache_pytrees() -> None:
    """Make transformers' `DynamicCache` a pytree node, so a causal LM's default call (which returns
    one) can be captured, and unflattened back into a `DynamicCache` at every call.

    Uses transformers' own registration (`register_dynamic_cache_export_support`, the one its
    ExecuTorch export uses); done once, and only if transformers is already imported (attnpass
    never imports it). Without that function (older transformers), nothing is registered and a
    model returning a cache is refused by torch.export as before.
    """
    global _cache_pytrees_registered
    if _cache_pytrees_registered or "transformers" not in sys.modules:
        return
    try:
        from transformers.integrations.executorch import register_dynamic_cache_export_support
    except ImportError:
        _cache_pytrees_registered = True  # this transformers has no registration to use
        return
    register_dynamic_cache_export_support()  # tolerates an earlier registration of its own
    _cache_pytrees_registered = True


def export_model(model: torch.nn.Module, args: tuple, kwargs: dict, static=frozenset(), ties=()) -> ExportedProgram:
    """Capture `model(*args, **kwargs)` with `Dim.AUTO` on every dim of every tensor input.

    A batch-1 example is captured at batch 2 (the example repeated along dim 0), so the batch stays
    symbolic, unless the model cannot be captured so. `static` dims are captured static and each
    group of `ties` as one symbol (see `attnpass.frontend.export_shapes`). `ep.example_inputs` is the
    example that was captured.
    """
    register_cache_pytrees()
    args, kwargs = _unaliased(args, kwargs)
    doubled_args, doubled_kwargs, doubled = export_shapes.double_unit_batch(args, kwargs)
    if doubled:
        try:
            return _export(model, doubled_args, doubled_kwargs, static, ties)
        except Exception:  # noqa: BLE001 - the model needs batch 1: capture the example as given
            pass
    try:
        return _export(model, args, kwargs, static, ties)
    except Exception as e:  # noqa: BLE001 - report any capture failure with its cause
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__} with the given example inputs: "
            f"{type(e).__name__}: {first}. Check that model(*args, **kwargs) runs, and that the inputs "
            f"are tensors (or nested tuples/dicts of tensors)."
        ) from e


def _unaliased(args, kwargs):
    """The example with every tensor that shares storage with an earlier one cloned.

    `model(**batch, labels=batch["input_ids"])` passes one tensor twice; export then reads both
    arguments from one graph input, and a later call with other labels would run on them as
    input_ids. Distinct tensors make distinct inputs."""
    seen = set()

    def fresh(x):
        if not isinstance(x, torch.Tensor) or x.numel() == 0:
            return x
        key = (x.device, x.untyped_storage().data_ptr())
        if key in seen:
            return x.clone()
        seen.add(key)
        return x

    return pytree.tree_map(fresh, (tuple(args), dict(kwargs)))


def _export(model, args, kwargs, static, ties) -> ExportedProgram:
    shapes = export_shapes.dynamic_shapes(args, kwargs, static, ties)
    return torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=shapes)


# What each graph input / output of a Program is bound to (`Program._resolve`).
_PARAMETER, _BUFFER, _CONSTANT, _USER, _OUTPUT = range(5)


def _changed_dtype(owner: torch.nn.Module, module: torch.nn.Module, name: str, now: torch.dtype,
                   captured: torch.dtype) -> TypeError:
    path = next((p for p, m in owner.named_modules() if m is module), "?")
    return TypeError(
        f"attnpass: {path + '.' if path else ''}{name} is {now} now; this sparsified model's graph was "
        f"captured with {captured} weights and holds only for them: convert the original model "
        f"(model.to({now})) and sparsify it again"
    )


class Program:
    """An exported program whose lifted graph we run with state read from an owner module.

    Each parameter/buffer input is resolved once per owner to (submodule, attribute name), and read
    at every call as `submodule._parameters[name]` / `submodule._buffers[name]`: a Parameter
    re-assigned on that submodule, `.to()` and `load_state_dict` are all seen, without walking the
    dotted name at every call. (A submodule replaced after the first call is not: re-create the
    model instead.)
    """

    def __init__(self, ep: ExportedProgram):
        self.ep = ep
        self.gm: fx.GraphModule = ep.graph_module
        self.in_spec = ep.call_spec.in_spec
        self.out_spec = ep.call_spec.out_spec
        self._returns_cache = needs_cache_unflatten(self.out_spec)
        self.input_specs = list(ep.graph_signature.input_specs)
        self.output_specs = list(ep.graph_signature.output_specs)
        self.user_input_names = [s.arg.name for s in self.input_specs if s.kind is InputKind.USER_INPUT]
        self.sites: list = []      # filled by detect.capture_sites
        self.skipped: list = []
        self.signature = None      # the call signature it was captured for (sparse_module.call_signature)
        self.specialised = ""      # why the graph holds only at the example's sizes ('' if not; detect.capture_sites)
        self._owner = None         # weakref to the owner the slots below were resolved on
        self._in_slots: list = []
        self._in_dtypes: list = []
        self._boxed = None         # (gm.code it was built from, gm with the boxed calling convention)
        self._mutated_inputs = {s.target for s in ep.graph_signature.output_specs if s.kind is OutputKind.USER_INPUT_MUTATION}
        self._out_slots: list = []
        for spec in self.input_specs:
            if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR, InputKind.USER_INPUT):
                raise CaptureError(f"captured program has an input of kind {spec.kind.name}, which attnpass does not run")

    def state_inputs(self) -> dict[str, torch.Tensor]:
        """Placeholder name -> tensor for parameters, buffers and constants (as captured)."""
        out = {}
        for spec in self.input_specs:
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                out[spec.arg.name] = self.ep.state_dict[spec.target] if spec.target in self.ep.state_dict else self.ep.constants[spec.target]
            elif spec.kind is InputKind.CONSTANT_TENSOR:
                out[spec.arg.name] = self.ep.constants[spec.target]
        return out

    def user_inputs(self, args, kwargs) -> dict[str, object]:
        """Placeholder name -> value for the user inputs of a call."""
        return dict(zip(self.user_input_names, self._flatten(args, kwargs)))

    def _flatten(self, args, kwargs):
        flat, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        if spec != self.in_spec:
            # keyword order may differ from the example's: rebuild kwargs in the captured order
            try:
                kwargs = {key: kwargs[key] for key in self.in_spec.child(1).context}
                flat, spec = pytree.tree_flatten((tuple(args), kwargs))
            except (KeyError, AttributeError, IndexError):
                pass
        if spec != self.in_spec:
            raise TypeError(
                "the call's arguments do not have the structure of the example the model was captured with:\n"
                f"  captured: {self.in_spec}\n  called:   {spec}"
            )
        return flat

    def _boxed_graph(self) -> fx.GraphModule:
        """`gm` with the boxed calling convention (one list argument, cleared once read) and without
        export's no-op calls (`attnpass.frontend.lean_graph`), rebuilt when `gm` was recompiled (a rewrite); it
        shares gm's submodules."""
        code = self.gm.code
        if self._boxed is None or self._boxed[0] is not code:
            graph = copy.deepcopy(self.gm.graph)
            lean_graph(graph)  # without export's run-time checks and no-op calls
            graph.set_codegen(_BoxedCodeGen())
            self._boxed = (code, fx.GraphModule(self.gm, graph))
        return self._boxed[1]

    def _resolve(self, owner: torch.nn.Module) -> None:
        """Resolve every state input/output of the graph on `owner`, once: (table kind, submodule, name)."""

        def slot(kind: str, target: str):
            path, _, name = target.rpartition(".")
            module = owner.get_submodule(path) if path else owner
            table = module._parameters if kind == "parameter" else module._buffers
            if name not in table:
                raise AttributeError(f"{type(owner).__name__} has no {kind} {target!r}, which the captured graph reads")
            return (_PARAMETER if kind == "parameter" else _BUFFER, module, name)

        in_slots = []
        for spec in self.input_specs:
            if spec.kind is InputKind.PARAMETER:
                in_slots.append(slot("parameter", spec.target))
            elif spec.kind is InputKind.BUFFER:
                in_slots.append(slot("buffer", spec.target))
            elif spec.kind is InputKind.CONSTANT_TENSOR:
                in_slots.append((_CONSTANT, self.ep.constants[spec.target], None))
            else:
                in_slots.append((_USER, spec.arg.name, None))
        out_slots = []
        for spec in self.output_specs:
            if spec.kind is OutputKind.BUFFER_MUTATION:
                out_slots.append(slot("buffer", spec.target))
            elif spec.kind is OutputKind.USER_INPUT_MUTATION:
                out_slots.append((_USER, spec.target, None))
            elif spec.kind is OutputKind.USER_OUTPUT:
                out_slots.append((_OUTPUT, None, None))
            else:
                raise RuntimeError(f"captured program has an output of kind {spec.kind.name}, which attnpass does not run")
        self._in_slots, self._out_slots = in_slots, out_slots
        # the dtype each parameter / buffer had at capture: the graph is specialised to it (its
        # conversions and the checks export wrote, which the graph that runs leaves out: lean_graph)
        values = {n.name: n.meta.get("val") for n in self.gm.graph.nodes if n.op == "placeholder"}
        self._in_dtypes = [getattr(values.get(spec.arg.name), "dtype", None) for spec in self.input_specs]
        self._owner = weakref.ref(owner)

    def accepts(self, flat: list, captured: list | None = None) -> bool:
        """Can the graph take these user inputs (in `in_spec` order)? Each tensor's static dims must
        match and each symbolic dim must lie in its range; other leaves must equal the constants.
        `captured`: the leaves of the call it was captured for; a dim of the same size there is taken
        as it is (export may have widened it, e.g. a batch of 1 captured as symbolic)."""
        placeholders = {n.name: n for n in self.gm.graph.nodes if n.op == "placeholder"}
        if len(flat) != len(self.user_input_names):
            return False
        for index, (name, value) in enumerate(zip(self.user_input_names, flat)):
            val = placeholders[name].meta.get("val") if name in placeholders else None
            if not isinstance(value, torch.Tensor):
                continue  # constants are part of the signature key
            if not isinstance(val, torch.Tensor) or val.dim() != value.dim() or val.dtype != value.dtype:
                return False
            same = tuple(captured[index].shape) if captured is not None else ()
            for dim, (want, got) in enumerate(zip(val.shape, value.shape)):
                if dim < len(same) and same[dim] == got:
                    continue
                if isinstance(want, int):
                    if want != got:
                        return False
                    continue
                expr = want.node.expr
                bounds = self.ep.range_constraints.get(expr) if getattr(expr, "is_Symbol", False) else None
                if bounds is None or not (bounds.lower <= got <= bounds.upper):
                    return False
        return True

    def __call__(self, owner: torch.nn.Module, args, kwargs):
        return self.run_flat(owner, self._flatten(args, kwargs))

    def run_flat(self, owner: torch.nn.Module, flat: list):
        """Run the graph on the user inputs `flat` (the call's leaves, in the order of `in_spec`).

        `flat` is consumed (emptied): the graph frees each input after its last use (the boxed
        calling convention), so a KV cache's old keys and values are released layer by layer as in
        the original model, not held to the end of the call."""
        if self._owner is None or self._owner() is not owner:
            self._resolve(owner)
        leaves = iter(flat)
        inputs, mutated = [], {}
        for (kind, a, b), dtype in zip(self._in_slots, self._in_dtypes):
            if kind == _PARAMETER or kind == _BUFFER:
                value = (a._parameters if kind == _PARAMETER else a._buffers)[b]
                if value is not None and value.dtype is not dtype:
                    raise _changed_dtype(owner, a, b, value.dtype, dtype)
                inputs.append(value)
            elif kind == _CONSTANT:
                inputs.append(a)
            else:
                value = next(leaves)
                if a in self._mutated_inputs:
                    mutated[a] = value
                inputs.append(value)
        flat.clear()
        outputs = self._boxed_graph()(inputs)
        if not isinstance(outputs, (tuple, list)):
            outputs = (outputs,)
        results = []
        for (kind, a, b), value in zip(self._out_slots, outputs):
            if kind == _OUTPUT:
                results.append(value)
            elif kind == _BUFFER:
                with torch.no_grad():
                    a._buffers[b].copy_(value)
            else:
                with torch.no_grad():
                    mutated[a].copy_(value)
        if self._returns_cache:
            return unflatten_outputs(results, self.out_spec)
        return pytree.tree_unflatten(results, self.out_spec)
