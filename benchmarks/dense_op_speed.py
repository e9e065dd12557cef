"""Speed of the canonical dense op `attnpass::attention` against calling
F.scaled_dot_product_attention directly with the equivalent arguments (CPU).

Interleaved runs (op, SDPA, op, SDPA, ...), median of --reps; forward under no_grad and
forward + backward. Prints one row per shape with the ratios op / SDPA and the aten kernels each
ran (torch.profiler op names).

    python benchmarks/dense_op_speed.py [--reps 7] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import profile

import attnpass.lowering.torch.dense  # noqa: F401 - registers torch.ops.attnpass.attention

_KERNELS = ("flash_attention", "attention_math", "bmm", "softmax", "baddbmm")


def make_case(name, B, Hq, Hkv, L, D, causal, pad):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, L, D, generator=g)
    k = torch.randn(B, Hkv, L, D, generator=g)
    v = torch.randn(B, Hkv, L, D, generator=g)
    keep = None
    if pad:
        keep = torch.ones(B, L, dtype=torch.bool)
        keep[-1, : L // 5] = False  # left padding on the last sequence
    scale = D ** -0.5
    if keep is None:
        sdpa_mask = None
    else:
        sdpa_mask = keep[:, None, None, :]
        if causal:
            sdpa_mask = sdpa_mask & torch.ones(L, L, dtype=torch.bool).tril()
    sdpa_causal = causal and keep is None

    def op(q, k, v):
        return torch.ops.attnpass.attention(q, k, v, None, None, keep, scale, causal, 0, 0.0, 0)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, is_causal=sdpa_causal, scale=scale,
                                              enable_gqa=Hq != Hkv)
    return name, (q, k, v), op, sdpa


def cases(quick: bool):
    out = [make_case(f"B1 H9/3 L{L} D64 causal", 1, 9, 3, L, 64, True, False)
           for L in ((512, 2048) if quick else (512, 2048, 4096))]
    out.append(make_case("B2 H12 L1024 D64 key-pad", 2, 12, 12, 1024, 64, False, True))
    out.append(make_case("B2 H12 L1024 D64 causal+key-pad", 2, 12, 12, 1024, 64, True, True))
    return out


def time_fwd(fn, args):
    with torch.no_grad():
        t = time.perf_counter()
        fn(*args)
        return time.perf_counter() - t


def time_fwd_bwd(fn, args, grad):
    leaves = [a.detach().requires_grad_() for a in args]
    t = time.perf_counter()
    fn(*leaves).backward(grad)
    return time.perf_counter() - t


def kernels(fn, args, backward: bool) -> str:
    leaves = [a.detach().requires_grad_(backward) for a in args]
    with profile() as prof:
        out = fn(*leaves)
        if backward:
            out.sum().backward()
    names = {e.name.removeprefix("aten::") for e in prof.events() if any(s in e.name for s in _KERNELS)}
    return ",".join(sorted(names))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    a = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, median of {a.reps} interleaved runs")
    header = f"{'shape':34s} {'op fwd ms':>10s} {'sdpa fwd ms':>11s} {'ratio':>6s} {'op f+b ms':>10s} {'sdpa f+b ms':>11s} {'ratio':>6s}"
    print(header)
    rows = []
    for name, args, op, sdpa in cases(a.quick):
        grad = torch.randn_like(args[0])
        for fn in (op, sdpa):  # warm up
            time_fwd(fn, args)
            time_fwd_bwd(fn, args, grad)
        f = {op: [], sdpa: []}
        fb = {op: [], sdpa: []}
        for r in range(a.reps):
            order = (op, sdpa) if r % 2 == 0 else (sdpa, op)
            for fn in order:
                f[fn].append(time_fwd(fn, args))
            for fn in order:
                fb[fn].append(time_fwd_bwd(fn, args, grad))
        m = {key: statistics.median(val) * 1e3 for key, val in (("of", f[op]), ("sf", f[sdpa]), ("ob", fb[op]), ("sb", fb[sdpa]))}
        print(f"{name:34s} {m['of']:10.2f} {m['sf']:11.2f} {m['of'] / m['sf']:6.3f} {m['ob']:10.2f} {m['sb']:11.2f} "
              f"{m['ob'] / m['sb']:6.3f}", flush=True)
        rows.append((name, kernels(op, args, True), kernels(sdpa, args, True)))
    print("\naten kernels run (forward + backward):")
    for name, ko, ks in rows:
        print(f"  {name:34s} op:   {ko}\n  {'':34s} sdpa: {ks}")


if __name__ == "__main__":
    main()
