"""Find the attention sites of a graph: run the pattern families, analyse masks, name and describe.

Matching and rewriting are separate steps (as in torch.fx's subgraph rewriter): this module
only reads the graph. `rewrite.py` changes it.
"""
from __future__ import annotations

import math
import re

import torch
import torch.fx as fx

from attnpass.frontend import export_shapes
from attnpass import patterns
from attnpass.frontend.capture import CaptureError, Program, export_model
from attnpass.frontend.graph_ops import shape, view
from attnpass.frontend.mask_analysis import ProbeSet, analyse_mask, general_mask
from attnpass.frontend.rewrite import remove_dead_code
from attnpass.frontend.site import AttentionSite, MaskInfo, SiteMatch, SkippedSite
from attnpass.frontend.specialisation import specialisation


def module_path(node: fx.Node) -> tuple[str, str]:
    """The owning module's dotted path and class name, from export's or dynamo's nn_module_stack."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    # export: "layers.0"; dynamo: "L['self'].layers[0]", or "L['args'][0].layers[0]" when dynamo
    # entered through a wrapper (e.g. a decorated forward) that received the module as an argument
    path = re.sub(r"^L\['\w+'\](\[\d+\])?\.?", "", str(path))
    path = re.sub(r"\[(\d+)\]", r".\1", path).replace("._modules['", ".").replace("']", "")
    cls_name = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1]
    return path.strip("."), cls_name


def _projection_source(node, steps: int = 16):
    """The input of the linear layer a q/k tensor was projected by, to tell self from cross attention."""
    for _ in range(steps):
        if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):  # dynamo: x.view(...)
            return node
        if node.target in (torch.ops.aten.linear.default, torch.nn.functional.linear, torch._C._nn.linear):
            return node.args[0]
        if node.target is torch.ops.aten.addmm.default:
            return node.args[1]
        tensors = [a for a in node.all_input_nodes
                   if isinstance(a.meta.get("val", a.meta.get("example_value")), (torch.Tensor, list, tuple))]
        if not tensors:
            return node
        # cat([cached keys, new keys]): the new keys come from this call's projection
        node = tensors[-1] if node.target in _CATS else tensors[0]
    return node


_CATS = (torch.ops.aten.cat.default, torch.cat, torch.concat, torch.concatenate)


def _is_cross(match: SiteMatch, lq, lk) -> bool:
    # q and k projected from the same tensor: self-attention, also when the keys are longer because
    # cached keys precede this call's (a decode step or a chunk continuing over a KV cache)
    if _projection_source(match.q) is _projection_source(match.k):
        return False
    if str(lq) != str(lk):
        return True
    # q and k given as separate inputs (no projection on the way) of one length: nothing says they are
    # different sequences, and capture_sites tied their lengths (export_shapes), so serve it as self-attention
    q_in, k_in = export_shapes.raw_input(match.q), export_shapes.raw_input(match.k)
    return q_in is None or k_in is None


def scores_shape(match: SiteMatch) -> tuple:
    """The (symbolic) shape of a site's scores: (B, H, Lq, Lk) or (B*H, Lq, Lk)."""
    if match.pattern != "sdpa":
        return shape(match.anchor.args[0])  # the softmax input
    q, k = shape(match.q), shape(match.k)  # SDPA never materialises them
    return (*q[:-2], q[-2], k[-2])


