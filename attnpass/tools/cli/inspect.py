"""`attnpass inspect`: a model's attention sites and the sympy cost of each under one method."""
from __future__ import annotations

import dataclasses
import json
import sys

from attnpass.tools.cli.arguments import check_method_options, options_for, parse_methods, parse_options
from attnpass.tools.cli.errors import EXIT_CAPTURE, EXIT_OK, CliError
from attnpass.tools.cli.output import print_table, use_rich
from attnpass.tools.cli.targets import describe_inputs, load_target


def _example_batch(target) -> int | None:
    """The leading size of the example's first tensor input, if it has one."""
    import torch
    import torch.utils._pytree  # noqa: F401

    first = next((t for t in torch.utils._pytree.tree_leaves((target.args, target.kwargs))
                  if isinstance(t, torch.Tensor) and t.dim() > 0), None)
    return None if first is None else int(first.shape[0])


def _example_dims(site, length: int | None, batch: int | None) -> dict:
    """The site's dims as ints for the cost numbers: concrete ones as they are, symbolic lengths at
    --length (when given) else at the example call's value, symbolic batch at the example's."""
    from attnpass.api import example_int

    def dim(value, override):
        if isinstance(value, int):
            return value
        return override if override is not None else example_int(value)

    return {"batch": dim(site.batch, batch), "len_q": dim(site.len_q, length), "len_k": dim(site.len_k, length)}


def site_cost(site, method: str, opts: dict, length: int | None, batch: int | None) -> dict:
    """Dense and `method` cost of one site: formulas (the site's symbolic dims kept) and numbers."""
    from attnpass import cost_model

    cost_opts = {k: v for k, v in opts.items() if k in cost_model.cost_options(method)}
    out = {"method": method, "options": cost_opts}
    if method not in cost_model.METHODS:
        out["error"] = f"no cost model for method {method!r} (cost models: {list(cost_model.METHODS)})"
        return out
    dense = cost_model.cost(site, "dense")
    sparse = cost_model.cost(site, method, **cost_opts)
    out["dense_formula"] = {"flops": str(dense.flops), "bytes": str(dense.bytes)}
    out["formula"] = {"flops": str(sparse.flops), "bytes": str(sparse.bytes), "text": str(sparse)}
    dims = _example_dims(site, length, batch)
    out["at"] = {"B": dims["batch"], "Lq": dims["len_q"], "Lk": dims["len_k"]}
    if None in dims.values():
        out["numbers_error"] = "the site's batch or lengths are unknown"
        return out
    concrete = dataclasses.replace(site, batch=dims["batch"], len_q=dims["len_q"], len_k=dims["len_k"])
    dense_n = cost_model.cost(concrete, "dense")
    sparse_n = cost_model.cost(concrete, method, **cost_opts)
    out["params"] = {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in sparse_n.params.items()}
    try:
        d_flops, d_bytes = dense_n.evaluate()
        s_flops, s_bytes = sparse_n.evaluate()
    except ValueError as e:
        from attnpass.methods import method_class

        learned = " (its graph density is learned: pass --opt density=RHO)" if method_class(method).learns_density else ""
        out["numbers_error"] = str(e) + learned
        return out
    out["numbers"] = {"dense_flops": d_flops, "flops": s_flops, "dense_bytes": d_bytes, "bytes": s_bytes,
                      "flops_ratio": d_flops / s_flops, "bytes_ratio": d_bytes / s_bytes}
    return out


def method_status(site, method: str, opts: dict) -> str | None:
    """Why `method` would decline this site (sparsify leaves it unchanged), or None."""
    from attnpass.api import site_spec
    from attnpass.methods import method_class

    return method_class(method).unsupported_reason(site_spec(site), **opts)


def _num(x: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.3g}"


