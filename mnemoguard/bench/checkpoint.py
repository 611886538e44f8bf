"""The benchmark's per-checkpoint evaluation: a trainer callback that measures the live model at every ``on_save``
(ground truth, prompt fidelity, every detection signal, the loss gap per noise band), and at ``on_train_end`` the
weights the run exports (after a stop and rollback, the rollback checkpoint's) and the end-of-training analyses
(:mod:`.final`)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from ..callbacks import Callback, TrainerControl, TrainerState
from ..evaluation import PromptFidelityClassifier, detection_summary, roc_auc
from ..serialization import to_jsonable
from ..testbed.ground_truth import GroundTruth
from .caption_probes import CaptionProbes
from .config import BenchConfig
from .final import final_analyses
from .probes import (
    ProbeModel,
    Trajectory,
    band_losses,
    copy_ground_truth,
    probe_latents,
    sample_with_trajectory,
)
from .signals import detection_signals

__all__ = ["BenchCallback"]


def _tqdm(cfg: BenchConfig, total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not cfg.progress)


class BenchCallback(Callback):
    """Evaluates the live model at every checkpoint (``on_save``), the exported weights and the final analyses at
    ``on_train_end`` (the guard calls it while the model holds the weights the run exports).

    Evaluation runs with the model in eval mode and the global RNG state preserved (:mod:`mnemoguard.isolation`):
    training continues exactly as it would without the benchmark.
    """

    def __init__(self, cfg: BenchConfig, gt: GroundTruth, log_path: Path | None = None) -> None:
        self.cfg = cfg
        self.gt = gt
        self.log_path = log_path
        self.train = gt.unique_training_images(value_range=(0.0, 1.0))
        self.probes = CaptionProbes.build(gt, cfg, self.train.captions)
        self.classifier = PromptFidelityClassifier().fit(self.train.images.flatten(1), self.train.labels)
        self.checkpoints: list[dict[str, Any]] = []
        self.final: dict[str, Any] = {}
        self.exported: dict[str, Any] = {}  # {"source", "step", ...evaluate()} of the exported weights
        self.eval_seconds = 0.0
        self._prompts: Any = None

    # ------------------------------------------------------------------------------------------------ hooks
    def on_save(self, state: TrainerState, control: TrainerControl, context: Any = None, **kwargs: Any) -> None:
        self._run(state.global_step, context, "checkpoint")

    def on_train_end(self, state: TrainerState, control: TrainerControl, context: Any = None, **kwargs: Any) -> None:
        exported = context.exported or {"source": "last", "step": state.global_step}
        if exported["source"] == "last":  # the live weights: the last point of the curve
            if not self.checkpoints or self.checkpoints[-1]["step"] != state.global_step:
                self._run(state.global_step, context, "checkpoint")
            self.exported = {**self.checkpoints[-1], "source": "last"}
        else:  # a rollback's checkpoint or the EMA: evaluated as they are, labelled by what they are
            self._run(int(exported["step"]), context, "exported")
            self.exported["source"] = exported["source"]
        self._run(state.global_step, context, "final")

    def _run(self, step: int, context: Any, what: str) -> None:
        """Evaluate the model as it is now: a ``checkpoint`` of the curve, the ``exported`` weights, or the
        ``final`` analyses."""
        from ..baselines import ema_baseline
        from ..isolation import eval_mode, preserved_rng_state
        from ..prompts import PromptEncoder

        if context.latent:
            raise NotImplementedError("mnemoguard bench probes pixel-space models only")
        start = time.perf_counter()
        den = context.denoiser
        with preserved_rng_state(), eval_mode(context.unwrapped_model):
            ema = ema_baseline(den, context.ema) if context.ema is not None else None
            if self._prompts is None:  # the bench's own encoder: the training loop's cache is never touched
                self._prompts = PromptEncoder(context.prompts.encode, device=context.device)
            model = ProbeModel(den, ema, self._prompts, self._prompts([""]))
            if what == "final":
                self.final = final_analyses(self.cfg, self.gt, self.train, model, context.tokenizer)
            elif what == "exported":
                self.exported = self.evaluate(model, step)
            else:
                self.checkpoints.append(self.evaluate(model, step))
                self._log(self.checkpoints[-1])
        self.eval_seconds += time.perf_counter() - start

    def _log(self, result: dict[str, Any]) -> None:
        """Append a checkpoint's results to the JSON-lines log (kept if the run is interrupted)."""
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(to_jsonable(result, finite=True)) + "\n")

    # ------------------------------------------------------------------------------------------------ one checkpoint
    def evaluate(self, model: ProbeModel, step: int) -> dict[str, Any]:
        """Ground truth, prompt fidelity, detection signals and per-band losses of the live model at one checkpoint."""
        cfg, pr = self.cfg, self.probes
        start = time.perf_counter()
        cond_caps = model.encode(pr.captions)
        cond = cond_caps[pr.rows]
        latents = probe_latents(pr.seeds, model.image_shape)
        guidance = sorted(set(cfg.probes.guidance))
        bar = _tqdm(cfg, len(guidance) + 2, f"eval step {step}")
        trajectories, gt_out = {}, {}
        for w in guidance:
            traj = sample_with_trajectory(model, cond, latents, w, cfg.probes.num_inference_steps,
                                          cfg.probes.batch_size)
            trajectories[w] = traj
            gt_out[f"w={w:g}"] = self._ground_truth(traj.images)
            bar.update(1)
        first = pr.first_rows()
        detection, scores = {}, {}
        if cfg.signals.enabled:
            detection, scores = self._detection(model, cond_caps, latents[first], _select(trajectories[1.0], first),
                                                _select(trajectories[guidance[-1]], first), len(first) / len(pr.rows),
                                                trajectories[1.0].images)
        bar.update(1)
        losses = self._band_losses(model)
        bar.update(1)
        bar.close()
        return {
            "step": step,
            "seconds": time.perf_counter() - start,
            "ground_truth": gt_out,
            "fidelity": {f"w={w:g}": self._fidelity(trajectories[w].images) for w in guidance},
            "detection": detection,
            "scores": scores,
            "loss_by_band": losses,
        }

    def _detection(self, model: ProbeModel, cond_caps: torch.Tensor, latents: torch.Tensor, plain: Trajectory,
                   guided: Trajectory, share: float, images_w1: torch.Tensor) -> tuple[dict, dict]:
        """Every prompt-level signal on the first generation of each caption, with AUC etc. planted vs negatives."""
        cfg, pr = self.cfg, self.probes
        sig = detection_signals(
            model, cond_caps, latents, plain, guided, bands=cfg.signals.bands,
            asthana_gamma=cfg.signals.asthana_gamma, asthana_lo_index=cfg.signals.asthana_lo_index,
            curvature_step=cfg.signals.curvature_step, curvature_probes=cfg.signals.curvature_probes,
            curvature_method=cfg.signals.curvature_method, seed=cfg.seed, trajectory_share=share,
        )
        labels = torch.tensor([g == "planted" for g in pr.groups])
        copied = self._copied_captions(images_w1)
        keep = ~labels | copied  # planted captions copied at w = 1 (any seed) vs all negatives
        detection = {}
        for name, scores in sig.scores.items():
            row: dict[str, Any] = {"passes": sig.passes[name], "seconds": sig.seconds[name], "note": sig.notes[name]}
            if labels.any() and not labels.all():
                row.update(detection_summary(scores.double(), labels))
            if (labels & copied).any() and (~labels).any():
                row["auc_copied_vs_negatives"] = roc_auc(scores[keep].double(), labels[keep])
                row["num_copied"] = int((labels & copied).sum())
            detection[name] = row
        return detection, {k: v.tolist() for k, v in sig.scores.items()}

    def _fidelity(self, images: torch.Tensor) -> dict[str, float]:
        """Prompt fidelity per caption group: the share of generations a pixel classifier fitted on the testbed's
        training images assigns to the class their caption names (:class:`~mnemoguard.evaluation.
        PromptFidelityClassifier`); ``negatives`` pools the unseen and held-out captions (never-trained prompts)."""
        pr = self.probes
        labels = [self.gt.record(pr.captions[i]).label for i in pr.rows]
        hits = self.classifier.predict(images.flatten(1).clamp(0, 1)) == labels
        out = {}
        for group in [*dict.fromkeys(pr.groups), "negatives"]:
            idx = [k for k, i in enumerate(pr.rows) if pr.groups[i] == group or (group == "negatives" and
                                                                                 pr.groups[i] != "planted")]
            if idx:
                out[group] = float(hits[idx].mean())
        return out

    def _copied_captions(self, images: torch.Tensor) -> torch.Tensor:
        """``[P]`` bool: the caption's own training image came out in at least one of its generations."""
        pr, p = self.probes, self.cfg.probes
        res = copy_ground_truth(images, self.train.images, [pr.own_index[i] for i in pr.rows],
                                threshold=p.ratio_threshold, n_resamples=1, seed=self.cfg.seed)
        out = torch.zeros(len(pr.captions), dtype=torch.bool)
        for row, hit in zip(pr.rows, res["memorized"]):
            out[row] |= bool(hit) and pr.own_index[row] is not None
        return out

    def _ground_truth(self, images: torch.Tensor) -> dict[str, Any]:
        """Memorized / copy fractions and d1/d2 ratios of one guidance's generations, per caption group."""
        pr, p = self.probes, self.cfg.probes
        out: dict[str, Any] = {}
        for group in dict.fromkeys(pr.groups):
            idx = [k for k, i in enumerate(pr.rows) if pr.groups[i] == group]
            sub = copy_ground_truth(images[idx], self.train.images, [pr.own_index[pr.rows[k]] for k in idx],
                                    threshold=p.ratio_threshold, n_resamples=p.bootstrap_resamples, seed=self.cfg.seed)
            out[group] = {k: sub[k] for k in ("memorized_fraction", "copy_fraction", "median_ratio", "ratio")}
        return out

    def _band_losses(self, model: ProbeModel) -> dict[str, Any]:
        pr, cfg = self.probes, self.cfg
        planted = [c for c, g in zip(pr.captions, pr.groups) if g == "planted"]
        idx = [self.train.index_of(c)[0] for c in planted]
        imgs = self.train.images[idx] * 2 - 1
        held, held_caps = self.gt.held_out_images()
        bands = cfg.signals.bands
        out: dict[str, Any] = {"bands": bands}
        for name, x, caps in (("planted", imgs, planted), ("held_out", held, held_caps)):
            if len(caps):
                loss = band_losses(model, x, model.encode(list(caps)), bands, draws=cfg.danger_zone.loss_draws,
                                   seed=cfg.seed)
                out[name] = loss.mean(0).tolist()
        if "planted" in out and "held_out" in out:
            out["gap"] = [h - p for h, p in zip(out["held_out"], out["planted"])]
        return out


def _select(traj: Trajectory, rows: list[int]) -> Trajectory:
    """The rows ``rows`` of a trajectory."""
    return dataclasses.replace(
        traj, x=traj.x[:, rows], eps_cond=traj.eps_cond[:, rows],
        eps_uncond=None if traj.eps_uncond is None else traj.eps_uncond[:, rows], images=traj.images[rows],
    )
