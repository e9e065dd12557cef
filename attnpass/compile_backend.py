"""The torch.compile backend: `torch.compile(model, backend="attnpass")`.

For each graph dynamo hands it, the backend inlines the attention dynamo keeps as one call
(`inline_mha`: `F.multi_head_attention_forward` of nn.MultiheadAttention / nn.Transformer*Layer,
and nn.TransformerEncoderLayer's fused no_grad fast path), finds the attention sites with the same
pattern library and mask analysis as `sparsify` (`detect.find_sites`, on probes built from the
graph's example inputs), binds each to a site module of the chosen method (`SiteAttention`,
checked with the method's `unsupported_reason`, exactly as `sparsify` does), rewrites it
(`rewrite.rewrite_site`), and compiles the rest.

Why the graph is split at the sites. A site module builds its layout in Python from the sequence
length (Combiner's block is ~sqrt(L), region counts, index tables). Traced by AOT autograd with a
symbolic L, that code would put guards on L into dynamo's shape environment and every new length
would recompile. So the rewritten graph is cut at the site calls (`torch.fx.passes.split_module`):
the pieces between sites are compiled by the inner compiler (Inductor by default) with symbolic
shapes, and the site modules run eagerly, their custom ops (`attnpass::attention`,
`attnpass::grouped_attention`, ...) being their own kernels. Autograd composes across the pieces,
so training works: backward runs each compiled piece's AOT backward and each op's registered
autograd.

Methods with learned state (routing, SBM, Sparsefinder) are not created by the backend: a backend
sees one graph at a time and builds its modules anew on every recompilation, so their state would
be reset and would never be in `model.parameters()` / `state_dict()`. `backend(method="routing")`
raises a ValueError that says to compile `attnpass.sparsify(model, ..., method="routing")` instead.
In such a model dynamo traces through the site modules: the graphs it hands over hold attnpass ops
rather than softmax chains, so nothing is found to rewrite (no second rewrite); the attnpass ops
are reported as already sparse and lowered as they are (opaque custom ops for Inductor).

What was rewritten and why a site was skipped: `attnpass.explain(model, args, kwargs, ...)`, the
`.report` of a backend object, or the `attnpass.compile_backend` logger at INFO level.
"""
from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.split_module import split_module

from attnpass.api import site_spec
from attnpass.capture import check_call_inputs
from attnpass.detect import capture_sites, find_sites, module_path
from attnpass.inline_mha import inline_mha
from attnpass.mask_analysis import ProbeSet
from attnpass.methods import SiteAttention, method_class
from attnpass.rewrite import remove_dead_code, rewrite_site
from attnpass.site import AttentionSite, SkippedSite, format_table

log = logging.getLogger(__name__)

# Methods whose site modules hold no learned state: safe to create inside a backend.
STATELESS_METHODS: tuple[str, ...] = ("dense", "combiner")
INNER_COMPILERS: tuple[str, ...] = ("inductor", "aot_eager", "eager")


# -- reports -------------------------------------------------------------------------------------

@dataclass
class GraphReport:
    """What the backend did with one graph dynamo handed it (plain data: holds no graph)."""

    index: int
    rewritten: list[dict[str, str]] = field(default_factory=list)   # site rows + method
    skipped: list[SkippedSite] = field(default_factory=list)
    already_sparse: list[str] = field(default_factory=list)        # attnpass ops found in the graph
    pieces: int = 0                                                  # pieces given to the inner compiler


@dataclass
class CompileReport:
    """Every graph the backend compiled, in order; prints as tables."""

    method: str
    graphs: list[GraphReport] = field(default_factory=list)
    # filled by `explain` only: sites torch.export finds in the model that no graph handed to the
    # backend contained (dynamo ran that code outside any compiled graph)
    not_reached: list[SkippedSite] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def compilations(self) -> int:
        return len(self.graphs)

    @property
    def rewritten(self) -> list[str]:
        return [r["site"] for g in self.graphs for r in g.rewritten]

    @property
    def skipped(self) -> list[SkippedSite]:
        return [s for g in self.graphs for s in g.skipped]

    @property
    def already_sparse(self) -> list[str]:
        return [op for g in self.graphs for op in g.already_sparse]

    def __str__(self) -> str:
        parts = [f"attnpass backend (method={self.method!r}): {self.compilations} graph(s) compiled, "
                 f"{len(self.rewritten)} site(s) rewritten, {len(self.skipped)} skipped, "
                 f"{len(self.already_sparse)} already sparse op(s)"]
        for g in self.graphs:
            if not (g.rewritten or g.skipped or g.already_sparse):
                continue
            parts.append(f"graph {g.index}:")
            if g.rewritten:
                parts.append(format_table(g.rewritten))
            if g.skipped:
                parts.append("skipped (left unchanged):")
                parts.append(format_table([s.row() for s in g.skipped]))
            if g.already_sparse:
                parts.append("already sparse, lowered as is: " + ", ".join(g.already_sparse))
        if self.not_reached:
            parts.append("never reached the backend (left as they are):")
            parts.append(format_table([s.row() for s in self.not_reached]))
        parts += [f"note: {n}" for n in self.notes]
        return "\n".join(parts)

    __repr__ = __str__


