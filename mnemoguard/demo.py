"""``mnemoguard demo``: the same fine-tune twice, without and with the guard, on a small planted-memorization testbed.

1. builds a testbed (:mod:`mnemoguard.testbed`): plain digits with class captions plus two digits duplicated many
   times, each with its own caption — the duplication + specific-caption recipe for memorization;
2. **without the guard** (``<out>/unguarded``): fine-tunes the shipped tiny base UNet (``builtin:digits16``) on it.
   The guard only watches (monitor and danger-zone tracker on, no action, no stop), and every ``eval_every`` steps
   the demo generates ``eval_seeds`` images from each duplicated caption and counts the *copies* (a generation whose
   nearest training image is its own duplicated image, Gu et al.'s d1/d2 < 1/3): copies appear;
3. **with the guard** (``<out>/guarded``), same seed and data, the tracker at every check: it sees the rise (the
   duplicated digits come back as themselves from noise levels where held-out digits do not), the default policy
   weighs each duplicated digit as one image from the first step (``guard.default_policy``: ``duplicate_weight``),
   and the default stop rule would stop when the duplicated digits come back as copies from pure noise too often
   (``guard.default_stop``), the export rolling back to the last check before that;
4. prints both stories in plain words, the copies of each export side by side, and where to look (TensorBoard,
   ``report/report.md``, ``copies.png``).

The levels are the guard's defaults (rates, not loss units); the testbed is small so that it runs in minutes.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from .callbacks.base import Callback
from .config import RecipeConfig, load_config

__all__ = ["DEMO_TESTBED", "CopyCounter", "DemoSettings", "demo_recipe", "run_demo"]

DEMO_TESTBED: dict[str, Any] = {
    "seed": 0,
    "source": {"exclude_base": True},  # images the shipped base never saw, as a user's are
    "plain": {"num_images": 160},
    "duplicated": {"num_images": 4, "copies": 60, "classes": [0, 3, 6, 8]},  # each drawn ~5 times per step
    "template": {"enabled": False},
    "held_out": {"num_images": 8, "avoid_planted_classes": True},
    "unseen": {"num_global_style": 8, "num_template_style": 0, "avoid_planted_classes": True},
}


@dataclasses.dataclass
class DemoSettings:
    """The story's knobs (edit and call :func:`run_demo`)."""

    max_train_steps: int = 800
    monitor_every: int = 50  # optimizer steps between monitor checks (the tracker measures at each)
    eval_every: int = 100  # steps between the demo's copy counts (and checkpoints)
    eval_seeds: int = 8  # generations per duplicated caption at each count
    learning_rate: float = 1e-3
    base: str | None = "builtin:digits16"  # None: train from random initialisation
    guarded_only: bool = False  # skip the run without the guard (tests)


class CopyCounter(Callback):
    """Every ``every`` steps, generations from each duplicated caption and how many copy their own training image
    (nearest training image = the caption's own, d1/d2 < 1/3). Measured with the run's RNG state restored."""

    def __init__(self, captions: list[str], own: list[int], pool: torch.Tensor, every: int, seeds: int) -> None:
        self.captions, self.own, self.pool, self.every, self.seeds = captions, own, pool, every, seeds
        self.counts: list[dict[str, Any]] = []
        self.last: dict[str, Any] | None = None
        self.exported: dict[str, Any] | None = None

    def count(self, context: Any, step: int) -> dict[str, Any]:
        from .evaluation import nearest_neighbour_ratio
        from .isolation import eval_mode, preserved_rng_state
        from .sampling import generate

        caps = [c for c in self.captions for _ in range(self.seeds)]
        own = torch.tensor([o for o in self.own for _ in range(self.seeds)])
        with preserved_rng_state(), eval_mode(context.unwrapped_model), torch.no_grad():
            cond = context.prompts(caps)
            images = generate(context.denoiser, cond, num_inference_steps=25,
                              generator=torch.Generator().manual_seed(1234), decode=context.decode)
        nn = nearest_neighbour_ratio(images, self.pool, check_unique=False)
        copies = (nn.ratio < 1 / 3) & (nn.indices[:, 0] == own)
        entry = {"step": step, "copies": int(copies.sum()), "total": len(caps)}
        self.last = {**entry, "images": images, "nearest": self.pool[nn.indices[:, 0]], "copy": copies}
        return entry

    def on_step_end(self, state, control, context=None, **kwargs) -> None:
        if state.global_step % self.every == 0:
            self.counts.append(self.count(context, state.global_step))

    def on_train_end(self, state, control, context=None, **kwargs) -> None:
        """The exported weights (the guard's end hooks run with them in the model)."""
        exported = (getattr(context, "exported", None) or {})
        self.exported = self.count(context, int(exported.get("step") or state.global_step))


