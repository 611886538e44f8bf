"""A model family seen as a denoiser: eps / score / x0-predictions at ``(x_t, t, cond)``, for every family.

A :class:`Denoiser` is a model adapter (:mod:`mnemoguard.family.adapters`, the only place the network is called) plus
a noise schedule (:mod:`mnemoguard.family.schedule`, the only place a timestep becomes ``α_t, σ_t``):

.. math::

    x_t = \\alpha_t x_0 + \\sigma_t \\varepsilon

with DDPM's ``α = sqrt(ᾱ_t), σ = sqrt(1 − ᾱ_t)`` or flow matching's ``α = 1 − σ``. Whatever the network predicts
(``epsilon``, ``v_prediction``, ``sample``, ``flow_prediction``: :mod:`mnemoguard.parameterisation`), the denoiser
hands out the noise prediction, the score ``∇_x log p_t(x_t) ≈ −ε̂/σ_t`` and the clean-sample prediction, so every
signal works unchanged on every family. Timesteps are the loop's own (integers for DDPM, ``σ·T`` floats for flow).

Batches: every per-sample argument (timesteps, conditioning, tensors in extra keyword arguments) whose batch size
divides the batch of ``x_t`` is *tiled* (repeated as whole blocks, like ``x.repeat(K, ...)``). This is what lets
curvature estimators stack K probe copies of ``x`` along the batch and call the same ``eps`` function once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .family.adapters import ModelAdapter, model_adapter, unwrap_model
from .family.conditioning import Conditioning, as_conditioning
from .family.schedule import DDPMSchedule, NoiseSchedule, noise_schedule
from .parameterisation import (
    PREDICTION_TYPES,
    _check_prediction_type,
    _expand_like,
    denoising_loss,
    eps_from_prediction,
    training_target,
    x0_from_prediction,
)

__all__ = [
    "PREDICTION_TYPES",
    "Denoiser",
    "ad_safe",
    "denoising_loss",
    "eps_from_prediction",
    "tile_batch",
    "training_target",
    "x0_from_prediction",
]

_unwrap = unwrap_model  # the name the rest of the package imports


def tile_batch(obj: Any, batch_size: int, *, name: str = "argument") -> Any:
    """Tile the batch dimension of ``obj`` (a tensor, a :class:`Conditioning`, or a dict / list / tuple of them) up
    to ``batch_size``.

    Tensors with a batch that divides ``batch_size`` are repeated as whole blocks (``t.repeat(k, ...)``); 0-dim
    tensors are expanded to ``[batch_size]``; non-tensors pass through unchanged.
    """
    if isinstance(obj, Conditioning):
        return obj.tile(batch_size, name)
    if isinstance(obj, Tensor):
        if obj.ndim == 0:
            return obj.expand(batch_size)
        n = obj.shape[0]
        if n == batch_size:
            return obj
        if n == 0 or batch_size % n:
            raise ValueError(
                f"{name}: batch size {n} does not divide the batch size of x_t ({batch_size}); expected {batch_size}"
                f" or a divisor of it"
            )
        return obj.repeat(batch_size // n, *([1] * (obj.ndim - 1)))
    if isinstance(obj, Mapping):
        return {k: tile_batch(v, batch_size, name=f"{name}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(tile_batch(v, batch_size, name=f"{name}[{i}]") for i, v in enumerate(obj))
    return obj


def _concat_batches(a: Any, b: Any, *, name: str) -> Any:
    """Concatenate two equally structured (already tiled) batches along dim 0."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return torch.cat([a, b.to(device=a.device, dtype=a.dtype)])
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            raise ValueError(f"{name}: conditional and unconditional kwargs have different keys: {set(a)} vs {set(b)}")
        return {k: _concat_batches(a[k], b[k], name=f"{name}[{k!r}]") for k in a}
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return type(a)(_concat_batches(u, v, name=f"{name}[{i}]") for i, (u, v) in enumerate(zip(a, b)))
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        raise ValueError(f"{name}: one of the conditional / unconditional values is a tensor and the other is not")
    return a


def _math_sdpa() -> contextlib.AbstractContextManager:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as err:  # torch < 2.3
        raise RuntimeError("backend='math' needs torch>=2.3 (torch.nn.attention.sdpa_kernel)") from err
    return sdpa_kernel(SDPBackend.MATH)


