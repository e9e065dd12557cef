"""A long call's graph is captured on a short version of the same call.

Capturing a call runs the model several times at the call's sizes (export, the check that the graph
holds at other sizes, the mask analysis's probes), which for a causal LM at thousands of tokens costs
minutes. The graph is symbolic in the sequence length, so the same call on its last few tokens gives
the same graph in seconds; `SparseModel` then checks that it accepts the long call (else it
captures at the call's own sizes, as for any call). `SparseModel.generate` captures a long prompt's
prefill and decode graphs the same way, on a two-token generation from the short prompt. `sparsify`
relies on the same property: its example is short and its graph serves long calls.
"""
from __future__ import annotations

import torch
import torch.utils._pytree as pytree

# A token sequence longer than twice this is captured on its last this many tokens.
SHORT_CALL_TOKENS = 128


def shortened_call(args: tuple, kwargs: dict, tokens: int = SHORT_CALL_TOKENS) -> tuple[tuple, dict] | None:
    """(args, kwargs) of the same call on its last `tokens` positions, or None when it is not a
    token-sequence call longer than 2 * tokens whose sequence dim is clear.

    The sequence: the integer (B, L) input_ids (first positional argument, or keyword `input_ids` /
    generate's `inputs`). Every tensor argument with a dim of size L must be a (B, L) tensor given
    directly (attention_mask, position_ids, token_type_ids, labels): it is cut to its last `tokens`
    columns. A row the long
    call pads stays padded in the short one (transformers drops an all-ones mask, which would be
    another graph). A tensor of another shape holding L, or tensors inside containers (a KV cache),
    leave the call as it is (None)."""
    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if (not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point
            or ids.shape[1] <= 2 * tokens):
        return None
    length = ids.shape[1]

    def cut(value):
        if not isinstance(value, torch.Tensor):
            leaves = pytree.tree_leaves(value)
            return value if not any(isinstance(x, torch.Tensor) for x in leaves) else _UNCLEAR
        if length not in value.shape:
            return value
        if value.dim() != 2 or value.shape[1] != length:
            return _UNCLEAR
        return value[:, -tokens:]

    short_args = tuple(cut(a) for a in args)
    short_kwargs = {name: cut(value) for name, value in kwargs.items()}
    if any(v is _UNCLEAR for v in (*short_args, *short_kwargs.values())):
        return None
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape == ids.shape:
        short_mask = short_kwargs["attention_mask"].clone()
        short_mask[(mask == 0).any(-1), 0] = 0
        short_kwargs["attention_mask"] = short_mask
    return short_args, short_kwargs


_UNCLEAR = object()
