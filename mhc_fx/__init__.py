"""mhc_fx: turn the residual connections of any PyTorch model into n-stream Manifold-Constrained
Hyper-Connections (mHC, DeepSeek arXiv 2512.24880) or Hyper-Connections (HC, arXiv 2409.19606),
as compiler passes over the model's captured graph."""

from .config import MHCConfig
from .conversion import convert, find_residuals
from .converted import ConvertedModel
from .errors import CaptureError, ConfigError, ConversionError, MHCError
from .onnx import ExportError, ExportReport, export_onnx
from .optim import param_groups
from .report import BlockReport, ConversionReport

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``mhc_fx.backend`` (the torch.compile backend) imports Inductor: loaded on first use.
    if name == "backend":
        import importlib

        return importlib.import_module(".backend", __name__)
    raise AttributeError(f"module 'mhc_fx' has no attribute {name!r}")

__all__ = [
    "MHCConfig",
    "convert",
    "find_residuals",
    "param_groups",
    "export_onnx",
    "ExportReport",
    "ExportError",
    "ConvertedModel",
    "ConversionReport",
    "BlockReport",
    "MHCError",
    "ConfigError",
    "CaptureError",
    "ConversionError",
]
