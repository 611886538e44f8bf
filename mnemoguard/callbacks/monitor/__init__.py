"""The memorization monitor: probe choice, probe tensors, measurement, aggregation, visual check, and the callback
that schedules them (:class:`MemorizationMonitor`)."""

from .aggregate import CONTRAST_CAVEATS, ORIENTATION, aggregate
from .measure import COLUMNS, measure_all, measure_rows
from .monitor import MemorizationMonitor
from .probes import choose_probes, duplicated_caption_rows, probe_fingerprint
from .tensors import ProbeTensors, build_probe_tensors
from .visual import visual_check

__all__ = ["COLUMNS", "CONTRAST_CAVEATS", "ORIENTATION", "MemorizationMonitor", "ProbeTensors", "aggregate",
           "build_probe_tensors", "choose_probes", "duplicated_caption_rows", "measure_all", "measure_rows",
           "probe_fingerprint", "visual_check"]
