"""Model adapters: the only place the denoising network is called, for every family.

An adapter takes what every signal, sampler and baseline works with — the sample ``x`` ``[B, C, H, W]`` in the VAE's
latent layout (pixels without a VAE), the timestep ``t`` as the training loop holds it, a
:class:`~mnemoguard.family.conditioning.Conditioning` — makes the family's call, and returns the network's raw output
in that same ``[B, C, H, W]`` layout and in its own parameterisation:

==========================  ==========================================================================  ===============
adapter                     call                                                                        predicts
==========================  ==========================================================================  ===============
:class:`UNetAdapter`        ``unet(x, t, encoder_hidden_states=embeds)`` (SD 1.x/2.x)                  the scheduler's
:class:`SDXLUNetAdapter`    + ``added_cond_kwargs={"text_embeds": pooled, "time_ids": ...}``           the scheduler's
:class:`SD3Adapter`         ``transformer(hidden_states=x, timestep=t, encoder_hidden_states=embeds,    velocity
                            pooled_projections=pooled)``
:class:`FluxAdapter`        2x2-packed latents, ``img_ids`` / ``txt_ids``, ``timestep=t / 1000``,       velocity
                            the guidance embedding; the output unpacked
==========================  ==========================================================================  ===============

:func:`model_adapter` picks one from the model's class; another diffusers transformer (Qwen-Image, Z-Image, Flux2,
...) is a subclass of :class:`ModelAdapter` with its own :meth:`~ModelAdapter.forward` (docs/guard.md, "Other
models"). Adapters also know which keywords of the training loop carry the conditioning
(:meth:`~ModelAdapter.conditioning_from` / :meth:`~ModelAdapter.conditioning_into`), so the guard can read and edit a
micro-batch's conditioning without knowing the family.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .conditioning import Conditioning, as_conditioning

__all__ = ["FluxAdapter", "ModelAdapter", "SD3Adapter", "SDXLUNetAdapter", "UNetAdapter", "model_adapter",
           "unwrap_model"]


def unwrap_model(module: nn.Module) -> nn.Module:
    """Look through DDP / DeepSpeed (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers: registered
    submodules of those names (a DeepSpeed engine forwards unknown attributes to its model, so attribute checks would
    stop at the engine)."""
    for _ in range(8):
        children = getattr(module, "_modules", {})
        inner = children.get("module") or children.get("_orig_mod")
        if not isinstance(inner, nn.Module):
            return module
        module = inner
    return module


def _first_output(out: Any) -> Tensor:
    if isinstance(out, (tuple, list)):
        return out[0]
    return getattr(out, "sample", out)


class ModelAdapter:
    """A denoising network seen as ``adapter(x, t, cond) -> raw prediction`` (module docstring).

    Args:
        module: the network (prepared / wrapped or not: calls go to the module as given, so pass the unwrapped one
            for the guard's own calls; :meth:`with_module` swaps it).
        sample_size: the latent height/width the guard's own samples use (default: the model's ``sample_size``).

    Subclasses set :attr:`family`, :attr:`prediction_type` (None: the noise schedule's) and implement
    :meth:`forward`.
    """

    family: str = "custom"
    prediction_type: str | None = None
    pooled_key: str | None = None  # the loop's keyword for the pooled embeddings (None: the family has none)

    def __init__(self, module: nn.Module, *, sample_size: int | tuple[int, int] | None = None) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"{type(self).__name__}: expected the denoising network (a torch module), found "
                            f"{type(module).__name__}")
        self.module = module
        self._sample_size = sample_size
        self._rows = [0]  # batch rows sent through the network so far, shared with every with_module() clone

    # ------------------------------------------------------------------ description
    @property
    def rows(self) -> int:
        """Batch rows sent through the network by this adapter and every :meth:`with_module` clone of it (other
        weights of the same model: an EMA baseline, a functional view), so the cost of a measurement that calls a
        baseline too is the difference of this count around it."""
        return self._rows[0]

    @property
    def inner(self) -> nn.Module:
        """The network without DDP / DeepSpeed / compile wrappers."""
        return unwrap_model(self.module)

    @property
    def config(self) -> Any:
        return getattr(self.inner, "config", None)

    @property
    def dtype(self) -> torch.dtype:
        dtype = getattr(self.module, "dtype", None)
        if isinstance(dtype, torch.dtype):
            return dtype
        param = next(self.inner.parameters(), None)
        return param.dtype if param is not None else torch.float32

    @property
    def device(self) -> torch.device:
        param = next(self.inner.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @property
    def latent_channels(self) -> int:
        return int(self.config.in_channels)

    @property
    def sample_size(self) -> tuple[int, int]:
        size = self._sample_size if self._sample_size is not None else getattr(self.config, "sample_size", None)
        if size is None:
            raise ValueError(f"{type(self).__name__}: the model's config has no sample_size; give the guard the "
                             "training resolution (Guard(..., resolution=args.resolution))")
        return (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one sample as the guard sees it (latent channels, latent height and width)."""
        return (self.latent_channels, *self.sample_size)

    def with_sample_size(self, sample_size: int | tuple[int, int] | None) -> ModelAdapter:
        """This adapter with the guard's latent size set (when it is not known yet)."""
        if sample_size is not None and self._sample_size is None:
            self._sample_size = sample_size
        return self

    def with_module(self, module: nn.Module) -> ModelAdapter:
        """The same adapter (family, settings) around another module: other weights (EMA, a checkpoint) or a
        functional view of this one."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.module = module
        return clone

    # ------------------------------------------------------------------ the call
    def __call__(self, x: Tensor, t: Tensor, cond: Conditioning | Tensor | None = None, **kwargs: Any) -> Tensor:
        """The raw network output for ``x`` ``[B, C, H, W]`` at timesteps ``t`` ``[B]``, in ``x``'s dtype."""
        if x.ndim != 4:
            raise ValueError(f"{type(self).__name__}: expected samples [B, C, H, W], found shape {tuple(x.shape)}")
        dtype = self.dtype
        cond = None if cond is None else as_conditioning(cond).to(device=x.device, dtype=dtype)
        x_in = x.to(dtype) if dtype.is_floating_point else x
        self._rows[0] += int(x.shape[0])
        out = _first_output(self.forward(x_in, t, cond, **kwargs))
        C = x.shape[1]
        if out.ndim == 4 and out.shape[1] == 2 * C:  # learned-variance heads: [prediction, variance]
            out = out[:, :C]
        if out.shape != x.shape:
            raise ValueError(f"{type(self).__name__}: the network returned shape {tuple(out.shape)} for an input of "
                             f"shape {tuple(x.shape)}")
        return out.to(x.dtype)

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning | None, **kwargs: Any) -> Any:
        """The family's network call (``x`` and ``cond`` already in the model's dtype); override."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the loop's keywords
    def conditioning_from(self, inputs: Mapping[str, Any]) -> Conditioning:
        """The micro-batch's conditioning from the keywords a training loop passes (``encoder_hidden_states`` and the
        family's pooled embeddings)."""
        embeds = inputs.get("encoder_hidden_states")
        if embeds is None:
            raise ValueError("expected encoder_hidden_states (the token embeddings [B, L, D]); found none")
        pooled = inputs.get(self.pooled_key) if self.pooled_key else None
        if self.pooled_key and pooled is None:
            raise ValueError(f"a {self.family} model is conditioned on pooled text embeddings too: expected "
                             f"{self.pooled_key}= ([B, P]); found none")
        return Conditioning(embeds, pooled)

    def conditioning_into(self, inputs: dict[str, Any], cond: Conditioning) -> None:
        """Write ``cond`` back into the loop's keywords (what the loop passes to the network)."""
        inputs["encoder_hidden_states"] = cond.embeds
        if self.pooled_key:
            inputs[self.pooled_key] = cond.pooled

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.inner).__name__})"


