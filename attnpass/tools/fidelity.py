"""`attnpass.fidelity`: how close a sparsified model is to the model it came from, measured.

Per site (each measured in isolation, on the ORIGINAL model's inputs at that site, see
`site_probe.record_site_inputs`):

    pairs_computed   share of the site's allowed (query, key) pairs whose score the method
                     computes; a Combiner region-summary score, or a score routing computes to
                     choose its keys (keys='members'), counts as one pair
    mass_recall      share of the dense softmax probability that falls on the computed pairs
                     (Combiner: on its direct pairs; the rest reaches the query through summaries)
    output_error     ||sparse site output - dense site output|| / ||dense site output||

and for the whole model, the cosine similarity of the final outputs of the original and the
sparse model on the same batch (`output_fn` picks or pools them; by default the first tensor of
the output, compared row by row along its last dim), which includes the compounding of the errors
through the layers.

Both models are run in eval mode under no_grad and put back in the mode they were in; nothing
else about them changes. The per-site measures build (B, H, Lq, Lk) dense references: this is an
evaluation tool for evaluation lengths.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from attnpass.tools import site_probe
from attnpass.tools.progress import progress_bar


@dataclass
class SiteFidelity:
    """Fidelity of one site (or, for `overall`, of all sites pooled by their pair counts)."""

    name: str
    method: str
    pairs_allowed: int = 0
    pairs_computed: float = 0.0   # count (summary scores included)
    mass_total: float = 0.0       # dense probability mass of the rows (the number of non-empty rows)
    mass_covered: float = 0.0
    error_sq: float = 0.0         # sum of squared output differences
    norm_sq: float = 0.0          # sum of squared dense outputs

    @property
    def fraction_computed(self) -> float:
        return self.pairs_computed / max(self.pairs_allowed, 1)

    @property
    def mass_recall(self) -> float:
        return self.mass_covered / self.mass_total if self.mass_total > 0 else 1.0

    @property
    def output_error(self) -> float:
        return (self.error_sq / self.norm_sq) ** 0.5 if self.norm_sq > 0 else 0.0

    def add(self, other: SiteFidelity) -> None:
        for key in ("pairs_allowed", "pairs_computed", "mass_total", "mass_covered", "error_sq", "norm_sq"):
            setattr(self, key, getattr(self, key) + getattr(other, key))

    def as_dict(self) -> dict:
        return {"site": self.name, "method": self.method, "fraction_computed": self.fraction_computed,
                "mass_recall": self.mass_recall, "output_error": self.output_error,
                "pairs_allowed": self.pairs_allowed, "pairs_computed": self.pairs_computed}


@dataclass
class FidelityReport:
    sites: list[SiteFidelity]
    overall: SiteFidelity
    cosine_mean: float | None = None   # mean cosine of the final outputs (None: no original model given)
    cosine_min: float | None = None
    batches: int = 0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"sites": [s.as_dict() for s in self.sites], "overall": self.overall.as_dict(),
                "cosine_mean": self.cosine_mean, "cosine_min": self.cosine_min, "batches": self.batches,
                "notes": list(self.notes)}

    def __str__(self) -> str:
        rows = [("site", "method", "pairs computed", "mass recall", "output error")]
        for s in [*self.sites, self.overall]:
            rows.append((s.name, s.method, f"{100 * s.fraction_computed:.1f}%", f"{s.mass_recall:.4f}",
                         f"{s.output_error:.4f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if self.cosine_mean is not None:
            lines.append(f"final outputs: cosine mean {self.cosine_mean:.5f}, min {self.cosine_min:.5f} "
                         f"over {self.batches} batch(es)")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


# Query rows whose dense probabilities are held at once: (B, Hq, rows, Lk) float32, whatever Lq is
PROBABILITY_ROWS = 256


def measure_site(module: nn.Module, inputs: dict, name: str) -> SiteFidelity:
    """One site on one batch's recorded inputs: pairs, dense mass on them, output error (no grad).
    The pair sets are (B, Hq, Lq, Lk) bools; the dense probabilities go `PROBABILITY_ROWS` query rows
    at a time."""
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    call = {key: inputs.get(key) for key in ("bias", "mask", "key_keep")}
    mass_total = mass_covered = 0.0
    with torch.no_grad():
        sparse_out = module(q, k, v, **call)
        dense_out = site_probe._dense_forward(module)(q, k, v, **call)
        computed, allowed, n_computed = site_probe.counted_pairs(module, inputs)
        for start in range(0, q.shape[2], PROBABILITY_ROWS):
            rows = slice(start, start + PROBABILITY_ROWS)
            probs = site_probe.dense_probabilities(module, inputs, dtype=torch.float32, rows=rows, allowed=allowed)
            mass_total += float(probs.double().sum())
            mass_covered += float((probs * computed[:, :, rows]).double().sum())
    diff = (sparse_out.double() - dense_out.double())
    return SiteFidelity(
        name=name, method=module.method_name, pairs_allowed=int(allowed.sum()), pairs_computed=n_computed,
        mass_total=mass_total, mass_covered=mass_covered,
        error_sq=float(diff.square().sum()), norm_sq=float(dense_out.double().square().sum()),
    )


def _first_tensor(output) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict):  # Hugging Face ModelOutput is a dict
        output = list(output.values())
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"fidelity: cannot find a tensor in the model output of type {type(output).__name__}; "
                    "pass output_fn= to pick one")


def output_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of each row (last dim) of two outputs of the same shape, in float64."""
    if a.shape != b.shape:
        raise ValueError(f"fidelity: the two models' outputs differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.double().reshape(-1, a.shape[-1]), b.double().reshape(-1, b.shape[-1])
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


class _EvalMode:
    """Puts models in eval for the block and restores each submodule's own mode afterwards."""

    def __init__(self, *models: nn.Module | None):
        self.models = [m for m in models if m is not None]

    def __enter__(self):
        self.modes = [[(m, m.training) for m in model.modules()] for model in self.models]
        for model in self.models:
            model.eval()

    def __exit__(self, *exc):
        for modes in self.modes:
            for module, training in modes:
                module.training = training


def fidelity(original: nn.Module | None, sparse: nn.Module, batches: Iterable,
             output_fn: Callable[[object, object], Tensor] | None = None, progress: bool = True) -> FidelityReport:
    """Measure `sparse` (a model `sparsify` returned) against `original` on `batches`.

    Each batch is the model's call input: a dict of keyword arguments, a tuple of positional ones,
    or a single tensor. `output_fn(output, batch) -> Tensor` turns a model output into what is
    compared (e.g. mean-pooled, normalised sentence embeddings); by default the first tensor of
    the output. Pass `original=None` to get the per-site measures only. A tqdm bar counts the sites
    measured (`progress=False` hides it; without tqdm installed there is none).
    """
    modules = site_probe.site_modules(sparse)
    per_site = {name: SiteFidelity(name=name, method=m.method_name) for name, m in modules.items()}
    overall = SiteFidelity(name="overall", method=getattr(sparse, "method", "-"))
    cosines: list[Tensor] = []
    count = 0
    pick = output_fn or (lambda output, batch: _first_tensor(output))
    total = len(batches) * len(modules) if hasattr(batches, "__len__") else None
    bar = progress_bar(total, "attnpass.fidelity", "site", progress)
    with _EvalMode(original, sparse):
        for batch in batches:
            count += 1
            args, kwargs = site_probe.batch_call(batch)
            for name, inputs in site_probe.record_site_inputs(sparse, args, kwargs).items():
                measured = measure_site(modules[name], inputs, name)
                per_site[name].add(measured)
                overall.add(measured)
                bar.update(1)
            if original is not None:
                with torch.no_grad():
                    cosines.append(output_cosine(pick(original(*args, **kwargs), batch),
                                                 pick(sparse(*args, **kwargs), batch)))
    bar.close()
    if count == 0:
        raise ValueError("fidelity: `batches` is empty; give at least one batch of model inputs")
    report = FidelityReport(sites=list(per_site.values()), overall=overall, batches=count)
    if cosines:
        all_cos = torch.cat(cosines)
        report.cosine_mean, report.cosine_min = float(all_cos.mean()), float(all_cos.min())
    return report


__all__ = ["FidelityReport", "SiteFidelity", "fidelity", "measure_site", "output_cosine"]
