"""The one place where the guard's components are built from a ``guard:`` section and wired to each other.

Wiring is explicit: the policy gets its actions by name (the noise-gap scheduler as ``noise_gap``, every regularizer
under its registry name), the dashboard and the report get the monitor, the policy, the loss flags and early
stopping as arguments. Order (producers before consumers, the metrics contract of :mod:`mnemoguard.callbacks.base`)::

    LowLossFlags -> MemorizationMonitor -> DangerZoneTracker -> your callbacks -> MitigationPolicy
        -> NoiseGapScheduler -> regularizers -> EarlyStopping -> TensorBoardDashboard -> MemorizationReport

Your callbacks sit between the producers and the consumers: they see the monitor's values of the step, and the
values they produce (a validation loss) reach the policy and early stopping at the same step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ..callbacks.base import Callback
from ..callbacks.danger_zone import DangerZoneTracker
from ..callbacks.dashboard import TensorBoardDashboard
from ..callbacks.early_stopping import EarlyStopping
from ..callbacks.monitor import MemorizationMonitor
from ..callbacks.noise_gap import NoiseGapScheduler
from ..callbacks.policy import MitigationPolicy
from ..callbacks.regularizers import Regularizer, build_regularizers
from ..callbacks.regularizers.agc_table import LowLossFlags
from ..callbacks.report import MemorizationReport
from ..config import ConfigError, EMASettings, GuardConfig, RecipeConfig, load_dataclass, read_mapping
from ..config.checks import check_guard_config
from ..config.plan import plan_components
from ..prompts import PromptEncoder, tokenize_and_encode
from .data import as_training_dataset

__all__ = ["Components", "adapter_kwargs", "build_components", "check_needs", "check_not_resumed", "hparams_of",
           "load_guard_config", "make_dataset", "make_ema", "make_prompts"]


def load_guard_config(source: Any = None, heldout_given: bool = False) -> tuple[GuardConfig, dict[str, Any] | None]:
    """``(GuardConfig, EMA settings or None)`` from a :class:`GuardConfig`, a :class:`~mnemoguard.config.RecipeConfig`,
    a mapping or a YAML path.

    A mapping (or file) is either a ``guard:`` section itself (``{monitor: ..., policy: ...}``) or a whole recipe, of
    which the ``guard:`` section and the ``ema:`` section (the EMA the guard builds) are used. ``enabled`` defaults to
    true here: handing a section to :class:`~mnemoguard.Guard` asks for a guard (``enabled: false`` still turns it
    off). Unknown keys, wrong types and unknown names are :class:`~mnemoguard.config.ConfigError` s naming the key.
    """
    if isinstance(source, GuardConfig):
        cfg, ema = source, None
    elif isinstance(source, RecipeConfig):
        cfg, ema = source.guard, asdict(source.ema)
    else:
        data = dict(read_mapping(source, "guard config"))
        ema = None
        recipe_keys = {f.name for f in fields(RecipeConfig)} - {f.name for f in fields(GuardConfig)}
        if recipe_keys & set(data):  # a whole recipe
            unknown = sorted(set(data) - recipe_keys)
            if unknown:
                raise ConfigError(f"guard config: a recipe has the sections {sorted(recipe_keys)}; found also "
                                  f"{unknown}")
            if data.get("ema") is not None:
                ema = asdict(load_dataclass(EMASettings, data["ema"], what="guard config (ema)"))
            data = dict(data.get("guard") or {})
        data.setdefault("enabled", True)
        cfg = load_dataclass(GuardConfig, data, what="guard config")
    check_guard_config(cfg, heldout_given=heldout_given)
    return cfg, ema


@dataclass
class Components:
    """The guard's components, by role (None / empty when not configured)."""

    loss_flags: LowLossFlags | None = None
    monitor: MemorizationMonitor | None = None
    danger_zone: DangerZoneTracker | None = None
    policy: MitigationPolicy | None = None
    noise_gap: NoiseGapScheduler | None = None
    regularizers: list[Regularizer] = field(default_factory=list)
    early_stopping: EarlyStopping | None = None
    dashboard: TensorBoardDashboard | None = None
    report: MemorizationReport | None = None
    user: list[Callback] = field(default_factory=list)

    def ordered(self) -> list[Callback]:
        """Every component in the order the hooks run (module docstring)."""
        order = [self.loss_flags, self.monitor, self.danger_zone, *self.user, self.policy, self.noise_gap,
                 *self.regularizers,
                 self.early_stopping, self.dashboard, self.report]
        return [cb for cb in order if cb is not None]


