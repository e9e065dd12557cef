"""A long call's graph is captured on its last tokens (attnpass/short_call.py) and serves the long call
exactly; where it cannot, the call is captured at its own sizes."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnpass
import attnpass.sparse_module as sparse_module
from attnpass.short_call import SHORT_CALL_TOKENS, shortened_call

LONG = 2 * SHORT_CALL_TOKENS + 44


def test_token_inputs_are_cut_to_their_last_tokens_and_padded_rows_stay_padded():
    ids = torch.arange(2 * LONG).view(2, LONG)
    mask = torch.ones(2, LONG, dtype=torch.long)
    mask[1, :10] = 0  # left padding, outside the last tokens
    args, kwargs = shortened_call((ids,), {"attention_mask": mask, "logits_to_keep": 1, "labels": ids.clone()})
    assert torch.equal(args[0], ids[:, -SHORT_CALL_TOKENS:]) and torch.equal(kwargs["labels"], ids[:, -SHORT_CALL_TOKENS:])
    assert kwargs["logits_to_keep"] == 1
    assert kwargs["attention_mask"][0].all() and kwargs["attention_mask"][1, 0] == 0 and kwargs["attention_mask"][1, 1:].all()
    assert mask[1, -SHORT_CALL_TOKENS:].all()  # the caller's mask is not written to


@pytest.mark.parametrize("kwargs", [
    {"attention_mask": torch.ones(1, 1, LONG, LONG, dtype=torch.bool)},   # a 4-D mask: which dim is which
    {"cache_position": torch.arange(LONG)},                              # a 1-D tensor of the length
    {"past_key_values": [torch.zeros(1, 2, 5, 4)]},                       # tensors inside a container
])
def test_calls_whose_sequence_dims_are_unclear_are_left_as_they_are(kwargs):
    assert shortened_call((torch.zeros(1, LONG, dtype=torch.long),), kwargs) is None


def test_short_and_float_inputs_are_left_as_they_are():
    assert shortened_call((torch.zeros(1, 2 * SHORT_CALL_TOKENS, dtype=torch.long),), {}) is None
    assert shortened_call((torch.zeros(1, LONG),), {}) is None


def _captured_lengths(monkeypatch) -> list[int]:
    lengths = []
    capture = sparse_module.capture_sites

    def recording(source, args, kwargs, **options):
        ids = args[0] if args else kwargs["input_ids"]
        lengths.append(ids.shape[1])
        return capture(source, args, kwargs, **options)

    monkeypatch.setattr(sparse_module, "capture_sites", recording)
    return lengths


def test_a_long_call_of_a_new_signature_is_captured_short_and_equals_the_original(monkeypatch):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 100, (2, LONG))
    mask = torch.ones(2, LONG, dtype=torch.long)
    mask[1, :7] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse = attnpass.sparsify(model, kwargs={"input_ids": ids[:, :16]}, method="dense")
        lengths = _captured_lengths(monkeypatch)
        with torch.no_grad():
            got = sparse(input_ids=ids, attention_mask=mask, logits_to_keep=3).logits
            want = model(input_ids=ids, attention_mask=mask, logits_to_keep=3).logits
    assert lengths == [SHORT_CALL_TOKENS]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class LengthBranch(nn.Module):
    """Causal self-attention whose output doubles past 200 tokens: a graph captured shorter holds only up to 200."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.qkv = nn.Linear(16, 48)

    def forward(self, input_ids, scale=1.0):
        h = self.embed(input_ids)
        q, k, v = self.qkv(h).view(*h.shape[:2], 3, 2, 8).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
        return out * 2 * scale if input_ids.shape[1] > 200 else out * scale


def test_a_graph_the_short_call_cannot_serve_is_captured_at_the_calls_sizes(monkeypatch):
    torch.manual_seed(0)
    model = LengthBranch().eval()
    ids = torch.randint(0, 50, (1, LONG))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse = attnpass.sparsify(model, (ids[:, :16],), method="dense")
        lengths = _captured_lengths(monkeypatch)
        with torch.no_grad():
            got = sparse(ids, scale=0.5)  # a new signature (a constant of another value)
    assert lengths == [SHORT_CALL_TOKENS, LONG]
    torch.testing.assert_close(got, model(ids, scale=0.5), rtol=1e-6, atol=1e-6)
