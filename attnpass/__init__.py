"""attnpass: find the attention in any PyTorch model's graph and rewrite it into sparse attention.

    report = attnpass.find_attention(model, args=(input_ids,), kwargs={"attention_mask": mask})
    sparse = attnpass.sparsify(model, args=(input_ids,), kwargs={"attention_mask": mask}, method="dense")
"""
from attnpass.api import NoAttentionFound, aux_loss, find_attention, sparsify
from attnpass.tools.calibrate import CalibrationReport, calibrate
from attnpass.backends.compile import backend, explain
from attnpass.frontend.capture import CaptureError
from attnpass.cost_model import cost
from attnpass.tools.fidelity import FidelityReport, fidelity
from attnpass.methods import METHODS
from attnpass.methods.sparsefinder import sparsefinder_metrics
from attnpass.backends.onnx import export_onnx
from attnpass.frontend.site import AttentionReport, AttentionSite, SkippedSite
from attnpass.sparse_module import SparseModel

__all__ = [
    "METHODS", "AttentionReport", "CalibrationReport", "FidelityReport", "AttentionSite", "CaptureError", "NoAttentionFound", "SkippedSite",
    "SparseModel", "aux_loss", "backend", "calibrate", "cost", "explain", "export_onnx", "fidelity", "find_attention", "sparsefinder_metrics", "sparsify",
]
__version__ = "0.1.0"
