"""From per-row values to the check's metrics: per probe, per band (never pooled across bands), per split.

For each signal and probe, the rows of that probe are averaged inside each band with
:func:`mnemoguard.signals.band_mean` (the rows' own levels of the schedule decide their band). Then per band and split:

- ``mem/<signal>/band=<b>/train`` and ``.../heldout``: the mean over probes; ``..._std`` their spread;
- ``mem/<signal>/band=<b>/contrast``: oriented so that *positive = the training probes look more memorized*:
  ``train − heldout`` for the gaps (larger on memorized rows), ``heldout − train`` for ``probe_loss`` (a memorized
  row has a lower loss).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...signals import band_mean
from .measure import COLUMNS

__all__ = ["CONTRAST_CAVEATS", "ORIENTATION", "aggregate"]

#: +1: larger on training probes = more memorized; -1: smaller (the loss)
ORIENTATION = {"live_vs_baseline": 1.0, "wen_gap": 1.0, "anisotropy": 1.0, "probe_loss": -1.0}

_CAPTION_SHIFT = ("expected negative with held-out image probes: held-out specific captions move the conditional "
                  "prediction more than trained ones (BENCHMARKS.md, issue 6); not a memorization signal there")
#: contrasts measured to run the wrong way, with why: shown next to their plots and charts
CONTRAST_CAVEATS = {"live_vs_baseline": _CAPTION_SHIFT, "wen_gap": _CAPTION_SHIFT}


def aggregate(values: torch.Tensor, t: torch.Tensor, probe: torch.Tensor, bands: dict[str, Any],
              signals: dict[str, str], num_train_probes: int, has_heldout: bool
              ) -> tuple[dict[str, float], dict[str, Any]]:
    """``(metrics, per_probe)`` of one check.

    Args:
        values: ``[N, 4]`` per-row values (columns :data:`~mnemoguard.callbacks.monitor.measure.COLUMNS`).
        t, probe: ``[N]`` level and probe id of each row.
        bands: name -> :class:`~mnemoguard.callbacks.bands.NoiseBand` (or a ``(lo, hi)`` pair of levels).
        signals: the signals measured at this check -> their tag names (``live_vs_baseline`` -> ``live_vs_ema``),
            in order. A value that is NaN or infinite (a diverged model) stays so in the means: it is recorded as a
            non-finite measurement, never dropped.
        num_train_probes: ``P``: probes ``0..P-1`` are training probes, the rest held-out.
        has_heldout: whether there are held-out probes (then ``heldout`` and ``contrast`` tags too).

    Returns:
        metrics: ``{tag: float}``; per_probe: ``{tag name: {band: {"train": [...], "heldout": [...]}}}`` (per-probe
        means over the probe's draws in the band).
    """
    t, probe = t.cpu(), probe.cpu()
    n_probes = int(probe.max()) + 1
    ranges = [tuple(b) for b in bands.values()]
    metrics: dict[str, float] = {}
    per_probe: dict[str, Any] = {}
    for sig, name in signals.items():
        col = values[:, COLUMNS[sig]]
        table = torch.stack([band_mean(col[probe == p], t[probe == p], ranges) for p in range(n_probes)])
        per_probe[name] = {}
        for b, bname in enumerate(bands):
            vals = [float(v) for v in table[:, b]]
            groups = {"train": vals[:num_train_probes]}
            if has_heldout:
                groups["heldout"] = vals[num_train_probes:]
            per_probe[name][bname] = groups
            means = {}
            for split, v in groups.items():
                arr = np.asarray(v, dtype=np.float64)
                means[split] = float(arr.mean())
                metrics[f"mem/{name}/band={bname}/{split}"] = means[split]
                metrics[f"mem/{name}/band={bname}/{split}_std"] = float(arr.std())
            if has_heldout:
                metrics[f"mem/{name}/band={bname}/contrast"] = ORIENTATION[sig] * (means["train"] - means["heldout"])
    return metrics, per_probe
