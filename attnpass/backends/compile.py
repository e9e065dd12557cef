"""The torch.compile backend: `torch.compile(model, backend="attnpass")`, or bound to the model
whose method state it keeps: `model.forward = torch.compile(model.forward,
backend=attnpass.backend(method="routing", model=model))`, then `model.generate(...)`.

For each graph dynamo hands it, the backend inlines the attention dynamo keeps as one call
(`inline_mha`: `F.multi_head_attention_forward` of nn.MultiheadAttention / nn.Transformer*Layer,
and nn.TransformerEncoderLayer's fused no_grad fast path), finds the attention sites with the same
pattern library and mask analysis as `sparsify` (`detect.find_sites`, on probes built from the
graph's example inputs), binds each to a site module of the chosen method (`SiteAttention`,
checked with the method's `unsupported_reason`, exactly as `sparsify` does), rewrites it
(`rewrite.rewrite_site`), and compiles the rest.

Which sites stay in the graph, and why others cut it. A site module whose call traces with symbolic
lengths (`SiteAttention.traces_symbolically`, asked on the call's fake inputs) is compiled with the
graph: the dense op everywhere (one `attnpass::attention` node), Sparsefinder's block recipe at a
prompt in inference (`attnpass::choose_blocks` and `attnpass::block_flash_attention`, ops whose fake
kernels state their shapes), Combiner (fixed) and routing at a prompt (layouts as tensor code of L,
the sizes the data decides read back as bounded unbacked ints: `attnpass/methods/symbolic.py`). A
module with state (routing's centroids) takes it as inputs of the compiled graph
(`attnpass/backends/site_state.py`), read at every call; while a first call has yet to initialise
that state (in Python, from its tokens) the graph runs eagerly. Other modules build their layout in
Python from the sequence length or from values (SBM's graph, Sparsefinder's other predictors,
routing's training step; a step over the cache the cost model cannot decide without the key length,
which one query never is): traced by AOT autograd with a symbolic L, that code would
put guards on L into dynamo's shape environment and every new length would recompile. The graph
is cut at those calls
(`torch.fx.passes.split_module`): the pieces between them are compiled by the inner compiler
(Inductor by default) with symbolic shapes, and those site modules run eagerly, their custom ops
being their own kernels. Autograd composes across the pieces, so training works: backward runs
each compiled piece's AOT backward and each op's registered autograd. The report's `pieces` and
`cut_at` say, per graph, what was done.

Where the site modules live. Unbound (`backend(method="combiner")`, `backend="attnpass"`), each
graph gets fresh modules, which is only right for methods without learned state (dense, Combiner):
a backend sees one graph at a time, so a routing module built per graph would have its centroids
reset at every recompilation and kept out of `model.state_dict()`. Those methods need the model:
`backend(method="routing", model=m)` binds the backend to `m`. A site's module is then created the
first time a graph holds the site, attached to `m` as `<owning module>.attnpass` (`api._attach`,
as `sparsify` attaches it, so the state_dict keys are sparsify's), and reused by every later graph
holding that site (a recompilation, another length, generation's decode graph). A site is known by
its name, the owning module's path and its order within it (`detect`'s naming); the module stores
it as `spec.name`, so a backend bound later to the same model finds the modules already attached.
Before reuse the graph's site must compute the attention the module was built for, by sparsify's
rule for a new call signature (`sparse_module._check_same_attention`: a decode step's one query
over the cache is the prompt's causal attention); a site that differs, whose path is not that
module in the bound model (a submodule compiled on its own), or in a graph reading none of the
model's parameters (another model) is left unchanged, reported, and warned about when it differs.
The modules take the model's mode and then follow `m.train()` / `m.eval()`, whose flag dynamo
guards on. A method's state reaches a traced site as graph inputs and a cut site directly, so
`load_state_dict`, calibration and training's EMA steps reach the compiled graphs without a
recompilation; dynamo never traces the methods' code, so it adds no graph break. Without a model, routing, SBM and
Sparsefinder raise a ValueError saying to pass `model=` (or to compile `attnpass.sparsify(...)`,
whose graphs hold attnpass ops rather than softmax chains: they are reported as already sparse and
lowered as they are, and dynamo breaks the graph at the methods' layout code).

Output layout. Inductor may return a graph output in another memory order than dynamo traced (a KV
cache's keys in the projection's (B, L, H, D) order); a later graph taking it as input would be
compiled again for the new strides (generation's first decode step reads the prefill's keys, the
next steps the decode steps' own). Outputs traced as contiguous are given back contiguous.

What was rewritten and why a site was skipped: `attnpass.explain(model, args, kwargs, ...)`, the
`.report` of a backend object, or the `attnpass.backends.compile` logger at INFO level.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.split_module import split_module

from attnpass.api import _attach, _refuse_sparsified, one_query_over_keys, site_spec
from attnpass.backends.site_state import state_as_inputs
from attnpass.frontend.capture import check_call_inputs
from attnpass.frontend.detect import capture_sites, find_sites, module_path
from attnpass.frontend.inline_mha import inline_mha
from attnpass.frontend.mask_analysis import ProbeSet
from attnpass.methods import METHODS, SiteAttention, canonical_method, method_class
from attnpass.prefill import check_prefill_queries
from attnpass.frontend.rewrite import remove_dead_code, rewrite_site
from attnpass.frontend.site import AttentionSite, SkippedSite, format_table
from attnpass.sparse_module import SignatureNotServed, _check_same_attention

log = logging.getLogger(__name__)


def stateless_methods() -> tuple[str, ...]:
    """Methods whose site modules hold no learned state: safe to create inside a backend."""
    return tuple(name for name in METHODS if not method_class(name).has_learned_state)
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
    cut_at: list[str] = field(default_factory=list)                  # sites run eagerly between pieces
    # sites whose first call initialises their state: the graph runs eagerly until it has
    eager_until_initialised: list[str] = field(default_factory=list)


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

    def __init__(self, method: str = "combiner", inner: str = "inductor", model: nn.Module | None = None, **options):
        name = canonical_method(method)
        site_class = method_class(name)
        prefill_queries = options.pop("prefill_queries", None)  # every method's, as in sparsify
        check_prefill_queries(prefill_queries)
        if model is None and site_class.has_learned_state:
            raise ValueError(
                f"attnpass backend: method {method!r} has learned state, which a backend cannot keep on its own "
                "(its modules would be rebuilt on every recompilation and missing from model.parameters() and "
                f"state_dict()); bind the backend to the model that keeps it: attnpass.backend(method={method!r}, "
                "model=model), or compile the sparsified model: "
                f"torch.compile(attnpass.sparsify(model, args, kwargs, method={method!r}), backend='attnpass'). "
                f"Methods the backend applies without a model: {list(stateless_methods())}"
            )
        if model is not None:
            if not isinstance(model, nn.Module):
                raise TypeError("attnpass backend: model= must be the nn.Module being compiled, "
                                f"got {type(model).__name__}")
            _refuse_sparsified(model, "attnpass.backend(model=...)")
        site_class.validate_options(**options)
        if inner not in INNER_COMPILERS:
            raise ValueError(f"attnpass backend: inner={inner!r} must be one of {list(INNER_COMPILERS)}")
        self.method = name
        self.inner = inner
        self.model = model
        self.prefill_queries = prefill_queries
        self.options = dict(options)
        self._site_class = site_class
        self.report = CompileReport(name)

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        if self.prefill_queries is not None:
            opts += f", prefill_queries={self.prefill_queries!r}"
        bound = f", model={type(self.model).__name__}" if self.model is not None else ""
        return f"attnpass.backend(method={self.method!r}, inner={self.inner!r}{bound}{opts})"

    def site_modules(self) -> dict[str, nn.Module]:
        """Site name -> the module attached to the bound model for it (empty for an unbound backend,
        and before the first compiled call)."""
        if self.model is None:
            return {}
        return {m.spec.name: m for m in self.model.modules()
                if isinstance(m, SiteAttention) and m.method_name == self.method}

    def __call__(self, gm: fx.GraphModule, example_inputs):
        graph_report = GraphReport(len(self.report.graphs))
        self.report.graphs.append(graph_report)
        pristine = _copy(gm)
        contiguous = _contiguous_outputs(gm)
        try:
            compiled = self._rewrite_and_compile(gm, example_inputs, graph_report)
        except Exception as e:  # noqa: BLE001 - a graph we cannot rewrite still runs, unchanged
            why = f"attnpass could not rewrite this graph ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); compiled unchanged"
            warnings.warn(f"attnpass backend: {why}", stacklevel=2)
            graph_report.rewritten.clear()
            graph_report.skipped.append(SkippedSite("<graph>", "", "-", why))
            compiled, graph_report.pieces = _compile_split(pristine, example_inputs, set(), self.inner)
        return _with_traced_contiguity(compiled, contiguous)

    def _rewrite_and_compile(self, gm: fx.GraphModule, example_inputs, graph_report):
        graph_report.already_sparse = _attnpass_ops(gm)
        inlined, declined = inline_mha(gm)
        if inlined:
            remove_dead_code(gm)  # e.g. averaged attention weights the model does not read
        probes = _probes(gm, example_inputs)
        sites, skipped = find_sites(gm, probes)
        graph_report.skipped.extend(skipped + _opaque_attention(gm, declined))
        calls = []
        foreign = self._foreign_graph(example_inputs)
        for site in sites:
            made = self._make_site(site) if self.model is None else (foreign or self._bound_site(site))
            if isinstance(made, str):
                graph_report.skipped.append(SkippedSite(site.name, site.module_path, site.pattern, made))
                continue
            target = f"attnpass_site_{len(calls)}"
            gm.add_submodule(target, made)
            calls.append(rewrite_site(gm, site, target))
            row = {**site.row(), "method": self.method}
            if self.model is not None:
                row["module"] = _attached_path(self.model, site, made)
            graph_report.rewritten.append(row)
        if calls:
            remove_dead_code(gm)  # the replaced chains (and any L x L mask built only for them)
        _log(graph_report, self.method)
        cut = _sites_to_cut(gm, example_inputs, calls)
        graph_report.cut_at = sorted(n.meta["attnpass_site"] for n in cut)
        # a traced site whose state its first call initialises (routing's centroids, from that call's
        # tokens, in Python): the graph runs eagerly (not compiled) while any such module waits for it
        waiting = [n for n in calls if n not in cut and gm.get_submodule(n.target).needs_first_call()]
        graph_report.eager_until_initialised = sorted(n.meta["attnpass_site"] for n in waiting)
        eager = _copy(gm).forward if waiting else None
        compiled, graph_report.pieces = self._compile_cut_at(_copy(gm), example_inputs, calls, cut)
        return _UntilInitialised(eager, compiled, [gm.get_submodule(n.target) for n in waiting]) if waiting else compiled

    def _compile_cut_at(self, gm: fx.GraphModule, example_inputs, calls: list[fx.Node], cut: set[fx.Node]):
        """(callable, pieces): `gm` compiled, cut at the `cut` site calls, the other sites' state its inputs."""
        cut_names = {n.name for n in cut}
        traced_names = {n.name for n in calls} - cut_names
        gm, state = state_as_inputs(gm, [n for n in gm.graph.nodes if n.name in traced_names])
        cut = {n for n in gm.graph.nodes if n.name in cut_names}  # gm may be a copy
        compiled, pieces = _compile_split(gm, [*example_inputs, *state.tensors()], cut, self.inner)
        return state.appended(compiled), pieces

    def _new_module(self, spec) -> nn.Module | str:
        reason = self._site_class.unsupported_reason(spec, **self.options)
        if reason:
            return f"method {self.method!r}: {reason}"
        module = self._site_class(spec, **self.options)
        module.prefill_queries = self.prefill_queries
        return module

    def _make_site(self, site: AttentionSite) -> nn.Module | str:
        """Unbound: a fresh module per graph (the methods allowed here keep no state)."""
        module = self._new_module(site_spec(site))
        if isinstance(module, nn.Module):
            # dynamo bakes the mode into the graph (dropout's training flag): the site follows the graph
            module.train(site.dropout > 0.0)
        return module

    def _foreign_graph(self, example_inputs) -> str | None:
        """Why a graph is not the bound model's (its sites are then left as they are), or None.
        Dynamo lifts the parameters and buffers a graph reads into its inputs, as the very tensors."""
        if self.model is None:
            return None
        own = {id(t) for t in (*self.model.parameters(), *self.model.buffers())}
        if not own or any(id(x) in own for x in example_inputs):
            return None
        return (f"the graph reads no parameter or buffer of the bound {type(self.model).__name__}: it is another "
                "model's; bind a backend to each model compiled")

    def _bound_site(self, site: AttentionSite) -> nn.Module | str:
        """Bound to a model: the module attached to the model for this site, created and attached on
        first sight (`<owning module>.attnpass`, as sparsify does), reused by every later graph
        that computes the same attention."""
        model = self.model
        try:
            owner = model.get_submodule(site.module_path) if site.module_path else model
        except AttributeError:
            owner = None
        owner_class = type(owner).__name__ if owner is not None else None
        if owner is None or (site.module_type and owner_class != site.module_type):
            # e.g. a submodule compiled on its own: its paths are not the bound model's
            return (f"the site's module path {site.module_path!r} ({site.module_type}) is not that module in the bound "
                    f"{type(model).__name__}; compile the bound model or its forward")
        existing = _attached_to(owner, site.name)
        if existing is None:
            spec = site_spec(site)
            if one_query_over_keys(site):
                # sized from this call, the module's state would fit one query (routing: one cluster)
                return ("a decode step before any prompt reached the backend: left as the model computes it (exact "
                        "dense attention over the cache); the site's module is made from the first prompt's graph")
            module = self._new_module(spec)
            if isinstance(module, nn.Module):
                module.train(model.training)  # then it follows model.train() / model.eval()
                _attach(model, site, module)
            return module
        if existing.method_name != self.method:
            return (f"the model already holds a {existing.method_name!r} module for this site; a model is bound to one "
                    "method (use a fresh copy of the model for another)")
        try:
            # the rule sparsify applies to a new call signature (a decode step's one query over the
            # cache is stated as the prompt's causal attention by site_spec)
            _check_same_attention([site], {site.name: existing})
        except SignatureNotServed as e:
            why = f"its attention differs from the one its module was built for ({e}); left unchanged"
            warnings.warn(f"attnpass backend: graph {len(self.report.graphs) - 1}: {site.name}: {why}", stacklevel=3)
            return why
        return existing


