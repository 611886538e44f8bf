"""The end-of-run report: verdicts, JSON summary, plots, markdown, and the export's memorization metadata."""

from .metadata import exported_weight_files, memorization_metadata, stamp_safetensors
from .report import MemorizationReport
from .summary import build_summary
from .verdicts import VERDICT_RANK, overall_verdict, probe_verdicts

__all__ = ["VERDICT_RANK", "MemorizationReport", "build_summary", "exported_weight_files", "memorization_metadata",
           "overall_verdict", "probe_verdicts", "stamp_safetensors"]