@contextlib.contextmanager
def ad_safe(model: nn.Module, backend: Literal["classic", "math"] = "classic") -> Iterator[nn.Module]:
    """Make a diffusers model safe for forward-mode AD (``torch.func.jvp``) and double backward.

    PyTorch's fused scaled-dot-product attention kernels (the default ``AttnProcessor2_0`` path; the CPU flash
    kernel, CUDA flash / memory-efficient kernels) implement neither forward-mode derivatives nor double backward.

    - ``backend="classic"`` (default) swaps every attention processor for diffusers' classic matmul-softmax
      ``AttnProcessor`` and puts the original processors back on exit, also when the body raises. Models without
      attention processors, and transformers whose joint attention needs its own processor (SD3, Flux), fall back
      to ``"math"``.
    - ``backend="math"`` keeps the processors and restricts SDPA to its math kernel for the duration
      (``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``); use it to keep custom processors (e.g. attention
      capture) in place.

    Yields the (unwrapped) model.
    """
    if backend not in ("classic", "math"):
        raise ValueError(f"backend must be 'classic' or 'math', found {backend!r}")
    module = unwrap_model(model)
    classic_ok = hasattr(module, "set_attn_processor") and "Transformer" not in type(module).__name__
    if backend == "math" or not classic_ok:
        with _math_sdpa():
            yield module
        return
    from diffusers.models.attention_processor import AttnProcessor

    original = dict(module.attn_processors)
    module.set_attn_processor(AttnProcessor())
    try:
        yield module
    finally:
        # set_attn_processor consumes the dict it is given: hand it a copy.
        module.set_attn_processor(dict(original))


