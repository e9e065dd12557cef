'''The Triton kernels of the two sparse attention ops: plain Triton, specialised by ``tl.constexpr``.

Two families, each forward and backward, each for softmax and entmax-1.5:

* grouped — one program per (tile of BLOCK_M query slots, group g, batch*head). It loads its
  query tile once, then streams the group's key slots in tiles of BLOCK_N (keys gathered by
  k_index, logits by tl.dot), then the group's summary keys in tiles of BLOCK_S.
* edge (CSR) — one program per query row. It loads the query row once and streams the row's
  edges in tiles of BLOCK_N (keys gathered by col_index, logits as row-vector products: rows do
  not share keys, so there is no matrix product to form).

Every feature a call may or may not use (the normaliser, causal, key padding, bias, pair mask,
key range, summaries, dropout, the gradients asked for, the accumulation dtype) is a
``tl.constexpr`` argument: the compiler keeps only the branches a specialisation takes, as the
Triton tutorials specialise. `specialise.py` chooses the values for a call.

Softmax is online (running max and sum in fp32/fp64 registers, one pass). Entmax-1.5 needs the
threshold tau with sum_j relu(x_j - tau)^2 = 1 (x = logits / 2) before any probability is known;
it is found by N_BISECT bisection steps on [max - 1, max], each a streaming pass over the row's
tiles (no sort: a row need not fit one tile), then one exact pass solves the quadratic on the
support found ({x > lo}), which makes tau exact up to rounding unless an entry lies within
2^-N_BISECT of tau (its mass is then below 2^-2*N_BISECT). Backward recomputes the probabilities
from the saved row statistic (logsumexp or tau), first streaming once for the row sums the
normaliser's gradient needs (softmax: <p, dp>; entmax: sum s, <s, dp>), then again for the
gradients: dq in registers, dk / dv / bias / summary gradients by tl.atomic_add (keys are shared by
many query tiles, GQA heads and groups).

Each of those streaming passes is one call of the family's pass function (`_grouped_pass`,
`_edge_pass`) with a constexpr PASS: it walks the row's tiles once and applies the pass's step to
each (`_grouped_step` / `_edge_step`, built on the arithmetic both families share: `_half_max`,
`_bisect_mass`, `_support_sums`, `_tau`, `_probs`, `_row_sums`, `_dlogits`). Runtime arguments
travel as tuples (a program's rows, the key / summary / edge pointers and strides, the gradient
targets); constexprs are passed one by one, as Triton needs them.

Dropout reproduces `lowering/torch/common.py::dropout_keep` bit for bit: the same 32-bit hash of
(seed, batch*head, query position, key column), computed in int64 so products never overflow.

When a row's keys fit one tile (ONE_TILE: groups without summaries of width <= BLOCK_N, edge rows
of degree <= BLOCK_N), the tile is loaded once, before the passes, and every pass reads registers.
'''
import triton
import triton.language as tl

# ------------------------------------------------------------------------------------------
# Shared helpers
# ------------------------------------------------------------------------------------------


@triton.jit
def _sum(x, axis: tl.constexpr):
    # tl.sum / tl.max are jit functions of triton.language; a builtin reduce over the same
    # combine functions is the same code on a GPU and also runs in the interpreter when
    # triton.language was imported before TRITON_INTERPRET was set (e.g. by torch.compile).
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def _mma(a, b, ACC: tl.constexpr, PRECISION: tl.constexpr):
    # operands and accumulation in ACC; PRECISION "ieee" / "tf32", or "default" (float64)
    if PRECISION == "default":
        c = tl.dot(a.to(ACC), b.to(ACC), out_dtype=ACC)
    else:
        c = tl.dot(a.to(ACC), b.to(ACC), out_dtype=ACC, input_precision=PRECISION)
    return c


@triton.jit
def _mix32(x):
    # lowering/torch/common.py::_mix32 on int64 values in [0, 2**32)
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x6A09E667) & 0xFFFFFFFF
    return x ^ (x >> 16)


# Entmax-1.5 threshold arithmetic on one tile of logits s; row values come broadcast to s
# (grouped: row[:, None], edge: a scalar) and reductions run over AXIS, the key axis.

@triton.jit
def _half_max(m, s, AXIS: tl.constexpr):
    return tl.maximum(m, _max(s, AXIS) * 0.5)


@triton.jit
def _bisect_mass(s, mid_b, AXIS: tl.constexpr):
    r = tl.maximum(s * 0.5 - mid_b, 0.0)
    return _sum(r * r, AXIS)


@triton.jit
def _support_sums(s, m_b, lo_b, AXIS: tl.constexpr):
    """(count, sum, sum of squares) of the shifted entries x - max above the bracket's low end."""
    z = s * 0.5 - m_b
    sup = z > lo_b - m_b
    z = tl.where(sup, z, 0.0)
    return _sum(sup.to(z.dtype), AXIS), _sum(z, AXIS), _sum(z * z, AXIS)


@triton.jit
def _tau(m_use, cnt, s1, s2):
    # support of size r = cnt: tau solves r tau^2 - 2 tau sum + sumsq = 1 (shifted by the max)
    cnt_safe = tl.maximum(cnt, 1.0)
    mean = s1 / cnt_safe
    ss = s2 - s1 * mean
    tau = m_use + mean - tl.sqrt(tl.maximum((1.0 - ss) / cnt_safe, 0.0))
    return tl.where(cnt > 0, tau, 0.0)  # empty rows: statistic 0, as the CPU kernel


@triton.jit
def _probs(s, stat_b, ENTMAX: tl.constexpr):
    """(p, s) of the backward: p the probabilities, s = sqrt(p) for entmax (p itself for softmax)."""
    if ENTMAX:
        sv = tl.maximum(s * 0.5 - stat_b, 0.0)
        p = sv * sv
    else:
        p = tl.exp(s - stat_b)
        sv = p
    return p, sv


@triton.jit
def _row_sums(r1, r2, p, sv, dp, AXIS: tl.constexpr, ENTMAX: tl.constexpr):
    """The normaliser gradient's row sums: softmax r1 = <p, dp>; entmax r1 = sum s, r2 = <s, dp>."""
    if ENTMAX:
        r1 += _sum(sv, AXIS)
        r2 += _sum(sv * dp, AXIS)
    else:
        r1 += _sum(p * dp, AXIS)
    return r1, r2


