"""Time the Triton kernels against FlexAttention and dense SDPA on a GPU.

NOT RUN YET: this repository's machines have no GPU; docs/triton.md states so. On a CUDA machine:

    pip install -e ".[triton]"
    python benchmarks/triton_gpu_speed.py --lengths 1024 4096 16384 --dtype bfloat16

For each length it times, forward and forward+backward (median of `triton.testing.do_bench`):
dense SDPA (causal), FlexAttention with a block mask of the same block-diagonal pattern, the
grouped kernel on that pattern (Combiner-like blocks / routing-like clusters of size ~sqrt(L)),
and the edge kernel on a random graph of the given density (SBM-like, softmax) and with entmax-1.5
(Sparsefinder-like). It prints one line per (kernel, length) and a CSV with --csv.
"""
from __future__ import annotations

import argparse
import math

import torch


def _bench(fn, backward: bool):
    import triton.testing

    if not backward:
        return triton.testing.do_bench(fn)

    def step():
        out = fn()
        out.backward(torch.ones_like(out))

    return triton.testing.do_bench(step)


def _cases(L: int, args, dtype, flex) -> dict:
    """name -> zero-argument callable returning the output, for one sequence length."""
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask

    from attnpass.lowering.torch.edge_attention import edge_attention, edges_from_pairs
    from attnpass.lowering.torch.grouped_attention import grouped_attention

    dev = "cuda"
    B, H, D = args.batch, args.heads, args.head_dim
    block = 1 << round(math.log2(math.sqrt(L)))  # Combiner / routing optimum ~ sqrt(L)
    q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    scale = 1 / math.sqrt(D)
    idx = torch.arange(L, device=dev).view(1, 1, L // block, block).expand(B, H, -1, -1)

    def block_diag(b, h, qi, ki):
        return (qi // block == ki // block) & (ki <= qi)

    mask = create_block_mask(block_diag, B, H, L, L, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    nnz = int(args.density * B * H * L * L)
    row = torch.randint(0, B * H * L, (nnz,), device=dev, generator=g)
    col = torch.randint(0, L, (nnz,), device=dev, generator=g)
    row_ptr, col_index = edges_from_pairs(row, col, B * H * L)
    return {
        "sdpa-dense-causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "flex-block-causal": lambda: flex(q, k, v, block_mask=mask),
        "triton-grouped-block-causal": lambda: grouped_attention(q, k, v, idx, idx, scale=scale, causal=True)[0],
        "triton-edge-softmax": lambda: edge_attention(q, k, v, row_ptr, col_index, scale=scale)[0],
        "triton-edge-entmax15": lambda: edge_attention(q, k, v, row_ptr, col_index, scale=scale,
                                                       normalizer="entmax15")[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--density", type=float, default=0.01, help="edge density of the CSR graphs")
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--csv", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("triton_gpu_speed.py needs a CUDA GPU (the Triton kernels are untimed on CPU)")

    from torch.nn.attention.flex_attention import flex_attention

    dtype = getattr(torch, args.dtype)
    flex = torch.compile(flex_attention)
    rows = []
    for L in args.lengths:
        for name, fn in _cases(L, args, dtype, flex).items():
            fwd, fwd_bwd = _bench(fn, False), _bench(fn, True)
            rows.append((name, L, fwd, fwd_bwd))
            print(f"{name:30s} L={L:6d}  forward {fwd:8.3f} ms   forward+backward {fwd_bwd:8.3f} ms")
    if args.csv:
        with open(args.csv, "w") as f:
            f.write("kernel,length,forward_ms,forward_backward_ms\n")
            f.writelines(f"{n},{L},{a:.4f},{b:.4f}\n" for n, L, a, b in rows)


if __name__ == "__main__":
    main()