# ---------------------------------------------------------------------------------------------------- UNets
class UNetAdapter(ModelAdapter):
    """SD 1.x / 2.x ``UNet2DConditionModel`` (or any module called ``module(x, t, encoder_hidden_states=...,
    return_dict=False)``). Extra keyword arguments reach the network as they are."""

    family = "sd"

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning | None, **kwargs: Any) -> Any:
        if cond is not None:
            kwargs["encoder_hidden_states"] = cond.embeds
        return self.module(x, t, return_dict=False, **kwargs)

    @property
    def latent_channels(self) -> int:
        config = self.config
        return int(config.in_channels) if config is not None and hasattr(config, "in_channels") else 0


class SDXLUNetAdapter(UNetAdapter):
    """SDXL's UNet (``addition_embed_type="text_time"``): the pooled embeddings and the ``time_ids`` (original size,
    crop top-left, target size) go in ``added_cond_kwargs``. Without ``time_ids`` in the conditioning (the guard's own
    probes) they are ``(image_size, image_size, 0, 0, image_size, image_size)``: an uncropped image at the training
    resolution, as diffusers' SDXL scripts compute them for a centre crop of a square image.

    Args:
        image_size: the training resolution in pixels (default: the latent size x 8, SDXL's VAE factor).
    """

    family = "sdxl"
    pooled_key = "added_cond_kwargs"

    def __init__(self, module: nn.Module, *, sample_size: int | tuple[int, int] | None = None,
                 image_size: int | None = None) -> None:
        super().__init__(module, sample_size=sample_size)
        self.image_size = image_size

    def time_ids(self, batch: int, x: Tensor) -> Tensor:
        size = self.image_size or int(x.shape[-1]) * 8
        return torch.tensor([[size, size, 0, 0, size, size]], dtype=x.dtype, device=x.device).repeat(batch, 1)

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning | None, **kwargs: Any) -> Any:
        if cond is None or cond.pooled is None:
            raise ValueError("an SDXL UNet needs pooled text embeddings (text_embeds): encode captions with both text "
                             "encoders, e.g. encode_prompt returning (prompt_embeds, pooled_prompt_embeds)")
        time_ids = cond.extra.get("time_ids")
        added = {"text_embeds": cond.pooled,
                 "time_ids": self.time_ids(x.shape[0], x) if time_ids is None else time_ids.to(x.dtype)}
        return self.module(x, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=added, return_dict=False,
                           **kwargs)

    def conditioning_from(self, inputs: Mapping[str, Any]) -> Conditioning:
        embeds = inputs.get("encoder_hidden_states")
        added = inputs.get("added_cond_kwargs")
        if embeds is None or not isinstance(added, Mapping) or added.get("text_embeds") is None:
            found = sorted(added) if isinstance(added, Mapping) else type(added).__name__
            raise ValueError("an SDXL UNet is conditioned on encoder_hidden_states and added_cond_kwargs="
                             f"{{'text_embeds': [B, 1280], 'time_ids': [B, 6]}}; found added_cond_kwargs {found}")
        extra = {"time_ids": added["time_ids"]} if added.get("time_ids") is not None else {}
        return Conditioning(embeds, added["text_embeds"], extra)

    def conditioning_into(self, inputs: dict[str, Any], cond: Conditioning) -> None:
        inputs["encoder_hidden_states"] = cond.embeds
        added = dict(inputs.get("added_cond_kwargs") or {})
        added["text_embeds"] = cond.pooled
        if "time_ids" in cond.extra:
            added["time_ids"] = cond.extra["time_ids"]
        inputs["added_cond_kwargs"] = added