# -- the backend ---------------------------------------------------------------------------------

class AttnpassBackend:
    """A torch.compile backend: `(gm, example_inputs) -> callable`. Build it with `attnpass.backend(...)`."""

    def __init__(self, method: str = "combiner", inner: str = "inductor", **options):
        site_class = method_class(method)
        name = method.lower()
        if name not in STATELESS_METHODS:
            raise ValueError(
                f"attnpass backend: method {method!r} has learned state, which a torch.compile backend cannot "
                "own (its modules would be rebuilt on every recompilation and missing from model.parameters() "
                f"and state_dict()); compile the sparsified model instead: "
                f"torch.compile(attnpass.sparsify(model, args, kwargs, method={method!r}), backend='attnpass'). "
                f"Methods the backend applies itself: {list(STATELESS_METHODS)}"
            )
        site_class.validate_options(**options)
        if inner not in INNER_COMPILERS:
            raise ValueError(f"attnpass backend: inner={inner!r} must be one of {list(INNER_COMPILERS)}")
        self.method = name
        self.inner = inner
        self.options = dict(options)
        self._site_class = site_class
        self.report = CompileReport(name)

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"attnpass.backend(method={self.method!r}, inner={self.inner!r}{opts})"

    def __call__(self, gm: fx.GraphModule, example_inputs):
        graph_report = GraphReport(len(self.report.graphs))
        self.report.graphs.append(graph_report)
        pristine = fx.GraphModule(gm, copy.deepcopy(gm.graph))
        try:
            return self._rewrite_and_compile(gm, example_inputs, graph_report)
        except Exception as e:  # noqa: BLE001 - a graph we cannot rewrite still runs, unchanged
            why = f"attnpass could not rewrite this graph ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); compiled unchanged"
            warnings.warn(f"attnpass backend: {why}", stacklevel=2)
            graph_report.rewritten.clear()
            graph_report.skipped.append(SkippedSite("<graph>", "", "-", why))
            compiled, graph_report.pieces = _compile_split(pristine, example_inputs, set(), self.inner)
            return compiled

    def _rewrite_and_compile(self, gm: fx.GraphModule, example_inputs, graph_report):
        graph_report.already_sparse = _attnpass_ops(gm)
        inlined, declined = inline_mha(gm)
        if inlined:
            remove_dead_code(gm)  # e.g. averaged attention weights the model does not read
        probes = _probes(gm, example_inputs)
        sites, skipped = find_sites(gm, probes)
        graph_report.skipped.extend(skipped + _opaque_attention(gm, declined))
        calls = []
        for site in sites:
            made = self._make_site(site)
            if isinstance(made, str):
                graph_report.skipped.append(SkippedSite(site.name, site.module_path, site.pattern, made))
                continue
            target = f"attnpass_site_{len(calls)}"
            gm.add_submodule(target, made)
            calls.append(rewrite_site(gm, site, target))
            graph_report.rewritten.append({**site.row(), "method": self.method})
        if calls:
            remove_dead_code(gm)  # the replaced chains (and any L x L mask built only for them)
        _log(graph_report, self.method)
        compiled, graph_report.pieces = _compile_split(gm, example_inputs, set(calls), self.inner)
        return compiled

    def _make_site(self, site: AttentionSite) -> nn.Module | str:
        spec = site_spec(site)
        reason = self._site_class.unsupported_reason(spec, **self.options)
        if reason:
            return f"method {self.method!r}: {reason}"
        module = self._site_class(spec, **self.options)
        # dynamo bakes the mode into the graph (dropout's training flag): the site follows the graph
        module.train(site.dropout > 0.0)
        return module


def backend(method: str = "combiner", *, inner: str = "inductor", **options) -> AttnpassBackend:
    """A configured backend: `torch.compile(model, backend=attnpass.backend(method="dense"))`.

    `method`: "combiner" (default) or "dense" — methods without learned state; for routing, SBM and
    Sparsefinder compile `attnpass.sparsify(model, ..., method=...)` instead (a ValueError says so).
    `inner`: what compiles the graph between the sites — "inductor" (default), "aot_eager" or
    "eager" (for debugging and fast tests). `options` are the method's (see `attnpass.METHODS`).
    The returned object's `.report` lists every compiled graph with its rewritten and skipped sites.
    """
    return AttnpassBackend(method, inner, **options)


