"""MemorizationMonitor: memorization signals on a fixed probe set, every N optimizer steps, band by band.

A thin scheduler around pure parts: the probe set is chosen once (:mod:`.probes`), its tensors built once
(:mod:`.tensors`); at every ``every_n_steps``-th optimizer step (a *check*) the rows are measured (:mod:`.measure`),
aggregated per band and split (:mod:`.aggregate`), and every ``curvature_every_k_checks``-th check adds the visual
check (:mod:`.visual`: generations, nearest-neighbour ratio ``mem/nn_ratio/train``, curvature difference
``mem/curvature_diff/t=<t>/train``). A last check runs at the end of training when the last step was not one.

Checks run with the global RNG state saved and restored, the UNet in eval mode and no gradients (the curvature maps
take input gradients only): turning the monitor on leaves the training trajectory unchanged (tested). Values follow
the metrics contract (``state.update_metrics``, ``logs``, ``control.should_log``); per-probe values are kept in
:attr:`MemorizationMonitor.history` for histograms and the report.

The less-trained baseline of ``live_vs_<baseline>`` (:mod:`mnemoguard.baselines`): ``ema`` (default; the run's
EMA), ``snapshot`` (a ring entry of the EMA), ``lora_off`` (adapters disabled), ``uncond`` (then it equals
``wen_gap``) or ``checkpoint`` (an earlier LoRA file or diffusers ``unet/`` folder).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from typing import Any

import numpy as np

from ...config.guard import MonitorConfig
from ...isolation import eval_mode, preserved_rng_state
from ...serialization import check_keys
from ..base import Callback, TrainerControl, TrainerState
from .aggregate import CONTRAST_CAVEATS, aggregate
from .measure import measure_all
from .probes import SPEC_VERSION, choose_probes, probe_fingerprint
from .tensors import build_probe_tensors
from .visual import visual_check

logger = logging.getLogger("mnemoguard")

__all__ = ["MemorizationMonitor"]


class MemorizationMonitor(Callback):
    """Memorization signals on a fixed probe set during fine-tuning (see the module docstring).

    Args:
        config: the settings; keyword arguments override its fields
            (``MemorizationMonitor(every_n_steps=50, baseline="lora_off")``).
        heldout: held-out samples with images, used when ``config.heldout_captions`` is empty: a ``datasets.Dataset``
            with the training image / caption columns, or a sequence of ``(image, caption)`` pairs or
            ``{"image": ..., "text": ...}`` dicts (PIL images, ``datasets`` image cells, or ``[C, H, W]`` tensors in
            [-1, 1] at the training resolution). ``config.heldout_data`` (a folder) is loaded here instead.

    Attributes:
        history: one dict per check, ``{"step", "probe_set", "metrics": {tag: float}, "per_probe": {signal: {band:
            {split: [float per probe]}}}}`` (plus ``"visual"`` at visual checks: per generated probe, its id,
            ``nn_ratio``, ``nearest_is_own``, ``curvature``).
        probe_sets: one entry per probe set the run used (a changed config on resume chooses a new one).
        latest_visuals: the last generations / nearest images / curvature maps (CPU tensors) or None.
        seconds: wall time spent in its hooks, ``{"setup", "checks"}`` (kept in the state).
    """

    def __init__(self, config: MonitorConfig | None = None, heldout: Any = None, **overrides: Any) -> None:
        self.config = dataclasses.replace(config or MonitorConfig(), **overrides)
        c = self.config
        if c.heldout_data and heldout is not None:
            raise ValueError("MemorizationMonitor: give one source of held-out probes, heldout_data or heldout=, "
                             f"found heldout_data={c.heldout_data!r} and heldout=")
        if c.heldout_data:
            from ...data import load_dataset_source

            heldout = load_dataset_source(c.heldout_data)
        self.heldout = heldout
        self.needs = frozenset({"dataset", "prompts"} | ({"ema"} if c.baseline in ("ema", "snapshot") else set()))
        self.spec: dict[str, Any] | None = None
        self.num_rows = 0  # training rows (set at on_train_begin)
        self.num_checks = 0
        self.history: list[dict[str, Any]] = []
        self.probe_sets: list[dict[str, Any]] = []
        self.latest_visuals: dict[str, Any] | None = None
        self.seconds = {"setup": 0.0, "checks": 0.0}
        self.bands: dict[str, tuple[int, int]] = {}
        self._context: Any = None
        self._tensors: Any = None
        self._baseline: Any = None
        self._warned: set[str] = set()

    # ------------------------------------------------------------------------------------------------ names
    @property
    def baseline_name(self) -> str:
        """The tag name of the live-vs-baseline signal, e.g. ``live_vs_ema``."""
        return f"live_vs_{self.config.baseline}"

    def signal_tag(self, signal: str) -> str:
        """Tag name of a signal (``live_vs_baseline`` becomes ``live_vs_<baseline>``)."""
        return self.baseline_name if signal == "live_vs_baseline" else signal

    @property
    def signal_names(self) -> list[str]:
        """Tag names of the configured signals, in order."""
        return [self.signal_tag(s) for s in self.config.signals]

    def contrast_caveats(self) -> dict[str, str]:
        """``{signal tag name: why its contrast is expected to run negative}`` for the configured signals that have
        one (:data:`~mnemoguard.callbacks.monitor.aggregate.CONTRAST_CAVEATS`); empty without held-out probes."""
        if not self.has_heldout:
            return {}
        return {self.signal_tag(s): CONTRAST_CAVEATS[s] for s in self.config.signals if s in CONTRAST_CAVEATS}

    @property
    def has_heldout(self) -> bool:
        if self.spec is not None:
            return bool(self.spec["heldout_source"])
        return self.config.num_heldout_probes > 0 and bool(self.config.heldout_captions or self.heldout is not None)

    @property
    def splits(self) -> list[str]:
        return ["train", "heldout"] if self.has_heldout else ["train"]

    def metric_tags(self, include_std: bool = False) -> dict[str, dict[str, list[str]]]:
        """``{signal tag name: {"train" | "heldout" | "contrast": [tag per band]}}`` of the check metrics."""
        out: dict[str, dict[str, list[str]]] = {}
        for sig in self.signal_names:
            parts = {split: [f"mem/{sig}/band={b}/{split}" for b in self.bands] for split in self.splits}
            if include_std:
                for split in self.splits:
                    parts[f"{split}_std"] = [f"mem/{sig}/band={b}/{split}_std" for b in self.bands]
            if self.has_heldout:
                parts["contrast"] = [f"mem/{sig}/band={b}/contrast" for b in self.bands]
            out[sig] = parts
        return out

    def probes(self) -> list[dict[str, Any]]:
        """One dict per probe: ``{"id", "split", "kind", "index", "caption"}`` (``index``: dataset row, held-out
        row, or for unseen captions the id of the training probe whose inputs it shares)."""
        if self.spec is None:
            return []
        s = self.spec
        out = [{"id": i, "split": "train", "kind": k, "index": r, "caption": c}
               for i, (r, k, c) in enumerate(zip(s["train_rows"], s["train_kinds"], s["train_captions"]))]
        P = len(out)
        for j, (r, c) in enumerate(zip(s["heldout_rows"], s["heldout_captions"])):
            out.append({"id": P + j, "split": "heldout", "kind": s["heldout_source"], "index": r, "caption": c})
        return out

    def duplicate_multiplicity(self) -> dict[int, float]:
        """``{training row: estimated copies of its image in the data set}`` for the rows of the probe choice's
        duplicate groups (:mod:`mnemoguard.image_groups`, exact and near): the group's size among the scanned rows
        x rows / rows scanned (exact when every row was scanned, ``duplicate_scan_rows``); rows in no group are not
        in it. Empty before ``on_train_begin``."""
        if self.spec is None:
            return {}
        groups = self.spec["image_groups"]
        scale = self.num_rows / groups["rows_scanned"] if groups["rows_scanned"] else 1.0
        return {int(r): max(1.0, len(g) * scale) for g in groups["groups"] for r in g}

    @property
    def tensors(self) -> Any:
        """The probe set's tensors (:class:`~.tensors.ProbeTensors`), or None before ``on_train_begin``."""
        return self._tensors

    @property
    def probe_set(self) -> Any:
        """The probes, one entry each (:class:`~.tensors.ProbeSet`), or None before ``on_train_begin``."""
        return self._tensors.probe_set if self._tensors is not None else None

    def baseline(self) -> Any:
        """The less-trained baseline of this check (:mod:`mnemoguard.baselines`; None while an EMA snapshot ring is
        still empty)."""
        return self._current_baseline()

    def curvature_baseline(self, denoiser: Any = None) -> Any:
        """What the curvature maps compare the live model with: the baseline of this check, or, while there is none
        yet, the unconditional model of ``denoiser`` (default: the live one)."""
        from ...baselines import UnconditionalBaseline

        baseline = self._current_baseline()
        if baseline is not None:
            return baseline
        return UnconditionalBaseline(denoiser or self._context.denoiser, self._tensors.uncond)

    @property
    def last_check_step(self) -> int | None:
        live = self.training_history
        return live[-1]["step"] if live else None

    # ------------------------------------------------------------------------------------------------ set-up
    def on_train_begin(self, state: TrainerState, control: TrainerControl, context: Any = None,
                       **kwargs: Any) -> None:
        start = time.perf_counter()
        self._context = context
        self.num_rows = len(context.dataset)
        self.bands = dict(context.bands)
        T = context.num_train_timesteps
        with preserved_rng_state():
            fingerprint = probe_fingerprint(self.config, len(context.dataset),
                                            len(self.heldout) if self.heldout is not None else 0, self.bands)
            why = self._spec_mismatch(fingerprint, T)
            if why is not None:
                if self.spec is not None:
                    logger.warning("MemorizationMonitor: %s; a new probe set is chosen at step %d (the curves before "
                                   "and after are not comparable)", why, state.global_step)
                self.spec = choose_probes(context.dataset, self.config, self.bands, T, self.heldout)
                self.probe_sets.append({"step": int(state.global_step), "reason": why})
            self._tensors = build_probe_tensors(self.spec, context, self.heldout, self.config.curvature_num_probes)
            self._baseline = self._build_baseline(context)
        self.seconds["setup"] += time.perf_counter() - start

    def _spec_mismatch(self, fingerprint: dict[str, Any], num_train_timesteps: int) -> str | None:
        """Why the (checkpointed) probe set cannot be used, or None."""
        if self.spec is None:
            return "no probe set yet"
        if self.spec.get("version") != SPEC_VERSION:
            return f"the checkpoint's probe set has format {self.spec.get('version')}, this version {SPEC_VERSION}"
        if self.spec["num_train_timesteps"] != num_train_timesteps:
            return (f"the checkpoint's probe set is for {self.spec['num_train_timesteps']} timesteps, the model has "
                    f"{num_train_timesteps}")
        saved = self.spec["fingerprint"]
        changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
        if changed:
            return "the monitor settings or data changed since the checkpoint (" + ", ".join(
                f"{k}: {saved.get(k)!r} -> {fingerprint.get(k)!r}" for k in changed) + ")"
        return None

    def _build_baseline(self, context: Any) -> Any:
        from ...baselines import (
            AdapterDisabledBaseline,
            UnconditionalBaseline,
            ema_baseline,
            load_lora_baseline,
            load_unet_baseline,
        )

        c, den = self.config, context.denoiser
        if c.baseline == "ema":
            return ema_baseline(den, context.ema, "ema")
        if c.baseline == "snapshot":
            if not context.ema.num_snapshots:
                raise ValueError("guard.monitor.baseline='snapshot' needs EMA snapshots (ema.snapshot_every > 0 and "
                                 "ema.num_snapshots > 0); found num_snapshots=0")
            return ema_baseline(den, context.ema, c.baseline_snapshot)
        if c.baseline == "lora_off":
            if not context.is_lora:
                raise ValueError("guard.monitor.baseline='lora_off' needs a model with LoRA adapters; found none")
            return AdapterDisabledBaseline(den)
        if c.baseline == "uncond":
            return UnconditionalBaseline(den, self._tensors.uncond)
        if context.is_lora:
            return load_lora_baseline(den, c.baseline_checkpoint)
        return load_unet_baseline(c.baseline_checkpoint, like=den)

    def _current_baseline(self) -> Any:
        """The baseline for this check; None while the snapshot ring is still empty (skipped, warned once)."""
        if self.config.baseline == "snapshot" and not self._context.ema.snapshots:
            if "snapshot" not in self._warned:
                self._warned.add("snapshot")
                warnings.warn("MemorizationMonitor: no EMA snapshot yet; live_vs_snapshot is skipped until the first "
                              "one is taken", RuntimeWarning, stacklevel=3)
            return None
        return self._baseline

    # ------------------------------------------------------------------------------------------------ checks
    def on_step_end(self, state: TrainerState, control: TrainerControl, context: Any = None,
                    logs: dict | None = None, **kwargs: Any) -> None:
        if self._tensors is not None and state.global_step % self.config.every_n_steps == 0:
            self._record(state, control, logs)

    def on_train_end(self, state: TrainerState, control: TrainerControl, context: Any = None,
                     logs: dict | None = None, **kwargs: Any) -> None:
        """A last check, of the exported weights (``Guard.end`` is called after the export): at the last step unless
        it was checked, and whenever the export is not the last weights; such a check is kept in the history
        (labelled) but not logged as a point of the curves. An EMA export is measured from the EMA itself (on every
        rank, whatever the model holds: diffusers' scripts copy the EMA into the model on the main process only); a
        best-checkpoint export from the weights the model holds."""
        exported = (getattr(context, "exported", None) or {}) if context is not None else {}
        source = exported.get("source", "last")
        if self._tensors is None or state.global_step == 0:
            state.warn("The memorization monitor made no check in this run (no optimizer step was taken)")
            return
        if source != "last" or self.last_check_step != state.global_step:
            visual = bool(self.config.curvature_every_k_checks and self.config.curvature_num_probes)
            denoiser = None
            if source == "ema" and context.ema is not None:
                from ...baselines import ema_baseline

                denoiser = ema_baseline(context.denoiser, context.ema)._inner
            self._record(state, control, logs, weights=exported if source != "last" else None, visual=visual,
                         denoiser=denoiser)

    def _record(self, state: TrainerState, control: TrainerControl, logs: dict | None,
                weights: dict[str, Any] | None = None, visual: bool | None = None, denoiser: Any = None) -> None:
        start = time.perf_counter()
        self.num_checks += 1
        if visual is None:
            k = self.config.curvature_every_k_checks
            visual = bool(k) and self.num_checks % k == 0 and self.config.curvature_num_probes > 0
        metrics, per_probe, vis = self.measure(visual=visual, denoiser=denoiser)
        entry: dict[str, Any] = {"step": state.global_step, "probe_set": len(self.probe_sets) - 1,
                                 "metrics": dict(metrics), "per_probe": per_probe}
        if weights is not None:  # the exported weights, not the live ones of this step
            entry["weights"] = {"source": weights.get("source"), "step": weights.get("step")}
        if vis is not None:
            entry["visual"] = {key: vis[key] for key in ("probe_ids", "nn_ratio", "nearest_is_own", "curvature")}
            self.latest_visuals = {**vis, "step": state.global_step, "weights": entry.get("weights")}
        self.history.append(entry)
        if weights is None:
            state.update_metrics(metrics)
            if logs is not None:  # the spreads stay in the history (histograms, margin charts), off the trackers
                logs.update({k: v for k, v in metrics.items() if not k.endswith("_std")})
            control.should_log = True
        self.seconds["checks"] += time.perf_counter() - start

    @property
    def training_history(self) -> list[dict[str, Any]]:
        """The checks of the live weights at their steps (without an end check of exported weights)."""
        return [h for h in self.history if "weights" not in h]

    def measure(self, visual: bool = False, denoiser: Any = None
                ) -> tuple[dict[str, float], dict[str, Any], dict[str, Any] | None]:
        """One check on the current weights (or on ``denoiser``'s: other weights of the same model), without
        recording it: ``(metrics, per_probe, visuals)``.

        Deterministic for given weights: everything random comes from the monitor's seed."""
        if self._tensors is None:
            raise RuntimeError("MemorizationMonitor.measure: no probe set yet (on_train_begin has not run)")
        context, tz, c = self._context, self._tensors, self.config
        den = denoiser if denoiser is not None else context.denoiser
        baseline = self._current_baseline()
        measured = {s: self.signal_tag(s) for s in c.signals if s != "live_vs_baseline" or baseline is not None}
        with preserved_rng_state(), eval_mode(context.unwrapped_model):
            values = measure_all(context, den, baseline, tz, set(measured), c.batch_size, c.score_space)
            metrics, per_probe = aggregate(values, tz.level, tz.probe, self.bands, measured, tz.num_train_probes,
                                           self.has_heldout)
            vis = None
            if visual:
                vis = visual_check(context, den, self.curvature_baseline(den), tz, c)
                metrics[f"mem/curvature_diff/t={c.curvature_timestep}/train"] = float(np.mean(vis["curvature"]))
                if vis["nn_ratio"]:
                    metrics["mem/nn_ratio/train"] = float(np.mean(vis["nn_ratio"]))
        return metrics, per_probe, vis

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "num_checks": self.num_checks, "history": self.history,
                "probe_sets": self.probe_sets, "seconds": dict(self.seconds)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_keys(state, {"spec": (dict, type(None)), "num_checks": int, "history": list, "probe_sets": list,
                           "seconds": dict}, "MemorizationMonitor", required=("spec", "history"))
        self.spec = state["spec"]
        self.num_checks = int(state.get("num_checks", len(state["history"])))
        self.history = list(state["history"])
        self.probe_sets = list(state.get("probe_sets", []))
        self.seconds = {**self.seconds, **{k: float(v) for k, v in state.get("seconds", {}).items()}}
        self.latest_visuals = None
        self._tensors = None  # rebuilt (and the spec checked against the settings) in on_train_begin
