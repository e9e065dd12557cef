'''Triton source templates of the sparse attention kernels (rendered by `generate.py`).

Two families, each forward and backward, each for softmax and entmax-1.5:

* grouped — one program per (tile of BLOCK_M query slots, group g, batch*head). It loads its
  query tile once, then streams the group's key slots in tiles of BLOCK_N (keys gathered by
  k_index, logits by tl.dot), then the group's summary keys in tiles of BLOCK_S.
* edge (CSR) — one program per query row. It loads the query row once and streams the row's
  edges in tiles of BLOCK_N (keys gathered by col_index, logits as row-vector products: rows do
  not share keys, so there is no matrix product to form).

Softmax is online (running max and sum in fp32/fp64 registers, one pass). Entmax-1.5 needs the
threshold tau with sum_j relu(x_j - tau)^2 = 1 (x = logits / 2) before any probability is known;
it is found by a fixed number (N_BISECT) of bisection steps on [max - 1, max], each a streaming
pass over the row's tiles (no sort: a row need not fit one tile), then one exact pass solves the
quadratic on the support found ({x > lo}), which makes tau exact up to rounding unless an entry
lies within 2^-N_BISECT of tau (its mass is then below 2^-2*N_BISECT). Backward recomputes the
probabilities from the saved row statistic (logsumexp or tau), first streaming once for the row
sums the normaliser's gradient needs (softmax: <p, dp>; entmax: sum s, <s, dp>), then again for
the gradients: dq in registers, dk / dv / bias / summary gradients by tl.atomic_add (keys are
shared by many query tiles, GQA heads and groups).

Dropout reproduces `lowering/torch/common.py::dropout_keep` bit for bit: the same 32-bit hash of
(seed, batch*head, query position, key column), computed in int64 so products never overflow.

Directives: ``#if expr`` / ``#else`` / ``#endif`` over the spec (upper-case names), ``#> name``
inserts SNIPPETS[name]; ``{{NAME}}`` substitutes a spec value.
'''

_COMMON = '''
import triton
import triton.language as tl

CONSTEXPRS = dict(D={{D}}, DV={{DV}}, BLOCK_D={{BLOCK_D}}, BLOCK_DV={{BLOCK_DV}}, BLOCK_N={{BLOCK_N}},
#if FAMILY == "grouped"
                  BLOCK_M={{BLOCK_M}}, BLOCK_S={{BLOCK_S}},
#endif
                  N_BISECT={{N_BISECT}})


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
def _mma(a, b):
    # operands in {{MMA}}, accumulation in {{ACC}}
    return tl.dot(a.to({{MMA}}), b.to({{MMA}}), out_dtype={{ACC}}{{DOT_ARGS}})
#if DROPOUT


@triton.jit
def _mix32(x):
    # lowering/torch/common.py::_mix32 on int64 values in [0, 2**32)
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x6A09E667) & 0xFFFFFFFF
    return x ^ (x >> 16)
#endif
'''

# ------------------------------------------------------------------------------------------
# Grouped kernels
# ------------------------------------------------------------------------------------------

GROUPED_DEFAULTS = dict(
    d=16, dv=16, block_m=16, block_n=16, block_s=16, dtype="float32", normalizer="softmax",
    causal=False, padding=False, bias=False, pair_mask=False, key_range=False, summary=False,
    summary_mask=False, dropout=False, n_bisect=30, one_tile=False,
)
GROUPED_BWD_DEFAULTS = dict(GROUPED_DEFAULTS, bias_grad=False, summary_grad=False, dstat=False)

_GROUPED_SIGNATURE = '''
    Q, K, V, QI, KI, KPM, BIAS, PMASK, KR, SK, SV, SMASK, SCALARS,
    causal_offset, seed_mix, drop_threshold, Hq, Hkv, Lq, Lk, G, Wq, Wk, S,
    sb0, sb1, sb2, sb3, sp0, sp1, sp2, sp3, ssk0, ssk1, ssk2, ssk3, ssv0, ssv1, ssv2, ssv3,
    sm0, sm1, sm2, sm3, sm4,'''

