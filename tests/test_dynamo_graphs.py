"""The pattern library reads the graph a torch.compile backend receives (torch-level ops, methods
and operators) as well as the torch.export graph: same sites, no second copy of the patterns."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo

from attnpass.frontend.detect import find_sites
from tests.zoo import by_name

CASES = ["bert-eager", "bert-sdpa", "gpt2-eager", "gpt2-sdpa", "llama-eager", "llama-sdpa",
         "hand-matmul-div-mask", "hand-einsum-scaled-q", "hand-baddbmm-3d", "hand-gqa-expand-reshape",
         "bloom-eager", "deberta-v2-eager", "longt5-local-eager",
         "neg-moe-router", "neg-query-axis-softmax", "neg-softmax-gate"]


@pytest.mark.parametrize("name", CASES)
def test_dynamo_graph_sites_match_the_model(name):
    case = by_name(name)
    model = case.build()
    args, kwargs = case.inputs(2, 8)
    found = []

    def backend(gm, example_inputs):
        sites, skipped = find_sites(gm, probes=None)
        found.append((len(sites), skipped))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(*args, **kwargs)
    assert sum(n for n, _ in found) == case.attention_count, found
    assert all(not skipped for _, skipped in found), found
