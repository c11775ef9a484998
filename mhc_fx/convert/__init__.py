"""Conversion: residual analysis, the plan, the rewrite and the guarded call.

:func:`convert` rewrites a model in place; :func:`find_residuals` only reports;
:func:`report` returns a converted model's :class:`ConversionReport`. The other stages use
what is exported here (export re-runs :func:`analyse` / :func:`rewrite_graph` on its own graph
and sets a converted model's :class:`ConvertedForward` aside), not the modules inside.
"""

from .conversion import convert, find_residuals, is_converted, report
from .guarded import CaptureRecord, ConvertedForward
from .rewrite import analyse, rewrite_graph
from .conversion_report import BlockReport, ConversionReport

__all__ = [
    "convert", "find_residuals", "is_converted", "report", "CaptureRecord", "ConvertedForward", "BlockReport",
    "ConversionReport", "analyse", "rewrite_graph",
]
