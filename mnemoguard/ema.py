"""EMA of the trainable parameters and a ring of earlier snapshots: the "less-trained" baselines.

The method names follow diffusers' ``EMAModel`` (``step``, ``copy_to``, ``store``, ``restore``, ``state_dict``,
``load_state_dict``, ``cur_decay_value``, ``optimization_step``) so that anyone who has passed ``--use_ema`` to a
diffusers script knows them. Two things differ on purpose:

* shadow weights are kept by parameter *name*, so a baseline runs without touching the live module:
  ``ema.functional_call(unet, args, kwargs)`` evaluates the UNet with EMA (or snapshot) weights through
  :func:`torch.func.functional_call`; no store / copy / restore of full weights is needed;
* the horizon can be given as a *lag* in optimizer steps (``lag=L`` means ``decay = L / (L + 1)``, whose mean lag is
  ``L`` steps) as well as a raw decay. With neither warm-up nor lag, the decay follows diffusers' default
  ``(1 + t) / (10 + t)``, whose mean lag is ``t / 10``: a baseline at about 90 % of training so far.

Under DeepSpeed ZeRO-3 the partitioned parameters are gathered (``deepspeed.zero.GatheredParameters``) for each
update; deepspeed is imported only then.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

ParamsLike = nn.Module | Iterable[nn.Parameter] | Iterable[tuple[str, nn.Parameter]]


def _is_zero3_partitioned(params: list[torch.Tensor]) -> bool:
    return any(hasattr(p, "ds_id") for p in params)


@contextlib.contextmanager
def gathered_parameters(params: list[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Gather ZeRO-3 partitioned parameters for the duration of the block; a no-op otherwise."""
    if not _is_zero3_partitioned(params):
        yield
        return
    import deepspeed  # imported lazily: only ZeRO-3 runs need it

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def ema_update(shadow: torch.Tensor, param: torch.Tensor, decay: float) -> None:
    """In-place EMA update ``shadow <- decay * shadow + (1 - decay) * param``."""
    shadow.lerp_(param.detach().to(device=shadow.device, dtype=shadow.dtype), 1.0 - decay)


