"""What every regularizer shares: the run-time switch, its own seeded generator, per-step metrics, sample dropping.

A regularizer is a small *pure* function (tensors / lists in, tensors / lists out; randomness only from a
``torch.Generator`` passed in) plus a :class:`Regularizer` callback that holds the switch and the state:

* ``enabled`` / ``strength``: set at construction (``config.enabled``, ``config.strength``) and at run time with
  :meth:`Regularizer.activate` / :meth:`Regularizer.deactivate` (what a
  :class:`~mnemoguard.callbacks.policy.MitigationPolicy` calls; every regularizer has an ``action_name``, its
  registry name, so the policy finds it among the trainer's callbacks). ``strength`` multiplies the regularizer's main
  parameter (each class says which); ``strength=0`` is off.
* ``band``: ``activate(band=(t_lo, t_hi))`` restricts the regularizer to samples whose training timestep is in
  ``[t_lo, t_hi)`` (a policy rule with a band passes one); ``None``: every sample.
* a private ``torch.Generator`` (seeded from ``config.seed``, the regularizer's name and the rank): the global RNG is
  never touched, so switching a regularizer on does not change the rest of the training trajectory, and its state is
  in the checkpoint (a resumed run draws the same numbers).
* metrics (the contract of :mod:`mnemoguard.callbacks.base`): per optimizer step, ``reg/<name>/...`` floats summed
  over micro-batches and ranks, written to ``state.metrics`` and to the step's ``logs`` (they reach the trackers at the
  trainer's logging cadence); only on steps where the regularizer ran.

Dropping samples (Wen's filter, IET-AGC) multiplies ``inputs["weights"]`` by the keep mask and, as both papers' code
does (the loss is the mean over the kept samples), renormalises the survivors by ``n_active_before / n_kept``.
Per-sample loss weights the trainer folds in (Min-SNR) live in ``loss_per_sample``, so a zero weight masks them
consistently. When nothing is kept, :func:`skip_if_nothing_kept` makes the micro-batch a clean no-op.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..base import Callback, TrainerControl, TrainerState

__all__ = [
    "Regularizer", "RegularizerConfig", "drop_samples", "live_eps", "skip_if_nothing_kept", "timestep_mask",
]


@dataclass
class RegularizerConfig:
    """Settings every regularizer has."""

    enabled: bool = True  # on from the start; False: off until activate() (e.g. by a MitigationPolicy)
    strength: float = 1.0  # run-time multiplier of the main parameter (see each regularizer); 0 = no effect
    seed: int = 0  # seed of the regularizer's own generator (mixed with its name and the rank)


def _check_band(band: Any) -> tuple[int, int] | None:
    if band is None:
        return None
    if hasattr(band, "t_lo"):  # a DangerZone-like object
        band = None if band.t_lo is None else (int(band.t_lo), int(band.t_hi) + 1)
        if band is None:
            return None
    try:
        lo, hi = (int(b) for b in band)
    except (TypeError, ValueError):
        raise ValueError(f"band must be a (t_lo, t_hi) pair of timesteps or None, found {band!r}") from None
    if not lo < hi:
        raise ValueError(f"band must have t_lo < t_hi (half-open [t_lo, t_hi)), found ({lo}, {hi})")
    return lo, hi


def timestep_mask(timesteps: Tensor, band: tuple[int, int] | None) -> Tensor:
    """``[B]`` bool: samples whose timestep lies in the half-open ``band`` (all of them for ``None``)."""
    if band is None:
        return torch.ones(timesteps.shape[0], dtype=torch.bool, device=timesteps.device)
    return (timesteps >= band[0]) & (timesteps < band[1])


def drop_samples(weights: Tensor, keep: Tensor, renormalize: bool = True) -> Tensor:
    """Zero the weights of the samples not kept; optionally renormalise the survivors.

    .. math:: w'_b = w_b\\,k_b \\cdot \\frac{|\\{b: w_b \\ne 0\\}|}{|\\{b: w_b \\ne 0, k_b\\}|}

    With uniform weights the trainer's ``mean_b(w'_b l_b)`` is then the mean loss over the kept samples, which is
    what Wen et al.'s ``mse(model_pred[keep], target[keep])`` and IET-AGC's ``mean(l·keep)·B/max(Σkeep, 1)``
    compute; samples an earlier filter already dropped (weight 0) do not count, so filters compose. When nothing is
    kept every weight is 0 (no renormalisation).
    """
    if keep.shape != weights.shape:
        raise ValueError(f"keep must have the weights' shape {tuple(weights.shape)}, found {tuple(keep.shape)}")
    keep = keep.to(device=weights.device, dtype=torch.bool)
    active = weights != 0
    new = torch.where(keep, weights, torch.zeros_like(weights))
    if renormalize:
        n_before, n_after = int(active.sum()), int((active & keep).sum())
        if n_after > 0 and n_after != n_before:
            new = new * (n_before / n_after)
    return new


def live_eps(denoiser: Any, model_pred: Tensor, x_t: Tensor, timesteps: Tensor) -> Tensor:
    """The live network's training prediction as a noise prediction (``epsilon`` models: unchanged), float32."""
    from ...denoiser import eps_from_prediction

    pred, x_t = model_pred.float(), x_t.float()
    if denoiser.prediction_type == "epsilon":
        return pred
    ab = denoiser.alpha_bar(timesteps, dtype=torch.float32, device=x_t.device)
    return eps_from_prediction(pred, x_t, ab.sqrt(), (1 - ab).sqrt(), denoiser.prediction_type)