def _describe(name: str, path: str, cls: str, match: SiteMatch, info: MaskInfo) -> AttentionSite:
    scores = scores_shape(match)
    lq, lk = scores[-2], scores[-1]
    head_dim, head_dim_v = _dim_after(match.q, match.q_adapter, -1), _dim_after(match.v, match.v_adapter, -1)
    if match.batch_dims == 2:
        batch, heads_q, layout = scores[0], scores[1], "B,H,L,D"
    elif match.batch_dims > 2:
        # blocked: (B, N.., H, Lq, Lk) served as (B*N.., H, Lq, Lk); the batch is still the model's B
        # (the block count N follows the length, and specialisation tells lengths from batch by it)
        batch, heads_q, layout = scores[0], scores[-3], "B*N,H,L,D (leading dims merged into the batch)"
    elif info.heads_from_padding > 1:
        batch, heads_q, layout = "B", info.heads_from_padding, "B*H,L,D"
    else:
        batch, heads_q, layout = scores[0], 1, "B*H,L,D (heads folded in batch)"
    heads_kv = _dim_after(match.k, match.k_adapter, 1) if match.batch_dims >= 2 else heads_q
    mask = info.kind
    if info.window:  # a band: "causal band (window 6)+key_padding", "band (window 4)"
        mask = ("causal " if info.causal else "") + f"band (window {info.window})" + \
            ("+key_padding" if "key_padding" in info.kind else "")
    mask += " (bottom-right)" if info.causal_bottom_right else ""
    return AttentionSite(
        name=name, module_path=path, module_type=cls, pattern=match.pattern,
        batch=batch, heads_q=heads_q, heads_kv=heads_kv, len_q=lq, len_k=lk,
        head_dim=head_dim, head_dim_v=head_dim_v, layout=layout,
        scale=match.scale, scale_note=match.scale_note, mask=mask, bias=info.bias_note,
        dropout=match.dropout_p, cross=_is_cross(match, lq, lk), dtype=_dtype(match.q),
        notes=list(match.notes) + ([info.why_general] if info.why_general else []),
        match=match, mask_info=info,
    )


def _dtype(node) -> str:
    val = node.meta.get("val", node.meta.get("example_value"))
    return str(val.dtype).replace("torch.", "") if isinstance(val, torch.Tensor) else "?"


def _dim_after(node, adapter, dim: int):
    """The size of dim `dim` of `node` once its layout adapter has run (heads, head dim)."""
    s = list(shape(node))
    for step in adapter:
        if step[0] == "permute":
            s = [s[i] for i in step[1]]
        elif step[0] == "transpose":
            s[step[1]], s[step[2]] = s[step[2]], s[step[1]]
        elif step[0] == "unsqueeze":
            s.insert(step[1], 1)
        elif step[0] == "split_heads":  # (B*H, ...) -> (B, H, ...); B itself is never asked for
            s = [None, step[1]] + s[1:]
        elif step[0] == "flatten":
            s = s[:step[1]] + [math.prod(s[step[1]:step[2] + 1])] + s[step[2] + 1:]
    return s[dim]


def capture_sites(model: torch.nn.Module, args: tuple, kwargs: dict, check_sizes: bool = False) -> Program:
    """Capture `model` and find its sites: the program, with `.sites` and `.skipped` filled in.

    When the sites show that the capture left free what is fixed -- a site's heads or head dim, which
    raw q/k/v inputs leave symbolic -- or split what is one -- q's and k's lengths, when q and k are
    separate inputs of one example length --, the model is captured again with those dims static or
    tied (`attnpass.frontend.export_shapes`); a capture that fails or finds fewer sites is not used.
    With `check_sizes` (for a graph that will run, not for a report), `program.specialised` says why
    the graph holds only at the example's sizes ('' if it does not; `attnpass.frontend.specialisation`).
    """
    static, ties = frozenset(), frozenset()
    (program, probes), used_ties = _capture(model, args, kwargs, static, ties), ties
    for _ in range(3):
        more_static, more_ties = _refinements(program)
        if more_static <= static and more_ties <= ties:
            break
        static, ties = static | more_static, ties | more_ties
        try:
            again, again_probes = _capture(model, args, kwargs, static, ties)
        except CaptureError:
            break
        if len(again.sites) < len(program.sites) or not again.sites:
            break
        program, probes, used_ties = again, again_probes, ties
    if check_sizes:
        program.specialised = specialisation(model, program, probes)
    export_shapes.insert_tie_checks(program, sorted(sorted(group) for group in used_ties))
    return program


def _capture(model, args, kwargs, static, ties) -> tuple[Program, ProbeSet]:
    program = Program(export_model(model, args, kwargs, static, sorted(sorted(group) for group in ties)))
    example = program.ep.example_inputs or (args, kwargs)  # a batch-1 example is captured at batch 2
    _mark_constant_values(program)
    probes = ProbeSet(program.gm, program.state_inputs(), program.user_inputs(*example),
                      program.ep.range_constraints)
    remove_dead_code(program.gm)  # users of the attention that the model never reads don't count
    program.sites, program.skipped = find_sites(program.gm, probes)
    return program, probes


