"""``mnemoguard demo``: the whole story on a small planted-memorization testbed, in about a minute on 2 CPU cores.

1. builds a testbed (:mod:`mnemoguard.testbed`): plain digits with class captions plus two digits duplicated many
   times, each with its own caption — the duplication + specific-caption recipe for memorization;
2. fine-tunes the shipped tiny base UNet (``builtin:digits16``) on it with the reference trainer and the guard on:
   the memorization monitor (planted pairs vs held-out pairs never trained on, per noise band, every
   ``monitor_every`` steps; a probe generation with its nearest training image every 4th check);
3. the policy raises an **alarm** when the gap between the held-out pairs' and the planted pairs' low-noise probe
   loss (``mem/probe_loss/band=low/contrast``, the generalization gap that led the ground truth on the benchmark)
   exceeds ``alarm_threshold`` for 2 checks, and switches on a **mitigation**, the default policy's: IET-AGC's
   low-loss gating (samples whose loss falls well below their timestep's running mean are left out of the loss);
4. early stopping **stops** the run when the probe generations keep moving towards their training images
   (``mem/nn_ratio/train``, the nearest-neighbour ratio d1/d2, has not improved on its best for ``stop_patience``
   generation checks: Lightning's patience), or at once when one comes out as a copy (below ``copy_ratio``); the
   export rolls back to the best checkpoint, the one whose probe generations were farthest from a copy;
5. prints the story and where to look: TensorBoard (``mem/...`` scalars, alarms, probe panels) and
   ``report/report.md``.

Thresholds were read off trial runs of this demo (``BENCHMARKS.md``); they suit this testbed, not every data set.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from .config import RecipeConfig, load_config

__all__ = ["DEMO_TESTBED", "DemoSettings", "demo_recipe", "run_demo"]

DEMO_TESTBED: dict[str, Any] = {
    "seed": 0,
    "source": {"exclude_base": True},  # images the shipped base never saw, as a user's are
    "plain": {"num_images": 160},
    "duplicated": {"num_images": 2, "copies": 120, "classes": [0, 1]},  # drawn ~10 times per step
    "template": {"enabled": False},
    "held_out": {"num_images": 8, "avoid_planted_classes": True},
    "unseen": {"num_global_style": 8, "num_template_style": 0, "avoid_planted_classes": True},
}


@dataclasses.dataclass
class DemoSettings:
    """The story's knobs (``--set demo.<key>=...`` is not offered; edit and call :func:`run_demo`)."""

    max_train_steps: int = 600
    monitor_every: int = 25  # optimizer steps between monitor checks
    alarm_threshold: float | None = 0.1  # alarm when the probe-loss contrast (held-out - planted pairs, low band)
    # exceeds this: on the benchmark the same gap read 0.07 at step 250 and 0.17 at 500, before copies (BENCHMARKS.md)
    alarm_rise: float | None = None  # or (and: the larger level wins) when it exceeds this factor x its first reading
    alarm_patience: int = 2  # consecutive checks beyond the level
    copy_ratio: float = 1 / 3  # early stop when a probe generation's d1/d2 falls below this (Gu et al.)
    stop_patience: int = 2  # or when d1/d2 has not improved on its best for this many generation checks (every
    # 4th monitor check); see the recorded runs in BENCHMARKS.md
    base: str | None = "builtin:digits16"  # None: train from random initialisation


def demo_recipe(gt: Any, out: Path, settings: DemoSettings) -> RecipeConfig:
    """The demo recipe on testbed ``gt``: the package defaults + the testbed + the guard's story settings."""
    s = settings
    cfg = load_config(None, [
        *gt.recipe_overrides(),
        f"training.output_dir={out}",
        f"training.max_train_steps={s.max_train_steps}",
        "training.learning_rate=1e-3",
        f"training.checkpointing_steps={4 * s.monitor_every}",
        "training.checkpoints_total_limit=null",
        "training.export=best",
        "validation.every_n_steps=0",
        *([f"model.tiny.base={s.base}"] if s.base else []),
        "guard.enabled=true",
        f"guard.monitor.every_n_steps={s.monitor_every}",
        "guard.monitor.num_duplicate_probes=2",
        "guard.monitor.num_random_probes=2",
        "guard.monitor.num_heldout_probes=4",
        "guard.monitor.curvature_every_k_checks=4",
        "guard.monitor.generation_guidance_scale=1.0",
        "guard.early_stopping.enabled=true",
        "guard.early_stopping.monitor=mem/nn_ratio/train",
        "guard.early_stopping.mode=max",
        f"guard.early_stopping.divergence_threshold={s.copy_ratio}",
        f"guard.early_stopping.patience={s.stop_patience}",
    ])
    planted = gt.captions("global")
    cfg.guard.monitor.heldout_data = str(gt.held_out_dir)  # held-out images + captions: a generalization gap
    cfg.validation.prompts = planted[:2] + gt.captions("unseen", "global")[:1]
    from .config import default_policy

    default = default_policy()  # the default rule and action, with the demo's alarm knobs
    cfg.guard.policy = [dataclasses.replace(rule, threshold=s.alarm_threshold, rise_factor=s.alarm_rise,
                                            patience=s.alarm_patience) for rule in default.rules]
    cfg.guard.regularizers = dict(default.regularizers)  # off until the alarm
    cfg.guard.noise_gap.enabled = default.needs_noise_gap
    return cfg


