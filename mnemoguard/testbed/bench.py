"""``mnemoguard bench``: train the reference trainer on a planted-memorization testbed and measure every signal.

:func:`run_bench` does, with one seed:

1. builds the testbed (``<out>/testbed``) and trains the reference :class:`~mnemoguard.trainer.Trainer` on it
   (``<out>/train``), checkpointing every ``train.eval_every`` steps with EMA on (the less-trained baseline);
2. at every checkpoint, inside the trainer's ``on_save`` hook (global RNG forked, so the training run is the one it
   would be without the benchmark): generations of planted vs unseen / held-out captions at w = 1 and at the
   users' guidance, nearest-neighbour ground truth with bootstrap intervals, every prompt-level signal with AUC,
   TPR@1%FPR, cost and wall time, and the training-loss gap per noise band;
3. after training: Kim & Lee's localisation maps on template captions, the danger-zone curves of the training data
   beside the per-noise-level memorization rate;
4. writes ``bench.json``, PNG figures and ``bench.md`` (:mod:`.bench_report`); each checkpoint's numbers are also
   appended to ``checkpoints.jsonl`` as soon as they exist, so an interrupted run keeps them.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ..callbacks import Callback, TrainerControl, TrainerState
from ..config import load_config
from ..evaluation import (
    KIM_LEE_TV_THRESHOLD,
    PromptFidelityClassifier,
    detection_summary,
    roc_auc,
    template_verbatim,
)
from .bench_config import BenchConfig, load_bench_config
from .bench_mitigation import apply_mitigation
from .bench_probes import (
    ProbeModel,
    Trajectory,
    band_losses,
    copy_ground_truth,
    probe_latents,
    sample_with_trajectory,
)
from .build import build_testbed
from .ground_truth import GroundTruth

__all__ = ["BenchCallback", "BenchConfig", "ProbeSet", "load_bench_config", "run_bench"]

RESULTS_FILE, MARKDOWN_FILE, CHECKPOINT_LOG = "bench.json", "bench.md", "checkpoints.jsonl"


def _tqdm(cfg: BenchConfig, total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not cfg.progress)


@dataclasses.dataclass
class ProbeSet:
    """The probed captions, their groups, per-row seeds and their own training images.

    Rows are generation-major: row ``j * P + p`` is generation ``j`` of caption ``p``; negatives get fewer
    generations, so generation ``j`` only has the captions with more than ``j`` seeds.
    """

    captions: list[str]
    groups: list[str]  # planted | unseen | held_out
    own_index: list[int | None]
    rows: list[int]  # caption index of each row
    gens: list[int]  # generation index of each row
    seeds: list[int]

    @classmethod
    def build(cls, gt: GroundTruth, cfg: BenchConfig, train_captions: tuple[str, ...]) -> ProbeSet:
        p = cfg.probes
        pos = gt.captions("global")[: p.num_positive]
        groups = {"planted": pos, "unseen": gt.captions("unseen", "global")[: p.num_unseen],
                  "held_out": gt.captions("held_out")[: p.num_held_out]}
        captions = [c for g in groups.values() for c in g]
        names = [g for g, cs in groups.items() for _ in cs]
        index = {c: i for i, c in enumerate(train_captions)}
        own = [index.get(c) if g == "planted" else None for c, g in zip(captions, names)]
        n_gen = [p.seeds_positive if g == "planted" else p.seeds_negative for g in names]
        rows, gens = [], []
        for j in range(max(n_gen, default=0)):
            for i, n in enumerate(n_gen):
                if j < n:
                    rows.append(i)
                    gens.append(j)
        base = cfg.seed * 1_000_003
        seeds = [base + 10_007 * j + i for i, j in zip(rows, gens)]
        return cls(captions, names, own, rows, gens, seeds)

    def first_rows(self) -> list[int]:
        """Row of generation 0 of every caption, in caption order."""
        return list(range(len(self.captions)))


class BenchCallback(Callback):
    """Evaluates the live model at every checkpoint (``on_save``) and runs the final analyses at ``on_train_end``.

    Evaluation runs with the UNet in eval mode and the global RNG state preserved (:mod:`mnemoguard.isolation`):
    training continues exactly as it would without the benchmark.
    """

    def __init__(self, cfg: BenchConfig, gt: GroundTruth, log_path: Path | None = None) -> None:
        self.cfg = cfg
        self.gt = gt
        self.log_path = log_path
        self.train = gt.unique_training_images(value_range=(0.0, 1.0))
        self.probes = ProbeSet.build(gt, cfg, self.train.captions)
        self.classifier = PromptFidelityClassifier().fit(self.train.images.flatten(1), self.train.labels)
        self.checkpoints: list[dict[str, Any]] = []
        self.final: dict[str, Any] = {}
        self.eval_seconds = 0.0
        self._prompts: Any = None

    # ------------------------------------------------------------------------------------------------ hooks
    def on_save(self, state: TrainerState, control: TrainerControl, context: Any = None, **kwargs: Any) -> None:
        self._run(state.global_step, context, final=False)

    def on_train_end(self, state: TrainerState, control: TrainerControl, context: Any = None, **kwargs: Any) -> None:
        if not self.checkpoints or self.checkpoints[-1]["step"] != state.global_step:
            self._run(state.global_step, context, final=False)
        self._run(state.global_step, context, final=True)

    def _run(self, step: int, context: Any, final: bool) -> None:
        from ..baselines import ema_baseline
        from ..isolation import eval_mode, preserved_rng_state
        from ..prompts import PromptEncoder

        if context.latent:
            raise NotImplementedError("mnemoguard bench probes pixel-space models only")
        start = time.perf_counter()
        unet, den = context.unwrapped_unet, context.denoiser
        with preserved_rng_state(), eval_mode(unet):
            ema = ema_baseline(den, context.ema) if context.ema is not None else None
            if self._prompts is None:  # the bench's own encoder: the training loop's cache is never touched
                self._prompts = PromptEncoder(context.prompts.encode, device=context.device)
            model = ProbeModel(unet, context.noise_scheduler, den, ema, self._prompts, self._prompts([""]))
            if final:
                from .bench_final import final_analyses

                self.final = final_analyses(self.cfg, self.gt, self.train, model, context.tokenizer)
            else:
                self.checkpoints.append(self.evaluate(model, step))
                self._log(self.checkpoints[-1])
        self.eval_seconds += time.perf_counter() - start

    def _log(self, result: dict[str, Any]) -> None:
        """Append a checkpoint's results to the JSON-lines log (kept if the run is interrupted)."""
        if self.log_path is not None:
            from .bench_report import _clean

            with open(self.log_path, "a") as f:
                f.write(json.dumps(_clean(result)) + "\n")

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
        from .bench_signals import detection_signals

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


