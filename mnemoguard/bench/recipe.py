"""The reference trainer's recipe for a benchmark run: the testbed's data, the bench's training sizes, EMA on (the
less-trained baseline), checkpoints at every evaluation step, and the guard's monitor when ``train.monitor_every``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import load_config
from ..testbed.ground_truth import GroundTruth
from .config import BenchConfig
from .mitigation import apply_mitigation

__all__ = ["bench_recipe", "family_overrides", "monitor_overrides"]


def bench_recipe(cfg: BenchConfig, gt: GroundTruth, out: Path):
    """The training recipe of a benchmark run writing to ``out / "train"`` (``--set``-style overrides on the
    defaults, then the mitigation arm and the monitor's held-out probes)."""
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
        *monitor_overrides(t),
        *(["guard.danger_zone.enabled=true"] if t.danger_zone else []),
        *(["guard.default_stop=true", "training.export=best"] if t.stop else []),
        *([f"guard.danger_zone.every_n_checks={t.danger_zone_every}"] if t.monitor_every else []),
        *([f"model.tiny.base={t.base}"] if t.base else []),
        *(["model.lora.enabled=true"] if t.lora else []),
        *family_overrides(t),
        *t.recipe_overrides,
    ])
    apply_mitigation(recipe.guard, t.mitigation, monitor_on=bool(t.monitor_every))
    if t.monitor_every and t.monitor_heldout == "images":  # the contrast is a generalization gap (guard.md)
        recipe.guard.monitor.heldout_data = str(gt.held_out_dir)
    elif t.monitor_every:  # not expressible as a --set
        recipe.guard.monitor.heldout_captions = gt.captions("unseen", "global")[: t.monitor_probes]
    return recipe


def family_overrides(t: Any) -> list[str]:
    """The tiny model of ``train.family``: the UNet (DDPM), or a transformer trained with the rectified-flow
    objective at the ``weighting_scheme`` density (SD3: 4 joint blocks of 4 heads x 16, patch 2, 0.63 M parameters
    at 16 px with MiniLM's 384-d states; Flux: 1 double- and 2 single-stream blocks of 4 heads x 16)."""
    if t.family == "sd":
        return []
    out = [f"model.family={t.family}", f"training.weighting_scheme={t.weighting_scheme}",
           f"model.tiny.flow_shift={t.flow_shift}", "model.tiny.num_attention_heads=4",
           "model.tiny.attention_head_dim=16"]
    if t.family == "sd3":
        return out + ["model.tiny.num_layers=4", "model.tiny.patch_size=2"]
    return out + ["model.tiny.num_layers=1", "model.tiny.num_single_layers=2"]


def monitor_overrides(t: Any) -> list[str]:
    """The guard's monitor only (no policy, no early stop): planted captions are its duplicate probes."""
    if not t.monitor_every:
        return []
    return [
        "guard.enabled=true",
        f"guard.monitor.every_n_steps={t.monitor_every}",
        f"guard.monitor.num_duplicate_probes={t.monitor_probes}",
        f"guard.monitor.num_random_probes={t.monitor_random_probes}",
        f"guard.monitor.num_heldout_probes={t.monitor_probes}",
        "guard.monitor.curvature_every_k_checks=0",
        "guard.dashboard.enabled=false",
    ]
