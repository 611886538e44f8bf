""""The less-trained model" behind one interface.

Every baseline answers ``baseline.eps(x_t, t, cond, **kwargs)`` at the same inputs and with the same signature
as the live :meth:`mnemoguard.denoiser.Denoiser.eps` (any family: the baseline runs through the live denoiser's model
adapter and noise schedule), so any signal comparing the live model with a baseline
(live-vs-baseline score gap, Kim & Lee's :math:`\\Delta h_{\\tilde\\theta}` and :math:`\\Delta s_{\\tilde\\theta}`)
takes any of them:

=============================  ==========================================================================
``UnconditionalBaseline``      the same network with the empty caption's conditioning (Wen et al.'s baseline)
``AdapterDisabledBaseline``    a peft-LoRA-adapted model with its adapters switched off (= the base model)
``WeightsBaseline``            other weights for (part of) the live module, run with
                               ``torch.func.functional_call``: EMA weights, earlier snapshots
                               (:class:`mnemoguard.ema.EMAModel`), a LoRA checkpoint file
``DenoiserBaseline``           a separate network (e.g. an earlier full checkpoint loaded from disk)
=============================  ==========================================================================

Only the adapter toggle touches the live module, and it restores it (per-layer adapter state and ``requires_grad``
flags) on exit, also on exceptions. No baseline forces ``no_grad``: curvature maps differentiate through them with
respect to ``x``; wrap calls in ``torch.no_grad()`` for plain gaps.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mnemoguard.denoiser import Denoiser, _unwrap
from mnemoguard.family.conditioning import Conditioning

__all__ = [
    "AdapterDisabledBaseline",
    "Baseline",
    "DenoiserBaseline",
    "UnconditionalBaseline",
    "WeightsBaseline",
    "adapters_disabled",
    "ema_baseline",
    "load_lora_baseline",
    "load_unet_baseline",
]


Cond = Conditioning | Tensor | None


class Baseline:
    """Interface: ``eps(x_t, t, cond=None, **kwargs) -> Tensor``, like :meth:`Denoiser.eps`."""

    name: str = "baseline"

    def eps(self, x_t: Tensor, t: Tensor | float, cond: Cond = None, **kwargs: Any) -> Tensor:
        raise NotImplementedError

    def __call__(self, x_t: Tensor, t: Tensor | float, cond: Cond = None, **kwargs: Any) -> Tensor:
        return self.eps(x_t, t, cond, **kwargs)

    def eps_fn(self, t: Tensor | float, cond: Cond = None, **kwargs: Any) -> Callable[[Tensor], Tensor]:
        """``x -> eps(x, t, cond)``, the ``baseline_eps_fn`` of the curvature maps."""
        return lambda x: self.eps(x, t, cond, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# ---------------------------------------------------------------------------------------------------- unconditional
class UnconditionalBaseline(Baseline):
    """The live network on the unconditional input: :math:`\\varepsilon_\\theta(x_t, t, \\varnothing)`.

    ``cond`` passed to :meth:`eps` is ignored and replaced by ``uncond`` (the empty caption's conditioning, batch 1,
    tiled; for SDXL its pooled embeddings too).
    """

    name = "uncond"

    def __init__(self, denoiser: Denoiser, uncond: Conditioning | Tensor) -> None:
        self.denoiser = denoiser
        self.uncond = uncond

    def eps(self, x_t: Tensor, t: Tensor | float, cond: Cond = None, **kwargs: Any) -> Tensor:
        return self.denoiser.eps(x_t, t, self.uncond, **kwargs)


# ---------------------------------------------------------------------------------------------------- adapters off
def _tuner_layers(module: nn.Module) -> list[nn.Module]:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError as err:  # pragma: no cover - peft is a dependency
        raise ImportError("AdapterDisabledBaseline needs peft (`pip install peft`)") from err
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(unet: nn.Module) -> Iterator[nn.Module]:
    """Switch off every peft adapter of ``unet`` (any diffusers model) for the block; restore each layer's previous
    state on exit.

    Uses diffusers' ``model.disable_adapters()`` where available (peft's per-layer ``enable_adapters(False)``
    otherwise). On exit each tuner layer gets back its own enabled/disabled state and every parameter its own
    ``requires_grad`` flag (peft's toggles rewrite them), even if the block raised.
    """
    model = _unwrap(unet)
    layers = _tuner_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no peft adapter layers to disable; add a LoRA with `model.add_adapter(...)` "
            "or pick another baseline"
        )
    was_disabled = [bool(layer.disable_adapters) for layer in layers]
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    if getattr(model, "_hf_peft_config_loaded", False) and callable(getattr(model, "disable_adapters", None)):
        model.disable_adapters()
    else:
        for layer in layers:
            layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer, off in zip(layers, was_disabled):
            layer.enable_adapters(not off)
        for p, flag in requires_grad:
            p.requires_grad_(flag)


class AdapterDisabledBaseline(Baseline):
    """The live LoRA-adapted model with its adapters switched off, i.e. the frozen base model.

    The natural "less-trained self" of a LoRA fine-tune (Kim & Lee's :math:`\\tilde\\theta` = the pre-fine-tuning
    model), at the cost of one more forward pass and no extra memory.
    """

    name = "adapters_disabled"

    def __init__(self, denoiser: Denoiser) -> None:
        if not _tuner_layers(_unwrap(denoiser.model)):
            raise ValueError("the denoiser's model has no peft adapter layers; AdapterDisabledBaseline needs a LoRA")
        self.denoiser = denoiser

    def eps(self, x_t: Tensor, t: Tensor | float, cond: Cond = None, **kwargs: Any) -> Tensor:
        with adapters_disabled(self.denoiser.model):
            return self.denoiser.eps(x_t, t, cond, **kwargs)


# ---------------------------------------------------------------------------------------------------- other weights
class _Functional(nn.Module):
    """Calls ``module`` with some of its parameters replaced (``torch.func.functional_call``)."""

    def __init__(self, module: nn.Module, weights: Callable[[], Mapping[str, Tensor]]) -> None:
        super().__init__()
        self.wrapped = module
        self._weights = weights

    @property
    def dtype(self) -> torch.dtype:
        return next(self.wrapped.parameters()).dtype

    @property
    def config(self) -> Any:
        """The wrapped model's config (what its adapter reads: Flux's ``guidance_embeds``, the sample size)."""
        return getattr(self.wrapped, "config", None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        ref = next(self.wrapped.parameters())
        weights = {n: w.to(device=ref.device, dtype=ref.dtype) for n, w in self._weights().items()}
        return torch.func.functional_call(self.wrapped, weights, args, kwargs, strict=False)


class WeightsBaseline(Baseline):
    """The live module evaluated with other weights for some (or all) of its parameters, without copying them in.

    .. math:: \\varepsilon_{\\tilde\\theta}(x_t, t, c) = \\text{functional\\_call}(\\text{unet},
        \\{\\text{name} \\mapsto \\tilde\\theta_{\\text{name}}\\}, (x_t, t, c))

    Parameters not in ``weights`` and all buffers come from the live module. ``weights`` is a mapping from the
    (unwrapped) module's parameter names to tensors, or a zero-argument callable returning one (read at every call,
    e.g. an EMA that keeps moving). Not usable on ZeRO-3 partitioned modules.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        weights: Mapping[str, Tensor] | Callable[[], Mapping[str, Tensor]],
        *,
        name: str = "weights",
        check: bool = True,
    ) -> None:
        module = _unwrap(denoiser.model)
        get = weights if callable(weights) else (lambda w=weights: w)
        if check:
            _check_weights(module, get())
        self.name = name
        self.denoiser = denoiser
        self.module = module
        self._functional = _Functional(module, get)
        self._inner = denoiser.with_model(self._functional)

    def eps(self, x_t: Tensor, t: Tensor | float, cond: Cond = None, **kwargs: Any) -> Tensor:
        return self._inner.eps(x_t, t, cond, **kwargs)