def cmd_inspect(args) -> int:
    import attnpass

    method = parse_methods(args.method, ["routing"])
    if len(method) != 1:
        raise CliError(f"inspect takes one --method, got {method}")
    method = method[0]
    opts = options_for(method, parse_options(args.opt))
    from attnpass import cost_model

    # an option is the method's (checked by its class) or the cost model's (e.g. SBM's learned density)
    method_keys, cost_keys = _method_keys(method), set(cost_model.cost_options(method))
    unknown = sorted(set(opts) - method_keys - cost_keys)
    if unknown:
        raise CliError(f"method {method!r} got unknown option(s) {unknown}; it takes {sorted(method_keys | cost_keys)}")
    method_opts = {k: v for k, v in opts.items() if k in method_keys}
    check_method_options(method, method_opts)
    target = load_target(args.target, args.length, args.batch)
    report = attnpass.find_attention(target.model, target.args, target.kwargs)
    length = args.length if target.source == "callable" else None  # folders: already built at --length
    sites = []
    for site in report.sites:
        entry = dict(site.row())
        entry["declined"] = method_status(site, method, method_opts)
        # the example's batch (a batch-1 example is captured at batch 2, which the site's hint shows)
        entry["cost"] = site_cost(site, method, opts, length, _example_batch(target))
        sites.append(entry)
    doc = {"target": args.target, "model": report.model_name, "inputs": describe_inputs(target),
           "method": method, "options": opts, "sites": sites, "skipped": [s.row() for s in report.skipped]}
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        _print_inspect(doc, use_rich(args))
    # the report is printed either way; the exit code says whether the method would rewrite anything
    if not any(entry["declined"] is None for entry in sites):
        why = "no attention found" if not sites else f"method {method!r} declines every site"
        print(f"attnpass inspect: error: {why}", file=sys.stderr)
        return EXIT_CAPTURE
    return EXIT_OK


def _method_keys(method: str) -> set[str]:
    """Option names the method's module accepts (from its class; empty if it takes none)."""
    from attnpass.methods import method_class

    return set(method_class(method).options)


def _print_inspect(doc: dict, rich_out: bool) -> None:
    inputs = ", ".join(f"{k} {tuple(v) if isinstance(v, list) else v}" for k, v in doc["inputs"].items())
    print(f"{doc['model']} ({doc['target']}), inputs: {inputs}")
    sites, skipped = doc["sites"], doc["skipped"]
    if not sites and not skipped:
        print("no attention found (no softmax(Q K^T) V or scaled_dot_product_attention in the captured graph)")
        return
    table_cols = [k for k in sites[0] if k not in ("declined", "cost")] if sites else []
    print_table([{c: s[c] for c in table_cols} for s in sites],
                f"{len(sites)} attention site(s)" + (f", {len(skipped)} skipped" if skipped else ""), rich_out)
    if skipped:
        print_table(skipped, "skipped (left unchanged):", rich_out)
    if not sites:
        return
    method = doc["method"]
    print()
    rows, formulas = [], {}
    for s in sites:
        c = s["cost"]
        row = {"site": s["site"]}
        if "error" in c:
            row["cost"] = c["error"]
        elif "numbers" in c:
            n = c["numbers"]
            row.update({"B x Lq x Lk": f"{c['at']['B']} x {c['at']['Lq']} x {c['at']['Lk']}",
                        "params": ", ".join(f"{k}={v}" for k, v in c["params"].items()) or "-",
                        f"FLOPs dense -> {method}": f"{_num(n['dense_flops'])} -> {_num(n['flops'])} "
                                                    f"({n['flops_ratio']:.2f}x fewer)",
                        f"bytes dense -> {method}": f"{_num(n['dense_bytes'])} -> {_num(n['bytes'])} "
                                                    f"({n['bytes_ratio']:.2f}x fewer)"})
        else:
            row["cost"] = c.get("numbers_error", "")
        row[f"{method}"] = f"declined: {s['declined']}" if s["declined"] else "rewritten"
        rows.append(row)
        if "formula" in c:
            key = (c["dense_formula"]["flops"], c["dense_formula"]["bytes"], c["formula"]["flops"], c["formula"]["bytes"])
            formulas.setdefault(key, []).append(s["site"])
    # rows may differ in columns (a site without numbers): pad so the table stays rectangular
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print_table([{k: r.get(k, "") for k in cols} for r in rows],
                f"cost per site, method={method} (sympy cost model, evaluated at the lengths shown)",
                rich_out)
    if not formulas:
        return
    from attnpass import cost_model

    legend = cost_model.symbol_legend(method)
    print(f"\nformulas (sympy; B batch, L_q / L_k lengths when symbolic{', ' + legend if legend else ''}):")
    w = max(len("dense"), len(method))
    for (d_flops, d_bytes, s_flops, s_bytes), names in formulas.items():
        where = names[0] if len(names) == 1 else f"{len(names)} sites ({names[0]} ...)"
        print(f"  {where}:")
        for name, flops, nbytes in (("dense", d_flops, d_bytes), (method, s_flops, s_bytes)):
            print(f"    {name:<{w}}  flops {flops}\n    {'':<{w}}  bytes {nbytes}")
