"""Recover causal / band / key-padding structure from the masks a model builds as L x L tensors.

Models rarely hand attention a flag: Hugging Face builds a (B, 1, L, L) tensor from a causal
rule and the attention_mask vector, nn.MultiheadAttention folds key_padding_mask into a
(B*H, 1, L) tensor, GPT-style code slices a stored triangle. Sparse methods need the structure,
not the tensor, so for each site we decide what its mask pieces (see `attnpass.frontend.site.MaskPiece`)
compute, by evaluating the subgraph that builds them on probe inputs — the example, and inputs
at other batch sizes and lengths with random 0/1 padding vectors — and comparing the pairs they
allow with every candidate structure (causal top-left or bottom-right, a band of keys at distance
< w from the query — causal, the w keys ending at it (Mistral's sliding window), or both sides
(ModernBERT's local layers) — key padding read from a 2-D 0/1 graph input with either polarity, or
no masking at all: transformers hands ViT an all-True mask). A band's w is read from the constants of
the mask's subgraph (w - 1, w, w + 1 for each). A candidate is accepted only if it agrees exactly on every probe; otherwise the pieces stay as tensors ("general"), which is always exact.

A mask piece that is sometimes neither 0 nor a masking value (<= -1e4) is a bias (T5's
relative position bias, ALiBi) and always stays a tensor.

Probes near the example's length cannot tell a sliding window (or a chunk) longer than the
example from plain causal: every probe pair is inside the window. So a structure (a band included)
is accepted only after one more probe at a length past every integer the mask's subgraph holds (a window of
24 is the constant 24 in `kv_idx > q_idx - 24`; a stored triangle buffer is its own size). Where
that length is beyond what we can afford to evaluate, the mask stays general.
"""
from __future__ import annotations

import functools
import itertools
import operator

import sympy
import torch
import torch.fx as fx

from attnpass.frontend.graph_ops import meta_val
from attnpass.frontend.site import MaskInfo, MaskPiece, SiteMatch

_MASKING = -1e4
# The longest probe a mask is evaluated at to prove its structure beyond the example's length
# (a (B, 1, L, L) mask at 8192 is 64 M elements per batch row: seconds, not minutes).
LONGEST_PROBE = 8192
# Integers at or above this are "no limit" sentinels (slice ends, int64 max), not windows.
_SENTINEL = 2**31


