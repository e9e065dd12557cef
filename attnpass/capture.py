"""Capture a model as an FX graph with `torch.export` (non-strict), and run the captured graph.

`torch.fx.symbolic_trace` fails on Hugging Face models; non-strict export succeeds on all the
models we test. Every dim of every tensor input is marked `Dim.AUTO`, so export keeps a dim
symbolic wherever the model allows (batch, sequence length) and specialises it silently where
the model needs a fixed size (hidden size, image size).

`Program` runs the *lifted* graph: parameters and buffers are graph inputs, read from an owner
module at every call. That is what lets the returned module train, move between devices and
load state dicts like any module, and what lets a graph captured in eval mode and one captured
in train mode share one set of parameters.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind


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


def export_model(model: torch.nn.Module, args: tuple, kwargs: dict) -> ExportedProgram:
    shapes = torch.export.ShapesCollection()
    for t in pytree.tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            shapes[t] = {d: Dim.AUTO for d in range(t.dim())}
    try:
        return torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=shapes)
    except Exception as e:  # noqa: BLE001 - report any capture failure with its cause
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__} with the given example inputs: "
            f"{type(e).__name__}: {first}. Check that model(*args, **kwargs) runs, and that the inputs "
            f"are tensors (or nested tuples/dicts of tensors)."
        ) from e


class Program:
    """An exported program whose lifted graph we run with state read from an owner module."""

    def __init__(self, ep: ExportedProgram):
        self.ep = ep
        self.gm: fx.GraphModule = ep.graph_module
        self.in_spec = ep.call_spec.in_spec
        self.out_spec = ep.call_spec.out_spec
        self.input_specs = list(ep.graph_signature.input_specs)
        self.output_specs = list(ep.graph_signature.output_specs)
        self.user_input_names = [s.arg.name for s in self.input_specs if s.kind is InputKind.USER_INPUT]
        self.sites: list = []      # filled by detect.capture_sites
        self.skipped: list = []
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

    def __call__(self, owner: torch.nn.Module, args, kwargs):
        flat = iter(self._flatten(args, kwargs))
        inputs, user = [], {}
        for spec in self.input_specs:
            if spec.kind is InputKind.PARAMETER:
                inputs.append(owner.get_parameter(spec.target))
            elif spec.kind is InputKind.BUFFER:
                inputs.append(owner.get_buffer(spec.target))
            elif spec.kind is InputKind.CONSTANT_TENSOR:
                inputs.append(self.ep.constants[spec.target])
            else:
                user[spec.arg.name] = next(flat)
                inputs.append(user[spec.arg.name])
        outputs = self.gm(*inputs)
        if not isinstance(outputs, (tuple, list)):
            outputs = (outputs,)
        results = []
        for spec, value in zip(self.output_specs, outputs):
            if spec.kind is OutputKind.USER_OUTPUT:
                results.append(value)
            elif spec.kind is OutputKind.BUFFER_MUTATION:
                with torch.no_grad():
                    owner.get_buffer(spec.target).copy_(value)
            elif spec.kind is OutputKind.USER_INPUT_MUTATION:
                with torch.no_grad():
                    user[spec.target].copy_(value)
            else:
                raise RuntimeError(f"captured program has an output of kind {spec.kind.name}, which attnpass does not run")
        return pytree.tree_unflatten(results, self.out_spec)
