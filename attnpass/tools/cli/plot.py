"""`attnpass plot`: which (query, key) pairs each method computes at one site, beside the dense attention.

For the chosen site (`--site`, default the first) the model is rewritten with method="dense" (an
exact rewrite) and run once on the input; a forward pre-hook on the site module captures the
canonical q, k, v and the site's masking (bias, bool mask, key padding). Each requested method's
site module is then built for that site (as `sparsify` would: same spec, same options, fresh
state seeded by `--seed`), run once on the captured tensors, and asked for its layout through the
method's own API: Combiner `build_layout`, routing `RoutingAttention.layout()`, SBM `sample()` (in eval the
same seeded graph the call attended over), Sparsefinder `predict()`. Every method therefore sees the
*original* model's q and k at that site (in a fully sparsified model later layers would see
inputs changed by the earlier sparse layers).

Unlike the sparse path, this tool builds Lq x Lk tensors on purpose (the heatmaps are Lq x Lk
pictures), so it is meant for plotting lengths (it refuses more than `MAX_PAIRS` pairs).

One PNG per method, two panels: the dense softmax probabilities of the site (row `--row`, head
`--head`) and the pair mask of the method: pairs it computes, pairs a Combiner query reaches
only through a region summary, pairs it leaves out, and pairs the site's own masking forbids.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from attnpass.tools import site_probe
from attnpass.tools.cli import (  # its shared parts
    EXIT_CAPTURE,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    CliError,
    check_method_options,
    load_target,
    options_for,
    parse_methods,
    parse_options,
    print_table,
    use_rich,
)

MAX_PAIRS = 4096 * 4096
FIGSIZE = (11.0, 5.0)  # inches; pixels = FIGSIZE * dpi

# Pair categories in the method panel.
FORBIDDEN, LEFT_OUT, VIA_SUMMARY, COMPUTED = 0, 1, 2, 3
CATEGORY_NAMES = {FORBIDDEN: "forbidden by the site's mask", LEFT_OUT: "not computed",
                  VIA_SUMMARY: "reached via a region summary", COMPUTED: "computed"}
CATEGORY_COLORS = {FORBIDDEN: "#d9d9d9", LEFT_OUT: "#ffffff", VIA_SUMMARY: "#9ecae1", COMPUTED: "#08306b"}


# --------------------------------------------------------------------------------------------
# The site's inputs and its dense attention
# --------------------------------------------------------------------------------------------


def capture_site_inputs(sparse_model, site_name: str, args: tuple, kwargs: dict) -> dict:
    """Run the (dense-rewritten) model once; return what its site module `site_name` was called with."""
    recorded = site_probe.record_site_inputs(sparse_model, args, kwargs)
    if site_name not in recorded:
        raise CliError(f"site {site_name!r} was not called when the model ran on the example input", EXIT_CAPTURE)
    return recorded[site_name]


def allowed_pairs(site_module, inputs: dict, row: int, head: int) -> Tensor:
    """(Lq, Lk) bool: the pairs the site's own masking allows (causal, key padding, bool mask, -inf bias)."""
    return site_probe.allowed_pairs(site_module, inputs)[row, head].cpu()


def dense_probabilities(site_module, inputs: dict, row: int, head: int, allowed: Tensor) -> Tensor:
    """(Lq, Lk) float64 softmax probabilities of the site as the original model computes them."""
    return site_probe.dense_probabilities(site_module, inputs)[row, head].cpu()


# --------------------------------------------------------------------------------------------
# Which pairs each method computes (from the method's layout API)
# --------------------------------------------------------------------------------------------


def method_pairs(method: str, module, inputs: dict, row: int, head: int) -> tuple[Tensor, Tensor | None]:
    """(computed (Lq, Lk) bool, via_summary (Lq, Lk) bool or None) for one batch row and query head.

    `module` has already run forward on `inputs` (so learned state such as routing centroids is
    initialised exactly as in that call).
    """
    if method != module.method_name:
        raise CliError(f"attnpass plot: site module is {module.method_name!r}, not {method!r}")
    computed, summaries = site_probe.computed_pairs(module, inputs)
    computed = computed[row, head].cpu()
    # Combiner reaches every allowed key exactly once: what is not direct goes through a summary
    return computed, (None if summaries is None else ~computed)