class EMAModel:
    """Exponential moving average of a model's trainable parameters, plus a ring of earlier snapshots.

    Args:
        model (`nn.Module`): the (unwrapped) model; only parameters with ``requires_grad`` are tracked when
            ``only_trainable`` (for a LoRA that is the adapters alone, a few MB).
        decay (`float`, defaults to 0.9999): the largest decay used (diffusers' cap).
        lag (`float`, *optional*): horizon in optimizer steps; sets ``decay = lag / (lag + 1)`` and overrides
            ``decay``. The warm-up schedule still applies until it reaches that value.
        min_decay (`float`, defaults to 0.0): the smallest decay used.
        update_after_step (`int`, defaults to 0): steps before the average starts moving.
        use_ema_warmup (`bool`, defaults to False): ``1 - (1 + t / inv_gamma) ** -power`` warm-up
            (Karras / crowsonkb) instead of ``(1 + t) / (10 + t)``.
        inv_gamma, power: warm-up parameters (diffusers' defaults).
        snapshot_every (`int`, defaults to 0): every this many optimizer steps, copy the *live* trainable weights
            into the snapshot ring (0 = no snapshots).
        num_snapshots (`int`, defaults to 0): ring size; the oldest snapshot is dropped first.
        device, dtype: where and in which dtype to keep shadow and snapshot weights (e.g. ``"cpu"``,
            ``torch.bfloat16`` for SD-size full fine-tunes); default: like the parameters.
        only_trainable (`bool`, defaults to True): track only ``requires_grad`` parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        lag: float | None = None,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        use_ema_warmup: bool = False,
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
        snapshot_every: int = 0,
        num_snapshots: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        only_trainable: bool = True,
    ) -> None:
        if lag is not None:
            if lag <= 0:
                raise ValueError(f"EMA lag must be a positive number of steps, got {lag!r}")
            decay = lag / (lag + 1.0)
        if not 0.0 <= min_decay <= decay < 1.0:
            raise ValueError(f"EMA needs 0 <= min_decay <= decay < 1, got min_decay={min_decay}, decay={decay}")
        if snapshot_every < 0 or num_snapshots < 0 or (snapshot_every > 0) != (num_snapshots > 0):
            raise ValueError(
                "snapshots need both snapshot_every > 0 and num_snapshots > 0 (or both 0), got "
                f"snapshot_every={snapshot_every}, num_snapshots={num_snapshots}"
            )
        self.decay = float(decay)
        self.lag = lag
        self.min_decay = float(min_decay)
        self.update_after_step = int(update_after_step)
        self.use_ema_warmup = bool(use_ema_warmup)
        self.inv_gamma = float(inv_gamma)
        self.power = float(power)
        self.snapshot_every = int(snapshot_every)
        self.num_snapshots = int(num_snapshots)
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self.optimization_step = 0
        self.cur_decay_value: float | None = None

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or not only_trainable]
        if not named:
            raise ValueError("EMAModel found no parameters to track: the model has no parameter with requires_grad")
        self.names = [n for n, _ in named]
        params = [p for _, p in named]
        with gathered_parameters(params):
            self.shadow: dict[str, torch.Tensor] = {n: self._new_copy(p) for n, p in named}
        self.snapshots: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.collected: dict[str, torch.Tensor] | None = None

    # ----------------------------------------------------------------------------------------------------- helpers
    def _new_copy(self, p: torch.Tensor) -> torch.Tensor:
        return p.detach().to(device=self.device or p.device, dtype=self.dtype or p.dtype, copy=True)

    def _params(self, model_or_params: ParamsLike) -> list[torch.Tensor]:
        """Tracked parameters of ``model_or_params``, in ``self.names`` order."""
        if isinstance(model_or_params, nn.Module):
            by_name = dict(model_or_params.named_parameters())
            missing = [n for n in self.names if n not in by_name]
            if missing:
                raise KeyError(
                    f"the model lacks {len(missing)} parameter(s) this EMA tracks, e.g. {missing[:3]}; "
                    "pass the same (unwrapped) model the EMA was built from"
                )
            return [by_name[n] for n in self.names]
        items = list(model_or_params)
        if items and isinstance(items[0], tuple):
            items = [p for n, p in items if n in self.shadow]
        else:
            # diffusers passes ``unet.parameters()``: keep the trainable ones, in order.
            trainable = [p for p in items if p.requires_grad]
            items = trainable if len(trainable) == len(self.names) else items
        if len(items) != len(self.names):
            raise ValueError(f"expected {len(self.names)} parameters (as tracked at construction), got {len(items)}")
        return items

    def get_decay(self, optimization_step: int) -> float:
        """Decay used at ``optimization_step`` (diffusers' schedule, clamped to ``[min_decay, decay]``)."""
        step = max(0, optimization_step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.use_ema_warmup:
            value = 1 - (1 + step / self.inv_gamma) ** -self.power
        else:
            value = (1 + step) / (10 + step)
        return max(self.min_decay, min(value, self.decay))

    # ---------------------------------------------------------------------------------------------------- the API
    @torch.no_grad()
    def step(self, model_or_params: ParamsLike) -> None:
        """One EMA update after an optimizer step; also takes a snapshot every ``snapshot_every`` steps."""
        params = self._params(model_or_params)
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        with gathered_parameters(params):
            for name, p in zip(self.names, params):
                ema_update(self.shadow[name], p, decay)
            if self.snapshot_every and self.optimization_step % self.snapshot_every == 0:
                copies = {n: self._new_copy(p) for n, p in zip(self.names, params)}
                self.snapshots.append((self.optimization_step, copies))
                del self.snapshots[: -self.num_snapshots]

    @torch.no_grad()
    def copy_to(self, model_or_params: ParamsLike, source: str | int = "ema") -> None:
        """Copy EMA (or snapshot ``source``) weights into the given parameters."""
        weights = self.weights(source)
        params = self._params(model_or_params)
        with gathered_parameters(params, modifier_rank=0):
            for name, p in zip(self.names, params):
                p.data.copy_(weights[name].to(device=p.device, dtype=p.dtype))

    @torch.no_grad()
    def store(self, model_or_params: ParamsLike) -> None:
        """Save the current parameters (on CPU) to put back with :meth:`restore`."""
        params = self._params(model_or_params)
        with gathered_parameters(params):
            self.collected = {n: p.detach().to("cpu", copy=True) for n, p in zip(self.names, params)}

    @torch.no_grad()
    def restore(self, model_or_params: ParamsLike) -> None:
        """Put back the parameters saved by :meth:`store`."""
        if self.collected is None:
            raise RuntimeError("EMAModel.restore() called without a previous store()")
        params = self._params(model_or_params)
        with gathered_parameters(params, modifier_rank=0):
            for name, p in zip(self.names, params):
                p.data.copy_(self.collected[name].to(device=p.device, dtype=p.dtype))
        self.collected = None

    @contextlib.contextmanager
    def average_parameters(self, model: nn.Module, source: str | int = "ema") -> Iterator[nn.Module]:
        """``store``, ``copy_to``, run the block, ``restore`` — even if the block raises."""
        self.store(model)
        self.copy_to(model, source)
        try:
            yield model
        finally:
            self.restore(model)

    def weights(self, source: str | int = "ema") -> dict[str, torch.Tensor]:
        """Weights by name: ``"ema"`` for the average, an int ``i`` for ``snapshots[i]`` (``-1`` = newest)."""
        if source == "ema":
            return self.shadow
        if isinstance(source, int) and not isinstance(source, bool):
            if not self.snapshots:
                raise IndexError(f"snapshot {source} requested but no snapshot has been taken yet (snapshot_every="
                                 f"{self.snapshot_every}, step {self.optimization_step})")
            return self.snapshots[source][1]
        raise ValueError(f"source must be 'ema' or a snapshot index (int), got {source!r}")

    @property
    def snapshot_steps(self) -> list[int]:
        """Optimizer steps at which the snapshots in the ring were taken, oldest first."""
        return [s for s, _ in self.snapshots]

    def functional_call(
        self, model: nn.Module, args: tuple = (), kwargs: dict[str, Any] | None = None, source: str | int = "ema"
    ) -> Any:
        """Run ``model(*args, **kwargs)`` with EMA / snapshot weights, leaving the live module untouched.

        Untracked parameters and buffers come from ``model`` itself. Not usable on ZeRO-3 partitioned modules
        (use :meth:`average_parameters` there).
        """
        ref = next(model.parameters())
        weights = {n: w.to(device=ref.device, dtype=ref.dtype) for n, w in self.weights(source).items()}
        return torch.func.functional_call(model, weights, args, kwargs or {}, strict=False)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> EMAModel:
        """Move shadow and snapshot weights (floating-point only for ``dtype``)."""
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)

        self.shadow = {n: move(t) for n, t in self.shadow.items()}
        self.snapshots = [(s, {n: move(t) for n, t in w.items()}) for s, w in self.snapshots]
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype or self.dtype
        return self

    # ------------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Hyper-parameters, counters, shadow and snapshot weights (CPU tensors)."""
        return {
            "decay": self.decay,
            "lag": self.lag,
            "min_decay": self.min_decay,
            "update_after_step": self.update_after_step,
            "use_ema_warmup": self.use_ema_warmup,
            "inv_gamma": self.inv_gamma,
            "power": self.power,
            "snapshot_every": self.snapshot_every,
            "num_snapshots": self.num_snapshots,
            "optimization_step": self.optimization_step,
            "cur_decay_value": self.cur_decay_value,
            "names": list(self.names),
            "shadow": {n: t.detach().cpu() for n, t in self.shadow.items()},
            "snapshots": [(s, {n: t.detach().cpu() for n, t in w.items()}) for s, w in self.snapshots],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; the tracked parameter names must match, every value be of its kind."""
        from .serialization import check_keys

        num, opt_num = (int, float), (int, float, type(None))
        kinds = {"decay": num, "lag": opt_num, "min_decay": num, "update_after_step": int, "use_ema_warmup": bool,
                 "inv_gamma": num, "power": num, "snapshot_every": int, "num_snapshots": int, "optimization_step": int,
                 "cur_decay_value": opt_num, "names": list, "shadow": dict, "snapshots": list}
        check_keys(state, kinds, "EMAModel", required=tuple(kinds))
        bad = [n for n, t in state["shadow"].items() if not isinstance(t, torch.Tensor)]
        if bad:
            raise ValueError(f"EMAModel.shadow: expected tensors, found {type(state['shadow'][bad[0]]).__name__} for "
                             f"{bad[0]!r}")
        if list(state["names"]) != self.names:
            raise ValueError(
                f"EMA state tracks {len(state['names'])} parameters that do not match the {len(self.names)} of this "
                "model (different model, or LoRA vs full fine-tune?)"
            )
        for key in ("decay", "lag", "min_decay", "update_after_step", "use_ema_warmup", "inv_gamma", "power",
                    "snapshot_every", "num_snapshots", "optimization_step", "cur_decay_value"):
            setattr(self, key, state[key])
        self.shadow = {n: self._place(t, self.shadow[n]) for n, t in state["shadow"].items()}
        self.snapshots = [
            (s, {n: self._place(t, self.shadow[n]) for n, t in w.items()}) for s, w in state["snapshots"]
        ]

    @staticmethod
    def _place(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(device=like.device, dtype=like.dtype)


class DiffusersEMAView:
    """A diffusers ``EMAModel`` (what ``train_text_to_image.py --use_ema`` keeps) seen as named EMA weights of the
    UNet, so the guard uses it as its baseline without a second copy. Its ``shadow_params`` follow the order of the
    parameters it was built from (``unet.parameters()``, or the trainable ones); they are read at every call, so the
    view follows the loop's ``ema_unet.step(...)`` and ``load_state_dict``. The loop keeps stepping and saving it."""

    snapshots: list = []
    num_snapshots = 0

    def __init__(self, ema: Any, unet: nn.Module) -> None:
        named = list(unet.named_parameters())
        shadow = list(ema.shadow_params)
        for candidates in (named, [(n, p) for n, p in named if p.requires_grad]):
            if len(candidates) == len(shadow) and all(p.shape == s.shape for (_, p), s in zip(candidates, shadow)):
                self.names = [n for n, _ in candidates]
                break
        else:
            raise ValueError(f"ema: the diffusers EMAModel holds {len(shadow)} shadow parameters that match neither "
                             f"the UNet's {len(named)} parameters nor its trainable ones in order and shape; build it "
                             "from the same UNet's parameters()")
        self.ema = ema

    @property
    def optimization_step(self) -> int:
        return int(self.ema.optimization_step)

    def weights(self, source: str | int = "ema") -> dict[str, torch.Tensor]:
        if source != "ema":
            raise IndexError(f"a diffusers EMAModel keeps no snapshots; found source={source!r}")
        return dict(zip(self.names, self.ema.shadow_params))


def as_ema_weights(ema: Any, unet: nn.Module) -> EMAModel | DiffusersEMAView:
    """The EMA as the guard's baselines read it: our :class:`EMAModel` as it is, a diffusers
    ``diffusers.training_utils.EMAModel`` through :class:`DiffusersEMAView`; a ``TypeError`` naming both otherwise."""
    if isinstance(ema, EMAModel):
        return ema
    if type(ema).__name__ == "EMAModel" and hasattr(ema, "shadow_params"):
        return DiffusersEMAView(ema, unet)
    raise TypeError("ema: expected a mnemoguard.ema.EMAModel or a diffusers.training_utils.EMAModel, found "
                    f"{type(ema).__module__}.{type(ema).__name__}")
