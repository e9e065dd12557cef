"""The old name of `attnpass.lowering.torch` (the PyTorch kernels also run on CUDA, so "cpu" was a
misnomer), kept for one release: `attnpass.lowering.cpu.<module>` imports still work and warn."""
from __future__ import annotations

import importlib
import sys
import warnings

from attnpass.lowering import torch as _torch_kernels

_MODULES = ("bucket_attention", "common", "dense", "edge_attention", "grouped_attention", "ordered_topk",
            "row_normalizers")

warnings.warn("attnpass.lowering.cpu is now attnpass.lowering.torch; the old name goes in the next release",
              DeprecationWarning, stacklevel=2)

for _name in _MODULES:
    # the same module objects under the old names: monkeypatching either reaches the kernels
    sys.modules[f"{__name__}.{_name}"] = importlib.import_module(f"{_torch_kernels.__name__}.{_name}")
    globals()[_name] = sys.modules[f"{__name__}.{_name}"]
