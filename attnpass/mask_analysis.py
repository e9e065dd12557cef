"""Recover causal / key-padding structure from the masks a model builds as L x L tensors.

Models rarely hand attention a flag: Hugging Face builds a (B, 1, L, L) tensor from a causal
rule and the attention_mask vector, nn.MultiheadAttention folds key_padding_mask into a
(B*H, 1, L) tensor, GPT-style code slices a stored triangle. Sparse methods need the structure,
not the tensor, so for each site we decide what its mask pieces (see `attnpass.site.MaskPiece`)
compute, by evaluating the subgraph that builds them on probe inputs — the example, and inputs
at other batch sizes and lengths with random 0/1 padding vectors — and comparing the pairs they
allow with every candidate structure (causal top-left or bottom-right, key padding read from a
2-D 0/1 graph input with either polarity). A candidate is accepted only if it agrees exactly on
every probe; otherwise the pieces stay as tensors ("general"), which is always exact.

A mask piece that is sometimes neither 0 nor a masking value (<= -1e4) is a bias (T5's
relative position bias, ALiBi) and always stays a tensor.
"""
from __future__ import annotations

import itertools

import sympy
import torch
import torch.fx as fx

from attnpass.site import MaskInfo, MaskPiece, SiteMatch

_MASKING = -1e4


class ProbeSet:
    """Inputs to evaluate parts of a captured program on: the example and a few other shapes."""

    def __init__(self, gm: fx.GraphModule, state: dict[str, torch.Tensor], user_inputs: dict[str, torch.Tensor],
                 range_constraints: dict | None = None, seed: int = 0):
        self.gm = gm
        self.state = state
        self.example = user_inputs
        self.placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
        self.sizes = self._symbol_sizes()
        self.ranges = range_constraints or {}
        gen = torch.Generator().manual_seed(seed)
        self.probes = [self._assignment(0)] + [self._assignment(d) for d in (3, 1)]
        self.inputs = [self._inputs(a, gen, use_example=(i == 0)) for i, a in enumerate(self.probes)]
        self.padding_candidates = [name for name, t in user_inputs.items() if _is_01_matrix(t)]
        self._envs: list[dict] = [dict() for _ in self.probes]

    # -- sizes ---------------------------------------------------------------------------------
    def _symbol_sizes(self) -> dict:
        sizes = {}
        for name, t in self.example.items():
            val = self.placeholders[name].meta.get("val")
            if not isinstance(val, torch.Tensor) or not isinstance(t, torch.Tensor):
                continue
            for d, n in zip(val.shape, t.shape):
                if isinstance(d, torch.SymInt) and isinstance(d.node.expr, sympy.Symbol):
                    sizes[d.node.expr] = int(n)
        return sizes

    def _assignment(self, delta: int) -> dict:
        out = {}
        for sym, n in self.sizes.items():
            new = n + delta
            vr = self.ranges.get(sym)
            if vr is not None and (new > vr.upper or new < vr.lower):
                new = n
            out[sym] = new
        return out

    def size(self, dim, probe: int) -> int:
        if isinstance(dim, torch.SymInt):
            return int(dim.node.expr.subs(self.probes[probe]))
        return int(dim)

    def shape(self, node: fx.Node, probe: int) -> tuple[int, ...]:
        return tuple(self.size(d, probe) for d in node.meta["val"].shape)

    def _inputs(self, assignment: dict, gen: torch.Generator, use_example: bool) -> dict:
        if use_example:
            return dict(self.example)
        out = {}
        for name, t in self.example.items():
            if not isinstance(t, torch.Tensor):
                out[name] = t
                continue
            val = self.placeholders[name].meta["val"]
            shp = tuple(int(d.node.expr.subs(assignment)) if isinstance(d, torch.SymInt) else int(d) for d in val.shape)
            out[name] = _random_like(t, shp, gen)
        return out

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, node: fx.Node, probe: int):
        """The value `node` takes on probe `probe` (memoised; only its ancestors are run)."""
        env = self._envs[probe]
        if node in env:
            return env[node]
        order = []
        stack = [node]
        seen = set()
        while stack:  # collect un-evaluated ancestors
            n = stack.pop()
            if n in seen or n in env:
                continue
            seen.add(n)
            order.append(n)
            stack.extend(a for a in n.all_input_nodes)
        interp = fx.Interpreter(self.gm)
        interp.env = env
        for n in sorted(order, key=_position(self.gm)):
            if n.op == "placeholder":
                if n.name in self.state:
                    env[n] = self.state[n.name]
                elif n.name in self.inputs[probe]:
                    env[n] = self.inputs[probe][n.name]
                else:
                    raise KeyError(n.name)
            else:
                env[n] = interp.run_node(n)
        return env[node]