@triton.jit
def _row_grad_terms(r1, r2, dstat, ENTMAX: tl.constexpr, HAS_DSTAT: tl.constexpr):
    """(c, e) of `_dlogits` from the row sums and the row statistic's gradient."""
    if ENTMAX:
        ssum = tl.where(r1 > 0, r1, 1.0)
        c = r2 / ssum  # d tau = <s, d x> / sum(s)
        e = dstat / (2.0 * ssum)  # read only with HAS_DSTAT
    else:
        c = r1
        if HAS_DSTAT:
            c = c - dstat  # d logsumexp / d logits = p
        e = c
    return c, e


@triton.jit
def _dlogits(sv, dp, c_b, e_b, ENTMAX: tl.constexpr, HAS_DSTAT: tl.constexpr):
    """d logits: softmax p * (dp - c); entmax s * (dp - c), plus s * e when tau's gradient is given."""
    ds = sv * (dp - c_b)
    if ENTMAX:
        if HAS_DSTAT:
            ds += sv * e_b
    return ds


# What one streaming pass over a row's keys computes (the `PASS` of `_grouped_pass` / `_edge_pass`).
# State carried through a pass: running totals (t1, t2, t3, acc); row inputs p1, p2.
PASS_MAX: tl.constexpr = tl.constexpr(0)        # t1 = max of x = logits / 2 (entmax)
PASS_MASS: tl.constexpr = tl.constexpr(1)       # t1 = entmax mass at tau = p1 (a bisection midpoint)
PASS_SUPPORT: tl.constexpr = tl.constexpr(2)    # (t1, t2, t3) = count, sum, sum of squares of x - p1 over x > p2
PASS_ENTMAX: tl.constexpr = tl.constexpr(3)     # acc = entmax output at tau = p1
PASS_SOFTMAX: tl.constexpr = tl.constexpr(4)    # (t1, t2, acc) = online softmax max, sum, output
PASS_ROW_SUMS: tl.constexpr = tl.constexpr(5)   # (t1, t2) = the normaliser gradient's row sums
PASS_GRADS: tl.constexpr = tl.constexpr(6)      # acc = dq; dk, dv, ... scattered (p1, p2 = c, e)


# ------------------------------------------------------------------------------------------
# Grouped kernels
# ------------------------------------------------------------------------------------------