_GROUPED_CONSTEXPRS = '''
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, N_BISECT: tl.constexpr,'''

_GROUPED_PROLOGUE = '''
pid_m = tl.program_id(0)
g = tl.program_id(1).to(tl.int64)
bh = tl.program_id(2).to(tl.int64)
b = bh // Hq
h = bh % Hq
kv_base = (b * Hkv + h // (Hq // Hkv)) * Lk  # GQA: query head h reads kv head h // (Hq // Hkv)
slot = bh * G + g                             # (b, h, g) in the slot tensors
scale = tl.load(SCALARS)
#if DROPOUT
drop_scale = tl.load(SCALARS + 1)
hash_bh = _mix32(seed_mix.to(tl.int64) ^ bh)
#endif
offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
m_in = offs_m < Wq
offs_d = tl.arange(0, BLOCK_D)
d_ok = offs_d < D
offs_dv = tl.arange(0, BLOCK_DV)
dv_ok = offs_dv < DV
qpos = tl.load(QI + slot * Wq + offs_m, mask=m_in, other=-1)
q_ok = qpos >= 0
qpos = tl.maximum(qpos, 0)  # empty slots read row 0 and are masked out
q = tl.load(Q + ((bh * Lq + qpos) * D)[:, None] + offs_d[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)
#if KEY_RANGE
k_lo = tl.load(KR + (slot * Wq + offs_m) * 2, mask=m_in, other=0)
k_hi = tl.load(KR + (slot * Wq + offs_m) * 2 + 1, mask=m_in, other=-1)
#endif
#if DROPOUT
hash_q = _mix32(hash_bh ^ qpos)
#endif
'''

SNIPPETS = {}

# s: (BLOCK_M, BLOCK_N) logits of the query tile against key slots [n0, n0 + BLOCK_N), -inf where
# the pair is not allowed; kt / vt: the gathered key / value rows.
SNIPPETS["grouped_direct_tile"] = '''
offs_n = n0 + tl.arange(0, BLOCK_N)
kpos = tl.load(KI + slot * Wk + offs_n, mask=offs_n < Wk, other=-1)
k_ok = kpos >= 0
kpos = tl.maximum(kpos, 0)
krow = kv_base + kpos
kt = tl.load(K + (krow * D)[:, None] + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
vt = tl.load(V + (krow * DV)[:, None] + offs_dv[None, :], mask=k_ok[:, None] & dv_ok[None, :], other=0.0)
s = _mma(q, tl.trans(kt)) * scale
allowed = q_ok[:, None] & k_ok[None, :]
#if PADDING
allowed = allowed & (tl.load(KPM + b * Lk + kpos, mask=k_ok, other=0) != 0)[None, :]
#endif
#if CAUSAL
allowed = allowed & (kpos[None, :] <= qpos[:, None] + causal_offset)
#endif
#if KEY_RANGE
allowed = allowed & (kpos[None, :] >= k_lo[:, None]) & (kpos[None, :] <= k_hi[:, None])
#endif
#if PAIR_MASK
pm = tl.load(PMASK + b * sp0 + h * sp1 + qpos[:, None] * sp2 + kpos[None, :] * sp3, mask=allowed, other=0)
allowed = allowed & (pm != 0)
#endif
#if BIAS
s += tl.load(BIAS + b * sb0 + h * sb1 + qpos[:, None] * sb2 + kpos[None, :] * sb3, mask=allowed, other=0.0).to({{ACC}})
#endif
s = tl.where(allowed, s, float("-inf"))
#if DROPOUT
keep = _mix32(hash_q[:, None] ^ kpos[None, :]) >= drop_threshold
#endif
'''

