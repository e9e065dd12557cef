"""`attnpass.calibrate`: fit only the sparsity machinery of a converted model on its own activations.

    sparse = attnpass.sparsify(model, args, kwargs, method="routing")
    report = attnpass.calibrate(sparse, batches, steps=200)
    print(report)            # per site: objective before -> after, pairs computed, dense mass recall

How: every batch is run once through the sparse model with its sites computing the ORIGINAL dense
attention (`site_probe.record_site_inputs`), so each site's recorded q, k, bias and masks are the
original model's. The fitters (`calibrate_fitters`) then optimise each site's own state on those
recorded tensors for `steps` steps (step s uses batch s mod len(batches)): routing centroids,
Sparsefinder projections (+ clustering centroids), SBM clusters and phi. Combiner and dense have
nothing to fit (the report still measures them). The model's own parameters and buffers are never
handed to an optimiser and never written: they are bit-identical afterwards (tested).

Stopping: after `steps`, or earlier once the mean objective over the last `window` steps
(default: one pass over the batches, at least 10 steps) improves on the window before it by less
than `tol` (relative). A tqdm bar shows the steps and the current objective (`progress=False`
hides it). Randomness (centroid initialisation, the hinge loss's negative samples) comes from a
generator seeded by `seed`, without touching the caller's global RNG state.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from attnpass.tools import site_probe
from attnpass.tools.calibrate_fitters import fitter_for
from attnpass.tools.fidelity import SiteFidelity, _EvalMode, measure_site
from attnpass.methods.sparsefinder.gold import GOLD_RULES
from attnpass.tools.progress import progress_bar


@dataclass
class SiteCalibration:
    name: str
    method: str
    fitted: bool
    objective_before: float | None
    objective_after: float | None
    fidelity: SiteFidelity

    def as_dict(self) -> dict:
        return {"site": self.name, "method": self.method, "fitted": self.fitted,
                "objective_before": self.objective_before, "objective_after": self.objective_after,
                "fraction_computed": self.fidelity.fraction_computed, "mass_recall": self.fidelity.mass_recall}


@dataclass
class CalibrationReport:
    steps: int                       # steps run
    converged: bool                  # stopped early on the tolerance
    sites: list[SiteCalibration]
    history: list[float] = field(default_factory=list)   # mean objective over the fitted sites, per step

    def as_dict(self) -> dict:
        return {"steps": self.steps, "converged": self.converged, "sites": [s.as_dict() for s in self.sites],
                "history": list(self.history)}

    def __str__(self) -> str:
        def num(x):
            return "-" if x is None else f"{x:.4g}"

        rows = [("site", "method", "objective before", "after", "pairs computed", "mass recall")]
        for s in self.sites:
            rows.append((s.name, s.method, num(s.objective_before), num(s.objective_after),
                         f"{100 * s.fidelity.fraction_computed:.1f}%", f"{s.fidelity.mass_recall:.4f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        state = "converged" if self.converged else "step limit"
        lines.append(f"{self.steps} step(s), stopped: {state}")
        return "\n".join(lines)


def _check(sparse_model, steps, lr, gold, mass, density_weight, tol) -> None:
    if not isinstance(sparse_model, nn.Module) or not callable(getattr(sparse_model, "site_modules", None)):
        raise TypeError("calibrate expects the model attnpass.sparsify returned, got "
                        f"{type(sparse_model).__name__}; call attnpass.sparsify(model, ...) first")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"calibrate: steps={steps!r} must be an int >= 0")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"calibrate: lr={lr!r} must be a number > 0")
    if gold is not None and gold not in GOLD_RULES:
        raise ValueError(f"calibrate: gold={gold!r} must be one of {list(GOLD_RULES)} (or None: each site's own rule)")
    if mass is not None and not (isinstance(mass, (int, float)) and 0 < mass <= 1):
        raise ValueError(f"calibrate: mass={mass!r} must be in (0, 1]")
    if not (isinstance(density_weight, (int, float)) and density_weight >= 0):
        raise ValueError(f"calibrate: density_weight={density_weight!r} must be a number >= 0")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"calibrate: tol={tol!r} must be a number >= 0")


def calibrate(sparse_model: nn.Module, batches: Iterable, steps: int = 200, *, lr: float = 1e-2,
              gold: str | None = None, mass: float | None = None, density_weight: float = 1.0,
              budget: float | None = None, tol: float = 1e-3, window: int | None = None,
              progress: bool = True, seed: int = 0) -> CalibrationReport:
    """Fit the sparsity state of `sparse_model` (what `sparsify` returned) on `batches`, in place.

    batches: the model's call inputs (a dict of keyword arguments, a tuple of positional ones, or a
    single tensor each); a finite collection, read once. lr: Adam learning rate (Sparsefinder, SBM).
    gold / mass: Sparsefinder's gold graph ("entmax15" or "mass"; None = each site's own rule, see
    the sparsefinder method's `normalizer` option). density_weight: SBM's price of density.
    budget: share of allowed pairs the Sparsefinder distance predictor keeps (sets its threshold).
    Returns a `CalibrationReport`; the per-site pairs / mass recall are measured on `batches`.
    """
    _check(sparse_model, steps, lr, gold, mass, density_weight, tol)
    if budget is not None and not (isinstance(budget, (int, float)) and 0 < budget <= 1):
        raise ValueError(f"calibrate: budget={budget!r} must be in (0, 1]")
    batches = list(batches)
    if not batches:
        raise ValueError("calibrate: `batches` is empty; give at least one batch of model inputs")
    modules = site_probe.site_modules(sparse_model)
    window = window if window is not None else max(len(batches), 10)

    with torch.random.fork_rng(devices=[]), _EvalMode(sparse_model):
        torch.manual_seed(seed)
        recorded = [site_probe.record_site_inputs(sparse_model, *site_probe.batch_call(b)) for b in batches]
        fitters = {name: fitter_for(m, lr=lr, gold=gold, mass=mass, density_weight=density_weight, budget=budget)
                   for name, m in modules.items()}
        fitters = {name: f for name, f in fitters.items() if f is not None}
        # each method fits the keys it computes: without the sinks= its anchor computes (its layout
        # offset, below any local= window, the method's own code applies)
        data = {name: [f.prepare(_method_inputs(f.module, r[name])) for r in recorded if name in r]
                for name, f in fitters.items()}
        fitters = {name: f for name, f in fitters.items() if data[name]}  # sites no batch reached

        def mean_objective(name):
            return sum(fitters[name].objective(d) for d in data[name]) / len(data[name])

        before = {name: mean_objective(name) for name in fitters}
        history, converged, done = [], False, 0
        bar = progress_bar(steps, "attnpass.calibrate", "step", progress and bool(fitters))
        for step in range(steps if fitters else 0):
            values = [f.step(data[name][step % len(data[name])]) for name, f in fitters.items()]
            history.append(sum(values) / len(values))
            done = step + 1
            bar.update(1)
            bar.set_postfix(objective=f"{history[-1]:.4g}")
            if len(history) >= 2 * window:
                previous = sum(history[-2 * window:-window]) / window
                current = sum(history[-window:]) / window
                if previous - current < tol * abs(previous):
                    converged = True
                    break
        bar.close()
        for f in fitters.values():
            f.finish()
        after = {name: mean_objective(name) for name in fitters}

        sites = []
        for name, module in modules.items():
            measured = SiteFidelity(name=name, method=module.method_name)
            for r in recorded:
                if name in r:
                    measured.add(measure_site(module, r[name], name))
            sites.append(SiteCalibration(name, module.method_name, name in fitters, before.get(name),
                                         after.get(name), measured))
    return CalibrationReport(steps=done, converged=converged, sites=sites, history=history)




__all__ = ["CalibrationReport", "SiteCalibration", "calibrate"]


def _method_inputs(module: nn.Module, inputs: dict) -> dict:
    """A site's recorded inputs as its method's own layout sees them (`SiteAttention.method_key_keep`)."""
    return {**inputs, "key_keep": module.method_key_keep(inputs.get("key_keep"), inputs["k"])}
