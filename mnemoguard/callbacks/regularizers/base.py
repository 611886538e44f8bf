"""What every regularizer shares: the run-time switch, its own seeded generator, per-step metrics, sample dropping.

A regularizer is a small *pure* function (tensors / lists in, tensors / lists out; randomness only from a
``torch.Generator`` passed in) plus a :class:`Regularizer` callback that holds the switch and the state:

* ``enabled`` / ``strength``: set at construction (``config.enabled``, ``config.strength``) and at run time with
  :meth:`Regularizer.activate` / :meth:`Regularizer.deactivate` (what the
  :class:`~mnemoguard.callbacks.policy.MitigationPolicy` calls: the Guard's builder registers every regularizer as
  the policy's action of the same name). ``strength`` multiplies the regularizer's main parameter (each class says
  which); ``strength=0`` is off.
* ``band``: ``activate(band=(lo, hi))`` restricts the regularizer to samples whose training timestep's level
  (:mod:`mnemoguard.callbacks.bands`) is in ``[lo, hi)`` (a policy rule with a band passes one); ``None``: every
  sample.
* a private ``torch.Generator`` (seeded from ``config.seed``, the regularizer's name and the rank): the global RNG is
  never touched, so switching a regularizer on does not change the rest of the training trajectory, and its state is
  in the checkpoint (a resumed run draws the same numbers).
* ``needs``: what it needs from the run (:data:`mnemoguard.callbacks.base.NEEDS`), checked when the Guard is built.
* metrics (the contract of :mod:`mnemoguard.callbacks.base`): ``reg/<name>/...`` floats, summed over micro-batches
  and ranks *on the device* (no host sync per micro-batch) since the last log step, reduced and written to
  ``state.metrics`` and the step's ``logs`` when the step is logged.

Dropping samples (Wen's filter, IET-AGC) multiplies ``inputs["weights"]`` by the keep mask and, as both papers' code
does (the loss is the mean over the kept samples), renormalises the survivors by ``n_active_before / n_kept``
(:func:`drop_samples`, device-only). When every sample of every micro-batch of an optimizer step, on every rank, was
dropped, the Guard skips that optimizer step (``Guard(optimizer=...)``): weights and Adam's moments stay put, as in
Wen et al.'s code.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...config.regularizers import RegularizerConfig
from ..bands import as_band
from ..base import Callback, TrainerControl, TrainerState

__all__ = ["Regularizer", "RegularizerConfig", "drop_samples", "live_eps", "timestep_mask"]


def timestep_mask(levels: Tensor, band: tuple[int, int] | None) -> Tensor:
    """``[B]`` bool: samples whose level lies in the half-open ``band`` (all of them for ``None``)."""
    if band is None:
        return torch.ones(levels.shape[0], dtype=torch.bool, device=levels.device)
    return (levels >= band[0]) & (levels < band[1])


def drop_samples(weights: Tensor, keep: Tensor, renormalize: bool = True) -> Tensor:
    """Zero the weights of the samples not kept; optionally renormalise the survivors.

    .. math:: w'_b = w_b\\,k_b \\cdot \\frac{|\\{b: w_b \\ne 0\\}|}{|\\{b: w_b \\ne 0, k_b\\}|}

    With uniform weights the loss ``mean_b(w'_b l_b)`` is then the mean loss over the kept samples, which is what
    Wen et al.'s ``mse(model_pred[keep], target[keep])`` and IET-AGC's ``mean(l·keep)·B/max(Σkeep, 1)`` compute;
    samples an earlier filter already dropped (weight 0) do not count, so filters compose. When nothing is kept every
    weight is 0 (no renormalisation). Tensor operations only: no host synchronisation.
    """
    if keep.shape != weights.shape:
        raise ValueError(f"keep must have the weights' shape {tuple(weights.shape)}, found {tuple(keep.shape)}")
    keep = keep.to(device=weights.device, dtype=torch.bool)
    active = weights != 0
    new = torch.where(keep, weights, torch.zeros_like(weights))
    if renormalize:
        n_before, n_after = active.sum(), (active & keep).sum()
        one = torch.ones((), dtype=new.dtype, device=new.device)
        new = new * torch.where(n_after > 0, n_before / n_after.clamp_min(1), one)
    return new


def live_eps(denoiser: Any, inputs: dict[str, Any], detach: bool = False) -> Tensor:
    """The live network's training prediction (``inputs["model_pred"]``, in the parameterisation
    ``inputs["model_pred_type"]`` when the loop preconditioned it, else the network's own) as a noise prediction at
    the micro-batch's ``noisy_model_input`` and ``timesteps``, float32."""
    from ...parameterisation import eps_from_prediction

    pred, x_t, t = inputs["model_pred"].float(), inputs["noisy_model_input"].float(), inputs["timesteps"]
    if detach:
        pred = pred.detach()
    kind = inputs.get("model_pred_type") or denoiser.prediction_type
    if kind == denoiser.prediction_type:
        return denoiser.to_eps(pred, x_t, t)
    alpha, sigma = denoiser.schedule.alpha_sigma(t, dtype=torch.float32, device=x_t.device)
    return eps_from_prediction(pred, x_t, alpha, sigma, kind)


class Regularizer(Callback):
    """Base class: the switch, the generator, the state and the metrics (see the module docstring).

    Subclasses set ``name`` (the registry key and the policy's action name), ``config_class`` and ``needs``, and
    implement ``on_before_forward`` or ``on_loss``. Each time they act they call :meth:`_count` with the micro-batch's
    counts (tensors stay on the device; the same keys every time: the sums are reduced across ranks) and turn the
    sums into metric values in :meth:`_metric_values`. ``drops_samples`` marks the ones that zero loss weights (the
    Guard then checks, once per optimizer step, whether anything was kept).
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[RegularizerConfig]] = RegularizerConfig
    drops_samples: ClassVar[bool] = False

    def __init__(self, config: RegularizerConfig | None = None, **overrides: Any) -> None:
        if config is not None and not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} expects a {self.config_class.__name__}, found "
                            f"{type(config).__name__}")
        try:
            self.config = dataclasses.replace(config or self.config_class(), **overrides)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{self.name}: {e}") from None
        self.enabled = bool(self.config.enabled)
        self.strength = float(self.config.strength)
        self.band: tuple[int, int] | None = None
        self.process_index = 0
        self.generator = torch.Generator().manual_seed(self._seed())
        self._generator_loaded = False
        self._sums: dict[str, Tensor] = {}
        self.totals: dict[str, float] = {}  # cumulative counters over the run (kept in the state)

    @property
    def state_key(self) -> str:
        return self.name

    # ------------------------------------------------------------------------------------------- switch
    @property
    def active(self) -> bool:
        """Whether the regularizer acts on the next micro-batch."""
        return self.enabled and self.strength > 0

    def activate(self, strength: float = 1.0, band: Any = None) -> None:
        """Turn on with ``strength`` (multiplier of the main parameter), optionally only for timesteps in ``band``."""
        strength = float(strength)
        if not strength >= 0:
            raise ValueError(f"{self.name}: strength must be >= 0, found {strength}")
        self.band = as_band(band) if band is not None else None
        self.enabled, self.strength = True, strength

    def deactivate(self) -> None:
        """Turn off; the band is cleared (``strength`` keeps its value until the next ``activate``)."""
        self.enabled = False
        self.band = None

    def eligible(self, levels: Tensor) -> Tensor:
        """``[B]`` bool: the samples this regularizer may act on (the band of levels, if any)."""
        return timestep_mask(levels, self.band)

    # ------------------------------------------------------------------------------------------- randomness
    def _seed(self, process_index: int = 0) -> int:
        return (int(self.config.seed) * 1_000_003 + zlib.crc32(self.name.encode()) + 7_919 * process_index) % 2**63

    def _remix_for_rank(self) -> None:
        """Give each rank its own stream after all ranks loaded rank 0's generator state."""
        if self.process_index:
            base = int(torch.randint(0, 2**62, (1,), generator=self.generator))
            self.generator.manual_seed((base + 7_919 * self.process_index) % 2**63)

    def on_train_begin(self, state: TrainerState, control: TrainerControl, context: Any = None,
                       **kwargs: Any) -> None:
        self.process_index = int(context.process_index) if context is not None else 0
        if not self._generator_loaded:
            self.generator.manual_seed(self._seed(self.process_index))

    # ------------------------------------------------------------------------------------------- metrics
    def _count(self, **values: Tensor | float) -> None:
        """Add this micro-batch's counts to the sums since the last log (tensors stay where they are)."""
        for key, value in values.items():
            value = torch.as_tensor(value, dtype=torch.float64)
            self._sums[key] = self._sums[key] + value.to(self._sums[key].device) if key in self._sums else value

    def _metric_values(self, sums: dict[str, float]) -> dict[str, float]:
        """Sums since the last log (over micro-batches and ranks) -> ``{tag suffix: value}``; override."""
        return {}

    def on_step_end(self, state: TrainerState, control: TrainerControl, context: Any = None,
                    logs: dict | None = None, **kwargs: Any) -> None:
        # Sums are read (and reduced across ranks) only when the step is logged: one sync per log, not per step.
        if not self._sums or not control.should_log:
            return
        keys = sorted(self._sums)
        device = context.device if context is not None else "cpu"
        packed = torch.stack([self._sums[k].to(device) for k in keys])
        if context is not None and context.num_processes > 1:
            packed = context.accelerator.reduce(packed, reduction="sum")
        sums = dict(zip(keys, packed.tolist()))
        for key, value in sums.items():
            self.totals[key] = self.totals.get(key, 0.0) + value
        values = {"strength": self.strength if self.active else 0.0, **self._metric_values(sums)}
        values = {f"reg/{self.name}/{k}": float(v) for k, v in values.items()}
        state.update_metrics(values)
        if logs is not None:
            logs.update(values)
        self._sums = {}

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
        self.band = as_band(state["band"]) if state.get("band") is not None else None
        generator = state["generator"]
        if not isinstance(generator, Tensor) or generator.dtype != torch.uint8:
            raise ValueError(f"{self.name}: the saved generator state must be a uint8 tensor, found {type(generator)}")
        self.generator.set_state(generator)
        self._generator_loaded = True
        self._remix_for_rank()
        self.totals = {str(k): float(v) for k, v in state.get("totals", {}).items()}
        self.load_extra_state(state)

    def __repr__(self) -> str:
        on = f"on, strength={self.strength:g}" if self.active else "off"
        band = f", band={self.band}" if self.band is not None else ""
        return f"{type(self).__name__}({on}{band})"