# the same for summary slots [s0, s0 + BLOCK_S); dropout numbers them Lk + g*S + s.
SNIPPETS["grouped_summary_tile"] = '''
offs_s = s0 + tl.arange(0, BLOCK_S)
s_in = offs_s < S
kt = tl.load(SK + b * ssk0 + h * ssk1 + g * ssk2 + offs_s[:, None] * ssk3 + offs_d[None, :],
             mask=s_in[:, None] & d_ok[None, :], other=0.0)
vt = tl.load(SV + b * ssv0 + h * ssv1 + g * ssv2 + offs_s[:, None] * ssv3 + offs_dv[None, :],
             mask=s_in[:, None] & dv_ok[None, :], other=0.0)
s = _mma(q, tl.trans(kt)) * scale
allowed = q_ok[:, None] & s_in[None, :]
#if SUMMARY_MASK
sm = tl.load(SMASK + b * sm0 + h * sm1 + g * sm2 + offs_m[:, None] * sm3 + offs_s[None, :] * sm4, mask=allowed, other=0)
allowed = allowed & (sm != 0)
#endif
s = tl.where(allowed, s, float("-inf"))
#if DROPOUT
keep = _mix32(hash_q[:, None] ^ (Lk + g * S + offs_s)[None, :]) >= drop_threshold
#endif
'''

SNIPPETS["softmax_update"] = '''
m_new = tl.maximum(m_i, _max(s, 1))
m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
alpha = tl.exp(m_i - m_use)
p = tl.exp(s - m_use[:, None])
l_i = l_i * alpha + _sum(p, 1)
#if DROPOUT
p = tl.where(keep, p * drop_scale, 0.0)  # the normaliser counts dropped pairs; the output does not
#endif
acc = acc * alpha[:, None] + _mma(p, vt)
m_i = m_new
'''

SNIPPETS["row_max"] = '''
m_i = tl.maximum(m_i, _max(s, 1) * 0.5)
'''

SNIPPETS["bisect_mass"] = '''
r = tl.maximum(s * 0.5 - mid[:, None], 0.0)
mass += _sum(r * r, 1)
'''

SNIPPETS["support_sums"] = '''
z = s * 0.5 - m_use[:, None]
sup = z > (lo - m_use)[:, None]
cnt += _sum(sup.to({{ACC}}), 1)
z = tl.where(sup, z, 0.0)
s1 += _sum(z, 1)
s2 += _sum(z * z, 1)
'''

SNIPPETS["entmax_accumulate"] = '''
r = tl.maximum(s * 0.5 - tau[:, None], 0.0)
p = r * r
#if DROPOUT
p = tl.where(keep, p * drop_scale, 0.0)
#endif
acc += _mma(p, vt)
'''

# The one entmax-1.5 threshold of this backend, for both families: tau of the program's rows (shape
# ROW: grouped, its BLOCK_M query slots; edge, its one row), from logits streamed N_BISECT + 2 times
# (see the module docstring). The each_* snippets are the family's loops over its tiles.
SNIPPETS["entmax_threshold"] = '''
m_i = tl.full({{ROW}}, float("-inf"), {{ACC}})
#> each_row_max
m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
lo = m_use - 1.0
hi = m_use
for _ in range(N_BISECT):
    mid = (lo + hi) * 0.5
    mass = tl.full({{ROW}}, 0.0, {{ACC}})
    #> each_bisect_mass
    lo = tl.where(mass >= 1.0, mid, lo)
    hi = tl.where(mass >= 1.0, hi, mid)
cnt = tl.full({{ROW}}, 0.0, {{ACC}})
s1 = tl.full({{ROW}}, 0.0, {{ACC}})
s2 = tl.full({{ROW}}, 0.0, {{ACC}})
#> each_support_sums
# support of size r = cnt: tau solves r tau^2 - 2 tau sum + sumsq = 1 (shifted by the max)
cnt_safe = tl.maximum(cnt, 1.0)
mean = s1 / cnt_safe
ss = s2 - s1 * mean
tau = m_use + mean - tl.sqrt(tl.maximum((1.0 - ss) / cnt_safe, 0.0))
tau = tl.where(cnt > 0, tau, 0.0)  # empty rows: statistic 0, as the CPU kernel
'''
for _body in ("row_max", "bisect_mass", "support_sums"):
    SNIPPETS[f"each_{_body}"] = f'''
#if FAMILY == "grouped"
#> grouped_each_{_body}
#else
#> edge_each_edge_{_body}
#endif
'''

