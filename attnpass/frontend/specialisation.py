"""Is a captured program the model's function at every size, or only at the example's?

torch.export keeps a dim symbolic wherever it can, but a model may still bake an example-sized
value into its graph without a guard: LongT5's transient-global attention computes
`one_hot(..., num_classes)` from the example's length, and a loop unrolled over the example's
length does the same. Such a graph runs at other sizes and fails deep inside (or, worse, computes
something else). So before rewriting, the captured program is run against the model itself on a
probe input with its lengths at about twice the example's (near sizes are not enough: LongT5's
baked class count still fits a few more tokens); a graph that raises, or disagrees, is specialised
to the example's sizes.
"""
from __future__ import annotations

import copy

import torch
import torch.utils._pytree as pytree

from attnpass.frontend.mask_analysis import ProbeSet

def specialisation(model: torch.nn.Module, program, probes: ProbeSet) -> str:
    """'' if the (not yet rewritten) `program` computes what `model` computes on a probe at other
    sizes, else a one-line reason. Only checked in eval mode (dropout draws differ).

    The probe keeps the sites' batch size and moves the other symbolic sizes: lengths are what
    models bake, and a larger batch would only cost time. Sizes can be tied by the model's own
    contract without the graph knowing (a decode step's attention mask is one longer than its
    cache), so every length first moves by the same step d = min(max length + 3, 256), which keeps
    their differences; a graph that disagrees there is also tried with every length n moved to
    min(2n + 3, n + 256), which keeps ratios (a model taking one input twice as long as another).
    It is specialised when it holds on neither."""
    if model.training or not probes.sizes:
        return ""
    # by value, so that sizes equal in the example stay equal (labels' batch and input_ids' batch may
    # be separate symbols of one size: a probe that splits them is not a valid call)
    batch = {probes.sizes.get(sym) for site in program.sites if isinstance(site.batch, torch.SymInt)
             for sym in site.batch.node.expr.free_symbols}
    lengths = [n for n in probes.sizes.values() if n not in batch]
    step = min(max(lengths, default=0) + 3, 256)
    shifted = {sym: (n if n in batch else n + step) for sym, n in probes.sizes.items()}
    scaled = {sym: (n if n in batch else min(2 * n + 3, n + 256)) for sym, n in probes.sizes.items()}
    why = _disagreement(model, program, probes, shifted)
    if why and scaled != shifted:
        why = _disagreement(model, program, probes, scaled) and why
    return why


def _disagreement(model: torch.nn.Module, program, probes: ProbeSet, sizes: dict) -> str:
    """'' if `program` computes what `model` computes on a probe at `sizes`, else why not."""
    probe = probes.long_probe(sizes)
    flat = [probes.inputs[probe][name] for name in program.user_input_names]
    args, kwargs = pytree.tree_unflatten(flat, program.in_spec)
    try:
        with torch.no_grad():
            # on a copy: the model updates a KV cache passed in, which the graph must then see unchanged
            expected = model(*copy.deepcopy(args), **copy.deepcopy(kwargs))
    except Exception:  # noqa: BLE001 - the model itself refuses the probe: nothing to compare
        return ""
    sizes = ", ".join(f"{sym}={n}" for sym, n in probes.probes[probe].items())
    try:
        with torch.no_grad():
            got = program(model, args, kwargs)
    except Exception as e:  # noqa: BLE001 - exactly what the check is for
        return f"the captured graph fails at other sizes ({sizes}: {type(e).__name__}: {_first_line(e)})"
    got_leaves, expected_leaves = _tensor_leaves(got), _tensor_leaves(expected)
    if len(got_leaves) != len(expected_leaves):
        return f"the captured graph returns {len(got_leaves)} tensors at other sizes ({sizes}), the model {len(expected_leaves)}"
    for g, e in zip(got_leaves, expected_leaves):
        if g.shape != e.shape:
            return f"the captured graph returns shape {tuple(g.shape)} at other sizes ({sizes}), the model {tuple(e.shape)}"
        if g.is_floating_point() and not torch.allclose(g, e, rtol=1e-3, atol=1e-4 * (1 + float(e.abs().amax()))):
            return f"the captured graph computes other values than the model at other sizes ({sizes})"
        if not g.is_floating_point() and not torch.equal(g, e):
            return f"the captured graph computes other values than the model at other sizes ({sizes})"
    return ""


def _tensor_leaves(out) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""