@triton.jit
def _grouped_rows(Q, QI, KR, SCALARS, seed_mix, Hq, Hkv, Lq, Lk, G, Wq,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  KEY_RANGE: tl.constexpr, DROPOUT: tl.constexpr):
    """The program's query tile: (g, b, h, kv_base, slot, offs_m, q, qpos, q_ok, k_lo, k_hi, hash_q,
    scale, drop_scale); key range and dropout entries are placeholders when unused."""
    pid_m = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    bh = tl.program_id(2).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    kv_base = (b * Hkv + h // (Hq // Hkv)) * Lk  # GQA: query head h reads kv head h // (Hq // Hkv)
    slot = bh * G + g                             # (b, h, g) in the slot tensors
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_in = offs_m < Wq
    offs_d = tl.arange(0, BLOCK_D)
    qpos = tl.load(QI + slot * Wq + offs_m, mask=m_in, other=-1)
    q_ok = qpos >= 0
    qpos = tl.maximum(qpos, 0)  # empty slots read row 0 and are masked out
    q = tl.load(Q + ((bh * Lq + qpos) * D)[:, None] + offs_d[None, :],
                mask=q_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    if KEY_RANGE:
        k_lo = tl.load(KR + (slot * Wq + offs_m) * 2, mask=m_in, other=0)
        k_hi = tl.load(KR + (slot * Wq + offs_m) * 2 + 1, mask=m_in, other=-1)
    else:
        k_lo = qpos
        k_hi = qpos
    scale = tl.load(SCALARS)
    if DROPOUT:
        drop_scale = tl.load(SCALARS + 1)
        hash_q = _mix32(_mix32(seed_mix.to(tl.int64) ^ bh) ^ qpos)
    else:
        drop_scale = scale
        hash_q = qpos
    return g, b, h, kv_base, slot, offs_m, q, qpos, q_ok, k_lo, k_hi, hash_q, scale, drop_scale


@triton.jit
def _grouped_key_tile(n0, rows, keys, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                      CAUSAL: tl.constexpr, PADDING: tl.constexpr, HAS_BIAS: tl.constexpr,
                      PAIR_MASK: tl.constexpr, KEY_RANGE: tl.constexpr, DROPOUT: tl.constexpr):
    """Logits s (BLOCK_M, BLOCK_N) of the query tile against key slots [n0, n0 + BLOCK_N), -inf
    where the pair is not allowed, with the gathered key / value rows:
    (k_ok, krow, kpos, kt, vt, s, allowed, keep)."""
    g, b, h, kv_base, slot, offs_m, q, qpos, q_ok, k_lo, k_hi, hash_q, scale, drop_scale = rows
    K, V, KI, KPM, BIAS, PMASK, Wk, Lk, causal_offset, drop_threshold, sb0, sb1, sb2, sb3, sp0, sp1, sp2, sp3 = keys
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    kpos = tl.load(KI + slot * Wk + offs_n, mask=offs_n < Wk, other=-1)
    k_ok = kpos >= 0
    kpos = tl.maximum(kpos, 0)
    krow = kv_base + kpos
    kt = tl.load(K + (krow * D)[:, None] + offs_d[None, :], mask=k_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    vt = tl.load(V + (krow * DV)[:, None] + offs_dv[None, :], mask=k_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)
    s = _mma(q, tl.trans(kt), ACC, PRECISION) * scale
    allowed = q_ok[:, None] & k_ok[None, :]
    if PADDING:
        allowed = allowed & (tl.load(KPM + b * Lk + kpos, mask=k_ok, other=0) != 0)[None, :]
    if CAUSAL:
        allowed = allowed & (kpos[None, :] <= qpos[:, None] + causal_offset)
    if KEY_RANGE:
        allowed = allowed & (kpos[None, :] >= k_lo[:, None]) & (kpos[None, :] <= k_hi[:, None])
    if PAIR_MASK:
        pm = tl.load(PMASK + b * sp0 + h * sp1 + qpos[:, None] * sp2 + kpos[None, :] * sp3, mask=allowed, other=0)
        allowed = allowed & (pm != 0)
    if HAS_BIAS:
        s += tl.load(BIAS + b * sb0 + h * sb1 + qpos[:, None] * sb2 + kpos[None, :] * sb3,
                     mask=allowed, other=0.0).to(ACC)
    s = tl.where(allowed, s, float("-inf"))
    if DROPOUT:
        keep = _mix32(hash_q[:, None] ^ kpos[None, :]) >= drop_threshold
    else:
        keep = allowed
    return k_ok, krow, kpos, kt, vt, s, allowed, keep


@triton.jit
def _grouped_summary_tile(s0, rows, summaries, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
                          PRECISION: tl.constexpr, SUMMARY_MASK: tl.constexpr, DROPOUT: tl.constexpr):
    """The same for summary slots [s0, s0 + BLOCK_S) (dropout numbers them Lk + g*S + s):
    (s_in, offs_s, kt, vt, s, keep)."""
    g, b, h, kv_base, slot, offs_m, q, qpos, q_ok, k_lo, k_hi, hash_q, scale, drop_scale = rows
    SK, SV, SMASK, S, Lk, drop_threshold, ssk0, ssk1, ssk2, ssk3, ssv0, ssv1, ssv2, ssv3, sm0, sm1, sm2, sm3, sm4 = \
        summaries
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_s = s0 + tl.arange(0, BLOCK_S)
    s_in = offs_s < S
    kt = tl.load(SK + b * ssk0 + h * ssk1 + g * ssk2 + offs_s[:, None] * ssk3 + offs_d[None, :],
                 mask=s_in[:, None] & (offs_d < D)[None, :], other=0.0)
    vt = tl.load(SV + b * ssv0 + h * ssv1 + g * ssv2 + offs_s[:, None] * ssv3 + offs_dv[None, :],
                 mask=s_in[:, None] & (offs_dv < DV)[None, :], other=0.0)
    s = _mma(q, tl.trans(kt), ACC, PRECISION) * scale
    allowed = q_ok[:, None] & s_in[None, :]
    if SUMMARY_MASK:
        sm = tl.load(SMASK + b * sm0 + h * sm1 + g * sm2 + offs_m[:, None] * sm3 + offs_s[None, :] * sm4,
                     mask=allowed, other=0)
        allowed = allowed & (sm != 0)
    s = tl.where(allowed, s, float("-inf"))
    if DROPOUT:
        keep = _mix32(hash_q[:, None] ^ (Lk + g * S + offs_s)[None, :]) >= drop_threshold
    else:
        keep = allowed
    return s_in, offs_s, kt, vt, s, keep


@triton.jit
def _grouped_probs(s, vt, keep, grads, drop_scale, ACC: tl.constexpr, PRECISION: tl.constexpr,
                   ENTMAX: tl.constexpr, DROPOUT: tl.constexpr):
    """Backward: (p, s = sqrt(p) for entmax, dp = dO . v, p as the output saw it)."""
    do, stat = grads[0], grads[1]
    p, sv = _probs(s, stat[:, None], ENTMAX)
    dp = _mma(do, tl.trans(vt), ACC, PRECISION)
    if DROPOUT:
        dp = tl.where(keep, dp * drop_scale, 0.0)
        pd = tl.where(keep, p * drop_scale, 0.0)
    else:
        pd = p
    return p, sv, dp, pd


@triton.jit
def _grouped_step(PASS: tl.constexpr, t1, t2, t3, acc, p1, p2, s, vt, keep, grads, drop_scale, ACC: tl.constexpr,
                  PRECISION: tl.constexpr, ENTMAX: tl.constexpr, DROPOUT: tl.constexpr):
    """One tile of a pass other than PASS_GRADS (the tile's rows are the query slots, its keys axis 1)."""
    if PASS == PASS_MAX:
        t1 = _half_max(t1, s, 1)
    elif PASS == PASS_MASS:
        t1 += _bisect_mass(s, p1[:, None], 1)
    elif PASS == PASS_SUPPORT:
        cnt, sum1, sum2 = _support_sums(s, p1[:, None], p2[:, None], 1)
        t1, t2, t3 = t1 + cnt, t2 + sum1, t3 + sum2
    elif PASS == PASS_ROW_SUMS:
        p, sv, dp, pd = _grouped_probs(s, vt, keep, grads, drop_scale, ACC, PRECISION, ENTMAX, DROPOUT)
        t1, t2 = _row_sums(t1, t2, p, sv, dp, 1, ENTMAX)
    else:
        if PASS == PASS_ENTMAX:
            r = tl.maximum(s * 0.5 - p1[:, None], 0.0)
            p = r * r
        else:  # PASS_SOFTMAX: t1 = running max, t2 = running sum
            m_new = tl.maximum(t1, _max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
            alpha = tl.exp(t1 - m_use)
            p = tl.exp(s - m_use[:, None])
            t2 = t2 * alpha + _sum(p, 1)
            acc = acc * alpha[:, None]
            t1 = m_new
        if DROPOUT:
            p = tl.where(keep, p * drop_scale, 0.0)  # the normaliser counts dropped pairs; the output does not
        acc += _mma(p, vt, ACC, PRECISION)
    return t1, t2, t3, acc


@triton.jit
def _grouped_tile_grads(s, kt, vt, keep, rows, grads, c_row, e_row, ACC: tl.constexpr, PRECISION: tl.constexpr,
                        ENTMAX: tl.constexpr, DROPOUT: tl.constexpr, HAS_DSTAT: tl.constexpr):
    """(d logits, dq contribution, dk tile, dv tile) of one tile."""
    g, b, h, kv_base, slot, offs_m, q, qpos, q_ok, k_lo, k_hi, hash_q, scale, drop_scale = rows
    do = grads[0]
    p, sv, dp, pd = _grouped_probs(s, vt, keep, grads, drop_scale, ACC, PRECISION, ENTMAX, DROPOUT)
    ds = _dlogits(sv, dp, c_row[:, None], e_row[:, None], ENTMAX, HAS_DSTAT)
    return ds, _mma(ds, kt, ACC, PRECISION), _mma(tl.trans(ds), q, ACC, PRECISION) * scale, \
        _mma(tl.trans(pd), do, ACC, PRECISION)


@triton.jit
def _grouped_pass(
    PASS: tl.constexpr, t1, t2, t3, acc, p1, p2, tile, rows, keys, summaries, grads,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, ENTMAX: tl.constexpr,
    CAUSAL: tl.constexpr, PADDING: tl.constexpr, HAS_BIAS: tl.constexpr, PAIR_MASK: tl.constexpr,
    KEY_RANGE: tl.constexpr, SUMMARY: tl.constexpr, SUMMARY_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    ONE_TILE: tl.constexpr, BIAS_GRAD: tl.constexpr, SUMMARY_GRAD: tl.constexpr, HAS_DSTAT: tl.constexpr,
):
    """One pass over every key of the query tile: its key slots (`tile`, loaded before the passes,
    when they fit ONE_TILE; else streamed in tiles of BLOCK_N), then its summary slots in tiles of
    BLOCK_S. Returns the running totals."""
    g, b, h, kv_base, slot, offs_m, q, qpos, q_ok, k_lo, k_hi, hash_q, scale, drop_scale = rows
    if PASS == PASS_GRADS:
        do, stat, DK, DV_, DBIAS, DSK, DSV, db0, db1, db2, db3 = grads
    Wk, S = keys[6], summaries[3]
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for n0 in range(0, 1 if ONE_TILE else Wk, BLOCK_N):  # ONE_TILE: one step, on the loaded tile
        if ONE_TILE:
            k_ok, krow, kpos, kt, vt, s, allowed, keep = tile
        else:
            k_ok, krow, kpos, kt, vt, s, allowed, keep = _grouped_key_tile(
                n0, rows, keys, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, ACC, PRECISION, CAUSAL, PADDING, HAS_BIAS,
                PAIR_MASK, KEY_RANGE, DROPOUT)
        if PASS == PASS_GRADS:
            ds, dq_t, dk_t, dv_t = _grouped_tile_grads(s, kt, vt, keep, rows, grads, p1, p2, ACC, PRECISION, ENTMAX,
                                                       DROPOUT, HAS_DSTAT)
            acc += dq_t
            tl.atomic_add(DK + (krow * D)[:, None] + offs_d[None, :], dk_t, mask=k_ok[:, None] & (offs_d < D)[None, :])
            tl.atomic_add(DV_ + (krow * DV)[:, None] + offs_dv[None, :], dv_t,
                          mask=k_ok[:, None] & (offs_dv < DV)[None, :])
            if BIAS_GRAD:
                tl.atomic_add(DBIAS + b * db0 + h * db1 + qpos[:, None] * db2 + kpos[None, :] * db3, ds, mask=allowed)
        else:
            t1, t2, t3, acc = _grouped_step(PASS, t1, t2, t3, acc, p1, p2, s, vt, keep, grads, drop_scale, ACC,
                                            PRECISION, ENTMAX, DROPOUT)
    if SUMMARY:
        for s0 in range(0, S, BLOCK_S):
            s_in, offs_s, kt, vt, s, keep = _grouped_summary_tile(
                s0, rows, summaries, D, DV, BLOCK_D, BLOCK_DV, BLOCK_S, ACC, PRECISION, SUMMARY_MASK, DROPOUT)
            if PASS == PASS_GRADS:
                ds, dq_t, dk_t, dv_t = _grouped_tile_grads(s, kt, vt, keep, rows, grads, p1, p2, ACC, PRECISION,
                                                           ENTMAX, DROPOUT, HAS_DSTAT)
                acc += dq_t
                if SUMMARY_GRAD:
                    tl.atomic_add(DSK + ((slot * S + offs_s) * D)[:, None] + offs_d[None, :], dk_t,
                                  mask=s_in[:, None] & (offs_d < D)[None, :])
                    tl.atomic_add(DSV + ((slot * S + offs_s) * DV)[:, None] + offs_dv[None, :], dv_t,
                                  mask=s_in[:, None] & (offs_dv < DV)[None, :])
            else:
                t1, t2, t3, acc = _grouped_step(PASS, t1, t2, t3, acc, p1, p2, s, vt, keep, grads, drop_scale, ACC,
                                                PRECISION, ENTMAX, DROPOUT)
    return t1, t2, t3, acc


@triton.jit
def grouped_fwd(
    Q, K, V, QI, KI, KPM, BIAS, PMASK, KR, SK, SV, SMASK, SCALARS,
    causal_offset, seed_mix, drop_threshold, Hq, Hkv, Lq, Lk, G, Wq, Wk, S,
    sb0, sb1, sb2, sb3, sp0, sp1, sp2, sp3, ssk0, ssk1, ssk2, ssk3, ssv0, ssv1, ssv2, ssv3,
    sm0, sm1, sm2, sm3, sm4,
    OUT, STAT,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, N_BISECT: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, ENTMAX: tl.constexpr, CAUSAL: tl.constexpr,
    PADDING: tl.constexpr, HAS_BIAS: tl.constexpr, PAIR_MASK: tl.constexpr, KEY_RANGE: tl.constexpr,
    SUMMARY: tl.constexpr, SUMMARY_MASK: tl.constexpr, DROPOUT: tl.constexpr, ONE_TILE: tl.constexpr,
):
    rows = _grouped_rows(Q, QI, KR, SCALARS, seed_mix, Hq, Hkv, Lq, Lk, G, Wq, D, BLOCK_D, BLOCK_M, KEY_RANGE, DROPOUT)
    keys = (K, V, KI, KPM, BIAS, PMASK, Wk, Lk, causal_offset, drop_threshold, sb0, sb1, sb2, sb3, sp0, sp1, sp2, sp3)
    summaries = (SK, SV, SMASK, S, Lk, drop_threshold, ssk0, ssk1, ssk2, ssk3, ssv0, ssv1, ssv2, ssv3,
                 sm0, sm1, sm2, sm3, sm4)
    tile = rows  # read only with ONE_TILE
    if ONE_TILE:  # the group's key slots fit one tile: load it once, keep it in registers for every pass
        tile = _grouped_key_tile(0, rows, keys, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, ACC, PRECISION, CAUSAL, PADDING,
                                 HAS_BIAS, PAIR_MASK, KEY_RANGE, DROPOUT)
    zero = tl.full([BLOCK_M], 0.0, ACC)
    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, ACC)
    if ENTMAX:
        # the threshold: the row max, N_BISECT bisection passes, then the sums over the support found
        m_i = _grouped_pass(
            PASS_MAX, tl.full([BLOCK_M], float("-inf"), ACC), zero, zero, acc, zero, zero, tile, rows, keys,
            summaries, (), D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, BLOCK_S, ACC, PRECISION, ENTMAX, CAUSAL, PADDING,
            HAS_BIAS, PAIR_MASK, KEY_RANGE, SUMMARY, SUMMARY_MASK, DROPOUT, ONE_TILE, False, False, False)[0]
        m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
        lo = m_use - 1.0
        hi = m_use
        for step in range(N_BISECT):
            mid = (lo + hi) * 0.5
            mass = _grouped_pass(
                PASS_MASS, zero, zero, zero, acc, mid, zero, tile, rows, keys, summaries, (), D, DV, BLOCK_D,
                BLOCK_DV, BLOCK_N, BLOCK_S, ACC, PRECISION, ENTMAX, CAUSAL, PADDING, HAS_BIAS, PAIR_MASK, KEY_RANGE,
                SUMMARY, SUMMARY_MASK, DROPOUT, ONE_TILE, False, False, False)[0]
            lo = tl.where(mass >= 1.0, mid, lo)
            hi = tl.where(mass >= 1.0, hi, mid)
        cnt, s1, s2, unused = _grouped_pass(
            PASS_SUPPORT, zero, zero, zero, acc, m_use, lo, tile, rows, keys, summaries, (), D, DV, BLOCK_D, BLOCK_DV,
            BLOCK_N, BLOCK_S, ACC, PRECISION, ENTMAX, CAUSAL, PADDING, HAS_BIAS, PAIR_MASK, KEY_RANGE, SUMMARY,
            SUMMARY_MASK, DROPOUT, ONE_TILE, False, False, False)
        stat = _tau(m_use, cnt, s1, s2)
        out = _grouped_pass(
            PASS_ENTMAX, zero, zero, zero, acc, stat, zero, tile, rows, keys, summaries, (), D, DV, BLOCK_D, BLOCK_DV,
            BLOCK_N, BLOCK_S, ACC, PRECISION, ENTMAX, CAUSAL, PADDING, HAS_BIAS, PAIR_MASK, KEY_RANGE, SUMMARY,
            SUMMARY_MASK, DROPOUT, ONE_TILE, False, False, False)[3]
    else:
        m_i, l_i, unused, acc = _grouped_pass(
            PASS_SOFTMAX, tl.full([BLOCK_M], float("-inf"), ACC), zero, zero, acc, zero, zero, tile, rows, keys,
            summaries, (), D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, BLOCK_S, ACC, PRECISION, ENTMAX, CAUSAL, PADDING,
            HAS_BIAS, PAIR_MASK, KEY_RANGE, SUMMARY, SUMMARY_MASK, DROPOUT, ONE_TILE, False, False, False)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        stat = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), 0.0)
    slot, offs_m = rows[4], rows[5]
    offs_dv = tl.arange(0, BLOCK_DV)
    tl.store(OUT + ((slot * Wq + offs_m) * DV)[:, None] + offs_dv[None, :], out.to(OUT.dtype.element_ty),
             mask=(offs_m < Wq)[:, None] & (offs_dv < DV)[None, :])
    tl.store(STAT + slot * Wq + offs_m, stat.to(STAT.dtype.element_ty), mask=offs_m < Wq)


@triton.jit
def grouped_bwd(
    Q, K, V, QI, KI, KPM, BIAS, PMASK, KR, SK, SV, SMASK, SCALARS,
    causal_offset, seed_mix, drop_threshold, Hq, Hkv, Lq, Lk, G, Wq, Wk, S,
    sb0, sb1, sb2, sb3, sp0, sp1, sp2, sp3, ssk0, ssk1, ssk2, ssk3, ssv0, ssv1, ssv2, ssv3,
    sm0, sm1, sm2, sm3, sm4,
    DO, STAT, DSTAT, DQ, DK, DV_, DBIAS, DSK, DSV, db0, db1, db2, db3,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, N_BISECT: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, ENTMAX: tl.constexpr, CAUSAL: tl.constexpr,
    PADDING: tl.constexpr, HAS_BIAS: tl.constexpr, PAIR_MASK: tl.constexpr, KEY_RANGE: tl.constexpr,
    SUMMARY: tl.constexpr, SUMMARY_MASK: tl.constexpr, DROPOUT: tl.constexpr, ONE_TILE: tl.constexpr,
    BIAS_GRAD: tl.constexpr, SUMMARY_GRAD: tl.constexpr, HAS_DSTAT: tl.constexpr,
):
    rows = _grouped_rows(Q, QI, KR, SCALARS, seed_mix, Hq, Hkv, Lq, Lk, G, Wq, D, BLOCK_D, BLOCK_M, KEY_RANGE, DROPOUT)
    keys = (K, V, KI, KPM, BIAS, PMASK, Wk, Lk, causal_offset, drop_threshold, sb0, sb1, sb2, sb3, sp0, sp1, sp2, sp3)
    summaries = (SK, SV, SMASK, S, Lk, drop_threshold, ssk0, ssk1, ssk2, ssk3, ssv0, ssv1, ssv2, ssv3,
                 sm0, sm1, sm2, sm3, sm4)
    tile = rows  # read only with ONE_TILE
    if ONE_TILE:
        tile = _grouped_key_tile(0, rows, keys, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, ACC, PRECISION, CAUSAL, PADDING,
                                 HAS_BIAS, PAIR_MASK, KEY_RANGE, DROPOUT)
    g, b, h, kv_base, slot, offs_m, q, qpos, q_ok, k_lo, k_hi, hash_q, scale, drop_scale = rows
    m_in = offs_m < Wq
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    do = tl.load(DO + ((slot * Wq + offs_m) * DV)[:, None] + offs_dv[None, :], mask=m_in[:, None] & (offs_dv < DV)[None, :],
                 other=0.0)
    stat = tl.load(STAT + slot * Wq + offs_m, mask=m_in, other=0.0).to(ACC)
    dstat = stat  # read only with HAS_DSTAT
    if HAS_DSTAT:
        dstat = tl.load(DSTAT + slot * Wq + offs_m, mask=m_in, other=0.0).to(ACC)
    grads = (do, stat, DK, DV_, DBIAS, DSK, DSV, db0, db1, db2, db3)
    zero = tl.full([BLOCK_M], 0.0, ACC)
    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, ACC)
    # pass 1: the row sums the normaliser's gradient needs; pass 2: the gradients
    r1, r2, unused, unused_acc = _grouped_pass(
        PASS_ROW_SUMS, zero, zero, zero, dq, zero, zero, tile, rows, keys, summaries, grads, D, DV, BLOCK_D, BLOCK_DV,
        BLOCK_N, BLOCK_S, ACC, PRECISION, ENTMAX, CAUSAL, PADDING, HAS_BIAS, PAIR_MASK, KEY_RANGE, SUMMARY,
        SUMMARY_MASK, DROPOUT, ONE_TILE, BIAS_GRAD, SUMMARY_GRAD, HAS_DSTAT)
    c_row, e_row = _row_grad_terms(r1, r2, dstat, ENTMAX, HAS_DSTAT)
    dq = _grouped_pass(
        PASS_GRADS, zero, zero, zero, dq, c_row, e_row, tile, rows, keys, summaries, grads, D, DV, BLOCK_D, BLOCK_DV,
        BLOCK_N, BLOCK_S, ACC, PRECISION, ENTMAX, CAUSAL, PADDING, HAS_BIAS, PAIR_MASK, KEY_RANGE, SUMMARY,
        SUMMARY_MASK, DROPOUT, ONE_TILE, BIAS_GRAD, SUMMARY_GRAD, HAS_DSTAT)[3]
    bh = tl.program_id(2).to(tl.int64)
    tl.atomic_add(DQ + ((bh * Lq + qpos) * D)[:, None] + offs_d[None, :], dq * scale,
                  mask=q_ok[:, None] & (offs_d < D)[None, :])