def build_components(cfg: GuardConfig, callbacks: Sequence[Callback] = (), heldout: Any = None) -> Components:
    """The components the ``guard:`` section asks for, wired (module docstring); ``callbacks`` are yours (between the
    producers and the consumers). ``heldout``: held-out samples for the monitor (instead of
    ``monitor.heldout_data``)."""
    out = Components(user=list(callbacks))
    plan = plan_components(cfg)
    if plan.loss_flags:
        out.loss_flags = LowLossFlags(cfg.loss_flags)
    if plan.monitor:
        out.monitor = MemorizationMonitor(cfg.monitor, heldout=heldout)
    if plan.danger_zone:
        out.danger_zone = DangerZoneTracker(cfg.danger_zone, monitor=out.monitor)
    if plan.noise_gap:
        out.noise_gap = NoiseGapScheduler(cfg.noise_gap)
    out.regularizers = build_regularizers(plan.regularizers, duplicate_weight={"monitor": out.monitor})
    rules = plan.rules
    if out.danger_zone is not None:  # "danger_zone" band / strength -> the tracker's live ones, read at every check
        tracker = out.danger_zone
        rules = [replace(r, band=(lambda: tracker.zone) if r.band == "danger_zone" else r.band,
                         strength=(lambda: tracker.strength) if r.strength == "danger_zone" else r.strength)
                 for r in rules]
    if rules:
        actions: dict[str, Any] = {r.name: r for r in out.regularizers}
        if out.noise_gap is not None:
            actions["noise_gap"] = out.noise_gap
        out.policy = MitigationPolicy(rules, actions=actions)
    es = plan.early_stopping
    if es.enabled:
        out.early_stopping = EarlyStopping(**{k: v for k, v in vars(es).items() if k != "enabled"})
    if plan.dashboard:
        out.dashboard = TensorBoardDashboard(
            cfg.dashboard, monitor=out.monitor, policy=out.policy, loss_flags=out.loss_flags,
            early_stopping=[out.early_stopping] if out.early_stopping is not None else [],
            copy_ratio=cfg.report.nn_ratio_threshold, danger_zone=out.danger_zone, noise_gap=out.noise_gap)
    if plan.report:
        extras = [cb for cb in out.user if callable(getattr(cb, "report_summary", None))]
        stoppers = [out.early_stopping] if out.early_stopping is not None else []
        out.report = MemorizationReport(cfg.report, monitor=out.monitor, policy=out.policy, loss_flags=out.loss_flags,
                                        stoppers=stoppers, extras=extras, danger_zone=out.danger_zone)
    return out


def make_prompts(accelerator: Any, text_encoder: Any, tokenizer: Any, encode_prompt: Any) -> PromptEncoder | None:
    """The guard's prompt encoder: ``encode_prompt`` as given, else the text encoder with its tokenizer, else None."""
    if encode_prompt is not None:
        return PromptEncoder(encode_prompt, device=accelerator.device)
    if text_encoder is not None:
        return PromptEncoder(lambda caps: tokenize_and_encode(text_encoder, tokenizer, caps),
                             device=accelerator.device)
    return None