_default: AttnpassBackend | None = None


def attnpass_backend(gm: fx.GraphModule, example_inputs):
    """`backend="attnpass"` (the `torch_dynamo_backends` entry point): Combiner, then Inductor."""
    global _default
    if _default is None:
        _default = AttnpassBackend()
    return _default(gm, example_inputs)


def explain(model: nn.Module, args=(), kwargs=None, method: str = "combiner", **options) -> CompileReport:
    """Compile `model` with the backend, call it once on `model(*args, **kwargs)`, and return the report.

    The report names every site the backend rewrote, every site it left unchanged with the
    reason, and the attnpass ops of an already sparsified model it lowered as they were. The graph
    between sites runs eagerly here (nothing is sent to Inductor), so this is quick; dynamo's
    caches are reset first so that the report covers a fresh compilation.

    It also captures the model with torch.export (as `find_attention` does) and lists, under
    `not_reached`, the attention sites no graph handed to the backend contained: code dynamo ran
    outside any compiled graph (a `torch.compiler.disable`d module, a graph break dynamo does not
    resume from), which the backend cannot see and so leaves dense without a word of its own. When
    torch.export cannot capture the model either (e.g. nn.TransformerEncoder checking a mask with
    `.item()`), `notes` says so.
    """
    args, kwargs = check_call_inputs(model, args, kwargs)
    compiler = AttnpassBackend(method, inner="eager", **options)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=compiler)(*args, **kwargs)
    torch._dynamo.reset()
    report = compiler.report
    seen = set(report.rewritten) | {s.name for s in report.skipped}
    try:
        exported = capture_sites(model, args, kwargs)
    except Exception as e:  # noqa: BLE001 - the cross-check is best effort; say why it is missing
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        report.notes.append("sites outside the compiled graphs could not be listed: torch.export could not "
                            f"capture the model either ({first})")
        return report
    for site in exported.sites:
        if site.name not in seen:
            report.not_reached.append(SkippedSite(
                site.name, site.module_path, site.pattern,
                "never reached the backend: dynamo ran this code outside its compiled graphs (a disabled "
                "module, or a graph break it does not resume from); attnpass.sparsify rewrites it"))
    return report


def _log(report: GraphReport, method: str) -> None:
    for row in report.rewritten:
        log.info("graph %d: rewrote %s (%s, mask %s) to %s", report.index, row["site"], row["pattern"], row["mask"], method)
    for s in report.skipped:
        log.info("graph %d: skipped %s (%s): %s", report.index, s.name, s.pattern, s.reason)
    for op in report.already_sparse:
        log.info("graph %d: %s already sparse, lowered as is", report.index, op)


# -- detection inputs ----------------------------------------------------------------------------

def _attnpass_ops(gm: fx.GraphModule) -> list[str]:
    """The attnpass custom ops already in a graph (a sparsified model traced by dynamo)."""
    return [f"{node.name} ({node.target})" for node in gm.graph.nodes
            if node.op == "call_function" and str(node.target).startswith("attnpass.")]


# Attention dynamo keeps as one opaque call, with no chain left in the graph to rewrite: PyTorch's
# fused inference fast path (nn.MultiheadAttention / nn.TransformerEncoderLayer in eval mode under
# no_grad), native ops with no decomposition. `inline_mha` lowers the encoder layer's op to the
# layer's slow path and inlines F.multi_head_attention_forward (which dynamo does not trace into);
# what it declines is reported with its reason, and so is nn.MultiheadAttention's own fast path.
_FAST_PATH = ("PyTorch's fused inference fast path (taken under no_grad) hides the attention in one native op; "
              "call the model with grad enabled (or in train mode) for attnpass to see it")
_OPAQUE = {getattr(torch, name): (name, _FAST_PATH)
           for name in ("_transformer_encoder_layer_fwd", "_native_multi_head_attention") if hasattr(torch, name)}


def _opaque_attention(gm: fx.GraphModule, declined: dict[fx.Node, str]) -> list[SkippedSite]:
    skipped = []
    for node in gm.graph.nodes:
        if node in declined:
            op, hint = _OPAQUE.get(node.target, ("multi_head_attention_forward", ""))
            reason = f"not inlined: {declined[node]}" + (f"; {hint}" if hint else "")
        elif node.op == "call_function" and node.target in _OPAQUE:
            op, reason = _OPAQUE[node.target]
        else:
            continue
        path, _ = module_path(node)
        skipped.append(SkippedSite(path or node.name, path, op, reason))
    return skipped