class Denoiser:
    """A (possibly LoRA-adapted) denoising network and its noise schedule, seen as eps / score / x0 predictors.

    Args:
        model: the network (a diffusers UNet / transformer, possibly wrapped by DDP / ``torch.compile``; its adapter is
            chosen by :func:`~mnemoguard.family.adapters.model_adapter`) or a
            :class:`~mnemoguard.family.adapters.ModelAdapter`.
        scheduler: the training noise scheduler (DDPM-family or ``FlowMatchEulerDiscreteScheduler``) or a
            :class:`~mnemoguard.family.schedule.NoiseSchedule`. May be omitted when ``alphas_cumprod`` is given.
        prediction_type: override what the network predicts (default: the adapter's — velocity for flow
            transformers — else the scheduler's ``config.prediction_type``).
        alphas_cumprod: a DDPM ``ᾱ`` table (shape ``[T]``) instead of a scheduler.

    Timesteps may be Python numbers, 0-dim tensors or ``[B]`` tensors. DDPM timesteps are integers or, between two
    table entries, floats (linear interpolation of ``ᾱ``: differentiable in t, which is what carrying a tangent
    through t needs); flow-matching timesteps are ``σ·T``.
    """

    def __init__(
        self,
        model: nn.Module | ModelAdapter,
        scheduler: Any = None,
        *,
        prediction_type: str | None = None,
        alphas_cumprod: Tensor | None = None,
    ) -> None:
        adapter = model_adapter(model)
        if alphas_cumprod is not None:
            schedule = DDPMSchedule(alphas_cumprod, prediction_type or adapter.prediction_type or "epsilon")
        elif scheduler is None:
            raise ValueError("pass the noise scheduler (or a NoiseSchedule), or `alphas_cumprod=` explicitly")
        else:
            schedule = noise_schedule(scheduler)
        prediction_type = prediction_type or adapter.prediction_type or schedule.prediction_type
        _check_prediction_type(prediction_type)
        schedule.check_prediction_type(prediction_type)
        self.adapter = adapter
        self.schedule: NoiseSchedule = schedule
        self.prediction_type = prediction_type

    @property
    def model(self) -> nn.Module:
        """The network as given (wrappers included)."""
        return self.adapter.module

    unet = model  # the name of the SD-only releases

    def with_model(self, model: nn.Module) -> Denoiser:
        """The same family, schedule and parameterisation around another module (other weights)."""
        return self.with_adapter(self.adapter.with_module(model))

    def with_adapter(self, adapter: ModelAdapter) -> Denoiser:
        """The same schedule and parameterisation with another adapter (e.g. one that records its calls)."""
        clone = object.__new__(Denoiser)
        clone.adapter, clone.schedule, clone.prediction_type = adapter, self.schedule, self.prediction_type
        return clone

    # ------------------------------------------------------------------ schedule
    @property
    def num_train_timesteps(self) -> int:
        return int(self.schedule.num_train_timesteps)

    def alpha(self, t: Tensor | float, *, dtype: torch.dtype = torch.float32, device: Any = None) -> Tensor:
        """Signal scale :math:`\\alpha_t`."""
        return self.schedule.alpha_sigma(t, dtype=dtype, device=device)[0]

    def sigma(self, t: Tensor | float, *, dtype: torch.dtype = torch.float32, device: Any = None) -> Tensor:
        """Noise scale :math:`\\sigma_t`."""
        return self.schedule.alpha_sigma(t, dtype=dtype, device=device)[1]

    def alpha_bar(self, t: Tensor | float, *, dtype: torch.dtype = torch.float32, device: Any = None) -> Tensor:
        """DDPM's :math:`\\bar\\alpha_t` (a ``ValueError`` for other schedules: a flow model's α² is no ᾱ, since
        α + σ = 1 there, not α² + σ² = 1; pass ``alpha=`` / ``sigma=`` to the signals instead)."""
        if self.schedule.kind != "ddpm":
            raise ValueError(f"alpha_bar is a DDPM schedule's ᾱ_t; this is a {self.schedule.kind} schedule: use "
                             "alpha(t) and sigma(t) (the signals take alpha= and sigma=)")
        return self.schedule.alpha_bar(t, dtype=dtype, device=device)

    # ------------------------------------------------------------------ network calls
    def _timesteps(self, t: Tensor | float, x_t: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim > 1:
            raise ValueError(f"timesteps must be a scalar or a [B] tensor, found shape {tuple(t.shape)}")
        return tile_batch(t, x_t.shape[0], name="t")

    def raw(self, x_t: Tensor, t: Tensor | float, cond: Conditioning | Tensor | None = None, **kwargs: Any) -> Tensor:
        """The network output in its own parameterisation, after batch tiling (no conversion)."""
        if x_t.ndim < 2:
            raise ValueError(f"x_t must be batched [B, C, ...], found shape {tuple(x_t.shape)}")
        B = x_t.shape[0]
        c = None if cond is None else as_conditioning(cond, what="cond").tile(B, "cond")
        return self.adapter(x_t, self._timesteps(t, x_t), c, **tile_batch(kwargs, B, name="kwargs"))

    def _coefs(self, t: Tensor | float, x_t: Tensor) -> tuple[Tensor, Tensor]:
        return self.schedule.alpha_sigma(self._timesteps(t, x_t), dtype=x_t.dtype, device=x_t.device)

    def to_eps(self, pred: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """A raw network output at ``(x_t, t)`` as a noise prediction (the one conversion every caller uses)."""
        if self.prediction_type == "epsilon":
            return pred
        alpha, sigma = self._coefs(t, x_t)
        return eps_from_prediction(pred, x_t, alpha, sigma, self.prediction_type)

    def to_x0(self, pred: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """A raw network output at ``(x_t, t)`` as a clean-sample prediction (no clipping)."""
        alpha, sigma = self._coefs(t, x_t)
        return x0_from_prediction(pred, x_t, alpha, sigma, self.prediction_type)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        """The training target at ``x_t = α_t x_0 + σ_t ε`` in this network's parameterisation
        (:func:`training_target`)."""
        alpha, sigma = self._coefs(t, x0)
        return training_target(x0, noise, alpha, sigma, self.prediction_type)

    def eps(self, x_t: Tensor, t: Tensor | float, cond: Conditioning | Tensor | None = None, **kwargs: Any) -> Tensor:
        """Noise prediction :math:`\\hat\\varepsilon(x_t, t, c)`, whatever the network's parameterisation."""
        return self.to_eps(self.raw(x_t, t, cond, **kwargs), x_t, t)

    def score(self, x_t: Tensor, t: Tensor | float, cond: Conditioning | Tensor | None = None,
              **kwargs: Any) -> Tensor:
        """Score :math:`\\nabla_x \\log p_t(x_t \\mid c) \\approx -\\hat\\varepsilon / \\sigma_t`."""
        _, sigma = self._coefs(t, x_t)
        return -self.eps(x_t, t, cond, **kwargs) / _expand_like(sigma, x_t)

    def x0(self, x_t: Tensor, t: Tensor | float, cond: Conditioning | Tensor | None = None, **kwargs: Any) -> Tensor:
        """Clean-sample prediction :math:`\\hat x_0(x_t, t, c)` (no clipping)."""
        return self.to_x0(self.raw(x_t, t, cond, **kwargs), x_t, t)

    def raw_cond_uncond(self, x_t: Tensor, t: Tensor | float, cond: Conditioning | Tensor,
                        uncond: Conditioning | Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Conditional and unconditional raw outputs ``(out_c, out_u)`` from ONE batched network call on
        ``cat([x_t, x_t])`` with conditioning ``cat([uncond, cond])`` (diffusers' CFG order). ``uncond`` (e.g. the
        empty caption's, batch 1) is tiled to the batch."""
        B = x_t.shape[0]
        t_in = self._timesteps(t, x_t)
        cond_b = as_conditioning(cond, what="cond").tile(B, "cond")
        uncond_b = as_conditioning(uncond, what="uncond").tile(B, "uncond")
        if cond_b.embeds.shape[1:] != uncond_b.embeds.shape[1:]:
            raise ValueError(
                f"cond and uncond must have the same per-sample shape, found {tuple(cond_b.embeds.shape[1:])}"
                f" and {tuple(uncond_b.embeds.shape[1:])}"
            )
        kw = tile_batch(kwargs, B, name="kwargs")
        both = self.adapter(torch.cat([x_t, x_t]), torch.cat([t_in, t_in]), Conditioning.cat([uncond_b, cond_b]),
                            **_concat_batches(kw, kw, name="kwargs"))
        out_u, out_c = both.chunk(2)
        return out_c, out_u

    def eps_cond_uncond(self, x_t: Tensor, t: Tensor | float, cond: Conditioning | Tensor,
                        uncond: Conditioning | Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Conditional and unconditional noise predictions ``(eps_c, eps_u)`` from ONE batched network call."""
        out_c, out_u = self.raw_cond_uncond(x_t, t, cond, uncond, **kwargs)
        return self.to_eps(out_c, x_t, t), self.to_eps(out_u, x_t, t)

    def guided(self, x_t: Tensor, t: Tensor | float, cond: Conditioning | Tensor,
               uncond: Conditioning | Tensor | None = None, guidance_scale: float = 1.0) -> Tensor:
        """The classifier-free-guided raw output ``out_∅ + w (out_c − out_∅)`` (one call on the doubled batch), in
        float32; ``w = 1``: the conditional call alone. (Guidance is linear, so guiding the raw output and guiding ε
        or x̂₀ are the same.)"""
        if guidance_scale == 1.0:
            return self.raw(x_t, t, cond).float()
        if uncond is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs the unconditional conditioning `uncond`")
        out_c, out_u = self.raw_cond_uncond(x_t, t, cond, uncond)
        out_c, out_u = out_c.float(), out_u.float()
        return out_u + guidance_scale * (out_c - out_u)

    # ------------------------------------------------------------------ callables for the signals
    def eps_fn(self, t: Tensor | float, cond: Conditioning | Tensor | None = None,
               **kwargs: Any) -> Callable[[Tensor], Tensor]:
        """``x -> eps(x, t, cond)``: the ``eps_fn`` the curvature estimators take."""
        return lambda x: self.eps(x, t, cond, **kwargs)

    def guidance_fn(self, t: Tensor | float, cond: Conditioning | Tensor,
                    uncond: Conditioning | Tensor, **kwargs: Any) -> Callable[[Tensor], Tensor]:
        """``x -> eps_c(x) - eps_u(x)`` from one batched call (the difference field of Kim & Lee's Δh_∅)."""

        def fn(x: Tensor) -> Tensor:
            eps_c, eps_u = self.eps_cond_uncond(x, t, cond, uncond, **kwargs)
            return eps_c - eps_u

        return fn

    def ad_safe(self, backend: Literal["classic", "math"] = "classic") -> contextlib.AbstractContextManager:
        """:func:`ad_safe` on this denoiser's network."""
        return ad_safe(self.model, backend)

    def __repr__(self) -> str:
        return f"Denoiser({self.adapter!r}, {self.schedule!r}, prediction_type={self.prediction_type!r})"