def skip_if_nothing_kept(inputs: dict[str, Any], accelerator: Any = None) -> bool:
    """Make a micro-batch whose weights are all zero a clean no-op; returns whether it was one.

    The trainer's loss is ``mean(weights * loss_per_sample) + extra_loss``: with all weights zero it is ``extra_loss``
    (0 unless another regularizer added a term). On a single process without a gradient scaler, the per-sample losses
    are detached and a grad-carrying zero is added to ``extra_loss``, so ``backward`` leaves the model's gradients
    ``None`` and the optimizer step skips every parameter: weights and optimizer state (Adam moments, step counts)
    stay exactly as they were, as in Wen et al.'s code, which skips the step. Under DDP / DeepSpeed / FSDP (every
    rank must reduce the same gradients) or fp16 with a ``GradScaler`` (which asserts that it saw gradients) the graph
    is kept and the gradients are zero. ``inputs["step_skipped"]`` is set to ``True`` either way; the reference
    trainer skips the optimizer step when every micro-batch of the step on every rank set it (one all-reduced flag),
    so there too weights and Adam moments stay put. Under DeepSpeed, whose engine steps inside ``backward``, the
    zero-gradient step is taken and momentum still moves the weights.
    """
    weights = inputs["weights"]
    if bool((weights != 0).any()):
        return False
    inputs["step_skipped"] = True
    distributed = getattr(accelerator, "num_processes", 1) > 1
    kind = getattr(getattr(accelerator, "distributed_type", None), "name", "NO")
    engine = kind in ("DEEPSPEED", "FSDP", "MEGATRON_LM")
    scaler = getattr(accelerator, "scaler", None) is not None
    if not (distributed or engine or scaler):
        inputs["loss_per_sample"] = inputs["loss_per_sample"].detach()
        extra = inputs["extra_loss"]
        if not extra.requires_grad:
            inputs["extra_loss"] = extra + torch.zeros((), dtype=extra.dtype, device=extra.device, requires_grad=True)
    return True