# ------------------------------------------------------------------------------------------
# Edge (CSR) kernels: one program per query row r = (b*Hq + h)*Lq + i
# ------------------------------------------------------------------------------------------


@triton.jit
def _edge_row(Q, ROW_PTR, SCALARS, seed_mix, Hq, Hkv, Lq, Lk, D: tl.constexpr, BLOCK_D: tl.constexpr,
              ACC: tl.constexpr, DROPOUT: tl.constexpr):
    """The program's query row: (row, i, b, h, kv_base, start, end, q, hash_q, scale, drop_scale)."""
    row = tl.program_id(0).to(tl.int64)
    bh = row // Lq
    i = row % Lq
    b = bh // Hq
    h = bh % Hq
    kv_base = (b * Hkv + h // (Hq // Hkv)) * Lk  # GQA: query head h reads kv head h // (Hq // Hkv)
    start = tl.load(ROW_PTR + row)
    end = tl.load(ROW_PTR + row + 1)
    scale = tl.load(SCALARS)
    if DROPOUT:
        drop_scale = tl.load(SCALARS + 1)
        hash_q = _mix32(_mix32(seed_mix.to(tl.int64) ^ bh) ^ i)
    else:
        drop_scale = scale
        hash_q = i
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + row * D + offs_d, mask=offs_d < D, other=0.0).to(ACC)
    return row, i, b, h, kv_base, start, end, q, hash_q, scale, drop_scale


