"""Registers, spills and shared memory of the Triton kernels, compiled for a GPU without one.

    python benchmarks/triton_resources.py [--arch 80] [--block 64] [--head-dim 64]

Compiles representative specialisations of each kernel through Triton's CUDA backend to a cubin
(no GPU needed) and prints, per kernel, what the GPU build asks of a streaming multiprocessor:
registers per thread and stack bytes per thread (`cuobjdump -res-usage`, both from the cubin: a
stack is where registers spill) and the shared memory a launch needs (Triton's metadata). These
decide occupancy and whether a launch fits at all (e.g. 100 KB of shared memory per block on
sm_86 / sm_89, 164 KB on sm_80); they are not timings, which need a GPU.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from attnpass.lowering.triton.specialise import constexprs, kernel

POINTERS = {"QI": "*i64", "KI": "*i64", "KR": "*i64", "ROW_PTR": "*i64", "COL": "*i64", "KPM": "*u8", "PMASK": "*u8",
            "SMASK": "*u8", **{name: "*fp32" for name in (
                "Q K V BIAS SK SV SCALARS OUT STAT DO DSTAT DQ DK DV_ DBIAS DSK DSV EBIAS DEDGE".split())}}


def specs(block: int, head_dim: int) -> list[tuple[str, dict]]:
    """What the methods launch: routing / Sparsefinder blocks (grouped, one tile, causal), Combiner
    (grouped with summaries), Sparsefinder / SBM edge lists; softmax, and entmax-1.5 for the paper's
    Sparsefinder; bf16 operands."""
    common = dict(d=head_dim, dv=head_dim, dtype="bfloat16")
    grouped = dict(common, block_m=block, block_n=block)
    summaries = dict(summary=True, block_s=min(32, block))
    return [
        ("grouped_fwd", dict(grouped, causal=True, one_tile=True)),
        ("grouped_fwd", dict(grouped, causal=True, **summaries)),
        ("grouped_fwd", dict(grouped, normalizer="entmax15", one_tile=True)),
        ("grouped_bwd", dict(grouped, causal=True, one_tile=True)),
        ("grouped_bwd", dict(grouped, causal=True, summary_grad=True, **summaries)),
        ("edge_fwd", dict(common, block_n=block, one_tile=True)),
        ("edge_fwd", dict(common, block_n=block, normalizer="entmax15", one_tile=True)),
        ("edge_bwd", dict(common, block_n=block, one_tile=True, edge_bias=True, edge_bias_grad=True)),
    ]


def resources(kind: str, spec: dict, arch: int) -> dict:
    fn, consts = kernel(kind), constexprs(kind, **spec)
    signature = {name: "constexpr" if name in consts else POINTERS.get(name, "i64") for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                              target=GPUTarget("cuda", arch, 32))
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([tool, "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    fields = dict(item.split(":", 1) for item in usage.split() if item.startswith(("REG:", "STACK:")))
    return {"registers": int(fields["REG"]), "stack": int(fields["STACK"]), "shared": compiled.metadata.shared,
            "warps": compiled.metadata.num_warps}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=80, help="CUDA compute capability x 10 (80 = A100)")
    parser.add_argument("--block", type=int, default=64, help="tile side (the dispatcher's largest is 64)")
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args(argv)
    print(f"sm_{args.arch}, tiles {args.block}, head dim {args.head_dim}, bf16; triton {triton.__version__}\n")
    print("| kernel | spec | registers / thread | stack bytes / thread | shared memory per block | warps |")
    print("|---|---|---:|---:|---:|---:|")
    for kind, spec in specs(args.block, args.head_dim):
        r = resources(kind, spec, args.arch)
        shown = ", ".join(f"{k}={v}" for k, v in spec.items() if k not in ("d", "dv", "dtype", "block_m", "block_n"))
        print(f"| {kind} | {shown} | {r['registers']} | {r['stack']} | {r['shared'] / 1024:.1f} KB | {r['warps']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