# ---------------------------------------------------------------------------------------------------- transformers
class SD3Adapter(ModelAdapter):
    """SD3 / SD3.5 ``SD3Transformer2DModel``: a velocity model called with the float timestep ``σ·T`` as diffusers'
    scripts draw it. (Their ``--precondition_outputs`` turns the velocity into ``x_t − σ v`` *after* the call: the
    network itself still predicts ``v``.)"""

    family = "sd3"
    prediction_type = "flow_prediction"
    pooled_key = "pooled_projections"

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning | None, **kwargs: Any) -> Any:
        if cond is None or cond.pooled is None:
            raise ValueError("an SD3 transformer needs token and pooled embeddings (encode_prompt's prompt_embeds, "
                             "pooled_prompt_embeds)")
        return self.module(hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds,
                           pooled_projections=cond.pooled, return_dict=False, **kwargs)


def pack_latents(x: Tensor) -> Tensor:
    """``[B, C, H, W]`` -> Flux's ``[B, (H/2)(W/2), 4C]`` sequence of 2x2 patches."""
    B, C, H, W = x.shape
    if H % 2 or W % 2:
        raise ValueError(f"Flux packs 2x2 latent patches: the latent height and width must be even, found {H}x{W}")
    return x.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), C * 4)


def unpack_latents(seq: Tensor, height: int, width: int) -> Tensor:
    """The inverse of :func:`pack_latents` for a latent of ``height`` x ``width``."""
    B, _, D = seq.shape
    return seq.reshape(B, height // 2, width // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(
        B, D // 4, height, width)


def latent_image_ids(height: int, width: int, device: Any, dtype: torch.dtype) -> Tensor:
    """Flux's positional ids of the packed latent: ``[(H/2)(W/2), 3]`` with (0, row, column)."""
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


class FluxAdapter(ModelAdapter):
    """FLUX.1 ``FluxTransformer2DModel``: the latent packed into 2x2 patches, positional ids for image and text
    tokens, the timestep as ``t / 1000`` and, for guidance-distilled models (``guidance_embeds``), the guidance value
    the run trains with (``--guidance_scale`` of diffusers' Flux scripts, 3.5 by default).

    Args:
        guidance_scale: the value of the guidance embedding.
        sample_size: the latent height/width (Flux's config has none: the guard passes the training resolution /
            the VAE factor).
    """

    family = "flux"
    prediction_type = "flow_prediction"
    pooled_key = "pooled_projections"

    def __init__(self, module: nn.Module, *, guidance_scale: float = 3.5,
                 sample_size: int | tuple[int, int] | None = None) -> None:
        super().__init__(module, sample_size=sample_size)
        self.guidance_scale = float(guidance_scale)

    @property
    def latent_channels(self) -> int:
        return int(self.config.in_channels) // 4

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning | None, **kwargs: Any) -> Any:
        if cond is None or cond.pooled is None:
            raise ValueError("a Flux transformer needs token (T5) and pooled (CLIP) embeddings")
        B, _, H, W = x.shape
        guidance = None
        if getattr(self.config, "guidance_embeds", False):
            guidance = torch.full((B,), self.guidance_scale, device=x.device, dtype=torch.float32)
        t = torch.as_tensor(t, device=x.device)
        out = self.module(hidden_states=pack_latents(x), timestep=t.float() / 1000, guidance=guidance,
                          pooled_projections=cond.pooled, encoder_hidden_states=cond.embeds,
                          txt_ids=torch.zeros(cond.embeds.shape[1], 3, device=x.device, dtype=x.dtype),
                          img_ids=latent_image_ids(H, W, x.device, x.dtype), return_dict=False, **kwargs)
        return unpack_latents(_first_output(out), H, W)