@triton.jit
def _edge_tile(n0, row, edges, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               BLOCK_N: tl.constexpr, ACC: tl.constexpr, CAUSAL: tl.constexpr, PADDING: tl.constexpr,
               HAS_BIAS: tl.constexpr, EDGE_BIAS: tl.constexpr, DROPOUT: tl.constexpr):
    """Logits s (BLOCK_N,) of the row's edges [start + n0, start + n0 + BLOCK_N), -inf where the
    edge is padding or removed by the causal rule / key padding, with the gathered rows:
    (e, col, krow, kt, vt, s, allowed, keep)."""
    r, i, b, h, kv_base, start, end, q, hash_q, scale, drop_scale = row
    COL, K, V, KPM, BIAS, EBIAS, Lk, causal_offset, drop_threshold, sb0, sb1, sb2, sb3 = edges
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    e = start + n0 + tl.arange(0, BLOCK_N)
    valid = e < end
    col = tl.load(COL + e, mask=valid, other=0)
    krow = kv_base + col
    kt = tl.load(K + (krow * D)[:, None] + offs_d[None, :], mask=valid[:, None] & (offs_d < D)[None, :],
                 other=0.0).to(ACC)
    vt = tl.load(V + (krow * DV)[:, None] + offs_dv[None, :], mask=valid[:, None] & (offs_dv < DV)[None, :],
                 other=0.0).to(ACC)
    s = _sum(kt * q[None, :], 1) * scale
    allowed = valid
    if CAUSAL:
        allowed = allowed & (col <= i + causal_offset)
    if PADDING:
        allowed = allowed & (tl.load(KPM + b * Lk + col, mask=valid, other=0) != 0)
    if HAS_BIAS:
        s += tl.load(BIAS + b * sb0 + h * sb1 + i * sb2 + col * sb3, mask=allowed, other=0.0).to(ACC)
    if EDGE_BIAS:
        s += tl.load(EBIAS + e, mask=allowed, other=0.0).to(ACC)
    s = tl.where(allowed, s, float("-inf"))
    if DROPOUT:
        keep = _mix32(hash_q ^ col) >= drop_threshold
    else:
        keep = allowed
    return e, col, krow, kt, vt, s, allowed, keep