def _check_weights(module: nn.Module, weights: Mapping[str, Tensor]) -> None:
    params = dict(module.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise KeyError(
            f"{len(missing)} baseline weight name(s) are not parameters of {type(module).__name__}, e.g. "
            f"{missing[:3]}; expected names like {list(params)[:2]}"
        )
    bad = [(n, tuple(w.shape), tuple(params[n].shape)) for n, w in weights.items() if w.shape != params[n].shape]
    if bad:
        n, found, expected = bad[0]
        raise ValueError(f"baseline weight {n!r} has shape {found}, the module expects {expected}")


def ema_baseline(denoiser: Denoiser, ema: Any, source: str | int = "ema") -> WeightsBaseline:
    """EMA weights (``source="ema"``) or snapshot ``source=i`` of a :class:`mnemoguard.ema.EMAModel`.

    The weights are read from the EMA at every call (a live view: it follows ``ema.step``), so for a snapshot the
    index is relative to the ring at call time (``-1`` = newest, ``0`` = oldest).
    """
    module = _unwrap(denoiser.model)
    missing = [n for n in ema.names if n not in dict(module.named_parameters())]
    if missing:
        raise KeyError(f"the EMA tracks parameters the model lacks, e.g. {missing[:3]}: build the EMA from the same "
                       "(unwrapped) model")
    name = "ema" if source == "ema" else f"snapshot[{source}]"
    return WeightsBaseline(denoiser, lambda: ema.weights(source), name=name, check=False)


MODEL_PREFIXES = ("unet.", "transformer.")  # how diffusers' LoRA files name the denoiser's keys


def load_lora_baseline(denoiser: Denoiser, path: str | os.PathLike, *, adapter_name: str = "default",
                       weight_name: str | None = None) -> WeightsBaseline:
    """An earlier LoRA checkpoint (diffusers' ``pytorch_lora_weights.safetensors``, a UNet's or a transformer's) as
    the baseline.

    The file's LoRA weights of the denoising model (keys ``unet.*`` or ``transformer.*``) replace the live adapter's
    (``adapter_name``) through ``functional_call``; the live module and its current LoRA stay untouched. The live
    model must carry an adapter of the same rank and targets. ``path`` is the file or its folder.
    """
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    file = path if os.path.isfile(path) else os.path.join(path, weight_name or "pytorch_lora_weights.safetensors")
    try:
        state = load_file(file)
    except (OSError, SafetensorError) as err:
        raise ValueError(f"{file}: not a readable LoRA .safetensors file ({err})") from None
    if any(k.endswith(".alpha") for k in state):
        raise ValueError("LoRA files with network alphas (kohya format) are not supported as a baseline; load them "
                         "into a separate model and use DenoiserBaseline")
    prefix = next((p for p in MODEL_PREFIXES if any(k.startswith(p) for k in state)), None)
    if prefix is None:
        raise ValueError(f"{path} holds no LoRA weights of a denoising model (keys starting with "
                         f"{' or '.join(repr(p) for p in MODEL_PREFIXES)}); found e.g. {list(state)[:3]}")
    model_state = convert_unet_state_dict_to_peft({k[len(prefix):]: v for k, v in state.items()
                                                   if k.startswith(prefix)})
    module = _unwrap(denoiser.model)
    tag = f".{adapter_name}."
    live = {n.replace(tag, "."): n for n, _ in module.named_parameters() if tag in n}
    if not live:
        raise ValueError(
            f"the live model has no adapter named {adapter_name!r}; add the LoRA before loading a baseline"
        )
    unknown = [k for k in model_state if k not in live]
    if unknown:
        raise KeyError(f"{len(unknown)} LoRA key(s) in {path} match no parameter of adapter {adapter_name!r}, e.g. "
                       f"{unknown[:3]} (different targets?)")
    weights = {live[k]: v for k, v in model_state.items()}
    return WeightsBaseline(denoiser, weights, name=f"lora:{os.path.basename(os.path.normpath(path))}")


# ---------------------------------------------------------------------------------------------------- separate model
class DenoiserBaseline(Baseline):
    """Another network (its own :class:`Denoiser`), e.g. an earlier full checkpoint or the pre-fine-tuning model."""

    def __init__(self, denoiser: Denoiser, *, name: str = "model") -> None:
        self.denoiser = denoiser
        self.name = name

    def eps(self, x_t: Tensor, t: Tensor | float, cond: Cond = None, **kwargs: Any) -> Tensor:
        return self.denoiser.eps(x_t, t, cond, **kwargs)


def load_unet_baseline(
    path: str | os.PathLike, like: Denoiser, *, device: Any = None, dtype: torch.dtype | None = None
) -> DenoiserBaseline:
    """Load an earlier diffusers model checkpoint (a ``unet/`` or ``transformer/`` folder, or a pipeline folder holding
    one) as a frozen baseline, with the live denoiser's family, schedule and parameterisation. Costs a second copy of
    the model in memory."""
    import diffusers

    path = os.fspath(path)
    subfolder = None
    if not os.path.isfile(os.path.join(path, "config.json")):
        subfolder = next((d for d in ("unet", "transformer") if os.path.isfile(os.path.join(path, d, "config.json"))),
                         None)
        if subfolder is None:
            raise FileNotFoundError(f"no diffusers model at {path}: expected {path}/config.json, "
                                    f"{path}/unet/config.json or {path}/transformer/config.json")
    with open(os.path.join(path, subfolder or "", "config.json")) as f:
        class_name = json.load(f).get("_class_name", "UNet2DConditionModel")
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ValueError(f"unknown diffusers model class {class_name!r} in {path}")
    unet = cls.from_pretrained(path, subfolder=subfolder)
    ref = next(_unwrap(like.model).parameters())
    unet = unet.to(device=device or ref.device, dtype=dtype or ref.dtype).eval().requires_grad_(False)
    return DenoiserBaseline(like.with_model(unet), name=f"checkpoint:{os.path.basename(os.path.normpath(path))}")