GROUPED_FWD = _COMMON + '''

@triton.jit
def kernel(''' + _GROUPED_SIGNATURE + '''
    OUT, STAT,''' + _GROUPED_CONSTEXPRS + '''
):
    #> grouped_prologue
    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, {{ACC}})
#if NORMALIZER == "softmax"
    m_i = tl.full([BLOCK_M], float("-inf"), {{ACC}})
    l_i = tl.full([BLOCK_M], 0.0, {{ACC}})
    #> grouped_each_softmax_update
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    stat = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), 0.0)
#else
    #> entmax_threshold
    #> grouped_each_entmax_accumulate
    out = acc
    stat = tau
#endif
    tl.store(OUT + ((slot * Wq + offs_m) * DV)[:, None] + offs_dv[None, :], out.to(OUT.dtype.element_ty),
             mask=m_in[:, None] & dv_ok[None, :])
    tl.store(STAT + slot * Wq + offs_m, stat.to(STAT.dtype.element_ty), mask=m_in)
'''
SNIPPETS["grouped_prologue"] = _GROUPED_PROLOGUE + '''
#if ONE_TILE
n0 = 0  # the group's key slots fit one tile: load it once, keep it in registers for every pass
#> grouped_direct_tile
#endif
'''

# Backward: probabilities p (and entmax's s = sqrt(p)) from the saved statistic, dp = dO . v
SNIPPETS["bwd_probs"] = '''
#if NORMALIZER == "softmax"
p = tl.exp(s - stat[:, None])
#else
sv = tl.maximum(s * 0.5 - stat[:, None], 0.0)
p = sv * sv
#endif
dp = _mma(do, tl.trans(vt))
#if DROPOUT
dp = tl.where(keep, dp * drop_scale, 0.0)
pd = tl.where(keep, p * drop_scale, 0.0)
#else
pd = p
#endif
'''

SNIPPETS["bwd_rowsums"] = '''
#> bwd_probs
#if NORMALIZER == "softmax"
delta += _sum(p * dp, 1)
#else
ssum += _sum(sv, 1)
sdp += _sum(sv * dp, 1)
#endif
'''

# d logits, then the gradients of everything the tile read (bwd_scatter: direct or summary targets).
SNIPPETS["bwd_grads"] = '''
#> bwd_probs
#if NORMALIZER == "softmax"
ds = p * (dp - delta[:, None])
#else
ds = sv * (dp - c_row[:, None])
#if DSTAT
ds += sv * dst_row[:, None]
#endif
#endif
dq += _mma(ds, kt)
dk_t = _mma(tl.trans(ds), q) * scale
dv_t = _mma(tl.trans(pd), do)
#> bwd_scatter
'''

SNIPPETS["grouped_prologue_bwd"] = '''
#> grouped_prologue
do = tl.load(DO + ((slot * Wq + offs_m) * DV)[:, None] + offs_dv[None, :], mask=m_in[:, None] & dv_ok[None, :], other=0.0)
stat = tl.load(STAT + slot * Wq + offs_m, mask=m_in, other=0.0).to({{ACC}})
#if DSTAT
dstat = tl.load(DSTAT + slot * Wq + offs_m, mask=m_in, other=0.0).to({{ACC}})
#endif
'''

GROUPED_BWD = _COMMON + '''

@triton.jit
def kernel(''' + _GROUPED_SIGNATURE + '''
    DO, STAT, DSTAT, DQ, DK, DV_, DBIAS, DSK, DSV, db0, db1, db2, db3,''' + _GROUPED_CONSTEXPRS + '''
):
    #> grouped_prologue_bwd
    # pass 1: the row sums the normaliser's gradient needs
#if NORMALIZER == "softmax"
    delta = tl.full([BLOCK_M], 0.0, {{ACC}})
    #> grouped_each_bwd_rowsums
#if DSTAT
    delta -= dstat  # d logsumexp / d logits = p
#endif
#else
    ssum = tl.full([BLOCK_M], 0.0, {{ACC}})
    sdp = tl.full([BLOCK_M], 0.0, {{ACC}})
    #> grouped_each_bwd_rowsums
    ssum = tl.where(ssum > 0, ssum, 1.0)
    c_row = sdp / ssum  # d tau = <s, d x> / sum(s)
#if DSTAT
    dst_row = dstat / (2.0 * ssum)
#endif
#endif
    # pass 2: gradients
    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, {{ACC}})
    #> grouped_each_bwd_grads
    tl.atomic_add(DQ + ((bh * Lq + qpos) * D)[:, None] + offs_d[None, :], dq * scale, mask=q_ok[:, None] & d_ok[None, :])
'''