@triton.jit
def _edge_probs(s, vt, keep, grads, drop_scale, ENTMAX: tl.constexpr, DROPOUT: tl.constexpr):
    """Backward: (p, s = sqrt(p) for entmax, dp = dO . v, p as the output saw it)."""
    do, stat = grads[0], grads[1]
    p, sv = _probs(s, stat, ENTMAX)
    dp = _sum(vt * do[None, :], 1)
    if DROPOUT:
        dp = tl.where(keep, dp * drop_scale, 0.0)
        pd = tl.where(keep, p * drop_scale, 0.0)
    else:
        pd = p
    return p, sv, dp, pd


@triton.jit
def _edge_step(PASS: tl.constexpr, t1, t2, t3, acc, p1, p2, s, vt, keep, grads, drop_scale, ENTMAX: tl.constexpr,
               DROPOUT: tl.constexpr):
    """One tile of a pass other than PASS_GRADS (the row's statistics are scalars, its edges axis 0)."""
    if PASS == PASS_MAX:
        t1 = _half_max(t1, s, 0)
    elif PASS == PASS_MASS:
        t1 += _bisect_mass(s, p1, 0)
    elif PASS == PASS_SUPPORT:
        cnt, sum1, sum2 = _support_sums(s, p1, p2, 0)
        t1, t2, t3 = t1 + cnt, t2 + sum1, t3 + sum2
    elif PASS == PASS_ROW_SUMS:
        p, sv, dp, pd = _edge_probs(s, vt, keep, grads, drop_scale, ENTMAX, DROPOUT)
        t1, t2 = _row_sums(t1, t2, p, sv, dp, 0, ENTMAX)
    else:
        if PASS == PASS_ENTMAX:
            r = tl.maximum(s * 0.5 - p1, 0.0)
            p = r * r
        else:  # PASS_SOFTMAX: t1 = running max, t2 = running sum
            m_new = tl.maximum(t1, _max(s, 0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(t1 - m_use)
            p = tl.exp(s - m_use)
            t2 = t2 * alpha + _sum(p, 0)
            acc = acc * alpha
            t1 = m_new
        if DROPOUT:
            p = tl.where(keep, p * drop_scale, 0.0)
        acc += _sum(p[:, None] * vt, 0)
    return t1, t2, t3, acc


@triton.jit
def _edge_pass(
    PASS: tl.constexpr, t1, t2, t3, acc, p1, p2, tile, row, edges, grads,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    ACC: tl.constexpr, ENTMAX: tl.constexpr, CAUSAL: tl.constexpr, PADDING: tl.constexpr, HAS_BIAS: tl.constexpr,
    EDGE_BIAS: tl.constexpr, DROPOUT: tl.constexpr, ONE_TILE: tl.constexpr, BIAS_GRAD: tl.constexpr,
    EDGE_BIAS_GRAD: tl.constexpr, HAS_DSTAT: tl.constexpr,
):
    """One pass over the row's edges (`tile`, loaded before the passes, when they fit ONE_TILE; else
    streamed in tiles of BLOCK_N). Returns the running totals."""
    r, i, b, h, kv_base, start, end, q, hash_q, scale, drop_scale = row
    if PASS == PASS_GRADS:
        do, stat, DK, DV_, DBIAS, DEDGE, db0, db1, db2, db3 = grads
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for n0 in range(0, 1 if ONE_TILE else end - start, BLOCK_N):  # ONE_TILE: one step, on the loaded tile
        if ONE_TILE:
            e, col, krow, kt, vt, s, allowed, keep = tile
        else:
            e, col, krow, kt, vt, s, allowed, keep = _edge_tile(
                n0, row, edges, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, ACC, CAUSAL, PADDING, HAS_BIAS, EDGE_BIAS, DROPOUT)
        if PASS == PASS_GRADS:
            p, sv, dp, pd = _edge_probs(s, vt, keep, grads, drop_scale, ENTMAX, DROPOUT)
            ds = tl.where(allowed, _dlogits(sv, dp, p1, p2, ENTMAX, HAS_DSTAT), 0.0)
            acc += _sum(ds[:, None] * kt, 0)
            tl.atomic_add(DK + (krow * D)[:, None] + offs_d[None, :], (ds * scale)[:, None] * q[None, :],
                          mask=allowed[:, None] & (offs_d < D)[None, :])
            tl.atomic_add(DV_ + (krow * DV)[:, None] + offs_dv[None, :], pd[:, None] * do[None, :],
                          mask=allowed[:, None] & (offs_dv < DV)[None, :])
            if BIAS_GRAD:
                tl.atomic_add(DBIAS + b * db0 + h * db1 + i * db2 + col * db3, ds, mask=allowed)
            if EDGE_BIAS_GRAD:
                tl.store(DEDGE + e, ds, mask=allowed)  # each edge belongs to exactly this row: no atomics
        else:
            t1, t2, t3, acc = _edge_step(PASS, t1, t2, t3, acc, p1, p2, s, vt, keep, grads, drop_scale, ENTMAX,
                                         DROPOUT)
    return t1, t2, t3, acc


@triton.jit
def edge_fwd(
    Q, K, V, ROW_PTR, COL, KPM, BIAS, EBIAS, SCALARS, causal_offset, seed_mix, drop_threshold,
    Hq, Hkv, Lq, Lk, sb0, sb1, sb2, sb3,
    OUT, STAT,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, N_BISECT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    ENTMAX: tl.constexpr, CAUSAL: tl.constexpr, PADDING: tl.constexpr, HAS_BIAS: tl.constexpr,
    EDGE_BIAS: tl.constexpr, DROPOUT: tl.constexpr, ONE_TILE: tl.constexpr,
):
    row = _edge_row(Q, ROW_PTR, SCALARS, seed_mix, Hq, Hkv, Lq, Lk, D, BLOCK_D, ACC, DROPOUT)
    edges = (COL, K, V, KPM, BIAS, EBIAS, Lk, causal_offset, drop_threshold, sb0, sb1, sb2, sb3)
    tile = row  # read only with ONE_TILE
    if ONE_TILE:  # the row's edges fit one tile: load it once, keep it in registers for every pass
        tile = _edge_tile(0, row, edges, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, ACC, CAUSAL, PADDING, HAS_BIAS, EDGE_BIAS,
                          DROPOUT)
    zero = tl.full([], 0.0, ACC)
    acc = tl.full([BLOCK_DV], 0.0, ACC)
    if ENTMAX:
        # the threshold: the row max, N_BISECT bisection passes, then the sums over the support found
        m_i = _edge_pass(
            PASS_MAX, tl.full([], float("-inf"), ACC), zero, zero, acc, zero, zero, tile, row, edges, (), D, DV, BLOCK_D,
            BLOCK_DV, BLOCK_N, ACC, ENTMAX, CAUSAL, PADDING, HAS_BIAS, EDGE_BIAS, DROPOUT, ONE_TILE, False, False,
            False)[0]
        m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
        lo = m_use - 1.0
        hi = m_use
        for step in range(N_BISECT):
            mid = (lo + hi) * 0.5
            mass = _edge_pass(
                PASS_MASS, zero, zero, zero, acc, mid, zero, tile, row, edges, (), D, DV, BLOCK_D, BLOCK_DV, BLOCK_N,
                ACC, ENTMAX, CAUSAL, PADDING, HAS_BIAS, EDGE_BIAS, DROPOUT, ONE_TILE, False, False, False)[0]
            lo = tl.where(mass >= 1.0, mid, lo)
            hi = tl.where(mass >= 1.0, hi, mid)
        cnt, s1, s2, unused = _edge_pass(
            PASS_SUPPORT, zero, zero, zero, acc, m_use, lo, tile, row, edges, (), D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, ACC,
            ENTMAX, CAUSAL, PADDING, HAS_BIAS, EDGE_BIAS, DROPOUT, ONE_TILE, False, False, False)
        stat = _tau(m_use, cnt, s1, s2)
        out = _edge_pass(
            PASS_ENTMAX, zero, zero, zero, acc, stat, zero, tile, row, edges, (), D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, ACC,
            ENTMAX, CAUSAL, PADDING, HAS_BIAS, EDGE_BIAS, DROPOUT, ONE_TILE, False, False, False)[3]
    else:
        m_i, l_i, unused, acc = _edge_pass(
            PASS_SOFTMAX, tl.full([], float("-inf"), ACC), zero, zero, acc, zero, zero, tile, row, edges, (), D, DV,
            BLOCK_D, BLOCK_DV, BLOCK_N, ACC, ENTMAX, CAUSAL, PADDING, HAS_BIAS, EDGE_BIAS, DROPOUT, ONE_TILE, False,
            False, False)
        out = acc / tl.where(l_i > 0, l_i, 1.0)
        stat = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), 0.0)
    r = row[0]
    offs_dv = tl.arange(0, BLOCK_DV)
    tl.store(OUT + r * DV + offs_dv, out.to(OUT.dtype.element_ty), mask=offs_dv < DV)
    tl.store(STAT + r, stat.to(STAT.dtype.element_ty))