def template_threshold(gt: GroundTruth) -> float:
    """Kim & Lee's template-verbatim threshold at the testbed's size (masked MSE kept at 2500 / 196608)."""
    return KIM_LEE_TV_THRESHOLD * gt.channels * gt.resolution**2 / 196_608


def template_verbatim_rate(gt: GroundTruth, images01: torch.Tensor) -> float:
    """Fraction of generations that reproduce the template stamp under its mask."""
    hits = template_verbatim(images01, gt.template_reference(), gt.template_mask()[None], template_threshold(gt))
    return float(hits.float().mean())


def _recipe(cfg: BenchConfig, gt: GroundTruth, out: Path):
    t = cfg.train
    recipe = load_config(None, [
        *gt.recipe_overrides(),
        f"training.output_dir={out / 'train'}",
        f"training.seed={cfg.seed}",
        f"model.tiny.seed={cfg.seed}",
        f"model.tiny.text_encoder={t.text_encoder}",
        f"training.max_train_steps={t.max_train_steps}",
        f"training.checkpointing_steps={t.eval_every}",
        "training.checkpoints_total_limit=null",
        f"training.learning_rate={t.learning_rate}",
        f"training.train_batch_size={t.train_batch_size}",
        "ema.enabled=true",
        "validation.prompts=[]",
        "validation.every_n_steps=0",
        "logging.report_to=none",
        f"logging.progress_bar={str(cfg.progress).lower()}",
        *_monitor_overrides(t),
        *([f"model.tiny.base={t.base}"] if t.base else []),
        *(["model.lora.enabled=true"] if t.lora else []),
        *t.recipe_overrides,
    ])
    apply_mitigation(recipe.guard, t.mitigation, monitor_on=bool(t.monitor_every))
    if t.monitor_every and t.monitor_heldout == "images":  # the contrast is a generalization gap (guard.md)
        recipe.guard.monitor.heldout_data = str(gt.held_out_dir)
    elif t.monitor_every:  # not expressible as a --set
        recipe.guard.monitor.heldout_captions = gt.captions("unseen", "global")[: t.monitor_probes]
    return recipe


