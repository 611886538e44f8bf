"""Checks of a ``guard:`` section that need no model (no torch): every name, and the metric tags the guard writes.

:func:`check_guard_config` runs when a recipe or a guard config loads (and so in ``mnemoguard config``). A policy
rule or an early-stopping ``monitor`` that names a guard tag (``mem/...``, ``reg/...``, ``train/...``) that nothing
will produce could never fire: :func:`check_metric_name` makes it a :class:`ConfigError` that says which part of the
tag is wrong (the signal, the band, the split) and lists the valid ones. Tags outside the guard's namespaces
(``val/loss`` from your own callback) cannot be known here; the run reports them at its end if they never appeared.
"""

from __future__ import annotations

from .danger_zone import DANGER_ZONE_TAGS
from .guard import GuardConfig, band_names, default_policy
from .plan import plan_components
from .regularizers import REGULARIZER_CONFIGS, check_regularizer_settings
from .schema import ConfigError

__all__ = ["GUARD_NAMESPACES", "check_guard_config", "check_metric_name", "guard_tags"]

GUARD_NAMESPACES = ("mem/", "reg/", "train/")
_NOISE_GAP = ("strength", "band_begin", "band_end", "band_mass")


def _signal_names(cfg: GuardConfig) -> list[str]:
    return [f"live_vs_{cfg.monitor.baseline}" if s == "live_vs_baseline" else s for s in cfg.monitor.signals]


def _splits(cfg: GuardConfig) -> list[str]:
    m = cfg.monitor
    heldout = m.num_heldout_probes > 0 and bool(m.heldout_captions or m.heldout_data)
    return ["train", "heldout", "contrast", "train_std", "heldout_std"] if heldout else ["train", "train_std"]


def guard_tags(cfg: GuardConfig, heldout_given: bool = False) -> set[str]:
    """Every tag the guard of ``cfg`` writes (``heldout_given``: held-out samples passed in code,
    ``Guard(heldout=)``)."""
    tags = {"train/loss", "train/lr", "train/skipped_steps", "data/skipped_samples"}
    plan = plan_components(cfg)
    bands = band_names(cfg.monitor)
    if plan.loss_flags:
        tags |= {f"mem/agc/flag_rate/band={b}" for b in bands} | {"mem/agc/flagged_samples"}
    m = cfg.monitor
    if plan.monitor:
        splits = _splits(cfg)
        if heldout_given and m.num_heldout_probes > 0 and "heldout" not in splits:
            splits = [*splits, "heldout", "contrast", "heldout_std"]
        tags |= {f"mem/{s}/band={b}/{p}" for s in _signal_names(cfg) for b in bands for p in splits}
        if m.curvature_every_k_checks and m.curvature_num_probes:
            tags |= {"mem/nn_ratio/train", f"mem/curvature_diff/t={m.curvature_timestep}/train"}
    if plan.noise_gap:
        tags |= {f"mem/noise_gap/{k}" for k in _NOISE_GAP}
    if plan.rules:
        tags |= {"mem/alarm"} | {f"mem/policy/{r.action}" for r in plan.rules}
    if plan.danger_zone:
        tags |= {f"mem/danger_zone/{k}" for k in DANGER_ZONE_TAGS}
    for name in plan.regularizers:
        tags |= {f"reg/{name}/{k}" for k in ("strength", *REGULARIZER_CONFIGS[name].metrics)}
    return tags


def _explain(tag: str, cfg: GuardConfig, tags: set[str]) -> str:
    """Which part of a ``mem/<signal>/band=<band>/<split>`` tag is off, with the valid choices."""
    parts = tag.split("/")
    if tag.startswith("mem/") and len(parts) == 4 and parts[2].startswith("band="):
        signal, band, split = parts[1], parts[2][5:], parts[3]
        signals, bands, splits = _signal_names(cfg), band_names(cfg.monitor), _splits(cfg)
        if signal not in signals and signal != "agc":
            return f"the monitor computes no signal {signal!r}; its signals are {signals} (guard.monitor.signals)"
        if band not in bands:
            return f"there is no band {band!r}; the bands are {bands} (guard.monitor.band_names)"
        if split not in splits:
            why = (" (held-out probes need guard.monitor.heldout_data or heldout_captions)"
                   if split in ("heldout", "contrast", "heldout_std") else "")
            return f"there is no split {split!r}; the splits are {splits}{why}"
    if tag.startswith(("mem/nn_ratio/", "mem/curvature_diff/")):
        return ("the probe generations run only with guard.monitor.curvature_every_k_checks > 0 (found "
                f"{cfg.monitor.curvature_every_k_checks}); their tags are mem/nn_ratio/train and "
                f"mem/curvature_diff/t={cfg.monitor.curvature_timestep}/train")
    nearby = sorted(t for t in tags if t.split("/")[:2] == parts[:2])[:12]
    if not nearby:  # the families of the namespace, e.g. mem/probe_loss/...
        nearby = sorted({"/".join(t.split("/")[:2]) + ("/..." if t.count("/") > 1 else "") for t in tags
                         if t.split("/")[0] == parts[0]})
    return f"the guard writes no such tag; tags like it: {nearby}"