@triton.jit
def edge_bwd(
    Q, K, V, ROW_PTR, COL, KPM, BIAS, EBIAS, SCALARS, causal_offset, seed_mix, drop_threshold,
    Hq, Hkv, Lq, Lk, sb0, sb1, sb2, sb3,
    DO, STAT, DSTAT, DQ, DK, DV_, DBIAS, DEDGE, db0, db1, db2, db3,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, N_BISECT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    ENTMAX: tl.constexpr, CAUSAL: tl.constexpr, PADDING: tl.constexpr, HAS_BIAS: tl.constexpr,
    EDGE_BIAS: tl.constexpr, DROPOUT: tl.constexpr, ONE_TILE: tl.constexpr,
    BIAS_GRAD: tl.constexpr, EDGE_BIAS_GRAD: tl.constexpr, HAS_DSTAT: tl.constexpr,
):
    row = _edge_row(Q, ROW_PTR, SCALARS, seed_mix, Hq, Hkv, Lq, Lk, D, BLOCK_D, ACC, DROPOUT)
    edges = (COL, K, V, KPM, BIAS, EBIAS, Lk, causal_offset, drop_threshold, sb0, sb1, sb2, sb3)
    tile = row  # read only with ONE_TILE
    if ONE_TILE:
        tile = _edge_tile(0, row, edges, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, ACC, CAUSAL, PADDING, HAS_BIAS, EDGE_BIAS,
                          DROPOUT)
    r, scale = row[0], row[9]
    offs_dv = tl.arange(0, BLOCK_DV)
    do = tl.load(DO + r * DV + offs_dv, mask=offs_dv < DV, other=0.0).to(ACC)
    stat = tl.load(STAT + r).to(ACC)
    dstat = stat  # read only with HAS_DSTAT
    if HAS_DSTAT:
        dstat = tl.load(DSTAT + r).to(ACC)
    grads = (do, stat, DK, DV_, DBIAS, DEDGE, db0, db1, db2, db3)
    zero = tl.full([], 0.0, ACC)
    dq = tl.full([BLOCK_D], 0.0, ACC)
    # pass 1: the row sums the normaliser's gradient needs; pass 2: the gradients
    r1, r2, unused, unused_acc = _edge_pass(
        PASS_ROW_SUMS, zero, zero, zero, dq, zero, zero, tile, row, edges, grads, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N,
        ACC, ENTMAX, CAUSAL, PADDING, HAS_BIAS, EDGE_BIAS, DROPOUT, ONE_TILE, BIAS_GRAD, EDGE_BIAS_GRAD, HAS_DSTAT)
    c_row, e_row = _row_grad_terms(r1, r2, dstat, ENTMAX, HAS_DSTAT)
    dq = _edge_pass(
        PASS_GRADS, zero, zero, zero, dq, c_row, e_row, tile, row, edges, grads, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N,
        ACC, ENTMAX, CAUSAL, PADDING, HAS_BIAS, EDGE_BIAS, DROPOUT, ONE_TILE, BIAS_GRAD, EDGE_BIAS_GRAD, HAS_DSTAT)[3]
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(DQ + r * D + offs_d, dq * scale, mask=offs_d < D)