def _is_state(node: fx.Node, value) -> bool:
    """A placeholder dynamo lifted from the module (parameter / buffer), not a user input."""
    if isinstance(value, nn.Parameter):
        return True
    arg = node.meta.get("grapharg")
    source = getattr(arg, "source", None)
    name = getattr(source, "name", None) or node.name  # a property in recent torch
    name = name() if callable(name) else str(name)
    return "_parameters" in name or "_buffers" in name


def _probes(gm: fx.GraphModule, example_inputs) -> ProbeSet:
    """Mask-analysis probes for a dynamo graph: its example inputs, and others at shifted sizes."""
    state, user = {}, {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        if isinstance(value, torch.SymInt):
            value = int(value.node.hint)  # a symbolic size input; its probe values follow the shapes
        if isinstance(value, torch.Tensor) and _is_state(node, value):
            state[node.name] = value
        else:
            user[node.name] = value
    ranges = None
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    if fake_mode is not None and fake_mode.shape_env is not None:
        ranges = dict(fake_mode.shape_env.var_to_range)
    return ProbeSet(gm, state, user, ranges)


# -- split at the sites and compile the pieces ---------------------------------------------------

class _Piece(nn.Module):
    """A compiled piece: inner compilers want and return tuples."""

    def __init__(self, compiled):
        super().__init__()
        self.compiled = compiled

    def forward(self, *args):
        return tuple(self.compiled(*args))


class _EagerSite(nn.Module):
    """A site call run eagerly. Its output is made contiguous: the next piece was compiled for the
    contiguous layout the fake propagation assumed."""

    def __init__(self, submod: fx.GraphModule):
        super().__init__()
        self.submod = submod

    def forward(self, *args):
        return tuple(t.contiguous() if isinstance(t, torch.Tensor) else t for t in self.submod(*args))


def _inner_compiler(inner: str):
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx
        return compile_fx
    if inner == "aot_eager":
        return torch._dynamo.lookup_backend("aot_eager")
    return lambda gm, example_inputs: gm.forward


def _compile_split(gm: fx.GraphModule, example_inputs, site_calls: set, inner: str):
    """Compile `gm` with the site calls as eager cuts; returns (callable, number of compiled pieces)."""
    compile_piece = _inner_compiler(inner)
    if not site_calls:
        return compile_piece(gm, list(example_inputs)), 1
    part, counter = {}, 0
    for node in gm.graph.nodes:
        if node in site_calls:
            part[node] = counter + 1
            counter += 2
        else:
            part[node] = counter
    split = split_module(gm, None, lambda n: part[n], keep_original_order=True, tuple_return=True)
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    # the backend's fake mode has dynamo's (symbolic) fake of every real input memoised
    fakes = [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    pieces = _SplitCompiler(split, compile_piece, fake_mode).compile(fakes)
    return split, pieces


class _SplitCompiler(fx.Interpreter):
    """Walk the split graph with fake values: compile each piece between sites with the inputs it
    will see (symbolic shapes included) and leave the site calls to run eagerly."""

    def __init__(self, split: fx.GraphModule, compile_piece, fake_mode):
        super().__init__(split)
        self.compile_piece = compile_piece
        self.fake_mode = fake_mode
        self.pieces = 0

    def compile(self, fakes) -> int:
        self.run(*fakes)
        self.module.recompile()
        return self.pieces

    def call_module(self, target, args, kwargs):
        submod = self.fetch_attr(target)
        sites = [n for n in submod.graph.nodes
                 if n.op == "call_module" and isinstance(submod.get_submodule(n.target), SiteAttention)]
        if sites:
            self.module.add_submodule(target, _EagerSite(submod))
            # the site's output by the SiteAttention contract: (B, Hq, Lq, Dv) in q's dtype
            env = dict(zip((n for n in submod.graph.nodes if n.op == "placeholder"), args))
            q, v = env[sites[0].args[0]], env[sites[0].args[2]]
            # the next piece must be compiled for a differentiable input when the site's is
            grad = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
            with self.fake_mode:
                return (q.new_empty((*q.shape[:-1], v.shape[-1])).requires_grad_(grad),)
        compiled = self.compile_piece(submod, list(args))
        self.pieces += 1
        with self.fake_mode:
            out = submod(*args)  # the uncompiled piece on fake values: the next piece's inputs
        self.module.add_submodule(target, _Piece(compiled))
        return out