class ProbeSet:
    """Inputs to evaluate parts of a captured program on: the example and a few other shapes."""

    def __init__(self, gm: fx.GraphModule, state: dict[str, torch.Tensor], user_inputs: dict[str, torch.Tensor],
                 range_constraints: dict | None = None, seed: int = 0):
        self.gm = gm
        self.state = state
        self.example = user_inputs
        self.placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
        self._order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.sizes = self._symbol_sizes()
        self.ranges = range_constraints or {}
        gen = torch.Generator().manual_seed(seed)
        self.probes = [self._assignment(0)] + [self._assignment(d) for d in (3, 1)]
        self.inputs = [dict(self.example)] + [self._random_inputs(a, gen) for a in self.probes[1:]]
        self.padding_candidates = [name for name, t in user_inputs.items() if _is_01_matrix(t)]
        self._envs: list[dict] = [dict() for _ in self.probes]
        self._added: dict = {}  # (kind, key) -> index of a probe added on demand

    # -- sizes ---------------------------------------------------------------------------------
    def _symbol_sizes(self) -> dict:
        sizes = {}
        for name, t in self.example.items():
            val = meta_val(self.placeholders[name])  # export: "val"; dynamo: "example_value"
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

    # The probes every structure must agree on (the example and two other sizes); probes past
    # them are added on demand (`long_probe`, `empty_row_probes`).
    STANDARD = 3

    def long_probe(self, lengths: dict) -> int:
        """A probe with the symbols in `lengths` set to the given sizes (clamped to their ranges)
        and every other symbol at the example's size; returns its index (added once)."""
        assignment = dict(self.sizes)
        for sym, n in lengths.items():
            vr = self.ranges.get(sym)
            if vr is not None:
                n = max(_as_int(vr.lower, n), min(n, _as_int(vr.upper, n)))
            assignment[sym] = n
        key = ("long", tuple(sorted((str(k), v) for k, v in assignment.items())))
        if key not in self._added:
            self._added[key] = self._append(assignment, self._random_inputs(assignment, torch.Generator().manual_seed(1)))
        return self._added[key]

    def empty_row_probes(self) -> list[int]:
        """Two probes at the example's sizes whose 0/1 inputs make queries with no key: row 0 padded
        on the left half, row 1 all padding (and the complement, for inputs that mark padding with 1)."""
        if ("empty", None) not in self._added:
            added = []
            for flip in (False, True):
                inputs = dict(self.example)
                for name in self.padding_candidates:
                    t = self.example[name]
                    keep = torch.ones(t.shape, dtype=torch.bool)
                    keep[0, : (t.shape[1] + 1) // 2] = False
                    if t.shape[0] > 1:
                        keep[1] = False
                    inputs[name] = (keep ^ flip).to(t.dtype)
                added.append(self._append(dict(self.probes[0]), inputs))
            self._added[("empty", None)] = added
        return self._added[("empty", None)]

    def _append(self, assignment: dict, inputs: dict) -> int:
        self.probes.append(assignment)
        self.inputs.append(inputs)
        self._envs.append({})
        return len(self.probes) - 1

    def shape(self, dims, probe: int) -> tuple[int, ...]:
        """Concrete sizes of (possibly symbolic) `dims` on probe `probe`."""
        return _concrete(dims, self.probes[probe])

    def _random_inputs(self, assignment: dict, gen: torch.Generator) -> dict:
        out = {}
        for name, t in self.example.items():
            val = meta_val(self.placeholders[name])
            if isinstance(t, torch.Tensor):
                t = _random_like(t, _concrete(val.shape, assignment), gen)
            elif isinstance(val, torch.SymInt):  # a dynamo graph takes its symbolic sizes as inputs
                try:
                    t = _concrete((val,), assignment)[0]
                except TypeError:  # not a function of the input sizes (e.g. a value read with .item())
                    pass
            out[name] = t
        return out

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, node: fx.Node, probe: int):
        """The value `node` takes on probe `probe` (memoised; only its ancestors are run)."""
        env = self._envs[probe]
        if node in env:
            return env[node]
        todo, stack = set(), [node]
        while stack:  # collect the ancestors not evaluated yet
            n = stack.pop()
            if n not in todo and n not in env:
                todo.add(n)
                stack.extend(n.all_input_nodes)
        interp = fx.Interpreter(self.gm)
        interp.env = env
        for n in sorted(todo, key=self._order.__getitem__):
            if n.op == "placeholder":
                env[n] = self.state[n.name] if n.name in self.state else self.inputs[probe][n.name]
            else:
                env[n] = interp.run_node(n)
        return env[node]


def _as_int(bound, default: int) -> int:
    try:
        return int(bound) if bool(getattr(bound, "is_finite", True)) else default
    except (TypeError, ValueError, OverflowError, AttributeError):  # an infinite bound
        return default


def _concrete(dims, assignment: dict) -> tuple[int, ...]:
    return tuple(int(d.node.expr.subs(assignment)) if isinstance(d, torch.SymInt) else int(d) for d in dims)


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