def demo_recipe(gt: Any, out: Path, settings: DemoSettings, guarded: bool) -> RecipeConfig:
    """The demo recipe on testbed ``gt``: the package defaults + the testbed + the guard (watching only, or acting)."""
    s = settings
    watch = [
        "guard.enabled=true",
        f"guard.monitor.every_n_steps={s.monitor_every}",
        "guard.monitor.num_duplicate_probes=4",
        "guard.monitor.num_random_probes=2",
        "guard.monitor.num_heldout_probes=8",
        "guard.monitor.curvature_every_k_checks=0",
        "guard.danger_zone.enabled=true",
        "guard.danger_zone.every_n_checks=1",
        "guard.danger_zone.draws=8",
    ]
    act = ["guard.default_policy=true", "guard.default_stop=true", "training.export=best"]
    cfg = load_config(None, [
        *gt.recipe_overrides(),
        f"training.output_dir={out}",
        f"training.max_train_steps={s.max_train_steps}",
        f"training.learning_rate={s.learning_rate}",
        f"training.checkpointing_steps={s.eval_every}",
        "training.checkpoints_total_limit=null",
        "validation.every_n_steps=0",
        *([f"model.tiny.base={s.base}"] if s.base else []),
        *watch,
        *(act if guarded else []),
    ])
    cfg.guard.monitor.heldout_data = str(gt.held_out_dir)  # held-out images + captions never trained on
    cfg.validation.prompts = gt.captions("global")[:2]
    return cfg


def _train(gt: Any, out: Path, settings: DemoSettings, guarded: bool, overrides: list[str] | None) -> dict[str, Any]:
    from .trainer import Trainer

    cfg = demo_recipe(gt, out, settings, guarded)
    if overrides:
        cfg = load_config(cfg, overrides)
    train = gt.unique_training_images(value_range=(0.0, 1.0))
    planted = gt.by_kind("global")
    own = [train.files.index(r.distinct_files[0]) for r in planted]
    counter = CopyCounter([r.caption for r in planted], own, train.images, settings.eval_every, settings.eval_seeds)
    trainer = Trainer(cfg, callbacks=[counter])
    start = time.perf_counter()
    state = trainer.train()
    seconds = time.perf_counter() - start
    exported = counter.exported
    parts = trainer.guard.components
    tracker = parts.danger_zone
    dedup = next((r for r in parts.regularizers if r.name == "duplicate_weight"), None)
    alarms = parts.policy.alarms if parts.policy is not None else []
    _copies_figure(counter.last, out / "copies.png")
    return {"steps": state.global_step, "seconds": seconds, "counts": counter.counts, "exported": exported,
            "stop_reason": state.stop_reason, "best_step": state.best_step, "final_dir": str(trainer.final_dir),
            "tracker": [{k: h[k] for k in ("step", "excess", "copy_rate", "active", "band", "strength")}
                        for h in tracker.history],
            "prior": tracker.prior["band"] if tracker.prior else None, "export": cfg.training.export,
            "alarm": next((a for a in alarms if a["on"]), None),
            # the regularizer's own metrics over the whole run (its totals), not a second formula
            "duplicate_weight": dedup._metric_values(dedup.totals) if dedup is not None else None}


def _copies_figure(last: dict[str, Any] | None, path: Path) -> None:
    """Each generation of the last count beside its nearest training image, copies marked."""
    if last is None:
        return
    from matplotlib.figure import Figure

    n = last["images"].shape[0]
    fig = Figure(figsize=(1.2 * n, 2.8), dpi=100, layout="constrained")
    axes = fig.subplots(2, n, squeeze=False)
    for i in range(n):
        for row, img in enumerate((last["images"][i], last["nearest"][i])):
            ax = axes[row][i]
            ax.imshow(img.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][i].set_title("COPY" if bool(last["copy"][i]) else "new", fontsize=8,
                             color="tab:red" if bool(last["copy"][i]) else "black")
    axes[0][0].set_ylabel("generation", fontsize=8)
    axes[1][0].set_ylabel("nearest\ntraining image", fontsize=8)
    fig.suptitle(f"Generations from the duplicated captions, step {last['step']}: {last['copies']} of {n} copies",
                 fontsize=9)
    fig.savefig(path)


