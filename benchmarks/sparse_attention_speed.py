"""Speed and memory of attnpass's routing and Combiner attention on CPU (issue 3's acceptance).

    pip install --no-deps routing_transformer==1.6.1 local-attention==1.9.15 \
        product-key-memory==0.1.10 mixture-of-experts==0.2.3 einops      # the routing baseline
    python benchmarks/sparse_attention_speed.py [--lengths 1024 4096 16384] [--out docs/benchmarks.md]

One attention layer, B=1, H=8, D=64, fp32, bidirectional, all in one run on this machine:
- forward (eval, no grad) and forward+backward (train mode) times of dense
  `F.scaled_dot_product_attention`, routing_transformer's `KmeansAttention` and attnpass's
  routing at the same cluster count and window (clusters from attnpass's cost model, window =
  L / clusters), and Combiner fixed / axial / logsparse at their cost-model block sizes;
- speed-ups at each length (targets at L=16k: routing >= 2x routing_transformer, Combiner-fixed
  >= 10x SDPA) and GFLOP/s on the pairs actually computed (FLOPs from `attnpass.cost_model`)
  next to this machine's dense matmul GFLOP/s;
- how time grows with L: the exponent fitted to the measured forward times against the ones the
  sympy cost model predicts over the same lengths (acceptance: within 0.15), over the speed
  table's lengths, over longer ones (--growth-lengths, forward only) and over the longest of those
  (--fit-from on), where the per-call overhead of the Python-level kernels (~10-20 ms) and the
  L-linear work (routing's local-window fallback for ~1/3 of the queries, layer norms, scatters)
  no longer dominate.
  Predictions: FLOPs alone, and the roofline time t = FLOPs / (dense matmul FLOP/s) +
  bytes / (memory bandwidth), with the rates measured in the same run: the streaming bandwidth,
  and the bandwidth of writing freshly allocated tensors (what eager PyTorch ops do). The sparse
  kernels move O(L) bytes (gathered rows, indices) against O(L^1.5) FLOPs at ~1/5-1/10 of the
  matmul peak, so at these lengths the bytes term is a large share of the time and the
  FLOPs-only exponent overstates the growth;
- peak memory of one forward at L=65536 (each method in a fresh process; acceptance: < 4 GB).
Timings are CPU timings; the Triton kernels' GPU timings are not measured here (no GPU).
"""
from __future__ import annotations

import argparse
import functools
import math
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from attnpass import cost_model
from attnpass.methods import SiteSpec, method_class

B, H, D = 1, 8, 64
COMBINER_VARIANTS = ("fixed", "axial", "logsparse")