def _position(gm):
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    return lambda n: index[n]


def _is_01_matrix(t) -> bool:
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.numel() == 0 or t.is_complex():
        return False
    return bool(((t == 0) | (t == 1)).all())


def _random_like(t: torch.Tensor, shape: tuple, gen: torch.Generator) -> torch.Tensor:
    if _is_01_matrix(t) or t.dtype == torch.bool:
        x = torch.randint(0, 2, shape, generator=gen)
        if x.dim() >= 1 and x.shape[-1] > 0:
            x[..., 0] = 1  # keep a key per row so no row is empty under any candidate structure
        return x.to(t.dtype)
    if not t.is_floating_point():
        lo, hi = int(t.min()), int(t.max())
        return torch.randint(lo, hi + 1, shape, generator=gen).to(t.dtype)
    return torch.randn(shape, generator=gen).to(t.dtype)


# -- structure matching --------------------------------------------------------------------------

def _allowed_and_bias(pieces: list[MaskPiece], probes: ProbeSet, probe: int):
    """Evaluate pieces on a probe: (allowed bool tensor or None, mask-like flags per piece)."""
    allowed, masklike = None, []
    for piece in pieces:
        value = probes.evaluate(piece.node, probe)
        if piece.kind == "add":
            value = value * piece.coef if piece.coef != 1.0 else value
            is_mask = bool(((value == 0) | (value <= _MASKING)).all())
            masklike.append(is_mask)
            keep = value == 0
        elif piece.kind == "fill":
            masklike.append(True)
            keep = ~value.bool()
        else:
            masklike.append(True)
            keep = value.bool()
        if is_mask_piece(piece, masklike[-1]):
            allowed = keep if allowed is None else (allowed & keep)
    return allowed, masklike


def is_mask_piece(piece: MaskPiece, masklike: bool) -> bool:
    return piece.kind != "add" or masklike


