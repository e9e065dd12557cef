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
import math
import re
from pathlib import Path

import torch
from torch import Tensor

from attnpass.cli import (
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
    import inspect

    module = sparse_model.site_modules()[site_name]
    signature = inspect.signature(module.forward)
    captured = {}

    def hook(_module, hook_args, hook_kwargs):
        bound = signature.bind(*hook_args, **hook_kwargs)
        bound.apply_defaults()
        captured.update(bound.arguments)

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            sparse_model(*args, **kwargs)
    finally:
        handle.remove()
    if not captured:
        raise CliError(f"site {site_name!r} was not called when the model ran on the example input", EXIT_CAPTURE)
    return captured


def allowed_pairs(site_module, inputs: dict, row: int, head: int) -> Tensor:
    """(Lq, Lk) bool: the pairs the site's own masking allows (causal, key padding, bool mask, -inf bias)."""
    q, k = inputs["q"], inputs["k"]
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    allowed = torch.ones(Lq, Lk, dtype=torch.bool)
    if site_module.spec.causal:
        offset = site_module.causal_offset(q, k)
        allowed &= torch.arange(Lk).view(1, Lk) <= torch.arange(Lq).view(Lq, 1) + offset
    if inputs.get("key_keep") is not None:
        allowed &= inputs["key_keep"][row].view(1, Lk).bool()
    if inputs.get("mask") is not None:
        allowed &= torch.broadcast_to(inputs["mask"], (B, Hq, Lq, Lk))[row, head].bool()
    if inputs.get("bias") is not None:
        allowed &= torch.broadcast_to(inputs["bias"], (B, Hq, Lq, Lk))[row, head] > -math.inf
    return allowed


def dense_probabilities(site_module, inputs: dict, row: int, head: int, allowed: Tensor) -> Tensor:
    """(Lq, Lk) float64 softmax probabilities of the site as the original model computes them."""
    q, k = inputs["q"], inputs["k"]
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    qh = q[row, head].double()
    kh = k[row, head // (Hq // Hkv)].double()
    scores = (qh @ kh.T) * site_module.scale(q)
    if inputs.get("bias") is not None:
        scores = scores + torch.broadcast_to(inputs["bias"], (B, Hq, Lq, Lk))[row, head].double()
    scores = scores.masked_fill(~allowed, -math.inf)
    probs = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)  # a row with no allowed key: zeros, as the kernels give


# --------------------------------------------------------------------------------------------
# Which pairs each method computes (from the method's layout API)
# --------------------------------------------------------------------------------------------


def _group_pairs(q_index: Tensor, k_index: Tensor, len_q: int, len_k: int, key_range: Tensor | None = None) -> Tensor:
    """(Lq, Lk) bool from groups: every query slot of group g with every key slot of g (-1 = empty);
    with key_range (G, Wq, 2), a query slot only with keys whose position is in [low, high]."""
    out = torch.zeros(len_q, len_k, dtype=torch.bool)
    G, Wq = q_index.shape
    Wk = k_index.shape[1]
    qi = q_index.view(G, Wq, 1).expand(G, Wq, Wk)
    ki = k_index.view(G, 1, Wk).expand(G, Wq, Wk)
    keep = (qi >= 0) & (ki >= 0)
    if key_range is not None:
        keep &= (ki >= key_range[..., :1]) & (ki <= key_range[..., 1:])
    out[qi[keep], ki[keep]] = True
    return out


def _csr_pairs(row_ptr: Tensor, col_index: Tensor, first_row: int, len_q: int, len_k: int) -> Tensor:
    out = torch.zeros(len_q, len_k, dtype=torch.bool)
    start, stop = int(row_ptr[first_row]), int(row_ptr[first_row + len_q])
    counts = row_ptr[first_row + 1:first_row + len_q + 1] - row_ptr[first_row:first_row + len_q]
    rows = torch.repeat_interleave(torch.arange(len_q), counts)
    out[rows, col_index[start:stop]] = True
    return out


def method_pairs(method: str, module, inputs: dict, row: int, head: int) -> tuple[Tensor, Tensor | None]:
    """(computed (Lq, Lk) bool, via_summary (Lq, Lk) bool or None) for one batch row and query head.

    `module` has already run forward on `inputs` (so learned state such as routing centroids is
    initialised exactly as in that call).
    """
    q, k, key_keep = inputs["q"], inputs["k"], inputs.get("key_keep")
    Hq, Lq, D = q.shape[1], q.shape[2], q.shape[3]
    Lk = k.shape[2]
    if method == "dense":
        return torch.ones(Lq, Lk, dtype=torch.bool), None
    if method == "combiner":
        from attnpass.methods.combiner import _default_block
        from attnpass.methods.combiner_layout import build_layout

        causal = module.spec.causal
        offset = module.causal_offset(q, k) if causal else 0
        block = module.block if module.block is not None else _default_block(Lq, Lk, D, module.variant)
        layout = build_layout(module.variant, Lq, Lk, block, causal, offset, q.device)
        direct = _group_pairs(layout.q_index, layout.k_index, Lq, Lk)
        # Combiner reaches every allowed key exactly once: what is not direct goes through a summary
        return direct, ~direct
    if method == "routing":
        layout = module.layout(q, k, key_keep)
        if head < module.local_heads:
            return _group_pairs(layout.local_q_index, layout.local_k_index, Lq, Lk), None
        h = head - module.local_heads
        pairs = _group_pairs(layout.q_index[row, h], layout.k_index[row, h], Lq, Lk)
        if layout.fallback_q_index is not None:
            pairs |= _group_pairs(layout.fallback_q_index[row, h], layout.fallback_k_index[row, h], Lq, Lk,
                                  layout.fallback_key_range[row, h])
        return pairs, None
    if method == "sbm":
        # the graph the eval call attended over: eval draws it from the site's seed, so sample() repeats it
        graph = module.last_graph if module.last_graph is not None else module.sample(q, k, key_keep)
        return _csr_pairs(graph.row_ptr, graph.col_index, (row * Hq + head) * Lq, Lq, Lk), None
    if method == "sparsefinder":
        row_ptr, col_index, _ = module.predict(q, k, key_keep)
        return _csr_pairs(row_ptr, col_index, (row * Hq + head) * Lq, Lq, Lk), None
    raise CliError(f"attnpass plot has no pair layout for method {method!r}")


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
