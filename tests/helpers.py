"""Small comparison helpers shared by the tests."""
from __future__ import annotations

import torch
import torch.utils._pytree as pytree
import transformers


def tensors(out) -> list[torch.Tensor]:
    """The tensors of a model output (tuple, dict, ModelOutput or tensor), in a fixed order."""
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def max_relative_error(got, expected) -> float:
    """max |got - expected| / max |expected| over all output tensors (0 when both are empty)."""
    g, e = tensors(got), tensors(expected)
    assert len(g) == len(e), f"{len(g)} output tensors, expected {len(e)}"
    worst = 0.0
    for a, b in zip(g, e):
        assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
        if not b.is_floating_point():
            assert torch.equal(a, b)
            continue
        scale = b.double().abs().max().item() or 1.0
        worst = max(worst, (a.double() - b.double()).abs().max().item() / scale)
    return worst


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


def tiny_gpt2(vocab_size: int = 50, n_head: int = 4, dropout: float = 0.0) -> torch.nn.Module:
    """A 2-layer GPT-2 LM (embedding 32, SDPA attention, no KV cache), seeded, in eval mode:
    small enough to train for a few dozen steps in a test."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=n_head,
                                     use_cache=False, attn_implementation="sdpa", bos_token_id=0, eos_token_id=0,
                                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return transformers.GPT2LMHeadModel(config).eval()