def adapter_kwargs(model: Any, resolution: int | None, codec: Any) -> dict[str, Any]:
    """What the model adapter learns from the run: the latent size of the guard's own samples (the training
    resolution over the VAE factor) and, for SDXL, the image size of its default ``time_ids``."""
    from ..family.adapters import ModelAdapter, SDXLUNetAdapter, unwrap_model

    if resolution is None or isinstance(model, ModelAdapter):
        if isinstance(model, ModelAdapter) and resolution is not None:
            model.with_sample_size(int(resolution) // codec.scale_factor)
            if isinstance(model, SDXLUNetAdapter) and model.image_size is None:
                model.image_size = int(resolution)
        return {}
    out: dict[str, Any] = {"sample_size": int(resolution) // codec.scale_factor}
    if getattr(getattr(unwrap_model(model), "config", None), "addition_embed_type", None) == "text_time":
        out["image_size"] = int(resolution)
    return out


def make_dataset(train_dataset: Any, adapter: Any, codec: Any, image_column: str, caption_column: str,
                 resolution: int | None) -> Any:
    """The training data as the guard reads it, at the training resolution (default: the model's sample size times
    the VAE's downsampling factor) and the images' channels."""
    channels = codec.image_channels if codec.latent else adapter.latent_channels
    res = int(resolution) if resolution is not None else adapter.sample_size[0] * codec.scale_factor
    return as_training_dataset(train_dataset, image_column, caption_column, res, channels)


def check_not_resumed(accelerator: Any) -> None:
    """A ``ValueError`` when the accelerator has already trained or loaded a checkpoint (``accelerator.step`` > 0):
    the Guard registers the state hooks that save and restore its state, so built after ``load_state`` it would run
    with the checkpoint's guard state dropped (and a fresh EMA)."""
    step = int(getattr(accelerator, "step", 0) or 0)
    if step > 0:
        raise ValueError(f"Guard: the accelerator has already taken or loaded {step} micro-steps (accelerator.step); "
                         "build the Guard before accelerator.load_state(...) so that the checkpoint's guard state is "
                         "restored with it")


def hparams_of(values: Mapping[str, Any] | None) -> dict[str, Any]:
    """Scalars for TensorBoard's hparams (nested mappings flattened to ``a/b``; other values as strings)."""
    out: dict[str, Any] = {}

    def walk(d: Mapping[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, Mapping):
                walk(v, f"{prefix}{k}/")
            else:
                out[f"{prefix}{k}"] = v if isinstance(v, (bool, int, float, str)) else str(v)

    walk(values or {}, "")
    return out


def make_ema(ema: Any, ema_kwargs: Mapping[str, Any] | None, recipe_ema: dict[str, Any] | None, unet: Any,
             callbacks: Any) -> tuple[Any, bool]:
    """``(the EMA baseline, whether the guard owns it)``: the loop's own EMA as given (a diffusers ``EMAModel`` or
    ours; it steps and saves it), ``True`` / ``False``, or ``None``: the guard builds one (from the recipe's ``ema:``
    settings and ``ema_kwargs``) when a component needs it and the recipe does not turn EMA off."""
    from ..ema import EMAModel, as_ema_weights

    if ema is not None and not isinstance(ema, bool):
        as_ema_weights(ema, unet)  # a TypeError names what was found
        return ema, False
    settings = dict(recipe_ema or {})
    recipe_on = settings.pop("enabled", True)
    needed = any("ema" in cb.needs for cb in callbacks)
    if not (ema if isinstance(ema, bool) else needed and recipe_on):
        return None, False
    return EMAModel(unet, **{**settings, **dict(ema_kwargs or {})}), True


def check_needs(callbacks: Any, context: Any) -> dict[str, list[str]]:
    """Every component's ``needs`` that the run provides at construction (prompt encoder, tokenizer, dataset, EMA),
    checked now: a ``ValueError`` names who needs what and how to give it. Returns who needs what per call
    (captions, the prediction, dataset rows), for the per-call checks."""
    from ..callbacks.base import NEEDS
    from .inputs import who

    have = {"prompts": context.prompts is not None, "tokenizer": context.tokenizer is not None,
            "dataset": context.dataset is not None, "ema": context.ema is not None}
    for need, present in have.items():
        users = [cb.state_key for cb in callbacks if need in cb.needs]
        if users and not present:
            hint = ". Or turn the monitor off: monitor: {enabled: false}" if "MemorizationMonitor" in users else ""
            raise ValueError(f"{who(users, 'needs', 'need')} {NEEDS[need]}; found none{hint}")
    return {need: [cb.state_key for cb in callbacks if need in cb.needs] for need in ("captions", "prediction",
                                                                                        "indices")}