def _candidate(kind_causal: str | None, pad: tuple | None, scores_shape: tuple, probes: ProbeSet, probe: int):
    *batch, lq, lk = scores_shape
    cand = torch.ones(lq, lk, dtype=torch.bool)
    if kind_causal is not None:
        offset = 0 if kind_causal == "top_left" else lk - lq
        cand = torch.ones(lq, lk, dtype=torch.bool).tril(offset)
    if pad is None:
        return cand
    name, keep_zero = pad
    vec = probes.inputs[probe][name]
    if vec.shape[-1] != lk:
        return None
    keep = (vec == 0) if keep_zero else (vec != 0)
    rows = batch[0]
    if rows % keep.shape[0] != 0:
        return None
    keep = keep.repeat_interleave(rows // keep.shape[0], dim=0)  # (B*H, Lk) rows for 3-D layouts
    view = keep.reshape(rows, *([1] * (len(batch) - 1)), 1, lk)
    return cand & view


def analyse_mask(match: SiteMatch, score_node: fx.Node, probes: ProbeSet) -> MaskInfo:
    """Decide what the site's mask pieces compute; see the module docstring."""
    if not match.pieces:
        return MaskInfo(kind="causal" if match.causal else "none")
    n_probes = len(probes.probes)
    try:
        results = [_allowed_and_bias(match.pieces, probes, p) for p in range(n_probes)]
    except Exception as e:  # noqa: BLE001 - a mask we cannot evaluate is kept as it is
        return _general(match, [True] * len(match.pieces), f"mask could not be evaluated on probes ({type(e).__name__})")
    masklike = [all(r[1][i] for r in results) for i in range(len(match.pieces))]
    bias = [p for p, m in zip(match.pieces, masklike) if not is_mask_piece(p, m)]
    bias_note = _bias_note(bias, probes)
    if all(not is_mask_piece(p, m) for p, m in zip(match.pieces, masklike)):
        return MaskInfo(kind="causal" if match.causal else "none", general_bias=bias, bias_note=bias_note)
    # re-evaluate allowed with the final mask/bias split (a piece is a mask only if it is on every probe)
    allowed = []
    for p in range(n_probes):
        acc = None
        for piece, m in zip(match.pieces, masklike):
            if not is_mask_piece(piece, m):
                continue
            value = probes.evaluate(piece.node, p)
            keep = (value * piece.coef == 0) if piece.kind == "add" else (~value.bool() if piece.kind == "fill" else value.bool())
            acc = keep if acc is None else acc & keep
        allowed.append(acc)
    scores_shapes = [probes.shape(score_node, p) for p in range(n_probes)]
    causal_options = ["top_left"] if match.causal else [None, "top_left", "bottom_right"]
    pad_options = [None] + [(name, kz) for name in probes.padding_candidates for kz in (False, True)]
    for causal, pad in itertools.product(causal_options, pad_options):
        if causal is None and pad is None:
            continue
        if all(_agrees(allowed[p], _candidate(causal, pad, scores_shapes[p], probes, p), scores_shapes[p]) for p in range(n_probes)):
            kind = "+".join(k for k in (("causal" if causal else ""), ("key_padding" if pad else "")) if k)
            rows = scores_shapes[0][0]
            heads = rows // probes.inputs[0][pad[0]].shape[0] if pad and match.batch_dims == 1 else 1
            return MaskInfo(
                heads_from_padding=heads,
                kind=kind,
                causal_offset=0,
                causal_bottom_right=(causal == "bottom_right"),
                padding_input=probes.placeholders[pad[0]] if pad else None,
                padding_keep_zero=bool(pad and pad[1]),
                general_bias=bias, bias_note=bias_note,
            )
    return _general(match, masklike, "mask is not causal / key-padding on every probe input", bias_note)


def _agrees(allowed, cand, scores_shape) -> bool:
    if cand is None or allowed is None:
        return False
    try:
        a = allowed.expand(scores_shape)
        c = cand.expand(scores_shape)
    except RuntimeError:
        return False
    return bool(torch.equal(a, c))


def _general(match: SiteMatch, masklike, why: str, bias_note: str = "") -> MaskInfo:
    bias = [p for p, m in zip(match.pieces, masklike) if p.kind == "add"]
    bools = [p for p in match.pieces if p.kind != "add"]
    return MaskInfo(kind="general" if bools or any(masklike) else ("causal" if match.causal else "none"),
                    general_bias=bias, general_bool=bools, why_general=why, bias_note=bias_note)


def _bias_note(bias: list[MaskPiece], probes: ProbeSet) -> str:
    if not bias:
        return ""
    notes = []
    for piece in bias:
        val = piece.node.meta.get("val")
        shape = "x".join(str(d) for d in val.shape) if isinstance(val, torch.Tensor) else "?"
        try:
            masked = bool((probes.evaluate(piece.node, 0) <= _MASKING).any())
        except Exception:  # noqa: BLE001
            masked = False
        notes.append(f"additive ({shape})" + (", mask folded in" if masked else ""))
    return "; ".join(notes)
