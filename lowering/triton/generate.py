"""Render a kernel template for one specialisation, write it to the cache and import it once.

A specialisation is a small dict (head dims, block sizes, dtype, normaliser, which masks and
extras are present). Rendering keeps only the code the specialisation needs: templates are
Triton source with three line directives,

    #if <python expression over the spec>   /  #else  /  #endif     (nestable)
    #> snippet_name                          (insert a named snippet at this indentation)

and ``{{NAME}}`` substitutions. The rendered text is what runs, so ``kernel_source`` shows
exactly the kernel a site gets. Generated modules are written to a cache directory
(``ATTNPASS_CACHE_DIR``, else ``~/.cache/attnpass/triton``) under a hash of their source, because
``triton.jit`` reads a kernel's source from its file; an in-process dict makes each specialisation
render and import once.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
import threading
from pathlib import Path

from attnpass.lowering.triton import templates

__all__ = ["KINDS", "cache_dir", "generated_kernels", "kernel_module", "kernel_source", "normalize_spec"]

# kind -> (template text, default spec). Every key of a spec must appear here.
KINDS = {
    "grouped_fwd": (templates.GROUPED_FWD, templates.GROUPED_DEFAULTS),
    "grouped_bwd": (templates.GROUPED_BWD, templates.GROUPED_BWD_DEFAULTS),
    "edge_fwd": (templates.EDGE_FWD, templates.EDGE_DEFAULTS),
    "edge_bwd": (templates.EDGE_BWD, templates.EDGE_BWD_DEFAULTS),
}

DTYPES = ("float16", "bfloat16", "float32", "float64")
NORMALIZERS = ("softmax", "entmax15")

_lock = threading.Lock()
_sources: dict[tuple, str] = {}
_modules: dict[tuple, object] = {}
_paths: dict[tuple, Path] = {}


def cache_dir() -> Path:
    """Where generated kernel files are written (``ATTNPASS_CACHE_DIR`` overrides)."""
    root = os.environ.get("ATTNPASS_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "attnpass"
    return base / "triton"


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, int(n) - 1).bit_length())


def normalize_spec(kind: str, spec: dict) -> tuple:
    """Validated, complete, hashable spec: defaults filled in, derived constants added."""
    if kind not in KINDS:
        raise ValueError(f"kernel_source: unknown kind {kind!r}; expected one of {sorted(KINDS)}")
    defaults = KINDS[kind][1]
    unknown = set(spec) - set(defaults)
    if unknown:
        raise ValueError(f"kernel_source({kind!r}): unknown spec keys {sorted(unknown)}; "
                         f"known: {sorted(defaults)}")
    full = {**defaults, **spec}
    if full["dtype"] not in DTYPES:
        raise ValueError(f"kernel_source({kind!r}): dtype must be one of {DTYPES}, got {full['dtype']!r}")
    if full["normalizer"] not in NORMALIZERS:
        raise ValueError(f"kernel_source({kind!r}): normalizer must be one of {NORMALIZERS}, "
                         f"got {full['normalizer']!r}")
    for name, value in full.items():
        if name.startswith("block_") and (value < 16 or value & (value - 1)):
            # tl.dot needs every tile dim >= 16, and tl.arange needs powers of two
            raise ValueError(f"kernel_source({kind!r}): {name} must be a power of two >= 16, got {value}")
    if full["d"] < 1 or full["dv"] < 1:
        raise ValueError(f"kernel_source({kind!r}): head dims must be >= 1, got d={full['d']}, dv={full['dv']}")
    return tuple(sorted(full.items()))


def _context(spec: tuple) -> dict:
    """Names a template can use: the spec in upper case plus derived constants."""
    s = {k.upper(): v for k, v in spec}
    s["FAMILY"] = "grouped" if "block_m" in dict(spec) else "edge"
    s["ROW"] = "[BLOCK_M]" if s["FAMILY"] == "grouped" else "[]"  # shape of a program's row statistics
    s["BLOCK_D"] = _pow2_at_least(s["D"])
    s["BLOCK_DV"] = _pow2_at_least(s["DV"])
    dtype = s["DTYPE"]
    s["ACC"] = "tl.float64" if dtype == "float64" else "tl.float32"
    # Matrix products: operands in float32 for every input dtype but float64. float32 inputs
    # multiply in IEEE float32 (TF32 would miss the 1e-4 tolerance). Half inputs use TF32 tensor
    # cores: a bf16/fp16 operand is exact in TF32 (10 mantissa bits), and the fp32 probabilities
    # keep 10 bits instead of bf16's 7. (Native bf16 operands would be ~2x faster on a GPU, but
    # Triton's interpreter multiplies bf16 tiles wrongly, so that variant could not be tested here.)
    s["MMA"] = s["ACC"]
    s["DOT_ARGS"] = {"float32": ', input_precision="ieee"', "float64": ""}.get(dtype, ', input_precision="tf32"')
    return s


_IF = re.compile(r"^(\s*)#if (.+)$")
_SNIPPET = re.compile(r"^(\s*)#> (\w+)\s*$")
_SUB = re.compile(r"\{\{(\w+)\}\}")


def _render(text: str, ctx: dict, snippets: dict, depth: int = 0) -> str:
    if depth > 8:
        raise RecursionError("kernel template: snippets nest too deeply")
    out, stack = [], []  # stack of (this branch active, parent active)
    active = True
    for line in text.splitlines():
        m_if = _IF.match(line)
        stripped = line.strip()
        if m_if:
            stack.append((active, bool(eval(m_if.group(2), {}, dict(ctx)))))  # noqa: S307 - our templates
            parent, cond = stack[-1]
            active = parent and cond
            continue
        if stripped == "#else":
            parent, cond = stack[-1]
            stack[-1] = (parent, not cond)
            active = parent and not cond
            continue
        if stripped == "#endif":
            active = stack.pop()[0]
            continue
        if not active:
            continue
        m_snip = _SNIPPET.match(line)
        if m_snip:
            indent, name = m_snip.groups()
            body = _render(snippets[name], ctx, snippets, depth + 1).strip("\n")
            out += [indent + b if b.strip() else "" for b in body.splitlines()]
            continue
        out.append(_SUB.sub(lambda m: str(ctx[m.group(1)]), line))
    if stack:
        raise SyntaxError("kernel template: unbalanced #if / #endif")
    return "\n".join(out) + "\n"


def kernel_source(kind: str, **spec) -> str:
    """The generated Triton source of one kernel specialisation (rendered once, then cached).

    ``kind`` is one of ``grouped_fwd``, ``grouped_bwd``, ``edge_fwd``, ``edge_bwd``; ``spec`` keys
    are those of the kind's defaults in ``templates.py`` (e.g. ``d=64, causal=True,
    normalizer="entmax15", dtype="bfloat16"``); missing keys take their defaults.
    """
    key = (kind, normalize_spec(kind, spec))
    with _lock:
        if key not in _sources:
            ctx = _context(key[1])
            header = "# Generated by attnpass.lowering.triton for {}: {}\n".format(
                kind, ", ".join(f"{k}={v!r}" for k, v in key[1]))
            _sources[key] = header + _render(KINDS[kind][0], ctx, templates.SNIPPETS)
        return _sources[key]


def kernel_module(kind: str, spec: dict):
    """The imported generated module (attributes: ``kernel``, ``CONSTEXPRS``) for a specialisation.

    Keyed also on whether Triton runs in interpreter mode: ``triton.jit`` decides at decoration
    time whether a function is compiled or interpreted.
    """
    import triton  # noqa: F401 - the generated module needs it; fail here with a clear error

    interpret = _interpreting()
    key = (kind, normalize_spec(kind, spec), interpret)
    with _lock:
        module = _modules.get(key)
    if module is not None:
        return module
    source = kernel_source(kind, **dict(key[1]))
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    path = cache_dir() / f"{kind}_{digest}.py"
    with _lock:
        if key in _modules:
            return _modules[key]
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != source:
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(source)
            os.replace(tmp, path)  # atomic: a concurrent process never imports a half-written file
        name = f"attnpass_triton_gen.{kind}_{digest}_{'interp' if interpret else 'jit'}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # inspect.getsource (used by triton.jit) looks modules up here
        module_spec.loader.exec_module(module)
        if interpret:
            _call_helpers_directly(module)
        _modules[key] = module
        _paths[key[:2]] = path
    return module


def _call_helpers_directly(module) -> None:
    """Interpreter mode only: bind the module's @triton.jit helpers (``_sum``, ``_mma``, ...) to
    their interpreter-rewritten Python functions.

    Triton's interpreter re-patches all of triton.language on every device-function call
    (``InterpretedFunction.__call__``), which costs more than the helper itself and about halves
    the speed of our kernels, whose inner loops call helpers. The kernel already runs under that
    patch, so the rewritten helper computes the same thing. Only the binding changes: the source
    (``kernel_source``) and what a GPU compiles are untouched.
    """
    from triton.runtime.interpreter import InterpretedFunction

    for name, value in list(vars(module).items()):
        if isinstance(value, InterpretedFunction) and name != "kernel":
            setattr(module, name, value.rewrite())


def generated_kernels() -> dict:
    """{(kind, spec): path of the generated file} for every kernel imported in this process."""
    with _lock:
        return dict(_paths)


def _interpreting() -> bool:
    from triton import knobs

    return bool(knobs.runtime.interpret)