def categories(allowed: Tensor, computed: Tensor, via_summary: Tensor | None) -> Tensor:
    """(Lq, Lk) int8 of FORBIDDEN / LEFT_OUT / VIA_SUMMARY / COMPUTED."""
    cat = torch.full(allowed.shape, LEFT_OUT, dtype=torch.int8)
    if via_summary is not None:
        cat[via_summary & allowed] = VIA_SUMMARY
    cat[computed & allowed] = COMPUTED
    cat[~allowed] = FORBIDDEN
    return cat


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def draw(path: Path, probs: Tensor, cat: Tensor, title: str, stats: str, dpi: int) -> tuple[int, int]:
    """Write the two-panel PNG; returns its (width, height) in pixels."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    fig, (left, right) = plt.subplots(1, 2, figsize=FIGSIZE, dpi=dpi, layout="constrained")
    try:
        image = left.imshow(probs.numpy(), cmap="viridis", interpolation="nearest", aspect="auto")
        left.set_title("dense attention (softmax probabilities)", fontsize=10)
        left.set_xlabel("key")
        left.set_ylabel("query")
        fig.colorbar(image, ax=left, shrink=0.8)
        cmap = ListedColormap([CATEGORY_COLORS[i] for i in range(4)])
        right.imshow(cat.numpy(), cmap=cmap, norm=BoundaryNorm([-0.5, 0.5, 1.5, 2.5, 3.5], 4),
                     interpolation="nearest", aspect="auto")
        right.set_title(stats, fontsize=10)
        right.set_xlabel("key")
        present = sorted(set(cat.unique().tolist()), reverse=True)
        right.legend(handles=[Patch(facecolor=CATEGORY_COLORS[c], edgecolor="#555555", label=CATEGORY_NAMES[c])
                              for c in present], loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        fig.suptitle(title, fontsize=11)
        fig.savefig(path, dpi=dpi)
        width, height = fig.canvas.get_width_height()
    finally:
        plt.close(fig)
    return width, height


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _pick_site(report, wanted: str | None):
    sites = report.sites
    if wanted is None:
        return sites[0]
    for s in sites:
        if s.name == wanted:
            return s
    if wanted.isdigit() and int(wanted) < len(sites):
        return sites[int(wanted)]
    raise CliError(f"--site {wanted!r} is not a site of the model; sites: {[s.name for s in sites]} "
                   f"(or an index 0..{len(sites) - 1})")


def run(args) -> int:
    import attnpass
    from attnpass.api import site_spec
    from attnpass.methods import METHODS, method_class

    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise CliError("attnpass plot needs matplotlib: pip install 'attnpass[cli]'", EXIT_UNAVAILABLE) from e
    methods = parse_methods(args.method, [m for m in METHODS if m != "dense"])
    options = parse_options(args.opt)
    for m in methods:
        check_method_options(m, options_for(m, options))
    if args.head < 0 or args.row < 0 or args.dpi < 10:
        raise CliError(f"--head and --row must be >= 0 and --dpi >= 10, got head={args.head}, row={args.row}, dpi={args.dpi}")
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise CliError(f"--out {args.out!r} exists and is not a directory")

    target = load_target(args.target, args.length, args.batch)
    target.model.eval()  # one inference call: dropout off, method state not trained
    dense = attnpass.sparsify(target.model, target.args, target.kwargs, method="dense")
    site = _pick_site(dense.report, args.site)
    inputs = capture_site_inputs(dense, site.name, target.args, target.kwargs)
    q, k = inputs["q"], inputs["k"]
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    if args.head >= Hq or args.row >= B:
        raise CliError(f"site {site.name!r} has {Hq} query heads and batch {B}; got --head {args.head} --row {args.row}")
    if Lq * Lk > MAX_PAIRS:
        raise CliError(f"site {site.name!r} has {Lq} x {Lk} pairs, more than this plotting tool draws "
                       f"({MAX_PAIRS}); use a smaller --length")
    site_module = dense.site_modules()[site.name]
    allowed = allowed_pairs(site_module, inputs, args.row, args.head)
    probs = dense_probabilities(site_module, inputs, args.row, args.head, allowed)
    out_dir.mkdir(parents=True, exist_ok=True)

    spec = site_spec(site)
    results = []
    for m in methods:
        opts = options_for(m, options)
        cls = method_class(m)
        entry = {"method": m, "options": opts, "site": site.name, "head": args.head, "row": args.row,
                 "len_q": Lq, "len_k": Lk}
        reason = cls.unsupported_reason(spec, **opts)
        if reason:
            entry["declined"] = reason
            results.append(entry)
            continue
        torch.manual_seed(args.seed)
        module = cls(spec, **opts).eval()
        with torch.no_grad():
            module(q, k, inputs["v"], bias=inputs.get("bias"), mask=inputs.get("mask"), key_keep=inputs.get("key_keep"))
            computed, via_summary = method_pairs(m, module, inputs, args.row, args.head)
        cat = categories(allowed, computed, via_summary)
        n_allowed = int(allowed.sum())
        n_computed = int((cat == COMPUTED).sum())
        covered = float((probs * (cat == COMPUTED)).sum() / probs.sum().clamp(min=1e-30))
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{m}-{site.name}-h{args.head}") + ".png"
        path = out_dir / name
        stats = (f"{n_computed} of {n_allowed} allowed pairs computed ({100 * n_computed / max(n_allowed, 1):.1f}%)\n"
                 f"dense probability mass on them: {covered:.3f}")
        if via_summary is not None:
            stats += ", the rest through summaries"
        settings = re.sub(r"site='[^']*', ", "", module.extra_repr())
        title = f"{target.name} | {site.name} | head {args.head} | row {args.row} | {Lq} x {Lk}\n{m}: {settings}"
        width, height = draw(path, probs, cat, title, stats, args.dpi)
        entry.update({"file": str(path), "width": width, "height": height, "pairs_allowed": n_allowed,
                      "pairs_computed": n_computed, "fraction_computed": n_computed / max(n_allowed, 1),
                      "dense_mass_covered": covered})
        if via_summary is not None:
            entry["pairs_via_summary"] = int((cat == VIA_SUMMARY).sum())
        results.append(entry)

    if args.json:
        print(json.dumps({"target": args.target, "model": target.name, "site": site.name, "plots": results},
                         indent=2, default=str))
    else:
        rows = [{"method": r["method"], "file": r.get("file", "-"),
                 "pairs computed": (f"{r['pairs_computed']} / {r['pairs_allowed']} ({100 * r['fraction_computed']:.1f}%)"
                                    if "file" in r else f"declined: {r['declined']}"),
                 "dense mass covered": f"{r['dense_mass_covered']:.3f}" if "file" in r else "-"} for r in results]
        print_table(rows, f"{target.name}, site {site.name}, head {args.head}, row {args.row}, {Lq} x {Lk}", use_rich(args))
    if not any("file" in r for r in results):
        raise CliError(f"no plot written: every method declined site {site.name!r} "
                       + "; ".join(f"{r['method']}: {r['declined']}" for r in results), EXIT_CAPTURE)
    return EXIT_OK
