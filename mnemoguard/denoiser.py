"""A diffusers UNet and its noise schedule seen as a denoiser: eps, score and x0-predictions at (x_t, t, cond).

Conventions (DDPM / Stable Diffusion, diffusers):

.. math::

    x_t = \\alpha_t x_0 + \\sigma_t \\varepsilon, \\qquad
    \\alpha_t = \\sqrt{\\bar\\alpha_t}, \\quad \\sigma_t = \\sqrt{1 - \\bar\\alpha_t},

with :math:`\\bar\\alpha_t` = ``scheduler.alphas_cumprod[t]``. The network predicts one of

- ``epsilon``: :math:`\\hat\\varepsilon`;
- ``v_prediction``: :math:`v = \\alpha_t \\varepsilon - \\sigma_t x_0` (Salimans & Ho 2022), so
  :math:`\\varepsilon = \\alpha_t v + \\sigma_t x_t` and :math:`x_0 = \\alpha_t x_t - \\sigma_t v`;
- ``sample``: :math:`\\hat x_0`, so :math:`\\varepsilon = (x_t - \\alpha_t \\hat x_0) / \\sigma_t`.

The score is :math:`\\nabla_x \\log p_t(x_t) \\approx -\\hat\\varepsilon / \\sigma_t`.

Batches: every per-sample argument (timesteps, conditioning, tensors inside UNet kwargs) whose batch size divides the
batch of ``x_t`` is *tiled* (repeated as whole blocks, like ``x.repeat(K, ...)``). This is what lets curvature
estimators stack K probe copies of ``x`` along the batch and call the same ``eps`` function once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

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


def tile_batch(obj: Any, batch_size: int, *, name: str = "argument") -> Any:
    """Tile the batch dimension of ``obj`` (a tensor, or a dict / list / tuple of them) up to ``batch_size``.

    Tensors with a batch that divides ``batch_size`` are repeated as whole blocks (``t.repeat(k, ...)``); 0-dim
    tensors are expanded to ``[batch_size]``; non-tensors pass through unchanged.
    """
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


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """Look through DDP / DeepSpeed (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers: registered
    submodules of those names (a DeepSpeed engine forwards unknown attributes to its model, so attribute checks would
    stop at the engine)."""
    for _ in range(8):
        children = getattr(module, "_modules", {})
        inner = children.get("module") or children.get("_orig_mod")
        if not isinstance(inner, torch.nn.Module):
            return module
        module = inner
    return module


def _math_sdpa() -> contextlib.AbstractContextManager:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as err:  # torch < 2.3
        raise RuntimeError("backend='math' needs torch>=2.3 (torch.nn.attention.sdpa_kernel)") from err
    return sdpa_kernel(SDPBackend.MATH)


@contextlib.contextmanager
def ad_safe(unet: torch.nn.Module, backend: Literal["classic", "math"] = "classic") -> Iterator[torch.nn.Module]:
    """Make a diffusers model safe for forward-mode AD (``torch.func.jvp``) and double backward.

    PyTorch's fused scaled-dot-product attention kernels (the default ``AttnProcessor2_0`` path; the CPU flash
    kernel, CUDA flash / memory-efficient kernels) implement neither forward-mode derivatives nor double backward.

    - ``backend="classic"`` (default) swaps every attention processor for diffusers' classic matmul-softmax
      ``AttnProcessor`` and puts the original processors back on exit, also when the body raises. Models without
      attention processors (plain ``nn.Module``) fall back to ``"math"``.
    - ``backend="math"`` keeps the processors and restricts SDPA to its math kernel for the duration
      (``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``); use it to keep custom processors (e.g. attention
      capture) in place.

    Yields the (unwrapped) model.
    """
    if backend not in ("classic", "math"):
        raise ValueError(f"backend must be 'classic' or 'math', found {backend!r}")
    model = _unwrap(unet)
    if backend == "math" or not hasattr(model, "set_attn_processor"):
        with _math_sdpa():
            yield model
        return
    from diffusers.models.attention_processor import AttnProcessor

    original = dict(model.attn_processors)
    model.set_attn_processor(AttnProcessor())
    try:
        yield model
    finally:
        # set_attn_processor consumes the dict it is given: hand it a copy.
        model.set_attn_processor(dict(original))


class Denoiser:
    """A (possibly LoRA-adapted) diffusers UNet plus its noise schedule, seen as eps / score / x0 predictors.

    Args:
        unet: a ``UNet2DConditionModel`` (or any module with the same call signature returning
            ``(sample,)`` with ``return_dict=False``), possibly wrapped by DDP / ``torch.compile``.
        scheduler: a DDPM-like scheduler with ``alphas_cumprod`` and ``config.prediction_type``. May be omitted when
            ``alphas_cumprod`` is given.
        prediction_type: override the scheduler's ``config.prediction_type``.
        alphas_cumprod: override the scheduler's :math:`\\bar\\alpha` table (shape ``[T]``).

    Timesteps may be Python numbers, 0-dim tensors or ``[B]`` tensors, integer or floating point. Floating-point
    timesteps between two table entries use linear interpolation of :math:`\\bar\\alpha` (differentiable in t,
    which is what carrying a tangent through t needs).
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        scheduler: Any = None,
        *,
        prediction_type: str | None = None,
        alphas_cumprod: Tensor | None = None,
    ) -> None:
        if alphas_cumprod is None:
            if scheduler is None or not hasattr(scheduler, "alphas_cumprod"):
                raise ValueError("pass a scheduler with `alphas_cumprod`, or `alphas_cumprod=` explicitly")
            alphas_cumprod = scheduler.alphas_cumprod
        if prediction_type is None:
            config = getattr(scheduler, "config", None)
            prediction_type = getattr(config, "prediction_type", None) or "epsilon"
        _check_prediction_type(prediction_type)
        ac = torch.as_tensor(alphas_cumprod).detach().to(device="cpu", dtype=torch.float64)
        if ac.ndim != 1 or ac.numel() < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D table, found shape {tuple(ac.shape)}")
        self.unet = unet
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        self.alphas_cumprod = ac

    # ------------------------------------------------------------------ schedule
    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.numel())

    def alpha_bar(self, t: Tensor | float, *, dtype: torch.dtype = torch.float32, device: Any = None) -> Tensor:
        """:math:`\\bar\\alpha_t`, same shape as ``t`` (linear interpolation for fractional float t)."""
        t = torch.as_tensor(t)
        device = t.device if device is None else device
        T = self.num_train_timesteps
        if not t.is_floating_point():
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= T):
                raise ValueError(f"timesteps must lie in [0, {T - 1}], found range [{int(t.min())}, {int(t.max())}]")
            return self.alphas_cumprod.to(t.device)[t.long()].to(device=device, dtype=dtype)
        if t.numel() and (float(t.detach().min()) < 0 or float(t.detach().max()) > T - 1):
            raise ValueError(f"timesteps must lie in [0, {T - 1}], found {t.detach().min()}..{t.detach().max()}")
        table = self.alphas_cumprod.to(device=t.device, dtype=torch.float64)
        lo = t.detach().floor().long().clamp(0, T - 2)
        frac = t.to(torch.float64) - lo.to(torch.float64)
        ab = table[lo] + frac * (table[lo + 1] - table[lo])
        return ab.to(device=device, dtype=dtype)

    def alpha(self, t: Tensor | float, **kwargs: Any) -> Tensor:
        """Signal scale :math:`\\alpha_t = \\sqrt{\\bar\\alpha_t}`."""
        return self.alpha_bar(t, **kwargs).sqrt()

    def sigma(self, t: Tensor | float, **kwargs: Any) -> Tensor:
        """Noise scale :math:`\\sigma_t = \\sqrt{1 - \\bar\\alpha_t}`."""
        return (1 - self.alpha_bar(t, **kwargs)).sqrt()

    # ------------------------------------------------------------------ network calls
    def _timesteps(self, t: Tensor | float, x_t: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim > 1:
            raise ValueError(f"timesteps must be a scalar or a [B] tensor, found shape {tuple(t.shape)}")
        return tile_batch(t, x_t.shape[0], name="t")

    def raw(self, x_t: Tensor, t: Tensor | float, cond: Tensor | None = None, **unet_kwargs: Any) -> Tensor:
        """The network output in its own parameterisation, after batch tiling (no conversion)."""
        if x_t.ndim < 2:
            raise ValueError(f"x_t must be batched [B, C, ...], found shape {tuple(x_t.shape)}")
        B = x_t.shape[0]
        t_in = self._timesteps(t, x_t)
        kwargs = tile_batch(unet_kwargs, B, name="unet_kwargs")
        if cond is not None:
            kwargs["encoder_hidden_states"] = tile_batch(cond, B, name="cond")
        model_dtype = getattr(_unwrap(self.unet), "dtype", x_t.dtype)
        x_in = x_t.to(model_dtype) if model_dtype.is_floating_point else x_t
        if "encoder_hidden_states" in kwargs and model_dtype.is_floating_point:
            kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"].to(model_dtype)
        out = self.unet(x_in, t_in, return_dict=False, **kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
        C = x_t.shape[1]
        if out.shape[1] == 2 * C:  # learned-variance heads: [prediction, variance]
            out = out[:, :C]
        if out.shape != x_t.shape:
            raise ValueError(f"the UNet returned shape {tuple(out.shape)} for an input of shape {tuple(x_t.shape)}")
        return out.to(x_t.dtype)

    def _coefs(self, t: Tensor | float, x_t: Tensor) -> tuple[Tensor, Tensor]:
        t_in = self._timesteps(t, x_t)
        ab = self.alpha_bar(t_in, dtype=x_t.dtype, device=x_t.device)
        return ab.sqrt(), (1 - ab).sqrt()

    def target(self, x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        """The training target at ``x_t = α_t x_0 + σ_t ε`` in this network's parameterisation
        (:func:`training_target`)."""
        alpha, sigma = self._coefs(t, x0)
        return training_target(x0, noise, alpha, sigma, self.prediction_type)

    def eps(self, x_t: Tensor, t: Tensor | float, cond: Tensor | None = None, **unet_kwargs: Any) -> Tensor:
        """Noise prediction :math:`\\hat\\varepsilon(x_t, t, c)`, whatever the network's parameterisation."""
        pred = self.raw(x_t, t, cond, **unet_kwargs)
        if self.prediction_type == "epsilon":
            return pred
        alpha, sigma = self._coefs(t, x_t)
        return eps_from_prediction(pred, x_t, alpha, sigma, self.prediction_type)

    def score(self, x_t: Tensor, t: Tensor | float, cond: Tensor | None = None, **unet_kwargs: Any) -> Tensor:
        """Score :math:`\\nabla_x \\log p_t(x_t \\mid c) \\approx -\\hat\\varepsilon / \\sigma_t`."""
        _, sigma = self._coefs(t, x_t)
        return -self.eps(x_t, t, cond, **unet_kwargs) / _expand_like(sigma, x_t)

    def x0(self, x_t: Tensor, t: Tensor | float, cond: Tensor | None = None, **unet_kwargs: Any) -> Tensor:
        """Clean-sample prediction :math:`\\hat x_0(x_t, t, c)` (no clipping)."""
        pred = self.raw(x_t, t, cond, **unet_kwargs)
        alpha, sigma = self._coefs(t, x_t)
        return x0_from_prediction(pred, x_t, alpha, sigma, self.prediction_type)

    def _cond_uncond(
        self,
        call: Callable[..., Tensor],
        x_t: Tensor,
        t: Tensor | float,
        cond: Tensor,
        uncond: Tensor,
        uncond_kwargs: Mapping[str, Any] | None,
        unet_kwargs: dict[str, Any],
    ) -> tuple[Tensor, Tensor]:
        B = x_t.shape[0]
        t_in = self._timesteps(t, x_t)
        kw_c = tile_batch(dict(unet_kwargs), B, name="unet_kwargs")
        kw_u = kw_c if uncond_kwargs is None else tile_batch(dict(uncond_kwargs), B, name="uncond_kwargs")
        cond_b = tile_batch(cond, B, name="cond")
        uncond_b = tile_batch(uncond, B, name="uncond")
        if cond_b.shape[1:] != uncond_b.shape[1:]:
            raise ValueError(
                f"cond and uncond must have the same per-sample shape, found {tuple(cond_b.shape[1:])}"
                f" and {tuple(uncond_b.shape[1:])}"
            )
        kwargs = _concat_batches(kw_u, kw_c, name="unet_kwargs")
        out = call(torch.cat([x_t, x_t]), torch.cat([t_in, t_in]), torch.cat([uncond_b, cond_b]), **kwargs)
        out_u, out_c = out.chunk(2)
        return out_c, out_u

    def eps_cond_uncond(
        self,
        x_t: Tensor,
        t: Tensor | float,
        cond: Tensor,
        uncond: Tensor,
        *,
        uncond_kwargs: Mapping[str, Any] | None = None,
        **unet_kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """Conditional and unconditional noise predictions ``(eps_c, eps_u)`` from ONE batched UNet call.

        The call is made on ``cat([x_t, x_t])`` with conditioning ``cat([uncond, cond])`` (diffusers' CFG order).
        ``uncond`` (e.g. the empty-prompt embedding, batch 1) is tiled to the batch. ``unet_kwargs`` go to both
        halves unless ``uncond_kwargs`` gives the unconditional half its own (SDXL: the empty prompt's
        ``added_cond_kwargs``).
        """
        return self._cond_uncond(self.eps, x_t, t, cond, uncond, uncond_kwargs, unet_kwargs)

    def raw_cond_uncond(
        self,
        x_t: Tensor,
        t: Tensor | float,
        cond: Tensor,
        uncond: Tensor,
        *,
        uncond_kwargs: Mapping[str, Any] | None = None,
        **unet_kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """As :meth:`eps_cond_uncond`, but the raw network outputs (e.g. v for v-prediction models)."""
        return self._cond_uncond(self.raw, x_t, t, cond, uncond, uncond_kwargs, unet_kwargs)

    # ------------------------------------------------------------------ callables for the signals
    def eps_fn(self, t: Tensor | float, cond: Tensor | None = None, **unet_kwargs: Any) -> Callable[[Tensor], Tensor]:
        """``x -> eps(x, t, cond)``: the ``eps_fn`` the curvature estimators take."""
        return lambda x: self.eps(x, t, cond, **unet_kwargs)

    def guidance_fn(
        self, t: Tensor | float, cond: Tensor, uncond: Tensor, **unet_kwargs: Any
    ) -> Callable[[Tensor], Tensor]:
        """``x -> eps_c(x) - eps_u(x)`` from one batched call (the difference field of Kim & Lee's Δh_∅)."""

        def fn(x: Tensor) -> Tensor:
            eps_c, eps_u = self.eps_cond_uncond(x, t, cond, uncond, **unet_kwargs)
            return eps_c - eps_u

        return fn

    def ad_safe(self, backend: Literal["classic", "math"] = "classic") -> contextlib.AbstractContextManager:
        """:func:`ad_safe` on this denoiser's UNet."""
        return ad_safe(self.unet, backend)