def run_demo(out_dir: str | os.PathLike = "outputs/demo", settings: DemoSettings | None = None,
             overrides: list[str] | None = None) -> dict[str, Any]:
    """Build the testbed, train with the guard, print the story; returns a summary dict."""
    from .testbed import build_testbed
    from .trainer import Trainer
    from .trainer.base_model import BUILTIN_BASES

    s = settings or DemoSettings()
    out = Path(out_dir)
    if s.base in BUILTIN_BASES and not (BUILTIN_BASES[s.base] / "config.json").is_file():
        print(f"note: {s.base} is not installed (scripts/train_base.py makes it); training from random weights")
        s = dataclasses.replace(s, base=None)
    if (out / "train").exists():  # the demo's own folder: a rerun replaces the previous story
        import shutil

        print(f"note: replacing the previous demo run in {out / 'train'}")
        shutil.rmtree(out / "train")
    gt = build_testbed(DEMO_TESTBED, out / "testbed", overwrite=True)
    cfg = demo_recipe(gt, out / "train", s)
    if overrides:
        cfg = load_config(cfg, overrides)
    trainer = Trainer(cfg)
    start = time.perf_counter()
    state = trainer.train()
    seconds = time.perf_counter() - start
    story = _story(trainer, state, gt)
    story["seconds"] = seconds
    if trainer.accelerator.is_main_process:
        _print_story(story, cfg, out)
    return story


def _story(trainer: Any, state: Any, gt: Any) -> dict[str, Any]:
    """What happened, from the state and the guard's callbacks."""
    policy = trainer.guard.policy
    ratios = [(h["step"], h["mem/nn_ratio/train"]) for h in state.log_history if "mem/nn_ratio/train" in h]
    contrast = [(h["step"], h["mem/probe_loss/band=low/contrast"]) for h in state.log_history
                if "mem/probe_loss/band=low/contrast" in h]
    return {
        "steps": state.global_step,
        "stop_reason": state.stop_reason,
        "best_step": state.best_step,
        "best_checkpoint": state.best_checkpoint,
        "alarms": [dict(a) for a in policy.alarms] if policy else [],
        "nn_ratio": ratios,
        "contrast": contrast,
        "planted_captions": gt.captions("global"),
        "final_dir": str(trainer.final_dir),
    }


def _print_story(story: dict[str, Any], cfg: RecipeConfig, out: Path) -> None:
    print(f"\nmnemoguard demo: {story['steps']} steps in {story['seconds']:.0f} s on the planted testbed "
          f"({len(story['planted_captions'])} digits duplicated 120x with their own captions).")
    if story["contrast"]:
        first, last = story["contrast"][0], story["contrast"][-1]
        print(f"  memorization signal  mem/probe_loss/band=low/contrast: {first[1]:+.3f} at step {first[0]} -> "
              f"{last[1]:+.3f} at step {last[0]}")
    for a in story["alarms"]:
        print(f"  alarm at step {a.get('step')}: {a.get('message') or a}")
    if not story["alarms"]:
        print("  no alarm was raised")
    if story["nn_ratio"]:
        print("  probe generations, d1/d2 to the nearest training image (< 1/3 = a copy): "
              + ", ".join(f"{r:.2f}@{s}" for s, r in story["nn_ratio"]))
    if story["stop_reason"]:
        print(f"  stop: {story['stop_reason']}")
    else:
        closest = min((r for _, r in story["nn_ratio"]), default=float("nan"))
        print(f"  stop: none — no probe generation became a copy (closest d1/d2 {closest:.2f} > "
              f"{cfg.guard.early_stopping.divergence_threshold:.2f}) and d1/d2 never stalled for "
              f"{cfg.guard.early_stopping.patience} checks; ran to the last step")
    best = story["best_step"]
    print(f"  exported ({cfg.training.export}): {story['final_dir']}"
          + (f" (step {best}: the checkpoint whose probe generations were farthest from any training image)"
             if best is not None else ""))
    logs = out / "train" / cfg.logging.logging_dir
    print(f"  report:      {out / 'train' / 'report' / 'report.md'}")
    print(f"  TensorBoard: tensorboard --logdir {logs} --host 127.0.0.1   (opens on guard/: the verdict)")