SNIPPETS["bwd_grads_summary"] = SNIPPETS["bwd_grads"].replace("#> bwd_scatter", "#> grouped_scatter_summary")
SNIPPETS["bwd_grads"] = SNIPPETS["bwd_grads"].replace("#> bwd_scatter", "#> grouped_scatter_direct")

SNIPPETS["grouped_scatter_summary"] = '''
#if SUMMARY_GRAD
tl.atomic_add(DSK + ((slot * S + offs_s) * D)[:, None] + offs_d[None, :], dk_t, mask=s_in[:, None] & d_ok[None, :])
tl.atomic_add(DSV + ((slot * S + offs_s) * DV)[:, None] + offs_dv[None, :], dv_t, mask=s_in[:, None] & dv_ok[None, :])
#endif
'''

SNIPPETS["grouped_scatter_direct"] = '''
tl.atomic_add(DK + (krow * D)[:, None] + offs_d[None, :], dk_t, mask=k_ok[:, None] & d_ok[None, :])
tl.atomic_add(DV_ + (krow * DV)[:, None] + offs_dv[None, :], dv_t, mask=k_ok[:, None] & dv_ok[None, :])
#if BIAS_GRAD
tl.atomic_add(DBIAS + b * db0 + h * db1 + qpos[:, None] * db2 + kpos[None, :] * db3, ds, mask=allowed)
#endif
'''

# Loops over every tile of a query tile's row set: direct key slots, then summary slots. The
# summary loop runs BODY_summary when a template defines it (different gradient targets).
for _body in ("softmax_update", "row_max", "bisect_mass", "support_sums", "entmax_accumulate",
              "bwd_rowsums", "bwd_grads"):
    _summary_body = _body + "_summary" if _body + "_summary" in SNIPPETS else _body
    SNIPPETS[f"grouped_each_{_body}"] = f'''
#if ONE_TILE
#> {_body}
#else
for n0 in range(0, Wk, BLOCK_N):
    #> grouped_direct_tile
    #> {_body}
#if SUMMARY
for s0 in range(0, S, BLOCK_S):
    #> grouped_summary_tile
    #> {_summary_body}
#endif
#endif
'''

# ------------------------------------------------------------------------------------------
# Edge (CSR) kernels: one program per query row r = (b*Hq + h)*Lq + i
# ------------------------------------------------------------------------------------------

EDGE_DEFAULTS = dict(
    d=16, dv=16, block_n=16, dtype="float32", normalizer="softmax", causal=False, padding=False,
    bias=False, edge_bias=False, dropout=False, n_bisect=30, one_tile=False,
)
EDGE_BWD_DEFAULTS = dict(EDGE_DEFAULTS, bias_grad=False, edge_bias_grad=False, dstat=False)

_EDGE_SIGNATURE = '''
    Q, K, V, ROW_PTR, COL, KPM, BIAS, EBIAS, SCALARS, causal_offset, seed_mix, drop_threshold,
    Hq, Hkv, Lq, Lk, sb0, sb1, sb2, sb3,'''

_EDGE_CONSTEXPRS = '''
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, N_BISECT: tl.constexpr,'''