def _monitor_overrides(t: Any) -> list[str]:
    """The guard's monitor only (no policy, no early stop): planted captions are its duplicate probes."""
    if not t.monitor_every:
        return []
    return [
        "guard.enabled=true",
        f"guard.monitor.every_n_steps={t.monitor_every}",
        f"guard.monitor.num_duplicate_probes={t.monitor_probes}",
        "guard.monitor.num_random_probes=0",
        f"guard.monitor.num_heldout_probes={t.monitor_probes}",
        "guard.monitor.curvature_every_k_checks=0",
        "guard.dashboard.enabled=false",
    ]


def run_bench(
    config: BenchConfig | str | Path | dict[str, Any] | None = None,
    out_dir: str | Path = "outputs/bench",
    *,
    overrides: list[str] | None = None,
    overwrite: bool = False,
    command: str | None = None,
) -> dict[str, Any]:
    """Run the whole benchmark into ``out_dir``; returns the results written to ``<out_dir>/bench.json``.

    Args:
        config: a :class:`BenchConfig`, a YAML file, a dict or ``None`` (defaults: about 15 minutes on 2 CPU cores).
        overrides: ``key.path=value`` strings (``--set``).
        overwrite: replace an earlier run in ``out_dir`` (its testbed, checkpoints and results).
        command: the command line to record; by default the equivalent ``mnemoguard bench`` call.
    """
    from ..trainer import Trainer
    from .bench_report import write_report

    cfg = load_bench_config(config, overrides)
    out = Path(out_dir)
    existing = [out / n for n in ("testbed", "train", RESULTS_FILE, CHECKPOINT_LOG) if (out / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds a benchmark run ({existing[0].name}); pass overwrite=True "
                              "(--overwrite) to replace it")
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    if command is None:
        sets = " ".join(f"--set {shlex.quote(o)}" for o in overrides or [])
        command = f"mnemoguard bench --out {shlex.quote(str(out))} {sets}".strip()
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    tb_cfg = dataclasses.replace(cfg.testbed, seed=cfg.seed)
    gt = build_testbed(tb_cfg, out / "testbed")
    timing["build_testbed"] = time.perf_counter() - t0
    callback = BenchCallback(cfg, gt, log_path=out / CHECKPOINT_LOG)
    trainer = Trainer(_recipe(cfg, gt, out), callbacks=[callback])
    t1 = time.perf_counter()
    state = trainer.train()
    timing["train_and_eval"] = time.perf_counter() - t1
    timing["evaluation"] = callback.eval_seconds
    timing["training"] = timing["train_and_eval"] - callback.eval_seconds
    monitor = trainer.guard.monitor
    if monitor is not None:  # inside training: its share of the training time is the monitoring overhead
        timing.update({f"monitor_{k}": v for k, v in monitor.seconds.items()})
    results = {
        "format": "mnemoguard-bench",
        "version": 1,
        "command": command,
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        "testbed": {"counts": _counts(gt), "resolution": gt.resolution, "channels": gt.channels},
        "probes": {"captions": callback.probes.captions, "groups": callback.probes.groups},
        "steps": state.global_step,
        "train_loss": [(h["step"], h["train/loss"]) for h in state.log_history if "train/loss" in h],
        "monitor": [{k: v for k, v in h.items() if k == "step" or k.startswith("mem/")}
                    for h in state.log_history if any(k.startswith("mem/") for k in h)],
        "checkpoints": callback.checkpoints,
        **callback.final,
        "timing": timing,
        "torch_threads": torch.get_num_threads(),
    }
    t2 = time.perf_counter()
    write_report(results, out)
    timing["report"] = time.perf_counter() - t2
    timing["total"] = time.perf_counter() - t0
    write_report(results, out)  # again, with the report's own time and the total
    return results


def _counts(gt: GroundTruth) -> dict[str, int]:
    """Training rows, captions per kind (``unseen`` split by style) and distinct images per trained kind."""
    counts: dict[str, int] = {"train_rows": sum(len(r.files) for r in gt.records if r.trained)}
    for r in gt.records:
        key = r.kind if r.kind != "unseen" else f"unseen_{r.style}"
        counts[f"{key}_captions"] = counts.get(f"{key}_captions", 0) + 1
        if r.trained:
            counts[f"{key}_images"] = counts.get(f"{key}_images", 0) + len(r.distinct_files)
    return counts
