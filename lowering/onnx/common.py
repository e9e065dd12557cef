"""What the ONNX lowerings share: the custom domain, node emission and neutral stand-ins.

Each attnpass kernel or method-level op is written to the ONNX file as ONE node of the custom
domain ``attnpass`` (opset version 1), and the file carries a model-local function of the same
(domain, name) whose body uses only standard ONNX ops, so plain onnxruntime runs it. A native
implementation can later replace the body without touching the graph.

Two pieces per op:

- the *body*: an onnxscript function (``@script(ATTNPASS, default_opset=op)``), turned into a
  ``FunctionProto`` and appended to the model after the exporter has finished (the exporter's own
  passes - version conversion, optimisation - inline every function they see, so the functions
  must not be in the model while they run);
- the *node*: emitted by the translation function through an ``onnxscript`` ``Op`` with an
  explicit ``OpSchema`` (the exporter needs a schema to know the inputs, attributes and number
  of outputs of an op it has never seen).

Absent optional tensors (no bias, no mask, no key padding) are passed as neutral constants
(0.0, True), so each op has one fixed signature and its body needs no branch on presence.
"""
from __future__ import annotations

import onnx
import onnxscript
from onnx.defs import OpSchema
from onnxscript import opset18 as op

DOMAIN = "attnpass"
DOMAIN_VERSION = 1
# The standard opset the bodies are written against; the exported model must use the same one
# (a model-local function shares the model's opset imports).
ONNX_OPSET = 18

ATTNPASS = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)

_FLOAT_TYPES = ["tensor(float)", "tensor(double)"]
_ATTR_TYPES = {"float": OpSchema.AttrType.FLOAT, "int": OpSchema.AttrType.INT, "string": OpSchema.AttrType.STRING}


def node_op(name: str, inputs: list[tuple[str, str]], attributes: list[tuple[str, str]],
            outputs: list[tuple[str, str]]) -> onnxscript.values.Op:
    """An onnxscript Op emitting a plain ``attnpass.<name>`` node.

    ``inputs``/``outputs``: (name, type constraint) with constraints "T" (float/double, shared),
    "B" (bool) or "I" (int64); ``attributes``: (name, "float" | "int" | "string"), all required.
    """
    def param(n, t):
        return OpSchema.FormalParameter(n, t)

    constraints = [("T", _FLOAT_TYPES, "float tensors"), ("B", ["tensor(bool)"], "bool tensors"),
                   ("I", ["tensor(int64)"], "int64 tensors")]
    used = {t for _, t in inputs + outputs}
    schema = OpSchema(
        name, DOMAIN, DOMAIN_VERSION, doc=f"attnpass custom op {name} (body: model-local function)",
        inputs=[param(n, t) for n, t in inputs], outputs=[param(n, t) for n, t in outputs],
        type_constraints=[c for c in constraints if c[0] in used],
        attributes=[OpSchema.Attribute(n, _ATTR_TYPES[t], "", required=True) for n, t in attributes],
    )
    return onnxscript.values.Op(ATTNPASS, name, op_schema=schema)


def check_float(opname: str, *tensors) -> None:
    """The bodies compute in the inputs' dtype, which must be float32 or float64 (as the CPU
    kernels accumulate); half precision would silently lose the >= float32 softmax."""
    for t in tensors:
        dtype = getattr(t, "dtype", None)
        if dtype is not None and dtype not in (onnxscript.ir.DataType.FLOAT, onnxscript.ir.DataType.DOUBLE):
            raise TypeError(f"export_onnx: {opname} inputs must be float32 or float64 to export, got {dtype}; "
                            "export the model in float32")


def zero_like(x):
    """A scalar 0 of x's dtype: the neutral additive bias."""
    return op.CastLike(op.Constant(value_float=0.0), x)


def true_scalar():
    """A scalar True: the neutral mask (broadcasts to any pair shape)."""
    return op.Constant(value=onnx.helper.make_tensor("true", onnx.TensorProto.BOOL, [], [True]))


def all_keys(q, k):
    """(B, Lk) all True: the neutral key padding mask (B from q, Lk from k)."""
    shape = op.Concat(op.Shape(q, start=0, end=1), op.Shape(k, start=2, end=3), axis=0)
    return op.Expand(true_scalar(), shape)


def as_4d(t):
    """A bias / mask broadcastable to (B, H, Lq, Lk) with leading axes added to make it 4-D."""
    rank = len(t.shape) if t.shape is not None else None
    if rank is None:
        raise TypeError("export_onnx: an attnpass node needs the rank of the site's bias / mask")
    return t if rank == 4 else op.Unsqueeze(t, list(range(4 - rank)))


def pair_bias(bias, q):
    """The site's bias as a 4-D input of q's dtype, or a (1, 1, 1, 1) zero when it has none."""
    if bias is None:
        return op.Reshape(zero_like(q), op.Constant(value_ints=[1, 1, 1, 1]))
    return op.CastLike(as_4d(bias), q)


def pair_mask(mask):
    """The site's bool mask as a 4-D input, or a (1, 1, 1, 1) True when it has none."""
    return op.Reshape(true_scalar(), op.Constant(value_ints=[1, 1, 1, 1])) if mask is None else as_4d(mask)


def int_input(value):
    """A symbolic int (e.g. Lk - Lq under dynamic shapes) as an int64 scalar input."""
    if isinstance(value, bool):
        raise TypeError(f"expected an int, got {value!r}")
    if isinstance(value, int):
        return op.Constant(value_int=value)
    return op.Cast(value, to=onnx.TensorProto.INT64)


def static_float(opname: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"export_onnx: {opname} needs a static {name} (a number), got {value!r}; it is symbolic "
                        "in this export (e.g. a head dim that varies), which the ONNX op cannot take as an attribute")
    return float(value)


def check_traced_site(module, name: str) -> None:
    """What a site exported by tracing its own code (Combiner, routing) must be: self-attention (its
    layout traces where Lq == Lk), with no bias or general mask kept as a tensor (the GroupedAttention
    node reads none), with an anchor only where it runs on its flash op."""
    if module.spec.has_bias or module.spec.has_mask:
        raise NotImplementedError(f"export_onnx: {name} keeps a {'bias' if module.spec.has_bias else 'general mask'} "
                                  "as a tensor (e.g. ALiBi), which the GroupedAttention node does not read in this "
                                  "version; method='dense' exports it")
    if module.spec.cross:
        raise NotImplementedError(f"export_onnx: {name} is cross-attention; its layout traces at self-attention "
                                  "sites (Lq == Lk) only")
    if module.anchor and not module.anchor.runs_on_flash(None, None, 0.0):  # the export's eval call
        raise NotImplementedError(f"export_onnx: {name}: sinks= without a local window at a causal site run the "
                                  "anchor on the grouped kernel's slots, which have no ONNX lowering in this "
                                  "version; give local= (causal sites) or no sinks")
