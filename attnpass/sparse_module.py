"""`SparseModel`: the module `sparsify` returns.

It owns a copy of the user's model (the original is never touched) and shares that copy's
parameter, buffer and submodule tables, so its `state_dict()` has the original's keys plus each
site's method state (under `<owning module>.attnpass`), and `.to()`, `.train()`, optimisers and
`load_state_dict` behave as for the original. Calls run a captured, rewritten graph
(`capture.Program`) with the current parameters.

One graph per call signature: export bakes into the graph the mode (dropout, every
`if self.training` branch) and every non-tensor argument (`use_cache=True`, `labels=None` or a
tensor, `output_hidden_states=True`, ...). So the model keeps one program per signature (mode,
argument names, which are None, the values of non-tensor arguments, each tensor's dtype and which
of its dims are 0 or 1); a call with a signature not seen yet is captured on first use (with a
`CaptureNotice` warning, once per signature) and rewritten with the *same* site modules, which
must compute the same attention as before (else the call is refused). `prepare(...)` captures
ahead of time. Arguments a graph cannot serve are refused with an error, never dropped.

A transformers causal LM's default call returns its `DynamicCache` (the pytree registration is
transformers' own, see `capture.register_cache_pytrees`); a cache passed in is updated in place
and returned, as by the original. A call continuing over a cache (decode steps, or a new chunk of a
multi-turn prompt) is the same attention as the prompt's (causal, bottom-right over the cached
keys) and is served by the same site modules. `generate()` runs transformers' generation loop on
these graphs.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import enum
import functools
import inspect
import warnings

import torch
import torch.utils._pytree as pytree
from torch import nn

from attnpass.frontend.capture import Program, register_cache_pytrees
from attnpass.frontend.detect import capture_sites
from attnpass.kv_cache import (adopt_caches, drop_empty_concatenations, lent_to_graph, plain_cache_for_sliding_windows,
                               refuse_cropped_sliding_caches)
from attnpass.frontend.rewrite import remove_dead_code, rewrite_site
from attnpass.frontend.site import AttentionReport, SkippedSite
from attnpass.short_call import shortened_call


class CaptureNotice(UserWarning):
    """A sparsified model is capturing its graph for a call signature it has not seen (a few seconds).

    Silence with `warnings.filterwarnings("ignore", category=attnpass.sparse_module.CaptureNotice)`,
    or avoid by calling `SparseModel.prepare(...)` with that signature first.
    """


# Bound methods of the source model that would run the ORIGINAL (dense) forward if forwarded to it.
_DENSE_ENTRY_POINTS = {
    "get_compiled_call": "get_compiled_call() on a sparsified model is not supported: it would compile the original "
                         "dense model (torch.compile the sparsified model itself instead)",
}

# argument name -> why a sparsified model refuses a truthy value for it
_REFUSED = {
    "output_attentions": "the sparsified attention does not compute the dense attention probabilities it returns",
}

_NOT_FOR_CAPTURE = ("max_new_tokens", "min_new_tokens", "max_length", "min_length", "streamer")

_CONSTANT_TYPES = (bool, int, float, str, torch.dtype, torch.device, enum.Enum)


def _leaf_key(x):
    if isinstance(x, torch.Tensor):
        # export specialises a dim of size 0 or 1 (Dim.AUTO keeps only sizes >= 2 symbolic)
        return (torch.Tensor, x.dtype, tuple(d if type(d) is int and d < 2 else 2 for d in x.shape))
    if isinstance(x, _CONSTANT_TYPES):
        return (type(x), x)
    return None


def _sized(key: tuple, flat: list) -> tuple:
    """A signature that also holds the call's tensor sizes: the key of a graph that holds only at the
    sizes it was captured at (`Program.specialised`)."""
    return (*key[:3], tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in flat))


def call_signature(training: bool, args, kwargs) -> tuple[tuple, list]:
    """The key a call's program is stored under, and the call's leaves (kwargs in sorted order).

    Key: (mode, the pytree structure of (args, kwargs sorted by name) -- argument names, nesting,
    which are None, a cache's layout --, for each leaf: a tensor's dtype and which of its dims are
    0 or 1 (export specialises those), or a constant's type and value).
    """
    flat, spec = pytree.tree_flatten((tuple(args), dict(sorted(kwargs.items()))))
    leaves = tuple(_leaf_key(x) for x in flat)
    if None in leaves:
        _refuse_leaf(args, kwargs)
    return (bool(training), spec, leaves), flat


def _refuse_leaf(args, kwargs):
    for name, value in [(f"positional argument {i}", a) for i, a in enumerate(args)] + \
                       [(f"argument {k!r}", v) for k, v in kwargs.items()]:
        for leaf in pytree.tree_leaves(value):
            if _leaf_key(leaf) is None:
                raise TypeError(
                    f"{name}: a {type(leaf).__name__} cannot be passed to a sparsified model (its graph takes tensors, "
                    "None, bool/int/float/str constants, tuples/lists/dicts of them and transformers' DynamicCache)")
    raise TypeError("a call argument cannot be passed to a sparsified model")


def _describe(key, base) -> str:
    """The arguments of signature `key` that differ from signature `base`, for the capture notice."""
    def named(k):  # argument name -> (its structure, its leaves' keys)
        args_spec, kwargs_spec = k[1].children()
        names = [f"args[{i}]" for i in range(args_spec.num_children)] + list(kwargs_spec.context)
        out, start = {}, 0
        for name, sub in zip(names, args_spec.children() + kwargs_spec.children()):
            out[name] = (sub, k[2][start:start + sub.num_leaves])
            start += sub.num_leaves
        return out

    def show(name, entry):
        sub, leaves = entry
        if sub.type is type(None):
            return f"{name}=None"
        if sub.is_leaf() and leaves[0][0] is not torch.Tensor:  # a constant, not a tensor
            return f"{name}={leaves[0][1]!r}"
        if sub.is_leaf() and any(d < 2 for d in leaves[0][2]):  # export specialises dims of size 0/1
            return f"{name} of shape ({', '.join(str(d) if d < 2 else '*' for d in leaves[0][2])})"
        return name

    now, before = named(key), (named(base) if base is not None else {})
    parts = [show(n, e) for n, e in now.items() if n not in before or before[n] != e]
    parts += [f"without {n}" for n in before if n not in now]
    if base is not None and key[0] != base[0]:
        parts.insert(0, "train mode" if key[0] else "eval mode")
    return ", ".join(parts) or "the same arguments"


class SparseModel(nn.Module):
    def __init__(self, source: nn.Module, method: str, site_modules: dict[str, nn.Module], declined: dict[str, str],
                 programs: dict[bool, Program], report: AttentionReport):
        super().__init__()
        object.__setattr__(self, "_source", source)
        # share the copy's tables: same keys in state_dict(), same objects for .to()/.train()
        object.__setattr__(self, "_parameters", source._parameters)
        object.__setattr__(self, "_buffers", source._buffers)
        object.__setattr__(self, "_non_persistent_buffers_set", source._non_persistent_buffers_set)
        object.__setattr__(self, "_modules", source._modules)
        object.__setattr__(self, "_programs", {})       # mode -> the first program captured in that mode
        object.__setattr__(self, "_signatures", {})     # call signature -> program
        object.__setattr__(self, "_first_signature", None)
        object.__setattr__(self, "_refused", {})        # call signature -> why it cannot be served
        object.__setattr__(self, "_specialised", {})    # call signature -> why its graphs hold only at one size
        object.__setattr__(self, "_generation_captured", set())  # generate() calls whose graphs are captured
        object.__setattr__(self, "_site_modules", site_modules)
        object.__setattr__(self, "_declined", declined)  # site name -> why the method left it unchanged
        self.method = method
        self.report = report
        self.training = source.training
        for program in programs.values():
            self._register(program)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # plain attributes of the original model (e.g. a Hugging Face `config`)
            source = self.__dict__.get("_source")
            if source is not None and not name.startswith("_"):
                value = getattr(source, name)
                if name in _DENSE_ENTRY_POINTS and inspect.ismethod(value):
                    return _refused_method(name, _DENSE_ENTRY_POINTS[name])
                return value
            raise

    @property
    def sites(self):
        return self.report.sites

    def site_modules(self) -> dict[str, nn.Module]:
        """Site name -> the module computing that site's attention."""
        return dict(self._site_modules)

    def forward(self, *args, **kwargs):
        refuse_cropped_sliding_caches(kwargs)
        key, flat = self._signature(args, kwargs)
        program = self._signatures.get(key)
        if program is None:
            program = self._compatible(key, flat)
        if program is None and key in self._specialised:
            key = _sized(key, flat)  # that call's graphs hold only at their own sizes
            program = self._signatures.get(key)
            if program is None:
                warnings.warn(
                    f"attnpass: first call of this sparsified {type(self._source).__name__} at these sizes: its graph "
                    f"holds only at the sizes it was captured at ({self._specialised[key[:3]]}); capturing it for "
                    "these sizes (takes a few seconds; later calls at these sizes reuse it)",
                    CaptureNotice, stacklevel=4)
        elif program is None and key not in self._refused:
            warnings.warn(
                f"attnpass: first call of this sparsified {type(self._source).__name__} with "
                f"{_describe(key, self._first_signature)}: capturing and rewriting its graph for this call "
                "signature (takes a few seconds; later calls reuse it; SparseModel.prepare(...) captures ahead of time)",
                CaptureNotice, stacklevel=4)  # the caller of model(...)
        if program is None:
            program = self._capture_on_short_call(key, args, kwargs, flat)
        if program is None:
            if len(key) == 3 and key in self._specialised:  # the short call's graph holds only at its sizes
                key = _sized(key, flat)
            program = self._signatures.get(key) or self._capture(key, args, kwargs)
        if not program._sorted_leaves:
            flat = program._flatten(args, kwargs)
        with lent_to_graph(kwargs, program._returns_cache):
            out = program.run_flat(self, flat)
        return adopt_caches(kwargs, out)

    def generate(self, *args, **kwargs):
        """transformers' `generate()` (same arguments: `max_new_tokens`, `streamer`, `output_scores`,
        `return_dict_in_generate`, ...), with every forward call of the generation loop served by
        this model's graphs: the prompt (prefill) through the method's sparse sites, each decode step
        as exact dense attention over the KV cache (`SiteAttention.is_decode_step`), the cache reused
        from step to step. A model without generation raises transformers' own error."""
        source = self._source
        generate = source.generate  # the original's attribute error for a model that cannot generate
        plain = plain_cache_for_sliding_windows(source, kwargs)
        if plain is not None:
            kwargs = {**kwargs, "past_key_values": plain}
        with self._forward_served_here():
            self._capture_generation_graphs(generate, args, kwargs)
            return generate(*args, **kwargs)

    def _capture_generation_graphs(self, generate, args, kwargs) -> None:
        """Before a long prompt's first generation, capture its prefill and decode graphs on a short
        one (`attnpass.short_call`: the prompt's last SHORT_CALL_TOKENS tokens, two new tokens): capture and its
        checks run the model several times at the example's length, which at a long prompt costs
        minutes; the graphs then serve the long prompt (a graph that holds only at its capture sizes
        is captured again at the call's, as for any call). Skipped in train mode (a stateful method
        would take a training step) and when this call's graphs exist; the random state is restored
        (sampling draws as without it)."""
        if self.training:
            return
        short = shortened_call(args, {k: v for k, v in kwargs.items() if k not in _NOT_FOR_CAPTURE})
        names = tuple(sorted(k for k, v in kwargs.items() if isinstance(v, torch.Tensor)))
        if short is None or names in self._generation_captured:
            return
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore", CaptureNotice)
            generate(*short[0], **short[1], max_new_tokens=2, min_new_tokens=2)
        self._generation_captured.add(names)

    @contextlib.contextmanager
    def _forward_served_here(self):
        """Route the owned copy's `forward` to this model while transformers' generation loop runs
        (it calls `self(**model_inputs)` on the model whose `generate` it is). The copy's own forward,
        signature included (generate reads it to choose its arguments), is restored afterwards; a
        capture during the loop sees the original forward (`_original_forward`)."""
        source = self._source
        if "forward" in source.__dict__:
            raise RuntimeError("generate() is already running on this sparsified model (or its forward was replaced)")
        original = source.forward

        @functools.wraps(original)
        def forward(*args, **kwargs):
            return self(*args, **kwargs)

        source.__dict__["forward"] = forward
        try:
            yield
        finally:
            del source.__dict__["forward"]

    @contextlib.contextmanager
    def _original_forward(self):
        served = self._source.__dict__.pop("forward", None)
        try:
            yield
        finally:
            if served is not None:
                self._source.__dict__["forward"] = served

    def prepare(self, *args, **kwargs) -> SparseModel:
        """Capture the graph for calls like `self(*args, **kwargs)` in the current mode, without running it.

        Calls with a new signature (argument names, which are None, non-tensor values, mode) are
        otherwise captured on first use, which takes a few seconds. Returns `self`.
        """
        key, flat = self._signature(args, kwargs)
        if key not in self._signatures and self._compatible(key, flat) is None:
            self._capture(key, args, kwargs)
        return self

    def _compatible(self, key, flat) -> Program | None:
        """A program captured for the same call whose graph also takes this call's sizes of 0/1 (the key
        tells them apart, as export usually specialises them, but e.g. a batch-1 example may have been
        captured with a symbolic batch); remembered under this call's key."""
        for other, program in list(self._signatures.items()):
            same_call = other[:2] == key[:2] and len(other[2]) == len(key[2]) and all(
                a[:2] == b[:2] for a, b in zip(other[2], key[2]))  # all but the sizes of 0/1
            if same_call and program._sorted_leaves and not program.specialised and program.accepts(flat):
                self._signatures[key] = program
                return program
        return None

    def _signature(self, args, kwargs):
        for name, why in _REFUSED.items():
            if kwargs.get(name) is not None and kwargs.get(name) is not False:
                raise ValueError(f"{name}={kwargs[name]!r} is not supported on a sparsified model: {why}")
        register_cache_pytrees()  # before flattening a cache argument
        return call_signature(self.training, args, kwargs)

    def _capture_on_short_call(self, key, args, kwargs, flat) -> Program | None:
        """The program for a long token-sequence call, captured on the call's last tokens
        (`attnpass.short_call`) when its graph also takes the long call; None otherwise (or in train
        mode, where capturing runs a stateful method's training step)."""
        if self.training or len(key) != 3 or key in self._specialised or key in self._refused:
            return None
        short = shortened_call(args, kwargs)
        if short is None:
            return None
        program = self._capture(key, *short)
        if program.signature == key and program.accepts(flat, captured=self._signature(*short)[1]):
            return program
        if self._signatures.get(key) is program:  # it does not take the long call: capture that one
            del self._signatures[key]
        return None

    def _capture(self, key, args, kwargs) -> Program:
        refused = self._refused.get(key)
        if refused is None:
            source = self._source
            source.training = key[0]
            try:
                with self._original_forward():
                    program = capture_and_rewrite(source, args, kwargs, self._site_modules, self._declined)
            except SignatureNotServed as e:
                refused = (f"a call with {_describe(key, self._first_signature)} cannot be served by this sparsified "
                           f"model: its attention differs from the one it was sparsified for ({e}); sparsify with an "
                           "example call of this kind instead")
                self._refused[key] = refused
            else:
                self._register(program)
                return program
        raise ValueError(refused)

    def _register(self, program: Program) -> None:
        key = program.signature
        if key is None:
            raise ValueError("SparseModel needs programs made by capture_and_rewrite (they carry their call signature)")
        if program.specialised:
            self._specialised[key[:3]] = program.specialised
        # the leaves of the sorted call are in the program's order when it was captured with sorted kwargs
        program._sorted_leaves = program.in_spec == key[1]
        self._signatures[key] = program
        self._programs.setdefault(key[0], program)
        if self._first_signature is None:
            object.__setattr__(self, "_first_signature", key)

    def _capture_mode(self, training: bool, args, kwargs) -> Program:
        """Capture (if not yet) the program for `self(*args, **kwargs)` in mode `training`."""
        key, _ = call_signature(training, args, kwargs)
        program = self._signatures.get(key)
        return program if program is not None else self._capture(key, args, kwargs)

    def __deepcopy__(self, memo):
        """An independent copy: the model with its site modules is copied; the captured graphs are
        not (they hold fake tensors, which cannot be copied) and are captured again on the copy's
        first call with each signature, rewritten with the copied site modules."""
        source = copy.deepcopy(self._source, memo)
        site_modules = copy.deepcopy(self._site_modules, memo)  # the same memo: the copies attached to source
        clone = SparseModel(source, self.method, site_modules, dict(self._declined), {}, self.report)
        object.__setattr__(clone, "_first_signature", self._first_signature)
        clone.training = self.training
        return clone

    def extra_repr(self) -> str:
        return f"method={self.method!r}, sites={len(self._site_modules)}"


def _refused_method(name: str, why: str):
    def refused(*args, **kwargs):
        raise NotImplementedError(why)

    refused.__name__ = refused.__qualname__ = name
    refused.__doc__ = why
    return refused


class SignatureNotServed(ValueError):
    """A call whose attention differs from the one the site modules were built for (e.g. a call
    continuing from a cache: causal bottom-right over cached keys, where the modules were built for
    a prompt's causal self-attention)."""


def _check_same_attention(sites, site_modules: dict[str, nn.Module]) -> None:
    """Every site of a new capture must compute the attention its (shared) module was built for."""
    from attnpass.api import site_spec  # api imports this module

    for site in sites:
        module = site_modules.get(site.name)
        built = getattr(module, "spec", None)
        if built is None or not dataclasses.is_dataclass(built):
            continue
        now = site_spec(site)
        differ = [f.name for f in dataclasses.fields(built)
                  if f.name not in ("name", "example_len_q", "example_len_k")
                  and getattr(now, f.name, None) != getattr(built, f.name)]
        if set(differ) <= {"window", "has_mask"} and built.window and now.has_mask and not now.window:
            continue  # served on the dense path with the call's own mask (SiteAttention.general_call_at_band_site)
        if differ:
            what = ", ".join(f"{n}={getattr(now, n, None)!r} (built for {getattr(built, n)!r})" for n in differ)
            raise SignatureNotServed(f"at {site.name}: {what}")


@contextlib.contextmanager
def _explicit_signature(model: nn.Module, args, kwargs):
    """Give `model.forward` an explicit signature for the capture when the call passes keywords
    that land in its `**kwargs` (transformers' `output_hidden_states`, `past_key_values`, ...):
    torch.export cannot match dynamic shapes to a `**kwargs` bundle. The model, its parameter
    names and module paths are unchanged; the patch is removed after the capture."""
    P = inspect.Parameter
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    named = {n for n, p in params.items() if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)}
    positional = [n for n, p in params.items() if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    var_keyword = any(p.kind is P.VAR_KEYWORD for p in params.values())
    if not var_keyword or set(kwargs) <= named or len(positional) < len(args):
        yield
        return
    original = model.forward
    had_own = "forward" in model.__dict__

    def forward(*a, **kw):
        return original(*a, **kw)

    forward.__signature__ = inspect.Signature(
        [P(n, P.POSITIONAL_OR_KEYWORD) for n in positional[:len(args)]]
        + [P(k, P.POSITIONAL_OR_KEYWORD, default=None) for k in kwargs if k not in positional[:len(args)]])
    model.__dict__["forward"] = forward
    try:
        yield
    finally:
        if had_own:
            model.__dict__["forward"] = original
        else:
            del model.__dict__["forward"]


def capture_and_rewrite(source: nn.Module, args, kwargs, site_modules: dict[str, nn.Module],
                        declined: dict[str, str], make_site=None) -> Program:
    """Capture `source`, find its sites, and rewrite each to its module.

    With `make_site(site) -> module | reason`, modules are created (a string is the reason the
    method declines the site, which then stays unchanged); without it (another mode or call
    signature), every site found must already have a module in `site_modules` or a reason in
    `declined`. Keyword arguments are captured in sorted order (the order `SparseModel` flattens
    calls in).
    """
    kwargs = dict(sorted(kwargs.items()))
    with _explicit_signature(source, args, kwargs):
        program = capture_sites(source, args, kwargs, check_sizes=True)
    program.signature, flat = call_signature(source.training, args, kwargs)
    if program.specialised:
        program.signature = _sized(program.signature, flat)
    if make_site is None:
        names = {s.name for s in program.sites}
        if names != set(site_modules) | set(declined):
            raise RuntimeError(
                f"the model's attention sites differ for this call ({'train' if source.training else 'eval'} mode, "
                f"arguments {sorted(kwargs) or len(args)}): now {sorted(names)}, at the first capture "
                f"{sorted(site_modules) + sorted(declined)}; attnpass cannot share their state between the two graphs"
            )
        _check_same_attention(program.sites, site_modules)
    else:
        for site in program.sites:
            made = make_site(site)
            if isinstance(made, str):
                declined[site.name] = made
            else:
                site_modules[site.name] = made
    kept = []
    for site in program.sites:
        if site.name in declined:
            program.skipped.append(SkippedSite(site.name, site.module_path, site.pattern, declined[site.name]))
            continue
        target = f"attnpass_site_{len(kept)}"
        program.gm.add_submodule(target, site_modules[site.name])
        rewrite_site(program.gm, site, target)
        kept.append(site)
    program.sites = kept
    drop_empty_concatenations(program.gm)  # a KV cache passed in is not copied at every call
    remove_dead_code(program.gm)
    return program