def _mark_constant_values(program: Program) -> None:
    """Give the patterns the values of the program's lifted one-element constant tensors (a masking
    value written `torch.tensor(finfo.min)`); parameters and buffers stay unknown (they can change)."""
    from torch.export.graph_signature import InputKind

    from attnpass.patterns.common import CONSTANT_VALUE

    constants = {s.arg.name: program.ep.constants[s.target] for s in program.input_specs
                 if s.kind is InputKind.CONSTANT_TENSOR}
    for node in program.gm.graph.nodes:
        value = constants.get(node.name) if node.op == "placeholder" else None
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
            node.meta[CONSTANT_VALUE] = float(value.item())


def _refinements(program: Program) -> tuple[frozenset, frozenset]:
    """User-input dims to capture static (heads, head dims), and groups of dims to tie (q's and k's
    lengths when q and k are separate inputs of one example length)."""
    symbols, ties = set(), set()
    for site in program.sites:
        symbols |= export_shapes.free_symbols(site.heads_q, site.heads_kv, site.head_dim, site.head_dim_v)
        lq, lk = site.len_q, site.len_k
        if not (isinstance(lq, torch.SymInt) and isinstance(lk, torch.SymInt)) or lq.node.expr == lk.node.expr:
            continue
        q_in, k_in = export_shapes.raw_input(site.match.q), export_shapes.raw_input(site.match.k)
        if q_in is None or k_in is None or q_in is k_in or lq.node.hint != lk.node.hint:
            continue
        group = export_shapes.input_dims(program, {lq.node.expr, lk.node.expr})
        if len(group) > 1:
            ties.add(frozenset(group))
    static = export_shapes.input_dims(program, symbols)
    if not program.sites and any(n.target in _SOFTMAX for n in program.gm.graph.nodes):
        # no site, but a softmax: an eager spelling on raw q/k/v scales by 1/sqrt(head dim), which a
        # symbolic head dim hides from the patterns. The last dim of a float input of rank >= 3 is a
        # feature dim (hidden size, head dim), never a length: capture it static and look again
        static |= export_shapes.float_last_dims(program)
    return frozenset(static), frozenset(ties)


_SOFTMAX = tuple(getattr(torch.ops.aten, name).default if name != "softmax" else torch.ops.aten.softmax.int
                 for name in ("softmax", "_softmax", "_safe_softmax") if hasattr(torch.ops.aten, name))


def find_sites(gm: fx.GraphModule, probes: ProbeSet | None) -> tuple[list[AttentionSite], list[SkippedSite]]:
    """All attention sites of `gm` in graph order, and the skipped ones with their reasons."""
    sites, skipped, used = [], [], {}
    for node in list(gm.graph.nodes):
        for family in patterns.FAMILIES:
            try:
                match = family(node)
            except patterns.NotAttention:
                match = None
            except patterns.Skip as reason:
                path, _ = module_path(node)
                skipped.append(SkippedSite(_unique(path, used), path, _family_name(family, node), str(reason)))
                break
            if match is None:
                continue
            path, cls = module_path(node)
            name = _unique(path, used)
            info = analyse_mask(match, scores_shape(match), probes) if probes is not None else general_mask(match)
            if not info.empty_rows:
                skipped.append(SkippedSite(name, path, match.pattern, "cannot tell what the model computes at a query "
                                           "with no allowed key (its mask's fill values do not give one rule on probes)"))
                break
            sites.append(_describe(name, path, cls, match, info))
            break
    return sites, skipped


def _family_name(family, node) -> str:
    ov = view(node)
    return ov.kind if ov is not None else family.__name__


def _unique(path: str, used: dict) -> str:
    base = path or "<root>"
    used[base] = used.get(base, 0) + 1
    return base if used[base] == 1 else f"{base}#{used[base]}"