def make_inputs(length: int, requires_grad: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, length, D, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def spec(length: int) -> SiteSpec:
    return SiteSpec(name="bench", scale=None, heads_q=H, heads_kv=H, head_dim=D,
                    example_len_q=length, example_len_k=length)


def routing_transformer_layer(clusters: int, window: int):
    try:
        from routing_transformer.routing_transformer import KmeansAttention
    except ImportError:
        return None
    return KmeansAttention(clusters, window, H, D, causal=False)


def layers(length: int) -> dict[str, tuple[torch.nn.Module | None, str, dict]]:
    """name -> (module or None for SDPA, cost-model method, cost-model options)."""
    clusters = cost_model.default_clusters(length, length, D)
    out = {"sdpa": (None, "dense", {})}
    rt = routing_transformer_layer(clusters, length // clusters)
    if rt is not None:
        out["routing_transformer"] = (rt, "routing", {"clusters": clusters})
    out["attnpass routing"] = (method_class("routing")(spec(length), clusters=clusters), "routing", {"clusters": clusters})
    for variant in COMBINER_VARIANTS:
        block = cost_model.default_block(length, length, D, variant)
        module = method_class("combiner")(spec(length), variant=variant, block=block)
        out[f"attnpass combiner-{variant}"] = (module, "combiner", {"variant": variant, "block": block})
    return out


def run(module, q, k, v):
    if module is None:
        return F.scaled_dot_product_attention(q, k, v)
    out = module(q, k, v)
    return out[0] if isinstance(out, tuple) else out  # KmeansAttention returns (out, aux_loss)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (also initialises k-means centroids from the first batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def forward(module, q, k, v):
    with torch.no_grad():
        run(module, q, k, v)


def forward_backward(module, q, k, v):
    run(module, q, k, v).sum().backward()


def measure(length: int, repeats: int) -> dict[str, dict]:
    results = {}
    for name, (module, method, options) in layers(length).items():
        if module is not None:
            module.eval()
        fwd = timed(functools.partial(forward, module, *make_inputs(length, requires_grad=False)), repeats)
        if module is not None:
            module.train()
        fwd_bwd = timed(functools.partial(forward_backward, module, *make_inputs(length, requires_grad=True)), repeats)
        flops, nbytes = cost_model.cost_expr(method, **options).evaluate(B=B, H=H, Lq=length, Lk=length, D=D)
        results[name] = dict(fwd=fwd, fwd_bwd=fwd_bwd, flops=flops, bytes=nbytes, options=options)
        print(f"  L={length:6d} {name:28s} fwd {fwd * 1e3:9.1f} ms  fwd+bwd {fwd_bwd * 1e3:9.1f} ms  "
              f"{flops / fwd / 1e9:6.1f} GFLOP/s", flush=True)
    return results


def growth(lengths, repeats: int) -> dict[int, dict[str, dict]]:
    """Forward times of every layer but SDPA (quadratic: minutes at 64k) at longer lengths."""
    results = {}
    for length in lengths:
        results[length] = {}
        for name, (module, method, options) in layers(length).items():
            if module is None:
                continue
            module.eval()
            fwd = timed(functools.partial(forward, module, *make_inputs(length, requires_grad=False)), repeats)
            flops, nbytes = cost_model.cost_expr(method, **options).evaluate(B=B, H=H, Lq=length, Lk=length, D=D)
            results[length][name] = dict(fwd=fwd, flops=flops, bytes=nbytes, options=options)
            print(f"  L={length:6d} {name:28s} fwd {fwd * 1e3:9.1f} ms", flush=True)
    return results


def exponent_rows(lengths, results, machine) -> list[str]:
    rows = []
    for name in results[lengths[0]]:
        measured = fitted_exponent(lengths, [results[n][name]["fwd"] for n in lengths])
        by_flops = fitted_exponent(lengths, [results[n][name]["flops"] for n in lengths])
        row = f"| {name} | {lengths[0]}-{lengths[-1]} | {measured:.2f} | {by_flops:.2f} | {measured - by_flops:+.2f} "
        for bandwidth in ("gb_per_s", "gb_per_s_fresh"):
            by_time = fitted_exponent(lengths, [model_seconds(results[n][name], machine, bandwidth) for n in lengths])
            row += f"| {by_time:.2f} | {measured - by_time:+.2f} "
        rows.append(row + "|")
    return rows


def model_seconds(result: dict, machine: dict, bandwidth: str) -> float:
    """The cost model's roofline time: FLOPs at the dense matmul rate plus bytes at a memory bandwidth."""
    return result["flops"] / (machine["gflops"] * 1e9) + result["bytes"] / (machine[bandwidth] * 1e9)


def matmul_gflops() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    seconds = timed(lambda: a @ b, 5)
    return 2 * 2048**3 / seconds / 1e9


def memory_gb_per_s(fresh_output: bool) -> float:
    """Memory bandwidth as an add of two 64M-float tensors moves it (read 2, write 1): into a reused
    output (streaming), or into a freshly allocated one, as every out-of-place eager op writes
    (the allocator maps new pages for tensors this large, and the first touch of each costs)."""
    a, b = torch.randn(1 << 26), torch.randn(1 << 26)
    out = torch.empty_like(a)
    seconds = timed((lambda: a + b) if fresh_output else (lambda: torch.add(a, b, out=out)), 5)
    return 3 * a.numel() * a.element_size() / seconds / 1e9


def fitted_exponent(lengths, values) -> float:
    """Least-squares slope of log(value) against log(L)."""
    x = [math.log(n) for n in lengths]
    y = [math.log(t) for t in values]
    mx, my = statistics.fmean(x), statistics.fmean(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: the latter survives exec, so a
    probe started from a large parent process would report the parent's peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_probe(name: str, length: int) -> None:
    """Run in a fresh process: print the peak RSS (MiB) before and after one forward."""
    module, _, _ = layers(length)[name]
    if module is not None:
        module.eval()
    q, k, v = make_inputs(length, requires_grad=False)
    before = peak_rss_mib()
    with torch.no_grad():
        run(module, q, k, v)
    print(f"{before:.0f} {peak_rss_mib():.0f}")


def peak_memory(names, length: int) -> dict[str, tuple[float, float]]:
    peaks = {}
    for name in names:
        done = subprocess.run([sys.executable, __file__, "--memory-probe", name, "--memory-length", str(length)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(f"  memory probe of {name} failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        before, after = map(float, done.stdout.split()[-2:])
        peaks[name] = (after, after - before)
        print(f"  L={length} {name:28s} peak RSS {after:8.0f} MiB (forward adds {after - before:7.0f} MiB)", flush=True)
    return peaks


def report(lengths, results, growth_lengths, growth_results, machine, peaks, memory_length, fit_from) -> str:
    lines = [f"Machine: {torch.get_num_threads()} threads, dense fp32 matmul {machine['gflops']:.0f} GFLOP/s, "
             f"memory bandwidth {machine['gb_per_s']:.1f} GB/s streaming, {machine['gb_per_s_fresh']:.1f} GB/s into "
             f"freshly allocated tensors (an add of 256 MiB tensors). "
             f"B={B}, H={H}, D={D}, fp32, bidirectional; best of the repeats.", ""]
    lines += ["| L | method | options | fwd ms | fwd+bwd ms | fwd speed-up vs SDPA | fwd+bwd vs SDPA "
              "| fwd vs routing_transformer | fwd+bwd vs routing_transformer | GFLOP/s (computed pairs, fwd) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for n in lengths:
        r = results[n]
        sdpa, rt = r["sdpa"], r.get("routing_transformer")
        for name, m in r.items():
            opts = ", ".join(f"{k}={v}" for k, v in m["options"].items())
            vs_rt = (f"{rt['fwd'] / m['fwd']:.2f}x", f"{rt['fwd_bwd'] / m['fwd_bwd']:.2f}x") \
                if rt is not None and "routing" in name else ("", "")
            lines.append(f"| {n} | {name} | {opts} | {m['fwd'] * 1e3:.1f} | {m['fwd_bwd'] * 1e3:.1f} "
                         f"| {sdpa['fwd'] / m['fwd']:.2f}x | {sdpa['fwd_bwd'] / m['fwd_bwd']:.2f}x "
                         f"| {vs_rt[0]} | {vs_rt[1]} | {m['flops'] / m['fwd'] / 1e9:.1f} |")
    lines += ["", "Growth of the forward time with L: the exponent fitted to the measured times, against the ones the "
              "sympy cost model predicts over the same lengths, from its FLOPs alone and from its roofline time "
              "(FLOPs / matmul rate + bytes / bandwidth, the rates measured above; with the streaming bandwidth and "
              "with the fresh-allocation one):", "",
              "| method | lengths | measured exponent | FLOPs exponent | difference | time-model exponent (streaming) "
              "| difference | time-model exponent (fresh allocation) | difference |",
              "|---|---|---|---|---|---|---|---|---|"]
    if len(lengths) > 1:
        lines += exponent_rows(lengths, results, machine)
    if growth_results:
        lines += exponent_rows(growth_lengths, growth_results, machine)
        tail = [n for n in growth_lengths if n >= fit_from]
        if 2 <= len(tail) < len(growth_lengths):
            lines += exponent_rows(tail, growth_results, machine)
    if peaks:
        lines += ["", f"Peak memory of one forward at L={memory_length} (fresh process; includes torch and the "
                  "q/k/v inputs):", "", "| method | peak RSS MiB | added by the forward MiB |", "|---|---|---|"]
        lines += [f"| {name} | {total:.0f} | {added:.0f} |" for name, (total, added) in peaks.items()]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--growth-lengths", type=int, nargs="*", default=[4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--fit-from", type=int, default=16384,
                        help="also fit the growth exponent over the growth lengths from this one on")
    parser.add_argument("--memory-length", type=int, default=65536)
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="also write the tables (markdown) to this file")
    opts = parser.parse_args()
    torch.manual_seed(0)
    if opts.memory_probe:
        memory_probe(opts.memory_probe, opts.memory_length)
        return
    machine = dict(gflops=matmul_gflops(), gb_per_s=memory_gb_per_s(False), gb_per_s_fresh=memory_gb_per_s(True))
    print(f"dense fp32 matmul: {machine['gflops']:.0f} GFLOP/s, memory bandwidth {machine['gb_per_s']:.1f} GB/s "
          f"(fresh allocation {machine['gb_per_s_fresh']:.1f} GB/s) on {torch.get_num_threads()} threads")
    results = {n: measure(n, opts.repeats) for n in opts.lengths}
    growth_results = growth(opts.growth_lengths, opts.repeats) if len(opts.growth_lengths) > 1 else {}
    names = [n for n in results[opts.lengths[0]] if n.startswith("attnpass")]
    peaks = peak_memory(names, opts.memory_length) if opts.memory_length else {}
    text = report(opts.lengths, results, opts.growth_lengths, growth_results, machine, peaks, opts.memory_length,
                  opts.fit_from)
    print("\n" + text)
    if opts.out:
        with open(opts.out, "w") as f:
            f.write("# Sparse attention on CPU: speed and memory\n\nGenerated by `python benchmarks/sparse_attention_speed.py"
                    f" --out {opts.out}`.\n\n" + text + "\n")


if __name__ == "__main__":
    main()