def _attached_to(owner: nn.Module, site_name: str) -> SiteAttention | None:
    """The site module already attached to `owner` for the site named `site_name` (its spec's name:
    the owner's path and the site's order within it), if any."""
    for child in owner.children():
        if isinstance(child, SiteAttention) and child.spec.name == site_name:
            return child
    return None


def _attached_path(model: nn.Module, site: AttentionSite, module: nn.Module) -> str:
    owner = model.get_submodule(site.module_path) if site.module_path else model
    attr = next(name for name, child in owner.named_children() if child is module)
    return f"{site.module_path}.{attr}" if site.module_path else attr


def backend(method: str = "combiner", *, inner: str = "inductor", model: nn.Module | None = None,
            **options) -> AttnpassBackend:
    """A configured backend: `torch.compile(model, backend=attnpass.backend(method="dense"))`.

    `model`: the model being compiled, to which the backend is bound. Each site's module is then
    created once, attached to `model` as `<owning module>.attnpass` (as `sparsify` attaches it), and
    reused by every later graph (recompilations, other lengths, the decode graph of generation), so
    the method's state is in `model.state_dict()`. Every method works bound; unbound, only the
    stateless "combiner" (default) and "dense" (routing, SBM, Sparsefinder raise a ValueError
    saying to pass `model=`). For generation: `model.forward = torch.compile(model.forward,
    backend=attnpass.backend(method="routing", model=model))`, then `model.generate(...)`.
    `inner`: what compiles the graph between the sites — "inductor" (default), "aot_eager" or
    "eager" (for debugging and fast tests). `options` are the method's (see `attnpass.METHODS`),
    and for every method `prefill_queries` (as in `sparsify`: which calls over a KV cache are
    decode steps; default: the cost model decides).
    The returned object's `.report` lists every compiled graph with its rewritten and skipped sites.
    """
    return AttnpassBackend(method, inner, model, **options)


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
    caches are reset first so that the report covers a fresh compilation. A method with learned
    state (routing, SBM, Sparsefinder) is applied by a backend bound to a copy of `model` (see
    `backend`'s `model=`), so `model` itself is not changed.

    It also captures the model with torch.export (as `find_attention` does) and lists, under
    `not_reached`, the attention sites no graph handed to the backend contained: code dynamo ran
    outside any compiled graph (a `torch.compiler.disable`d module, a graph break dynamo does not
    resume from), which the backend cannot see and so leaves dense without a word of its own. When
    torch.export cannot capture the model either (e.g. nn.TransformerEncoder checking a mask with
    `.item()`), `notes` says so.
    """
    args, kwargs = check_call_inputs(model, args, kwargs)
    # a method with state is bound to a copy: its modules are attached there, not to `model`
    bound = copy.deepcopy(model) if method_class(method).has_learned_state else None
    compiler = AttnpassBackend(method, "eager", bound, **options)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(bound if bound is not None else model, backend=compiler)(*args, **kwargs)
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


# -- output layout -------------------------------------------------------------------------------

def _contiguous_outputs(gm: fx.GraphModule) -> list[int]:
    """The graph outputs dynamo traced as contiguous tensors (read from size and stride hints: no
    guard is added)."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    values = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    found = []
    for i, node in enumerate(values):
        val = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
        if isinstance(val, torch.Tensor) and _hinted_contiguous(val):
            found.append(i)
    return found


def _hinted_contiguous(t: torch.Tensor) -> bool:
    def hint(x):
        return int(x.node.hint) if isinstance(x, torch.SymInt) else int(x)

    try:
        sizes, strides = [hint(d) for d in t.shape], [hint(d) for d in t.stride()]
    except (TypeError, AttributeError):  # an unbacked size has no hint
        return False
    expected = 1
    for size, stride in reversed(list(zip(sizes, strides))):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _with_traced_contiguity(compiled, contiguous: list[int]):
    """Give back outputs dynamo traced as contiguous in that layout. Inductor may return another one
    (a KV cache's keys in the projection's (B, L, H, D) order), and a later graph taking them as
    input would be recompiled for the new strides: generation's first decode step reads the
    prefill's keys, the next ones the decode steps' own."""
    if not contiguous:
        return compiled

    def run(*args):
        outs = compiled(*args)
        if all(outs[i].is_contiguous() for i in contiguous):
            return outs
        fixed = list(outs)
        for i in contiguous:
            fixed[i] = fixed[i].contiguous()
        return type(outs)(fixed) if isinstance(outs, tuple) else fixed

    return run


# -- split at the sites and compile the pieces ---------------------------------------------------

def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A graph module with its own graph (splitting and state inputs rewrite it), sharing the submodules."""
    return fx.GraphModule(gm, copy.deepcopy(gm.graph))


class _UntilInitialised:
    """`eager` (the rewritten graph run as Python, its site modules called as modules) while any of
    `modules` still waits for the first call that initialises its state, then `compiled`."""

    def __init__(self, eager, compiled, modules: list[nn.Module]):
        self.eager, self.compiled, self.modules = eager, compiled, modules

    def __call__(self, *args):
        if self.modules:
            self.modules = [m for m in self.modules if m.needs_first_call()]
            if self.modules:
                return self.eager(*args)
        return self.compiled(*args)


def _sites_to_cut(gm: fx.GraphModule, example_inputs, calls: list[fx.Node]) -> set[fx.Node]:
    """The site calls the graph is cut at: those whose module cannot trace the call it will get
    with symbolic lengths (`SiteAttention.traces_symbolically`, asked on the call's fake inputs)."""
    if not calls:
        return set()
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    fakes = [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    inputs = _SiteInputs(gm, {n.target for n in calls}, fake_mode).collect(fakes)
    traced = {n for n in calls if gm.get_submodule(n.target).traces_symbolically(*inputs[n.target][0],
                                                                                 **inputs[n.target][1])}
    return set(calls) - traced


def _site_output(q: torch.Tensor, v: torch.Tensor, args) -> torch.Tensor:
    """A fake of a site call's output by the SiteAttention contract: (B, Hq, Lq, Dv) in q's dtype,
    differentiable when the call's inputs are (the next piece must be compiled for that)."""
    grad = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    return q.new_empty((*q.shape[:-1], v.shape[-1])).requires_grad_(grad)


class _SiteInputs(fx.Interpreter):
    """Walk the rewritten graph with fake values and record each site call's inputs, without running
    the site modules (a module that cannot trace the call would put guards on the lengths)."""

    def __init__(self, gm: fx.GraphModule, targets: set[str], fake_mode):
        super().__init__(gm)
        self.targets, self.fake_mode, self.inputs = targets, fake_mode, {}

    def collect(self, fakes) -> dict[str, tuple[tuple, dict]]:
        with self.fake_mode:
            self.run(*fakes)
        return self.inputs

    def call_module(self, target, args, kwargs):
        if target not in self.targets:
            return super().call_module(target, args, kwargs)
        self.inputs[target] = (args, kwargs)
        return _site_output(args[0], args[2], [*args, *kwargs.values()])


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
    """Compile `gm` with the site calls `site_calls` as eager cuts (the other sites are compiled with
    the graph); returns (callable, number of compiled pieces)."""
    with _scalar_outputs_allowed(torch._guards.detect_fake_mode(example_inputs)):
        return _compile_split_pieces(gm, example_inputs, site_calls, _inner_compiler(inner))


@contextlib.contextmanager
def _scalar_outputs_allowed(fake_mode):
    """A traced site may read an int from a tensor: Combiner's default block, ~sqrt(L), is an unbacked
    int (`cost_model.default_block`), which torch.export and AOT autograd keep symbolic. Dynamo's fake
    mode refuses `.item()` unless `capture_scalar_outputs`, a setting that would also change how dynamo
    traces the user's own code; so it is allowed on the fake mode only while the backend compiles."""
    if fake_mode is None:
        yield
        return
    before = fake_mode.allow_scalar_outputs
    fake_mode.allow_scalar_outputs = True
    try:
        yield
    finally:
        fake_mode.allow_scalar_outputs = before


def _compile_split_pieces(gm: fx.GraphModule, example_inputs, site_calls: set, compile_piece):
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
    pieces = _SplitCompiler(split, compile_piece, fake_mode, {n.target for n in site_calls}).compile(fakes)
    return split, pieces


class _SplitCompiler(fx.Interpreter):
    """Walk the split graph with fake values: compile each piece between sites with the inputs it
    will see (symbolic shapes included) and leave the site calls to run eagerly."""

    def __init__(self, split: fx.GraphModule, compile_piece, fake_mode, cut_targets: set[str]):
        super().__init__(split)
        self.compile_piece = compile_piece
        self.fake_mode = fake_mode
        self.cut_targets = cut_targets
        self.pieces = 0

    def compile(self, fakes) -> int:
        self.run(*fakes)
        self.module.recompile()
        return self.pieces

    def call_module(self, target, args, kwargs):
        submod = self.fetch_attr(target)
        sites = [n for n in submod.graph.nodes if n.op == "call_module" and n.target in self.cut_targets]
        if sites:
            self.module.add_submodule(target, _EagerSite(submod))
            env = dict(zip((n for n in submod.graph.nodes if n.op == "placeholder"), args))
            with self.fake_mode:
                return (_site_output(env[sites[0].args[0]], env[sites[0].args[2]], args),)
        compiled = self.compile_piece(submod, list(args))
        self.pieces += 1
        with self.fake_mode:
            out = submod(*args)  # the uncompiled piece on fake values: the next piece's inputs
        self.module.add_submodule(target, _Piece(compiled))
        return out
