"""The GroupedAttention node's body (lowering/onnx/grouped.py) against the PyTorch grouped kernel, in
float64 on one node: every input it takes (summaries, causal offsets, band, key ranges, key padding,
empty slots, GQA), output and logsumexp statistic; what it does not lower is refused."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from attnpass.lowering.onnx import attach_functions
from attnpass.lowering.onnx.common import DOMAIN, ONNX_OPSET
from attnpass.lowering.torch.grouped_attention import grouped_attention

B, HQ, LQ, LK, D, DV, G, WQ, WK, S = 2, 4, 11, 13, 8, 6, 3, 4, 5, 2


def _inputs(seed: int, hkv: int, summaries: bool, bias: bool, pair_mask: bool, key_range: bool):
    g = torch.Generator().manual_seed(seed)
    x = dict(q=torch.randn(B, HQ, LQ, D, generator=g, dtype=torch.float64),
             k=torch.randn(B, hkv, LK, D, generator=g, dtype=torch.float64),
             v=torch.randn(B, hkv, LK, DV, generator=g, dtype=torch.float64))
    # distinct keys per group (the kernel counts a key listed twice twice, and so does the body)
    x["q_index"] = torch.randint(-1, LQ, (B, HQ, G, WQ), generator=g)
    keys = torch.stack([torch.randperm(LK, generator=g)[:WK] for _ in range(B * HQ * G)]).view(B, HQ, G, WK)
    x["k_index"] = keys.masked_fill(torch.rand(keys.shape, generator=g) < 0.2, -1)
    x["key_keep"] = torch.rand(B, LK, generator=g) > 0.2
    if bias:
        x["bias"] = torch.randn(B, 1, LQ, LK, generator=g, dtype=torch.float64)
    if pair_mask:
        x["pair_mask"] = torch.rand(1, HQ, LQ, LK, generator=g) > 0.3
    if summaries:
        x["summary_k"] = torch.randn(B, HQ, G, S, D, generator=g, dtype=torch.float64)
        x["summary_v"] = torch.randn(B, HQ, G, S, DV, generator=g, dtype=torch.float64)
        x["summary_mask"] = torch.rand(B, 1, G, WQ, S, generator=g) > 0.4
    if key_range:
        low = torch.randint(0, LK, (B, HQ, G, WQ), generator=g)
        x["key_range"] = torch.stack([low, low + 4], dim=-1)
    return x


class _OneCall(torch.nn.Module):
    def __init__(self, names: list[str], attributes: dict):
        super().__init__()
        self.names, self.attributes = names, attributes

    def forward(self, *tensors):
        return _reference(dict(zip(self.names, tensors)), self.attributes)


def _onnx_outputs(x: dict, attributes: dict):
    """The call exported as the exporter writes it (the translation table's node and its body) and run
    by onnxruntime; absent optional inputs are the node's neutral constants."""
    from attnpass.lowering.onnx import translation_table

    names = list(x)
    program = torch.export.export(_OneCall(names, attributes), tuple(x.values()), strict=False)
    onnx_program = torch.onnx.export(program, (), dynamo=True, custom_translation_table=translation_table(),
                                     opset_version=ONNX_OPSET, optimize=False, input_names=names, verbose=False)
    proto = attach_functions(onnx_program.model_proto)
    assert [n.op_type for n in proto.graph.node if n.domain == DOMAIN] == ["GroupedAttention"]
    onnx.checker.check_model(proto, full_check=True)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: x[i.name].numpy() for i in sess.get_inputs()}
    return sess.run(None, feeds)


def _reference(x: dict, attributes: dict):
    return grouped_attention(x["q"], x["k"], x["v"], x["q_index"], x["k_index"], key_padding_mask=x.get("key_keep"),
                             bias=x.get("bias"), summary_k=x.get("summary_k"), summary_v=x.get("summary_v"),
                             summary_mask=x.get("summary_mask"), pair_mask=x.get("pair_mask"),
                             key_range=x.get("key_range"), **attributes)


@pytest.mark.parametrize("hkv, summaries, key_range, attributes", [
    (4, True, False, dict(scale=0.25)),
    (2, True, False, dict(scale=0.25, causal=True, causal_offset=2)),
    (1, False, False, dict(scale=0.5, causal=True, causal_offset=-3, window=4)),
    (2, True, True, dict(scale=0.125, window=3)),
    (4, False, True, dict(scale=0.25, causal=True)),
])
def test_grouped_node_equals_the_kernel(hkv, summaries, key_range, attributes):
    x = _inputs(hkv * 10 + summaries, hkv, summaries, False, False, key_range)
    out, stat = _reference(x, attributes)
    got_out, got_stat = _onnx_outputs(x, attributes)
    filled = stat != 0
    assert filled.any() and not filled.all()  # the masks leave some rows empty, and not all
    assert np.abs(got_out - out.numpy()).max() < 1e-12
    assert np.abs(got_stat - stat.numpy()).max() < 1e-12


def test_grouped_node_refuses_what_it_does_not_lower():
    x = _inputs(0, 4, False, False, False, False)
    with pytest.raises(Exception, match="normalizer 'entmax15' has no ONNX body"):
        _onnx_outputs(x, dict(scale=0.25, normalizer="entmax15"))
    for bias, pair_mask in ((True, False), (False, True)):
        with pytest.raises(Exception, match="with a bias or pair mask read at the pairs has no ONNX lowering"):
            _onnx_outputs(_inputs(0, 4, False, bias, pair_mask, False), dict(scale=0.25))