def _piece_keep(piece: MaskPiece, value: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The pairs a piece keeps on one probe, and whether it acts as a mask there (an additive
    piece does only when all its values are 0 or masking values)."""
    if piece.kind == "add":
        value = value * piece.coef
        return value == 0, bool(((value == 0) | (value <= _MASKING)).all())
    return (~value.bool() if piece.kind == "fill" else value.bool()), True


def _value(piece: MaskPiece, probes: ProbeSet, probe: int) -> torch.Tensor:
    """A piece's value on probe `probe`, in the layout of the scores (its `adapter` applied)."""
    value = probes.evaluate(piece.node, probe)
    for step in piece.adapter:
        if step[0] != "split_heads":
            raise AssertionError(f"mask piece layout step {step[0]}")
        value = value.unflatten(0, (-1, step[1]))
    return value


def _allowed(pieces: list[MaskPiece], probes: ProbeSet, probe: int) -> torch.Tensor:
    """The pairs every one of the mask `pieces` keeps on probe `probe`."""
    return functools.reduce(operator.and_, (_piece_keep(piece, _value(piece, probes, probe))[0] for piece in pieces))


def _candidate(kind_causal: str | None, pad: tuple | None, scores_shape: tuple, probes: ProbeSet, probe: int,
               window: int = 0):
    *batch, lq, lk = scores_shape
    offset = lk - lq if kind_causal == "bottom_right" else 0
    cand = torch.ones(lq, lk, dtype=torch.bool)
    if kind_causal is not None:
        cand = cand.tril(offset)
    if window:  # a band (sliding window): keys at distance < window, causal: j > i + offset - window
        cand &= ~torch.ones(lq, lk, dtype=torch.bool).tril(offset - window)
        if kind_causal is None:
            cand &= torch.ones(lq, lk, dtype=torch.bool).tril(window - 1)
    if pad is None:
        return cand
    name, keep_zero = pad
    vec = probes.inputs[probe][name]
    rows = batch[0]
    if vec.shape[-1] != lk or rows % vec.shape[0] != 0:
        return None
    keep = (vec == 0) if keep_zero else (vec != 0)
    keep = keep.repeat_interleave(rows // keep.shape[0], dim=0)  # (B*H, Lk) rows for 3-D layouts
    return cand & keep.reshape(rows, *([1] * (len(batch) - 1)), 1, lk)


def _lq_is_lk(shapes) -> bool:
    """Self-attention lengths on every probe: where a bidirectional band (|i - j| < w) is defined."""
    return all(shape[-2] == shape[-1] for shape in shapes)


def _agrees(allowed, cand, scores_shape) -> bool:
    if cand is None:
        return False
    try:
        return bool(torch.equal(allowed.expand(scores_shape), cand.expand(scores_shape)))
    except RuntimeError:
        return False


def analyse_mask(match: SiteMatch, scores_shape: tuple, probes: ProbeSet) -> MaskInfo:
    """Decide what the site's mask pieces compute; see the module docstring.

    `scores_shape` is the (symbolic) shape of the site's scores, (B, H, Lq, Lk) or (B*H, Lq, Lk).
    """
    if not match.pieces:
        return MaskInfo(kind="causal" if match.causal else "none")
    n_probes = probes.STANDARD
    try:
        evaluated = [[_piece_keep(piece, _value(piece, probes, p)) for piece in match.pieces]
                     for p in range(n_probes)]
    except Exception as e:  # noqa: BLE001 - a mask we cannot evaluate is kept as it is
        return general_mask(match, f"mask could not be evaluated on probes ({type(e).__name__})")
    # a piece is a mask only if it acts as one on every probe; otherwise it is a bias
    is_mask = [all(evaluated[p][i][1] for p in range(n_probes)) for i in range(len(match.pieces))]
    bias = [piece for piece, m in zip(match.pieces, is_mask) if not m]
    masks = [piece for piece, m in zip(match.pieces, is_mask) if m]
    bias_note = _bias_note(bias, probes)
    if not any(is_mask):
        return MaskInfo(kind="causal" if match.causal else "none", general_bias=bias, bias_note=bias_note)
    allowed = [functools.reduce(operator.and_, (keep for (keep, _), m in zip(evaluated[p], is_mask) if m))
               for p in range(n_probes)]
    shapes = [probes.shape(scores_shape, p) for p in range(n_probes)]
    causal_options = ["top_left"] if match.causal else [None, "top_left", "bottom_right"]
    # a blocked site's batch is (B*blocks): a (B, Lk) padding vector would not line up with it
    pad_inputs = probes.padding_candidates if match.batch_dims <= 2 else []
    pad_options = [None] + [(name, kz) for name in pad_inputs for kz in (False, True)]
    # a band (sliding window) of w keys reads w as a constant of its subgraph: w - 1, w, w + 1 cover
    # `j > i - w`, `i - j < w`, `j >= i - w` and (bidirectional) `|i - j| <= w`. Bands are tried only
    # after every structure without one (the usual masks are decided by the first pass)
    windows = sorted({w for c in _mask_constants([m.node for m in masks], probes) for w in (c - 1, c, c + 1)})
    structures = [(causal, pad, 0) for causal, pad in itertools.product(causal_options, pad_options)]
    structures += [(causal, pad, w) for w in windows for causal, pad in itertools.product(causal_options, pad_options)
                   if causal or _lq_is_lk(shapes)]
    not_beyond = ""
    for causal, pad, window in structures:  # (None, None, 0): a mask that allows every pair
        if not all(_agrees(allowed[p], _candidate(causal, pad, shapes[p], probes, p, window), shapes[p])
                   for p in range(n_probes)):
            continue
        beyond = _holds_past_its_constants(masks, causal, pad, scores_shape, probes, window)
        if beyond:
            not_beyond = not_beyond or beyond
            continue
        empty_rows, why = _structured_empty_rows(match, masks, causal, pad, scores_shape, probes, window)
        if why:
            return general_mask(match, why, bias_note, probes)
        kind = "+".join(k for k in (("causal" if causal else ""), ("key_padding" if pad else "")) if k) or "none"
        heads = shapes[0][0] // probes.inputs[0][pad[0]].shape[0] if pad and match.batch_dims == 1 else 1
        return MaskInfo(
            kind=kind, causal_bottom_right=(causal == "bottom_right"), window=window,
            padding_input=probes.placeholders[pad[0]] if pad else None,
            padding_keep_zero=bool(pad and pad[1]), heads_from_padding=heads,
            general_bias=bias, bias_note=bias_note, empty_rows=empty_rows,
        )
    return general_mask(match, not_beyond or "mask is not causal / key-padding on every probe input", bias_note, probes)


# -- queries with no allowed key ----------------------------------------------------------------

def _structured_empty_rows(match: SiteMatch, pieces: list[MaskPiece], causal, pad, scores_shape,
                           probes: ProbeSet, window: int = 0) -> tuple[str, str]:
    """(rule, "") for a structure that also holds on the empty-row probes, with what the original
    computes at its queries with no key; ("", why) when the original differs there (e.g. a model
    that unmasks such rows), so the mask must stay general. `pieces`: the site's mask pieces."""
    indices = list(range(probes.STANDARD)) + (probes.empty_row_probes() if pad else [])
    empty = []
    for p in indices:
        shape = probes.shape(scores_shape, p)
        cand = _candidate(causal, pad, shape, probes, p, window)
        try:
            allowed = _allowed(pieces, probes, p)
        except Exception:  # noqa: BLE001 - the structure holds on the standard probes; rule unknown here
            continue
        if not _agrees(allowed, cand, shape):
            return "", "mask is causal / key-padding except at queries with no allowed key"
        empty.append((p, ~cand.expand(shape).any(dim=-1)))
    return _empty_row_rule(match, probes, empty), ""


def _empty_row_rule(match: SiteMatch, probes: ProbeSet, empty: list) -> str:
    """What the original computes at its queries with no allowed key, read off the score each
    masking piece leaves at those rows (`empty`: (probe, rows) pairs): "mean" where every score of
    the row is one finite constant (the softmax is uniform), "zero" where all are -inf (SDPA's
    rule; eager softmax gives NaN there, which we do not reproduce: noted on the site)."""
    if match.zeroed_where_masked:
        return "zero"
    rows = []
    for p, where in empty:
        if not bool(where.any()):
            continue
        value, replaced = None, None
        for piece in reversed(match.pieces):  # from the product outwards: the order they apply in
            t = _value(piece, probes, p)
            if piece.kind == "add":
                term = t.double() * piece.coef
                value = term if value is None else value + term
                continue
            removed = t.bool() if piece.kind == "fill" else ~t.bool()
            fill = torch.tensor(piece.value, dtype=torch.float64)
            value = torch.where(removed, fill, torch.zeros((), dtype=torch.float64) if value is None else value)
            replaced = removed if replaced is None else replaced | removed
        # `where` has the shape of the pieces that remove pairs (a (B, 1, L) row mask), `value` may be
        # wider (a per-head bias added to it): read every row of both
        shape = torch.broadcast_shapes((*where.shape, 1), value.shape)
        where = where.expand(shape[:-1])
        value = value.expand(shape)
        drowned = replaced.expand(shape) if replaced is not None else torch.zeros(shape, dtype=torch.bool)
        drowned = drowned | (value.abs() >= 1e30)  # finfo.min + a score is finfo.min
        value = torch.where(drowned, value, torch.full((), float("nan"), dtype=torch.float64))
        rows.append(value[where])
    if not rows:
        return "zero"
    # one (rows, Lk) block per probe: probes at other lengths have other Lk
    if all(bool(torch.isneginf(r).all()) for r in rows):
        if match.pattern != "sdpa":
            match.notes.append("queries with no allowed key: the original's softmax gives NaN there, the rewrite 0")
        return "zero"
    if all(bool(r.isfinite().all()) and bool((r == r[:, :1]).all()) for r in rows):
        return "mean"
    return ""


def _mask_constants(nodes, probes: ProbeSet) -> list[int]:
    """Integers a mask's subgraph could compare positions against: integral scalar arguments, and
    the sizes of the stored tensors (a sliced triangle buffer) it reads."""
    found, seen, stack = [], set(), list(nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
        if n.op == "placeholder" and n.name in probes.state:
            found.extend(int(d) for d in probes.state[n.name].shape)
        for a in (*n.args, *n.kwargs.values()):
            for x in (a if isinstance(a, (list, tuple)) else (a,)):
                if isinstance(x, bool) or not isinstance(x, (int, float)):
                    continue
                if float(x).is_integer() and 2 <= abs(x) < _SENTINEL:
                    found.append(abs(int(x)))
    return found


def _holds_past_its_constants(pieces: list[MaskPiece], causal, pad, scores_shape, probes: ProbeSet,
                              window: int = 0) -> str:
    """'' if the structure of mask `pieces` also holds at a length past every constant of their
    subgraph (see the module docstring), else why the mask must stay general."""
    longest = max((int(n) for p in probes.probes[:probes.STANDARD] for n in p.values()), default=0)
    needed = max(_mask_constants([p.node for p in pieces], probes), default=0) + 2
    if needed <= longest:
        return ""  # the probes already reach past every window the mask could hold
    symbols = set()
    for d in scores_shape[-2:]:
        if isinstance(d, torch.SymInt):
            symbols |= d.node.expr.free_symbols
    if not symbols and needed - 2 <= LONGEST_PROBE:
        # static lengths: the probes already ran at the only length there is (the graph's constants
        # then include that length itself). Past the probe limit the mask stays general all the same:
        # the limit bounds what the probes cost, and they ran at that length
        return ""
    if needed > LONGEST_PROBE:
        return (f"mask's subgraph holds the constant {needed - 2} (a window or chunk?) beyond the "
                f"{LONGEST_PROBE}-token probe limit, so its structure cannot be proven; kept as a tensor")
    p = probes.long_probe({sym: needed for sym in symbols})
    try:
        allowed = _allowed(pieces, probes, p)
    except Exception as e:  # noqa: BLE001
        return f"mask could not be evaluated at length {needed} ({type(e).__name__})"
    shape = probes.shape(scores_shape, p)
    if _agrees(allowed, _candidate(causal, pad, shape, probes, p, window), shape):
        return ""
    return (f"mask is causal / key-padding near the example's length but not at length {needed} "
            f"(a window or chunk of {needed - 2}?); kept as a tensor")


def general_mask(match: SiteMatch, why: str = "", bias_note: str = "", probes: ProbeSet | None = None) -> MaskInfo:
    """Keep every piece as the tensor it is: always exact, never structured. Additive pieces
    reproduce the original's queries with no allowed key by themselves; for bool pieces the rule
    is read off the probes (the fill value decides)."""
    if not match.pieces:
        return MaskInfo(kind="causal" if match.causal else "none")
    bools = [p for p in match.pieces if p.kind != "add"]
    rule = "zero"
    if bools and probes is not None:
        # "" when the probes cannot tell what the original computes at a query with no allowed key
        # (the site is then skipped: a guess would be a silently different function on such rows)
        try:
            empty = []
            for p in [*range(probes.STANDARD), *(probes.empty_row_probes() if probes.padding_candidates else [])]:
                empty.append((p, ~_allowed(bools, probes, p).any(dim=-1)))
            rule = _empty_row_rule(match, probes, empty)
        except Exception:  # noqa: BLE001 - a mask we cannot evaluate: the rule stays unknown
            rule = ""
    return MaskInfo(kind="general", general_bias=[p for p in match.pieces if p.kind == "add"],
                    general_bool=bools, why_general=why, bias_note=bias_note, empty_rows=rule)


def _bias_note(bias: list[MaskPiece], probes: ProbeSet) -> str:
    if not bias:
        return ""
    notes = []
    for piece in bias:
        val = meta_val(piece.node)
        shape = "x".join(str(d) for d in val.shape) if isinstance(val, torch.Tensor) else "?"
        try:
            masked = bool((_value(piece, probes, 0) <= _MASKING).any())
        except Exception:  # noqa: BLE001
            masked = False
        notes.append(f"additive ({shape})" + (", mask folded in" if masked else ""))
    return "; ".join(notes)