class Regularizer(Callback):
    """Base class: the switch, the generator, the state and the metrics (see the module docstring).

    Subclasses set ``name`` (the registry key and the policy's action name) and ``config_class``, and implement
    ``on_before_forward`` or ``on_loss``. Each time they act they call :meth:`_begin_micro_batch` and count what they
    did with :meth:`_count` (the same keys every time: the step's sums are reduced across ranks), and turn the sums
    into metric values in :meth:`_metric_values`.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[RegularizerConfig]] = RegularizerConfig

    def __init__(self, config: RegularizerConfig | None = None, **overrides: Any) -> None:
        if config is not None and not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} expects a {self.config_class.__name__}, found "
                            f"{type(config).__name__}")
        self.config = dataclasses.replace(config or self.config_class(), **overrides)
        if self.config.strength < 0:
            raise ValueError(f"{self.name}: strength must be >= 0, found {self.config.strength}")
        self.validate_config()
        self.enabled = bool(self.config.enabled)
        self.strength = float(self.config.strength)
        self.band: tuple[int, int] | None = None
        self.process_index = 0
        self.generator = torch.Generator().manual_seed(self._seed())
        self._generator_loaded = False
        self._sums: dict[str, float] = {}
        self._micro_batches = 0
        self.totals: dict[str, float] = {}  # cumulative counters over the run (kept in the state)

    # ------------------------------------------------------------------------------------------- switch
    @property
    def action_name(self) -> str:
        """The name a :class:`~mnemoguard.callbacks.policy.MitigationPolicy` registers this regularizer under."""
        return self.name

    @property
    def active(self) -> bool:
        """Whether the regularizer acts on the next micro-batch."""
        return self.enabled and self.strength > 0

    def activate(self, strength: float = 1.0, band: Any = None) -> None:
        """Turn on with ``strength`` (multiplier of the main parameter), optionally only for timesteps in ``band``."""
        strength = float(strength)
        if not strength >= 0:
            raise ValueError(f"{self.name}: strength must be >= 0, found {strength}")
        self.band = _check_band(band)
        self.enabled, self.strength = True, strength

    def deactivate(self) -> None:
        """Turn off; the band is cleared (``strength`` keeps its value until the next ``activate``)."""
        self.enabled = False
        self.band = None

    def validate_config(self) -> None:
        """Check the subclass's config (raise ``ValueError`` naming the field, expected and found)."""

    def eligible(self, timesteps: Tensor) -> Tensor:
        """``[B]`` bool: the samples this regularizer may act on (the band, if any)."""
        return timestep_mask(timesteps, self.band)

    def _denoiser(self, unet: Any, components: Any) -> Any:
        """The live UNet (wrappers looked through) with the training schedule, as a :class:`Denoiser`."""
        from ...denoiser import Denoiser, _unwrap

        if unet is None or components is None:
            raise ValueError(f"{self.name} needs the trainer's `unet` and `components` hook arguments, found "
                             f"unet={type(unet).__name__}, components={type(components).__name__}")
        module = _unwrap(unet)
        cached = getattr(self, "_denoiser_cache", None)
        if cached is None or cached.unet is not module:
            cached = Denoiser(module, components.noise_scheduler)
            self._denoiser_cache = cached
        return cached

    # ------------------------------------------------------------------------------------------- randomness
    def _seed(self, process_index: int = 0) -> int:
        return (int(self.config.seed) * 1_000_003 + zlib.crc32(self.name.encode()) + 7_919 * process_index) % 2**63

    def _remix_for_rank(self) -> None:
        """Give each rank its own stream after all ranks loaded rank 0's generator state."""
        if self.process_index:
            base = int(torch.randint(0, 2**62, (1,), generator=self.generator))
            self.generator.manual_seed((base + 7_919 * self.process_index) % 2**63)

    def on_train_begin(self, state: TrainerState, control: TrainerControl, accelerator: Any = None,
                       **kwargs: Any) -> None:
        self.process_index = int(getattr(accelerator, "process_index", 0) or 0)
        if not self._generator_loaded:
            self.generator.manual_seed(self._seed(self.process_index))

    # ------------------------------------------------------------------------------------------- metrics
    def _count(self, **values: float) -> None:
        """Add this micro-batch's counts to the step's sums."""
        for key, value in values.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value)

    def _begin_micro_batch(self) -> None:
        self._micro_batches += 1

    def _metric_values(self, sums: dict[str, float]) -> dict[str, float]:
        """Step sums (over micro-batches and ranks) -> ``{tag suffix: value}``; override."""
        return {}

    def on_step_end(self, state: TrainerState, control: TrainerControl, logs: dict | None = None,
                    accelerator: Any = None, **kwargs: Any) -> None:
        if self._micro_batches == 0:  # did not run this step (the same on every rank: the switch is rank-consistent)
            return
        keys = sorted(self._sums)
        sums = dict(self._sums)
        if keys and getattr(accelerator, "num_processes", 1) > 1:
            t = torch.tensor([self._sums[k] for k in keys], dtype=torch.float64, device=accelerator.device)
            t = accelerator.reduce(t, reduction="sum")
            sums = dict(zip(keys, t.tolist()))
        for key, value in sums.items():
            self.totals[key] = self.totals.get(key, 0.0) + value
        values = {"strength": self.strength if self.active else 0.0, **self._metric_values(sums)}
        values = {f"reg/{self.name}/{k}": float(v) for k, v in values.items()}
        state.update_metrics(values)
        if logs is not None:
            logs.update(values)
        self._sums, self._micro_batches = {}, 0

    # ------------------------------------------------------------------------------------------- state
    def extra_state(self) -> dict[str, Any]:
        """Subclass state to checkpoint (override with :meth:`load_extra_state`)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "enabled": self.enabled,
            "strength": self.strength,
            "band": list(self.band) if self.band is not None else None,
            "generator": self.generator.get_state(),
            "totals": dict(self.totals),
            **self.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name", self.name) != self.name:
            raise ValueError(f"state of regularizer {state.get('name')!r} loaded into {self.name!r}")
        self.enabled = bool(state["enabled"])
        self.strength = float(state["strength"])
        self.band = _check_band(state["band"])
        self.generator.set_state(state["generator"])
        self._generator_loaded = True
        self._remix_for_rank()
        self.totals = dict(state.get("totals", {}))
        self.load_extra_state(state)

    def __repr__(self) -> str:
        on = f"on, strength={self.strength:g}" if self.active else "off"
        band = f", band={self.band}" if self.band is not None else ""
        return f"{type(self).__name__}({on}{band})"
