"""Data-parallel training of a sparsified model: DDP, gloo backend, 2 processes on CPU.

Each rank trains on its own batches; the test checks that every parameter and buffer (routing's
EMA centroids, SBM's clusters and phi, the model's own weights) is identical on both ranks after
training. DDP's buffer broadcast is switched off, so the centroids agree only because attnpass
synchronises them (rank 0's initial draw is broadcast, every EMA step all-reduces the per-cluster
counts and sums); parameters agree through DDP's gradient all-reduce.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attnpass
from tests.helpers import tiny_gpt2

STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_lm():
    return tiny_gpt2().train()  # seeded: the same initial weights on every rank

def _worker(rank: int, world: int, port: int, method: str, options: dict, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
        sparse = attnpass.sparsify(_tiny_lm(), kwargs={"input_ids": ids}, method=method, **options).train()
        model = torch.nn.parallel.DistributedDataParallel(sparse, broadcast_buffers=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        torch.manual_seed(100 + rank)  # rank-local randomness (SBM's graphs) differs, as in real runs
        for step in range(STEPS):
            batch = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(10 * step + rank))
            logits = model(input_ids=batch)[0]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), batch[:, 1:].reshape(-1))
            opt.zero_grad()
            (loss + attnpass.aux_loss(sparse)).backward()
            opt.step()
        torch.save({k: v.detach().clone() for k, v in sparse.state_dict().items()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method, options", [("routing", dict(clusters=4)), ("sbm", dict(clusters=4))])
def test_ddp_keeps_parameters_and_method_state_identical_across_ranks(method, options, tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), method, options, str(tmp_path)), nprocs=2, join=True)
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert first.keys() == second.keys()
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert not different, f"replicas diverged in {different}"
    # training did move the weights and the method's state (the comparison is not of untouched tensors)
    initial = attnpass.sparsify(_tiny_lm(), kwargs={"input_ids": torch.zeros(2, 16, dtype=torch.long)},
                                method=method, **options).state_dict()
    assert not torch.equal(first["transformer.h.0.attn.c_attn.weight"], initial["transformer.h.0.attn.c_attn.weight"])
    state = [k for k in first if ".attnpass." in k]
    assert state
    if method == "routing":
        assert any(k.endswith("centroids") for k in state) and all(bool(first[k].all()) for k in state
                                                                   if k.endswith("initialized"))
    else:
        assert not torch.equal(first["transformer.h.0.attn.attnpass.clusters"],
                               initial["transformer.h.0.attn.attnpass.clusters"])
