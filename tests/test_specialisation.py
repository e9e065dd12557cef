"""A captured graph that holds only at its example's sizes (LongT5's transient-global attention
bakes `one_hot(num_classes)` from the example's length) is detected at capture, and the sparsified
model captures one graph per size instead of failing deep inside the graph at another length."""
from __future__ import annotations

import warnings

import pytest
import torch
import transformers

import attnpass
from attnpass.sparse_module import CaptureNotice
from tests.zoo import by_name


def _longt5():
    config = transformers.LongT5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=1, num_heads=4,
        local_radius=4, global_block_size=4, encoder_attention_type="transient-global", use_cache=False,
        return_dict=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.LongT5Model(config).eval()


def _call(batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, 100, (batch, length), generator=g),
            "attention_mask": torch.ones(batch, length, dtype=torch.long),
            "decoder_input_ids": torch.randint(3, 100, (batch, 6), generator=g)}


def test_a_length_specialised_graph_is_captured_per_size():
    model = _longt5()
    sparse = attnpass.sparsify(model, kwargs=_call(2, 16))
    program = next(iter(sparse._signatures.values()))
    assert "num_classes" in program.specialised
    # (length, notices expected): a new size is captured once, with the reason; known sizes reuse their graph
    for length, expected_notices in ((40, 1), (40, 0), (16, 0)):
        call = _call(2, length, seed=length)
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            got, expected = sparse(**call)[0], model(**call)[0]
        notices = [str(w.message) for w in caught if issubclass(w.category, CaptureNotice)]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert len(notices) == expected_notices, notices
        assert all("holds only at the sizes it was captured at" in n for n in notices)
    assert len(sparse._signatures) == 2  # one graph per size


@pytest.mark.parametrize("name", ["llama-sdpa", "bert-eager"])
def test_a_graph_that_holds_at_every_size_is_not_flagged(name):
    case = by_name(name)
    args, kwargs = case.inputs(2, 8)
    sparse = attnpass.sparsify(case.build(), args, kwargs)
    assert [p.specialised for p in sparse._signatures.values()] == [""]