def model_adapter(model: nn.Module | ModelAdapter, **kwargs: Any) -> ModelAdapter:
    """The adapter of a diffusers model, by its class (an adapter is returned as is): ``UNet2DConditionModel``
    (SDXL when ``addition_embed_type == "text_time"``), ``SD3Transformer2DModel``, ``FluxTransformer2DModel``; any
    other module is called like a UNet. ``kwargs`` go to the adapter (``image_size=`` for SDXL, ``guidance_scale=``
    for Flux, ``sample_size=``)."""
    if isinstance(model, ModelAdapter):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a diffusers model (UNet2DConditionModel, SD3Transformer2DModel, "
                        f"FluxTransformer2DModel, ...) or a ModelAdapter, found {type(model).__name__}")
    inner = unwrap_model(model)
    name = type(inner).__name__
    config = getattr(inner, "config", None)
    if name.startswith("FluxTransformer2D"):
        return FluxAdapter(model, **kwargs)
    if name.startswith("SD3Transformer2D"):
        return SD3Adapter(model, **{k: v for k, v in kwargs.items() if k == "sample_size"})
    if getattr(config, "addition_embed_type", None) == "text_time":
        return SDXLUNetAdapter(model, **{k: v for k, v in kwargs.items() if k in ("sample_size", "image_size")})
    if "Transformer" in name:
        raise TypeError(f"model: no built-in adapter for {name}; wrap it in a ModelAdapter subclass whose forward() "
                        "makes its call (docs/guard.md, 'Other models')")
    return UNetAdapter(model, **{k: v for k, v in kwargs.items() if k == "sample_size"})
