"""Conversion: capture, residual analysis, the plan, the rewrite and the guarded call.

:func:`convert` rewrites a model in place; :func:`find_residuals` only reports;
:func:`report` returns a converted model's :class:`ConversionReport`.
"""

from .conversion import convert, find_residuals, is_converted, report
from .guarded import CaptureRecord, ConvertedForward
from .report import BlockReport, ConversionReport

__all__ = [
    "convert", "find_residuals", "is_converted", "report", "CaptureRecord", "ConvertedForward", "BlockReport",
    "ConversionReport",
]
