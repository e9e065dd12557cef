"""The spellings of the two products of attention: scores = Q·Kᵀ and out = P·V.

matmul / bmm with an explicit or implicit transpose of K, einsum with any letter names (and '...'), and
baddbmm (scores = beta·mask + alpha·Q·Kᵀ, BLOOM/OPT and nn.MultiheadAttention style). Each
reader returns the operands together with the adapter that brings them to the layout
(batch..., L, D), and says how many leading batch dims the scores have.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from attnpass.frontend.graph_ops import shape, view
from attnpass.frontend.site import Adapter, MaskPiece
from attnpass.patterns.common import NotAttention, Skip, normalise_dim, peel_scale


@dataclass
class ScoreProduct:
    node: fx.Node
    q: fx.Node
    k: fx.Node
    q_adapter: Adapter
    k_adapter: Adapter
    batch_dims: int
    scale: float = 1.0
    pieces: list[MaskPiece] = field(default_factory=list)
    scale_notes: list[str] = field(default_factory=list)
    spelling: str = ""


@dataclass
class ValueProduct:
    node: fx.Node
    v: fx.Node
    v_adapter: Adapter
    out_adapter: Adapter
    spelling: str = ""


def _is_last_two_swap(ov, rank: int) -> bool:
    if ov is None:
        return False
    if ov.kind == "transpose":
        return {normalise_dim(d, rank) for d in ov["dims"]} == {rank - 1, rank - 2}
    if ov.kind == "permute":
        dims = [normalise_dim(d, rank) for d in ov["dims"]]
        return dims == list(range(rank - 2)) + [rank - 1, rank - 2]
    return False


def _key_from_transposed(kt: fx.Node, rank: int, scale: float, notes: list[str]):
    """K given as Kᵀ: return K (walking back through the transpose) and any scale folded into it."""
    kt, scale = peel_scale(kt, scale, "k", notes)
    ov = view(kt)
    if _is_last_two_swap(ov, rank):
        k, scale = peel_scale(ov["x"], scale, "k", notes)
        return k, [], scale
    return kt, [("transpose", -2, -1)], scale


def read_score_product(node: fx.Node) -> ScoreProduct | None:
    """Read `node` as scores = Q·Kᵀ, or None if it is not a product."""
    ov = view(node)
    if ov is None:
        return None
    out_shape = shape(node)
    if out_shape is None:
        return None
    rank = len(out_shape)
    if ov.kind in ("matmul", "bmm", "baddbmm"):
        x, y = ov["x"], ov["y"]
        if not isinstance(x, fx.Node) or not isinstance(y, fx.Node):
            return None
        if shape(x) is None or shape(y) is None or len(shape(x)) != rank or len(shape(y)) != rank:
            raise Skip(f"{ov.kind} operands broadcast across ranks ({shape(x)} @ {shape(y)})")
        notes: list[str] = []
        scale = 1.0
        pieces: list[MaskPiece] = []
        if ov.kind == "baddbmm":
            alpha, beta = ov["alpha"], ov["beta"]
            if not isinstance(alpha, (int, float)) or not isinstance(beta, (int, float)):
                raise Skip("baddbmm with tensor alpha/beta")
            scale = float(alpha)
            if beta != 0:
                pieces.append(MaskPiece("add", ov["bias"], float(beta)))
        q, scale = peel_scale(x, scale, "q", notes)
        k, k_adapter, scale = _key_from_transposed(y, rank, scale, notes)
        return ScoreProduct(node, q, k, [], k_adapter, rank - 2, scale, pieces, notes, ov.kind)
    if ov.kind == "einsum":
        return _read_einsum_scores(ov, rank)
    return None


def _parse_equation(equation: str, operands: list):
    """The two input terms and the output term of a two-operand einsum, '...' spelled out."""
    if "->" not in equation:
        raise Skip(f"einsum '{equation}' (implicit output) is not supported")
    lhs, out = equation.split("->")
    ins = lhs.split(",")
    if len(ins) != len(operands) or len(operands) != 2:
        raise NotAttention
    if "..." in equation:  # LongT5's blocked attention: "...qhd,...khd->...hqk" on 5-D tensors
        ins, out = _spell_ellipsis(equation, ins, out, operands)
    return ins[0], ins[1], out


def _spell_ellipsis(equation: str, ins: list[str], out: str, operands: list):
    """Replace '...' by letters the equation does not use, as many as the dims it stands for in each
    operand, right-aligned as einsum broadcasts them (an operand with fewer gets the last ones)."""
    spans = []
    for term, operand in zip(ins, operands):
        s = shape(operand)
        if s is None:
            raise NotAttention
        spans.append(len(s) - (len(term) - 3) if "..." in term else 0)
    if min(spans) < 0:
        raise NotAttention
    width = max(spans)
    free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in equation][:width]

    def spell(term: str, n: int) -> str:
        return term.replace("...", "".join(free[width - n:]))

    return [spell(t, n) for t, n in zip(ins, spans)], spell(out, width)


def _permutation(src: str, dst: str) -> Adapter:
    perm = [src.index(c) for c in dst]
    return [] if perm == list(range(len(src))) else [("permute", perm)]


def _read_einsum_scores(ov, rank: int) -> ScoreProduct | None:
    sa, sb, so = _parse_equation(ov["equation"], ov["operands"])
    a, b = ov["operands"]
    contracted = [c for c in sa if c in sb and c not in so]
    batch = [c for c in so if c in sa and c in sb]
    q_letters = [c for c in so if c in sa and c not in sb]
    k_letters = [c for c in so if c in sb and c not in sa]
    if len(contracted) != 1 or len(q_letters) != 1 or len(k_letters) != 1:
        return None
    if len(set(sa)) != len(sa) or len(set(sb)) != len(sb) or set(sa) | set(sb) != set(so) | set(contracted):
        return None
    if so[-2:] != q_letters[0] + k_letters[0]:
        raise Skip(f"einsum '{ov['equation']}' puts the query and key axes elsewhere than last")
    d = contracted[0]
    notes: list[str] = []
    q, scale = peel_scale(a, 1.0, "q", notes)
    k, scale = peel_scale(b, scale, "k", notes)
    q_adapter = _permutation(sa, "".join(batch) + q_letters[0] + d)
    k_adapter = _permutation(sb, "".join(batch) + k_letters[0] + d)
    return ScoreProduct(ov.node, q, k, q_adapter, k_adapter, len(batch), scale, [], notes, "einsum")


def read_value_product(node: fx.Node, probs: fx.Node, batch_dims: int) -> ValueProduct | None:
    """Read `node` as out = P·V where `probs` is P in layout (batch..., Lq, Lk)."""
    ov = view(node)
    if ov is None:
        return None
    if ov.kind in ("matmul", "bmm"):
        if ov["x"] is not probs or not isinstance(ov["y"], fx.Node):
            return None
        v = ov["y"]
        if shape(v) is None or len(shape(v)) != batch_dims + 2:
            raise Skip(f"P·V product broadcasts V of shape {shape(v)}")
        return ValueProduct(node, v, [], [], ov.kind)
    if ov.kind == "einsum":
        operands = ov["operands"]
        if len(operands) != 2 or probs not in operands:
            return None
        sa, sb, so = _parse_equation(ov["equation"], operands)
        sp, sv = (sa, sb) if operands[0] is probs else (sb, sa)
        v = operands[1] if operands[0] is probs else operands[0]
        batch, q_letter, k_letter = sp[:-2], sp[-2], sp[-1]
        d_letters = [c for c in sv if c not in sp]
        if len(d_letters) != 1 or k_letter not in sv or k_letter in so or sorted(so) != sorted(batch + q_letter + d_letters[0]):
            raise Skip(f"einsum '{ov['equation']}' is not a plain P·V product")
        d = d_letters[0]
        v_adapter = _permutation(sv, batch + k_letter + d)
        out_adapter = _permutation(batch + q_letter + d, so)
        return ValueProduct(node, v, v_adapter, out_adapter, "einsum")
    return None
