"""Where routing's training step goes, against routing_transformer's (issue 3's 2x target).

    pip install --no-deps routing_transformer==1.6.1 local-attention==1.9.15 \
        product-key-memory==0.1.10 mixture-of-experts==0.2.3 einops
    python benchmarks/routing_training_breakdown.py [--length 16384] [--out docs/benchmarks_routing.md]

One layer as in `sparse_attention_speed.py` (B=1, H=8, D=64, fp32, bidirectional, clusters from the
cost model, train mode):
- forward+backward of attnpass routing and routing_transformer's `KmeansAttention`, interleaved
  round by round (this shared machine drifts by tens of percent within minutes, so the ratio is
  taken per round: min and median over rounds);
- each one's training forward alone (with autograd recording), so its backward is the difference;
- attnpass routing's parts, each timed alone: the routing selection (layer norms, similarities,
  top-w of queries and keys, nearest centroids, fallback layout), the cluster attention and the
  local-window fallback (forward, forward+backward), the scatter of slot outputs, the commitment
  loss and the EMA step.
Best of `--repeats` calls each.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from sparse_attention_speed import layers, make_inputs
from sparse_attention_speed import timed as best

from attnpass.lowering.torch.grouped_attention import grouped_attention, scatter_slots
from attnpass.methods.kmeans import OnlineKMeans


def step(module, q, k, v):
    out = module(q, k, v)
    (out[0] if isinstance(out, tuple) else out).sum().backward()


def interleaved(ours, theirs, q, k, v, rounds: int) -> tuple[list[float], list[float]]:
    def once(module):
        start = time.perf_counter()
        step(module, q, k, v)
        return time.perf_counter() - start

    once(ours), once(theirs)
    t_ours, t_theirs = [], []
    for _ in range(rounds):
        t_ours.append(once(ours))
        t_theirs.append(once(theirs))
    return t_ours, t_theirs


def parts(site, q, k, v, repeats: int) -> tuple[list[tuple[str, float]], float]:
    """attnpass routing's pieces at this length, each timed alone (seconds), and the share of
    queries the local-window fallback serves."""
    L = q.shape[2]
    km = site.kmeans
    (_, q_index, k_index, fb_q, fb_k, fb_range), tokens = site._route(q, k, None, True)
    q_hat, k_hat = OnlineKMeans.normalise(q.detach()), OnlineKMeans.normalise(k.detach())
    sim_q, sim_k = km.similarity(q_hat, k_hat)
    width = -(-L // site.clusters)
    scale = site.scale(q)
    slots = grouped_attention(q, k, v, q_index, k_index, scale=scale)[0].detach().requires_grad_()

    def main():
        return grouped_attention(q, k, v, q_index, k_index, scale=scale)[0]

    def fallback():
        return grouped_attention(q, k, v, fb_q, fb_k, key_range=fb_range, scale=scale)[0]

    return [
        ("routing selection, all (train)", best(lambda: site._route(q, k, None, True), repeats)),
        ("selection: layer norms of q and k", best(lambda: (OnlineKMeans.normalise(q.detach()), OnlineKMeans.normalise(k.detach())), repeats)),
        ("selection: similarities to the centroids", best(lambda: km.similarity(q_hat, k_hat), repeats)),
        ("selection: top-w of queries and keys (aten topk)", best(lambda: (OnlineKMeans.top_slots(sim_q, width), OnlineKMeans.top_slots(sim_k, width)), repeats)),
        ("selection: nearest centroids of queries and keys", best(lambda: (OnlineKMeans.nearest(sim_q), OnlineKMeans.nearest(sim_k)), repeats)),
        ("cluster attention, forward", best(main, repeats)),
        ("cluster attention, forward+backward", best(lambda: main().sum().backward(), repeats)),
        ("local-window fallback, forward", best(fallback, repeats)),
        ("local-window fallback, forward+backward", best(lambda: fallback().sum().backward(), repeats)),
        ("scatter of the cluster slots, forward+backward", best(lambda: scatter_slots(slots, q_index, L)[0].sum().backward(), repeats)),
        ("commitment loss, forward", best(lambda: km.commitment_loss(tokens), repeats)),
        ("EMA step", best(lambda: km.update_(tokens), repeats)),
    ], int((fb_q >= 0).sum()) / fb_q.new_tensor(q.shape[:3]).prod().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="also write the tables (markdown) to this file")
    opts = parser.parse_args()
    torch.manual_seed(0)
    L = opts.length
    built = layers(L)
    if "routing_transformer" not in built:
        raise SystemExit("routing_transformer is not installed (see the install line in this file's docstring)")
    ours, theirs = built["attnpass routing"][0].train(), built["routing_transformer"][0].train()
    q, k, v = make_inputs(L, requires_grad=True)
    t_ours, t_theirs = interleaved(ours, theirs, q, k, v, opts.rounds)
    ratios = [b / a for a, b in zip(t_ours, t_theirs)]
    fwd_ours = best(lambda: ours(q, k, v), opts.repeats)
    fwd_theirs = best(lambda: theirs(q, k, v), opts.repeats)
    pieces, orphan_share = parts(ours, q, k, v, opts.repeats)

    lines = [f"L={L}, B=1, H=8, D=64, fp32, train mode, {ours.clusters} clusters, {torch.get_num_threads()} threads.", "",
             f"Forward+backward, {opts.rounds} interleaved rounds: attnpass routing min {min(t_ours) * 1e3:.0f} ms / "
             f"median {statistics.median(t_ours) * 1e3:.0f} ms; routing_transformer min {min(t_theirs) * 1e3:.0f} ms / "
             f"median {statistics.median(t_theirs) * 1e3:.0f} ms; speed-up per round min {min(ratios):.2f}x, "
             f"median {statistics.median(ratios):.2f}x, max {max(ratios):.2f}x.", "",
             f"Training forward alone (autograd recording): attnpass routing {fwd_ours * 1e3:.0f} ms, "
             f"routing_transformer {fwd_theirs * 1e3:.0f} ms; so the backward is about "
             f"{(min(t_ours) - fwd_ours) * 1e3:.0f} ms and {(min(t_theirs) - fwd_theirs) * 1e3:.0f} ms.", "",
             f"attnpass routing's parts (the fallback serves the {orphan_share:.0%} of queries no cluster took; "
             "routing_transformer leaves those at zero):", "", "| part | ms |", "|---|---|"]
    lines += [f"| {name} | {seconds * 1e3:.1f} |" for name, seconds in pieces]
    text = "\n".join(lines)
    print(text)
    if opts.out:
        with open(opts.out, "w") as f:
            f.write(f"# Routing's training step, part by part\n\nGenerated by `python benchmarks/routing_training_breakdown.py "
                    f"--out {opts.out}`.\n\n" + text + "\n")


if __name__ == "__main__":
    main()