def run_demo(out_dir: str | os.PathLike = "outputs/demo", settings: DemoSettings | None = None,
             overrides: list[str] | None = None, guarded_overrides: list[str] | None = None) -> dict[str, Any]:
    """Build the testbed, train without and with the guard, print both stories; returns ``{"unguarded",
    "guarded"}`` summaries (``unguarded`` is None with ``guarded_only``). ``overrides`` apply to both runs,
    ``guarded_overrides`` to the guarded one only."""
    from .testbed import build_testbed
    from .trainer.base_model import BUILTIN_BASES

    s = settings or DemoSettings()
    out = Path(out_dir)
    if s.base in BUILTIN_BASES and not (BUILTIN_BASES[s.base] / "config.json").is_file():
        print(f"note: {s.base} is not installed (scripts/train_base.py makes it); training from random weights")
        s = dataclasses.replace(s, base=None)
    for name in ("unguarded", "guarded", "train"):  # the demo's own folders: a rerun replaces the previous story
        if (out / name).exists():
            shutil.rmtree(out / name)
    gt = build_testbed(DEMO_TESTBED, out / "testbed", overwrite=True)
    story: dict[str, Any] = {"unguarded": None}
    if not s.guarded_only:
        print("mnemoguard demo 1/2: fine-tuning WITHOUT the guard acting (it only watches) ...", flush=True)
        story["unguarded"] = _train(gt, out / "unguarded", s, False, overrides)
    print("mnemoguard demo 2/2: the same fine-tune WITH the guard ...", flush=True)
    story["guarded"] = _train(gt, out / "guarded", s, True, [*(overrides or []), *(guarded_overrides or [])])
    _print_story(story, gt, out)
    return story


def _counts(run: dict[str, Any]) -> str:
    return ", ".join(f"{c['copies']}/{c['total']} at step {c['step']}" for c in run["counts"])


def _print_story(story: dict[str, Any], gt: Any, out: Path) -> None:
    n = len(gt.by_kind("global"))
    copies = DEMO_TESTBED["duplicated"]["copies"]
    print(f"\nThe testbed: {n} digits each copied {copies} times with their own caption among 160 ordinary digits. A "
          "*copy* is a generation from a duplicated caption whose nearest training image is that caption's own "
          "image, much nearer than any other (Gu et al.'s d1/d2 < 1/3).")
    un = story["unguarded"]
    if un is not None:
        print(f"\nWithout the guard ({un['steps']} steps, {un['seconds']:.0f} s):")
        print(f"  copies among the generations of the duplicated captions: {_counts(un)}")
        first = next((c["step"] for c in un["counts"] if c["copies"]), None)
        print(f"  -> copies appear from step {first}" if first else "  -> no copies in this run")
        print(f"  each generation beside its nearest training image: {out / 'unguarded' / 'copies.png'}")
    g = story["guarded"]
    print(f"\nWith the guard ({g['steps']} steps, {g['seconds']:.0f} s):")
    prior = g["prior"]
    if prior is not None and not prior["empty"]:
        print(f"  the data (before training): noise levels σ {prior['sigma_lo']:.2g}–{prior['sigma_hi']:.2g} "
              f"(timesteps {prior['t_lo']}–{prior['t_hi']}) are where this data set can be memorized")
    print("  the rise: how much more often the duplicated digits come back as themselves than held-out digits "
          "after being noised and denoised (the excess), and the share of the guard's own quick generations from "
          "their captions that copy them (the copy rate):")
    print("    " + "; ".join(f"step {h['step']}: excess {h['excess']:.2f}, copy rate {h['copy_rate']:.2f}"
                             for h in g["tracker"]))
    on = next((h for h in g["tracker"] if h["active"]), None)
    if on is not None and on["band"]:
        b = on["band"]
        print(f"  the alarm: at step {on['step']} the danger zone turned on (the excess reached 0.5), at timesteps "
              f"[{b['t_begin']}, {b['t_end']}) (σ {b['sigma_lo']:.2g}–{b['sigma_hi']:.2g})")
    else:
        print("  the alarm: the danger zone never turned on")
    dw = g["duplicate_weight"]
    if dw is not None:
        print(f"  the mitigation (the default policy, from the first step): each sample's loss is divided by the "
              f"copies of its image in the data set, so each duplicated digit weighs what one ordinary digit does "
              f"({dw['weighted_fraction']:.0%} of the samples drawn were copies of a duplicated digit; mean loss "
              f"weight {dw['mean_weight']:.2f}; ordinary digits keep weight 1)")
    if g["alarm"] is not None:
        print(f"  the policy's rule {g['alarm']['rule']!r} switched its action on at step {g['alarm']['step']}")
    elif dw is None:
        print("  the mitigation: none (no rule fired)")
    if g["stop_reason"]:
        print(f"  the stop: {g['stop_reason']}")
    else:
        print("  the stop: none (the copy rate's lower bound stayed at or below 5 %)")
    what = "the rollback: exported" if g["stop_reason"] else "the export (no stop, nothing to roll back):"
    print(f"  {what} ({g['export']}) the weights of step {g['best_step']}: {g['final_dir']}")
    print(f"  copies among the generations of the duplicated captions: {_counts(g)}")
    if un is not None:
        ue, ge = un["exported"], g["exported"]
        print(f"\nExported weights: without the guard {ue['copies']}/{ue['total']} generations are copies (step "
              f"{ue['step']}); with the guard {ge['copies']}/{ge['total']} (step {ge['step']}).")
    print(f"\n  report:      {out / 'guarded' / 'report' / 'report.md'} (and {out / 'unguarded' / 'report'})")
    print(f"  TensorBoard: tensorboard --logdir {out} --host 127.0.0.1   (opens on guard/: the verdict)")
