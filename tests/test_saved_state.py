"""What users hold keeps working across the move of attnpass into folders: state_dicts saved before it
load after it (and give the same outputs), and the old kernel package name still imports."""
from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import attnpass
from tests.helpers import tiny_gpt2

# Saved by the code before the move (tests/data/state_dicts_before_folders.pt holds the commit): per
# method, the options, the method's own state (the model's weights come from tiny_gpt2()) and the
# logits of the sparsified model on `ids` after one call.
SAVED = Path(__file__).parent / "data" / "state_dicts_before_folders.pt"


@pytest.mark.parametrize("method", ["routing", "sbm", "sparsefinder", "combiner"])
def test_a_state_dict_saved_before_the_move_loads_and_gives_the_same_outputs(method):
    saved = torch.load(SAVED)
    ids, entry = saved["ids"], saved[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse = attnpass.sparsify(tiny_gpt2(), (ids,), method=method, **entry["options"])
    state = sparse.state_dict()
    assert set(entry["state_dict"]) <= set(state), "a saved key has no place in today's module"
    state.update(entry["state_dict"])
    sparse.load_state_dict(state, strict=True)
    with torch.no_grad():
        logits = sparse(ids).logits
    torch.testing.assert_close(logits, entry["logits"], rtol=1e-5, atol=1e-5)


def test_the_old_kernel_package_name_imports_the_same_modules_and_warns():
    from attnpass.lowering.cpu import grouped_attention as old  # noqa: F401 (the old name)
    from attnpass.lowering.torch import grouped_attention as new

    assert old is new
    done = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", "import attnpass.lowering.cpu"],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "attnpass.lowering.cpu is now attnpass.lowering.torch" in done.stderr


def test_every_package_folder_is_in_the_installed_package_list():
    import tomllib

    root = Path(__file__).parent.parent
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    where = {package: root / folder for package, folder in setup["package-dir"].items()}

    def folder(package: str) -> Path:
        parts = package.split(".")
        for n in range(len(parts), 0, -1):  # the longest mapped prefix
            if ".".join(parts[:n]) in where:
                return where[".".join(parts[:n])].joinpath(*parts[n:])
        return root.joinpath(*parts)

    listed = set(setup["packages"])
    for package in listed:
        assert (folder(package) / "__init__.py").is_file(), package
    for base in ("attnpass", "patterns", "lowering"):
        for init in (root / base).rglob("__init__.py"):
            relative = init.parent.relative_to(root / base).parts
            prefix = {"attnpass": "attnpass", "patterns": "attnpass.patterns", "lowering": "attnpass.lowering"}[base]
            package = ".".join((prefix, *relative))
            assert package in listed, f"{package} ({init.parent}) is not in pyproject's packages: it would not install"
