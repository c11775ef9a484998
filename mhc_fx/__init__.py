"""mhc_fx: turn the residual connections of any PyTorch model into n-stream Manifold-Constrained
Hyper-Connections (mHC, DeepSeek arXiv 2512.24880) or Hyper-Connections (HC, arXiv 2409.19606),
as compiler passes over the model's captured graphs.

Stages (one subpackage each): :mod:`mhc_fx.nn` (the math and the connection modules),
:mod:`mhc_fx.convert` (capture, analysis, plan, rewrite, the guarded call), :mod:`mhc_fx.kernels`
(Triton kernels as ``torch.ops.mhc_fx``), :mod:`mhc_fx.compile` (the ``mhc`` torch.compile
backend), :mod:`mhc_fx.export` (ONNX, and ONNX Runtime GenAI folders for generation).
"""

from . import kernels  # noqa: F401  (registers torch.ops.mhc_fx: fused connections call them)
from .compile.fusion_report import FusionReport, fusion_reports
from .config import MHCConfig
from .convert import BlockReport, CaptureRecord, ConversionReport, convert, find_residuals, is_converted, report
from .errors import CaptureError, ConfigError, ConversionError, MHCError
from .export.genai import GenAIReport, export_genai
from .export.onnx import ExportError, ExportReport, export_onnx
from .optim import param_groups
from .pretrained import from_pretrained

__version__ = "0.1.0"

__all__ = [
    "MHCConfig",
    "convert",
    "find_residuals",
    "report",
    "fusion_reports",
    "FusionReport",
    "is_converted",
    "from_pretrained",
    "param_groups",
    "export_onnx",
    "ExportReport",
    "export_genai",
    "GenAIReport",
    "ExportError",
    "ConversionReport",
    "BlockReport",
    "CaptureRecord",
    "MHCError",
    "ConfigError",
    "CaptureError",
    "ConversionError",
]