SNIPPETS["edge_prologue"] = '''
row = tl.program_id(0).to(tl.int64)
bh = row // Lq
i = row % Lq
b = bh // Hq
h = bh % Hq
kv_base = (b * Hkv + h // (Hq // Hkv)) * Lk  # GQA: query head h reads kv head h // (Hq // Hkv)
start = tl.load(ROW_PTR + row)
end = tl.load(ROW_PTR + row + 1)
scale = tl.load(SCALARS)
#if DROPOUT
drop_scale = tl.load(SCALARS + 1)
hash_q = _mix32(_mix32(seed_mix.to(tl.int64) ^ bh) ^ i)
#endif
offs_d = tl.arange(0, BLOCK_D)
d_ok = offs_d < D
offs_dv = tl.arange(0, BLOCK_DV)
dv_ok = offs_dv < DV
q = tl.load(Q + row * D + offs_d, mask=d_ok, other=0.0).to({{ACC}})
#if ONE_TILE
n0 = 0  # the row's edges fit one tile: load it once, keep it in registers for every pass
#> edge_tile
#endif
'''

# s: (BLOCK_N,) logits of the row's edges [start + n0, start + n0 + BLOCK_N), -inf where the
# edge is padding or removed by the causal rule / key padding.
SNIPPETS["edge_tile"] = '''
e = start + n0 + tl.arange(0, BLOCK_N)
valid = e < end
col = tl.load(COL + e, mask=valid, other=0)
krow = kv_base + col
kt = tl.load(K + (krow * D)[:, None] + offs_d[None, :], mask=valid[:, None] & d_ok[None, :], other=0.0).to({{ACC}})
vt = tl.load(V + (krow * DV)[:, None] + offs_dv[None, :], mask=valid[:, None] & dv_ok[None, :], other=0.0).to({{ACC}})
s = _sum(kt * q[None, :], 1) * scale
allowed = valid
#if CAUSAL
allowed = allowed & (col <= i + causal_offset)
#endif
#if PADDING
allowed = allowed & (tl.load(KPM + b * Lk + col, mask=valid, other=0) != 0)
#endif
#if BIAS
s += tl.load(BIAS + b * sb0 + h * sb1 + i * sb2 + col * sb3, mask=allowed, other=0.0).to({{ACC}})
#endif
#if EDGE_BIAS
s += tl.load(EBIAS + e, mask=allowed, other=0.0).to({{ACC}})
#endif
s = tl.where(allowed, s, float("-inf"))
#if DROPOUT
keep = _mix32(hash_q ^ col) >= drop_threshold
#endif
'''

SNIPPETS["edge_softmax_update"] = '''
m_new = tl.maximum(m_i, _max(s, 0))
m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
alpha = tl.exp(m_i - m_use)
p = tl.exp(s - m_use)
l_i = l_i * alpha + _sum(p, 0)
#if DROPOUT
p = tl.where(keep, p * drop_scale, 0.0)
#endif
acc = acc * alpha + _sum(p[:, None] * vt, 0)
m_i = m_new
'''

SNIPPETS["edge_row_max"] = '''
m_i = tl.maximum(m_i, _max(s, 0) * 0.5)
'''

SNIPPETS["edge_bisect_mass"] = '''
r = tl.maximum(s * 0.5 - mid, 0.0)
mass += _sum(r * r, 0)
'''

SNIPPETS["edge_support_sums"] = '''
z = s * 0.5 - m_use
sup = z > lo - m_use
cnt += _sum(sup.to({{ACC}}), 0)
z = tl.where(sup, z, 0.0)
s1 += _sum(z, 0)
s2 += _sum(z * z, 0)
'''

SNIPPETS["edge_entmax_accumulate"] = '''
r = tl.maximum(s * 0.5 - tau, 0.0)
p = r * r
#if DROPOUT
p = tl.where(keep, p * drop_scale, 0.0)
#endif
acc += _sum(p[:, None] * vt, 0)
'''

EDGE_FWD = _COMMON + '''

@triton.jit
def kernel(''' + _EDGE_SIGNATURE + '''
    OUT, STAT,''' + _EDGE_CONSTEXPRS + '''
):
    #> edge_prologue
    acc = tl.full([BLOCK_DV], 0.0, {{ACC}})
#if NORMALIZER == "softmax"
    m_i = tl.full([], float("-inf"), {{ACC}})
    l_i = tl.full([], 0.0, {{ACC}})
    #> edge_each_edge_softmax_update
    out = acc / tl.where(l_i > 0, l_i, 1.0)
    stat = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), 0.0)
#else
    #> entmax_threshold
    #> edge_each_edge_entmax_accumulate
    out = acc
    stat = tau
#endif
    tl.store(OUT + row * DV + offs_dv, out.to(OUT.dtype.element_ty), mask=dv_ok)
    tl.store(STAT + row, stat.to(STAT.dtype.element_ty))
'''

