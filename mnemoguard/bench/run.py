"""``mnemoguard bench``: train the reference trainer on a planted-memorization testbed and measure every signal.

:func:`run_bench` does, with one seed:

1. builds the testbed (``<out>/testbed``) and trains the reference :class:`~mnemoguard.trainer.Trainer` on it
   (``<out>/train``), checkpointing every ``train.eval_every`` steps with EMA on (the less-trained baseline);
2. at every checkpoint, inside the trainer's ``on_save`` hook (global RNG forked, so the training run is the one it
   would be without the benchmark): generations of planted vs unseen / held-out captions at w = 1 and at the
   users' guidance, nearest-neighbour ground truth with bootstrap intervals, every prompt-level signal with AUC,
   TPR@1%FPR, cost and wall time, and the training-loss gap per noise band;
3. after training: the exported weights evaluated the same way (``exported``: after the guard's stop and rollback,
   the rollback checkpoint's, the model a user would ship), Kim & Lee's localisation maps on template captions,
   the danger-zone curves of the training data beside the per-noise-level memorization rate;
4. writes ``bench.json``, PNG figures and ``bench.md`` (:mod:`.report`); each checkpoint's numbers are also
   appended to ``checkpoints.jsonl`` as soon as they exist, so an interrupted run keeps them.

Modules: the recipe (:mod:`.recipe`), the probed captions (:mod:`.caption_probes`), the per-checkpoint
callback (:mod:`.checkpoint`), model-side measurements (:mod:`.probes`, :mod:`.signals`), the
end-of-training analyses (:mod:`.final`) and the report (:mod:`.report`).
"""

from __future__ import annotations

import dataclasses
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ..testbed.build import build_testbed
from ..testbed.ground_truth import GroundTruth
from .caption_probes import CaptionProbes
from .checkpoint import BenchCallback
from .config import BenchConfig, load_bench_config
from .probes import template_threshold, template_verbatim_rate
from .recipe import bench_recipe
from .report import MARKDOWN_FILE, RESULTS_FILE, write_report

__all__ = [
    "MARKDOWN_FILE",
    "RESULTS_FILE",
    "BenchCallback",
    "BenchConfig",
    "CaptionProbes",
    "load_bench_config",
    "run_bench",
    "template_threshold",
    "template_verbatim_rate",
]

CHECKPOINT_LOG = "checkpoints.jsonl"


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
    trainer = Trainer(bench_recipe(cfg, gt, out), callbacks=[callback])
    t1 = time.perf_counter()
    state = trainer.train()
    timing["train_and_eval"] = time.perf_counter() - t1
    timing["evaluation"] = callback.eval_seconds
    timing["training"] = timing["train_and_eval"] - callback.eval_seconds
    monitor = trainer.guard.monitor
    if monitor is not None:  # inside training: its share of the training time is the monitoring overhead
        timing.update({f"monitor_{k}": v for k, v in monitor.seconds.items()})
    tracker = trainer.guard.components.danger_zone
    if tracker is not None:
        timing.update({f"danger_zone_{k}": v for k, v in tracker.seconds.items()})
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
        "exported": callback.exported,
        "danger_zone_tracker": None if tracker is None else {"prior": tracker.prior, "history": tracker.history},
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
