"""The pass-key helpers of examples/real_models.py, with a character tokenizer (no model download):
the prompt's length and layout, and the teacher-forced check's alignment of logits and answer."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import real_models  # noqa: E402 - examples/ holds it; the licence texts it reads are on every machine


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


class NextTokenModel:
    """Logits whose argmax at position t is token t + 1 + `shift` of the input (shift 0: perfect)."""

    def __init__(self, shift=0):
        self.shift = shift

    def __call__(self, input_ids, use_cache=False):
        ids = input_ids[0]
        nxt = torch.roll(ids, -1 - self.shift)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, int(ids.max()) + 1).float()[None])


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_prompt_has_the_length_the_needle_and_the_question(depth):
    tok = CharTokenizer()
    prompt = real_models.pass_key_prompt(tok, 3000, depth, 71432)
    assert prompt.shape == (1, 3000)
    text = tok.decode(prompt[0].tolist())
    needle = "The pass key is 71432. Remember it. 71432 is the pass key."
    assert text.count(needle) == 1
    assert text.endswith("What is the pass key? The pass key is")
    at = text.index(needle) / len(text)
    assert abs(at - depth) < 0.05


def test_retrieves_reads_the_logits_before_each_answer_token():
    tok = CharTokenizer()
    prompt = real_models.pass_key_prompt(tok, 500, 0.5, 123)
    assert real_models.retrieves(NextTokenModel(), tok, prompt, 123)
    assert not real_models.retrieves(NextTokenModel(shift=1), tok, prompt, 123)