def check_metric_name(tag: str, cfg: GuardConfig, where: str, heldout_given: bool = False) -> None:
    """A :class:`ConfigError` when ``tag`` is in the guard's namespaces but the guard of ``cfg`` never writes it."""
    if not tag.startswith(GUARD_NAMESPACES):
        return
    tags = guard_tags(cfg, heldout_given)
    if tag not in tags:
        raise ConfigError(f"{where}: {tag!r} could never be produced: {_explain(tag, cfg, tags)}")


def check_guard_config(cfg: GuardConfig, where: str = "guard", heldout_given: bool = False) -> None:
    """Every name and value of the section that can be checked without a model: regularizer names and settings,
    rule actions, the default policy's needs, and every metric a rule or early stopping watches (against the tags the
    guard will write). Raises :class:`ConfigError` naming the key and the valid names."""
    if not cfg.enabled:
        return
    plan = plan_components(cfg)
    for name, settings in cfg.regularizers.items():
        check_regularizer_settings(name, settings, where=f"{where}.regularizers.{name}")
    configured = {"noise_gap", *plan.regularizers}
    for i, rule in enumerate(cfg.policy):
        if not rule.signal:
            raise ConfigError(f"{where}.policy[{i}].signal: expected a metric key (e.g. "
                              "'mem/probe_loss/band=low/contrast'), found ''")
        if rule.action not in {"noise_gap", *REGULARIZER_CONFIGS}:
            raise ConfigError(f"{where}.policy[{i}].action: expected 'noise_gap' or a regularizer "
                              f"({sorted(REGULARIZER_CONFIGS)}), found {rule.action!r}")
        if rule.action not in configured:
            raise ConfigError(f"{where}.policy[{i}].action {rule.action!r} is not configured, so the rule could never "
                              f"act: add {where}.regularizers.{rule.action}: {{enabled: false}} (the rule turns it "
                              "on)")
        for key in ("band", "strength"):
            if getattr(rule, key) == "danger_zone" and not plan.danger_zone:
                raise ConfigError(f"{where}.policy[{i}].{key}: 'danger_zone' follows the danger-zone tracker's live "
                                  f"{key}; turn it on with {where}.danger_zone.enabled: true (and the monitor), found "
                                  "it off")
    if "duplicate_weight" in plan.regularizers and not cfg.monitor.enabled:
        who = "regularizers.duplicate_weight" if "duplicate_weight" in cfg.regularizers else "default_policy"
        raise ConfigError(f"{where}.{who} reads the copies of each image from the monitor's duplicate scan "
                          f"(duplicate_weight): it needs {where}.monitor.enabled, found false")
    if cfg.early_stopping.enabled and not cfg.early_stopping.monitor:
        raise ConfigError(f"{where}.early_stopping.enabled needs {where}.early_stopping.monitor (a metric key)")
    if cfg.default_stop and cfg.early_stopping.enabled:
        raise ConfigError(f"{where}: give one stop rule, default_stop or early_stopping; found both")
    if (cfg.danger_zone.enabled or cfg.default_stop) and not cfg.monitor.enabled:
        raise ConfigError(f"{where}.danger_zone measures the monitor's probes: it needs {where}.monitor.enabled, "
                          "found false")
    if cfg.noise_gap.follow_danger_zone:
        if not plan.danger_zone:
            raise ConfigError(f"{where}.noise_gap.follow_danger_zone needs the tracker ({where}.danger_zone.enabled)")
        if any(r.action == "noise_gap" for r in cfg.policy):
            raise ConfigError(f"{where}: the noise gap follows the danger zone (noise_gap.follow_danger_zone) and a "
                              "policy rule drives it too; give it one driver")
    for i, rule in enumerate(cfg.policy):
        check_metric_name(rule.signal, cfg, f"{where}.policy[{i}].signal", heldout_given)
    for rule in default_policy().rules if cfg.default_policy else []:
        check_metric_name(rule.signal, cfg, f"{where}.default_policy (its rule on {rule.signal})", heldout_given)
    stopping = plan.early_stopping
    if stopping.enabled:
        what = "default_stop" if cfg.default_stop else "early_stopping.monitor"
        check_metric_name(stopping.monitor, cfg, f"{where}.{what}", heldout_given)
