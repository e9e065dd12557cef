"""Which kernel specialisation a call gets: a spec (head dims, tiles, dtype, normaliser, which masks
and extras are present) checked and turned into the kernel's ``tl.constexpr`` arguments.

The kernels are plain Triton (`kernels.py`); Triton compiles one variant per distinct constexpr
values and caches it. The only thing kept here besides the spec is the imported kernels module per
interpreter mode: ``triton.jit`` decides at decoration time whether a function is compiled or
interpreted, so a process that switches ``TRITON_INTERPRET`` gets a module decorated each way.
"""
from __future__ import annotations

import functools
import importlib.util
import sys
import threading
from pathlib import Path

__all__ = ["DEFAULTS", "constexprs", "kernel", "normalize_spec", "pow2_at_least"]

_COMMON = dict(d=16, dv=16, block_n=16, dtype="float32", normalizer="softmax", causal=False, padding=False,
               bias=False, dropout=False, n_bisect=30, one_tile=False)
_GROUPED = dict(_COMMON, block_m=16, block_s=16, pair_mask=False, key_range=False, summary=False,
                summary_mask=False)
_EDGE = dict(_COMMON, edge_bias=False)

# kind -> default spec; every key of a spec must appear here
DEFAULTS = {
    "grouped_fwd": _GROUPED,
    "grouped_bwd": dict(_GROUPED, bias_grad=False, summary_grad=False, dstat=False),
    "edge_fwd": _EDGE,
    "edge_bwd": dict(_EDGE, bias_grad=False, edge_bias_grad=False, dstat=False),
}
DTYPES = ("float16", "bfloat16", "float32", "float64")
NORMALIZERS = ("softmax", "entmax15")
# spec flag -> the kernel's constexpr (the kernels name their pointer arguments BIAS, DSTAT)
_FLAG_NAMES = {"bias": "HAS_BIAS", "dstat": "HAS_DSTAT"}
_SPEC_ONLY = ("dtype", "normalizer")


def pow2_at_least(n: int, floor: int = 16) -> int:
    """The smallest power of two >= n and >= floor (a tile side tl.arange and tl.dot accept)."""
    return max(floor, 1 << max(0, int(n) - 1).bit_length())


def normalize_spec(kind: str, spec: dict) -> tuple:
    """Validated, complete, hashable spec: defaults filled in."""
    if kind not in DEFAULTS:
        raise ValueError(f"triton kernel: unknown kind {kind!r}; expected one of {sorted(DEFAULTS)}")
    defaults = DEFAULTS[kind]
    unknown = set(spec) - set(defaults)
    if unknown:
        raise ValueError(f"triton kernel {kind!r}: unknown spec keys {sorted(unknown)}; known: {sorted(defaults)}")
    full = {**defaults, **spec}
    if full["dtype"] not in DTYPES:
        raise ValueError(f"triton kernel {kind!r}: dtype must be one of {DTYPES}, got {full['dtype']!r}")
    if full["normalizer"] not in NORMALIZERS:
        raise ValueError(f"triton kernel {kind!r}: normalizer must be one of {NORMALIZERS}, "
                         f"got {full['normalizer']!r}")
    for name, value in full.items():
        if name.startswith("block_") and (value < 16 or value & (value - 1)):
            # tl.dot needs every tile dim >= 16, and tl.arange needs powers of two
            raise ValueError(f"triton kernel {kind!r}: {name} must be a power of two >= 16, got {value}")
    if full["d"] < 1 or full["dv"] < 1:
        raise ValueError(f"triton kernel {kind!r}: head dims must be >= 1, got d={full['d']}, dv={full['dv']}")
    return tuple(sorted(full.items()))


def constexprs(kind: str, **spec) -> dict:
    """The ``tl.constexpr`` arguments of kernel `kind` for a spec (missing keys take their defaults).

    e.g. ``constexprs("grouped_fwd", d=64, causal=True, normalizer="entmax15", dtype="bfloat16")``.
    """
    return dict(_constexprs(kind, normalize_spec(kind, spec)))


@functools.lru_cache(maxsize=None)
def _constexprs(kind: str, spec: tuple) -> tuple:
    """`constexprs` of a normalised spec, built once per specialisation (every launch asks)."""
    import triton.language as tl

    full = dict(spec)
    out = {_FLAG_NAMES.get(name, name.upper()): value for name, value in full.items() if name not in _SPEC_ONLY}
    out["BLOCK_D"] = pow2_at_least(full["d"])
    out["BLOCK_DV"] = pow2_at_least(full["dv"])
    dtype = full["dtype"]
    out["ACC"] = tl.float64 if dtype == "float64" else tl.float32
    # Matrix products: operands in the accumulation dtype. float32 inputs multiply in IEEE float32
    # (TF32 would miss the 1e-4 tolerance). Half inputs use TF32 tensor cores: a bf16/fp16 operand
    # is exact in TF32, and the fp32 probabilities keep 10 mantissa bits instead of bf16's 7.
    # (Native bf16 operands would be ~2x faster on a GPU, but Triton's interpreter multiplies bf16
    # tiles wrongly, so that variant could not be tested here.)
    out["PRECISION"] = {"float32": "ieee", "float64": "default"}.get(dtype, "tf32")
    out["ENTMAX"] = full["normalizer"] == "entmax15"
    return tuple(out.items())


_lock = threading.Lock()
_modules: dict[bool, object] = {}


def kernel(kind: str):
    """The ``@triton.jit`` kernel `kind` (``grouped_fwd``, ``grouped_bwd``, ``edge_fwd``, ``edge_bwd``)."""
    if kind not in DEFAULTS:
        raise ValueError(f"triton kernel: unknown kind {kind!r}; expected one of {sorted(DEFAULTS)}")
    return getattr(_kernels_module(), kind)


def _kernels_module():
    from triton import knobs

    interpret = bool(knobs.runtime.interpret)
    with _lock:
        module = _modules.get(interpret)
        if module is None:
            path = Path(__file__).with_name("kernels.py")
            name = f"attnpass_triton_kernels_{'interp' if interpret else 'jit'}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module  # inspect.getsource (used by triton.jit) looks modules up here
            module_spec.loader.exec_module(module)
            if interpret:
                _call_helpers_directly(module)
            _modules[interpret] = module
    return module


def _call_helpers_directly(module) -> None:
    """Interpreter mode only: bind the module's @triton.jit helpers (``_sum``, ``_mma``, the tile
    loaders, ...) to their interpreter-rewritten Python functions.

    Triton's interpreter re-patches all of triton.language on every device-function call
    (``InterpretedFunction.__call__``), which costs more than most helpers themselves and about
    halves the speed of our kernels, whose inner loops call helpers. The kernel already runs under
    that patch, so the rewritten helper computes the same thing. Only the binding changes: the
    source and what a GPU compiles are untouched.
    """
    from triton.runtime.interpreter import InterpretedFunction

    for name, value in list(vars(module).items()):
        if isinstance(value, InterpretedFunction) and name not in DEFAULTS:
            setattr(module, name, value.rewrite())