SNIPPETS["edge_bwd_probs"] = '''
#if NORMALIZER == "softmax"
p = tl.exp(s - stat)
#else
sv = tl.maximum(s * 0.5 - stat, 0.0)
p = sv * sv
#endif
dp = _sum(vt * do[None, :], 1)
#if DROPOUT
dp = tl.where(keep, dp * drop_scale, 0.0)
pd = tl.where(keep, p * drop_scale, 0.0)
#else
pd = p
#endif
'''

SNIPPETS["edge_bwd_rowsums"] = '''
#> edge_bwd_probs
#if NORMALIZER == "softmax"
delta += _sum(p * dp, 0)
#else
ssum += _sum(sv, 0)
sdp += _sum(sv * dp, 0)
#endif
'''

SNIPPETS["edge_bwd_grads"] = '''
#> edge_bwd_probs
#if NORMALIZER == "softmax"
ds = p * (dp - delta)
#else
ds = sv * (dp - c_row)
#if DSTAT
ds += sv * dst_row
#endif
#endif
ds = tl.where(allowed, ds, 0.0)
dq += _sum(ds[:, None] * kt, 0)
tl.atomic_add(DK + (krow * D)[:, None] + offs_d[None, :], (ds * scale)[:, None] * q[None, :],
              mask=allowed[:, None] & d_ok[None, :])
tl.atomic_add(DV_ + (krow * DV)[:, None] + offs_dv[None, :], pd[:, None] * do[None, :],
              mask=allowed[:, None] & dv_ok[None, :])
#if BIAS_GRAD
tl.atomic_add(DBIAS + b * db0 + h * db1 + i * db2 + col * db3, ds, mask=allowed)
#endif
#if EDGE_BIAS_GRAD
tl.store(DEDGE + e, ds, mask=allowed)  # each edge belongs to exactly this row: no atomics
#endif
'''

EDGE_BWD = _COMMON + '''

@triton.jit
def kernel(''' + _EDGE_SIGNATURE + '''
    DO, STAT, DSTAT, DQ, DK, DV_, DBIAS, DEDGE, db0, db1, db2, db3,''' + _EDGE_CONSTEXPRS + '''
):
    #> edge_prologue
    do = tl.load(DO + row * DV + offs_dv, mask=dv_ok, other=0.0).to({{ACC}})
    stat = tl.load(STAT + row).to({{ACC}})
#if DSTAT
    dstat = tl.load(DSTAT + row).to({{ACC}})
#endif
    # pass 1: the row sums the normaliser's gradient needs
#if NORMALIZER == "softmax"
    delta = tl.full([], 0.0, {{ACC}})
    #> edge_each_edge_bwd_rowsums
#if DSTAT
    delta -= dstat
#endif
#else
    ssum = tl.full([], 0.0, {{ACC}})
    sdp = tl.full([], 0.0, {{ACC}})
    #> edge_each_edge_bwd_rowsums
    ssum = tl.where(ssum > 0, ssum, 1.0)
    c_row = sdp / ssum
#if DSTAT
    dst_row = dstat / (2.0 * ssum)
#endif
#endif
    # pass 2: gradients
    dq = tl.full([BLOCK_D], 0.0, {{ACC}})
    #> edge_each_edge_bwd_grads
    tl.store(DQ + row * D + offs_d, dq * scale, mask=d_ok)
'''

for _body in ("edge_softmax_update", "edge_row_max", "edge_bisect_mass", "edge_support_sums",
              "edge_entmax_accumulate", "edge_bwd_rowsums", "edge_bwd_grads"):
    SNIPPETS[f"edge_each_{_body}"] = f'''
#if ONE_TILE
#> {_body}
#else
for n0 in range(0, end - start, BLOCK_N):
    #> edge_tile
    #> {_body}
#endif
'''
