"""The checkpoints an audit reads, from any trainer: what they are, which step each is, and their weights on the base.

================================  ==============================================================================
what is given                     read as
================================  ==============================================================================
a ``.safetensors`` LoRA file      PEFT / diffusers keys (``unet.*`` / ``transformer.*``: diffusers' scripts,
                                  SimpleTuner, ai-toolkit's Flux), diffusers' older ``lora.down/up``, or kohya's
                                  ``lora_unet_*`` with ``lora_down`` / ``lora_up`` / ``alpha`` (sd-scripts,
                                  musubi-tuner, OneTrainer, ai-toolkit's SD / SDXL) — converted by diffusers'
                                  own loaders (``lora_state_dict`` of the family's pipeline)
an accelerate ``checkpoint-N/``   its ``pytorch_lora_weights.safetensors``, or its ``unet/`` / ``transformer/``
a model folder                    a full fine-tune: ``unet/``, ``transformer/`` or a ``config.json`` of its own
a folder of the above             every LoRA file and checkpoint inside, in step order
================================  ==============================================================================

LyCORIS / LoKr files and kohya's SD3 LoRAs have no diffusers converter: they are one-line errors that say so (and
what would work), as is a file that is not a readable safetensors file or a LoRA whose modules are not the base's.

The step of each comes from its metadata (``ss_steps``, ``global_step``, ``mnemoguard_global_step``,
``modelspec.training_steps``), else its name (``checkpoint-1000``, kohya's ``name-step00001000``, ai-toolkit's
``job_000001000``, OneTrainer's ``…-save-1000-…``), else the order given.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import DataError

__all__ = ["AuditError", "Checkpoint", "applied", "find_checkpoints", "lora_format", "read_lora"]

LORA_FILE = "pytorch_lora_weights.safetensors"
STEP_KEYS = ("mnemoguard_global_step", "ss_steps", "global_step", "modelspec.training_steps", "training_step")
_NAME_PATTERNS = (  # (regex on the file or folder name, what it is)
    (re.compile(r"^checkpoint-(\d+)$"), "accelerate checkpoint-N"),
    (re.compile(r"-step(\d+)(?:\.|$)"), "kohya -stepNNNNNNNN"),
    (re.compile(r"-save-(\d+)-\d+-\d+"), "OneTrainer -save-STEP-EPOCH-STEP"),
    (re.compile(r"_(\d{6,})(?:\.|$)"), "ai-toolkit _NNNNNNNNN"),
)


class AuditError(DataError):
    """A checkpoint the audit cannot read, in one line: which file, why, and what would work."""


@dataclass
class Checkpoint:
    """One checkpoint to audit.

    Attributes:
        path: what it is called (the file or folder as found).
        kind: ``lora`` or ``full``.
        weights: the file (LoRA) or the model folder (full) that holds the weights.
        step: its training step (None until known: then its order).
        step_source: ``metadata``, ``name`` or ``order``.
    """

    path: Path
    kind: str
    weights: Path
    step: int | None = None
    step_source: str = "order"

    @property
    def name(self) -> str:
        return self.path.name

    def fingerprint(self) -> str:
        """sha256 of the weights' bytes (a folder: of its safetensors files, in name order)."""
        h = hashlib.sha256()
        files = [self.weights] if self.weights.is_file() else sorted(self.weights.rglob("*.safetensors"))
        for f in files:
            with open(f, "rb") as stream:
                for block in iter(lambda: stream.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()


def _metadata(file: Path) -> dict[str, str]:
    """A safetensors file's metadata; an :class:`AuditError` when it is not a readable safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        reason = str(err).splitlines()[0] if str(err) else "truncated?"
        raise AuditError(f"{file}: not a readable safetensors file ({type(err).__name__}: {reason}); "
                         "was it still being written?") from None


def _step_from_name(name: str) -> int | None:
    for pattern, _ in _NAME_PATTERNS:
        m = pattern.search(name)
        if m:
            return int(m.group(1))
    return None


def _step(ckpt: Checkpoint) -> None:
    meta_file = ckpt.weights if ckpt.weights.is_file() else None
    if meta_file is not None:
        try:
            meta = _metadata(meta_file)
        except AuditError:  # unreadable: its step from the name; measuring it reports the error
            meta = {}
        for key in STEP_KEYS:
            value = meta.get(key)
            if value is not None and str(value).strip().isdigit():
                ckpt.step, ckpt.step_source = int(value), "metadata"
                return
    for name in (ckpt.path.name, ckpt.path.parent.name if ckpt.path.is_file() else ""):
        step = _step_from_name(name)
        if step is not None:
            ckpt.step, ckpt.step_source = step, "name"
            return


def _one(path: Path) -> Checkpoint | None:
    if path.is_file():
        return Checkpoint(path, "lora", path) if path.suffix == ".safetensors" else None
    if (path / LORA_FILE).is_file():
        return Checkpoint(path, "lora", path / LORA_FILE)
    for sub in ("unet", "transformer"):
        if (path / sub / "config.json").is_file():
            return Checkpoint(path, "full", path / sub)
    if (path / "config.json").is_file():
        return Checkpoint(path, "full", path)
    return None


def find_checkpoints(paths: Sequence[str | Path]) -> list[Checkpoint]:
    """Every checkpoint in ``paths`` (files, checkpoint folders, folders of them), each with its step, sorted by
    step (those without one keep the order given, after the others)."""
    found: list[Checkpoint] = []
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise AuditError(f"--checkpoints: no such file or folder {str(path)!r}")
        one = _one(path)
        if one is not None:
            found.append(one)
            continue
        inside = [c for c in (_one(p) for p in sorted(path.iterdir())) if c is not None] if path.is_dir() else []
        if not inside:
            raise AuditError(f"--checkpoints: {str(path)!r} holds no checkpoint (expected LoRA .safetensors files, "
                             f"checkpoint-N folders with {LORA_FILE} or unet/ / transformer/, or model folders)")
        found.extend(inside)
    for c in found:
        _step(c)
    known = sorted((c for c in found if c.step is not None), key=lambda c: (c.step, c.name))
    unknown = [c for c in found if c.step is None]
    for k, c in enumerate(unknown):  # the order given, after the known steps
        c.step = (known[-1].step if known else 0) + k + 1
    return known + unknown


# ---------------------------------------------------------------------------------------------------- LoRA formats
def lora_format(keys: Sequence[str]) -> str:
    """``lycoris`` (LoKr / LoHa keys), ``kohya`` (``lora_unet_*`` / ``lora_te*``), ``peft`` (``lora_A`` /
    ``lora_B``), ``diffusers`` (the older ``lora.down`` / ``lora.up``) or ``unknown``."""
    keys = list(keys)
    if any(re.search(r"(lokr_w[12]|hada_w[12]|lycoris_|\.lokr_|\.hada_)", k) for k in keys):
        return "lycoris"
    if any(k.startswith(("lora_unet_", "lora_te", "lora_transformer_")) for k in keys):
        return "kohya"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "peft"
    if any(".lora.down." in k or ".lora.up." in k or "_lora.down." in k for k in keys):
        return "diffusers"
    return "unknown"


_MIXINS = {"sd": "StableDiffusionLoraLoaderMixin", "sdxl": "StableDiffusionXLLoraLoaderMixin",
           "sd3": "SD3LoraLoaderMixin", "flux": "FluxLoraLoaderMixin"}


def read_lora(file: Path, family: str) -> tuple[dict[str, Any], dict[str, float] | None, str]:
    """``(state dict with the denoiser's prefix, network alphas or None, the file's format)``, converted by
    diffusers' loader of ``family``; an :class:`AuditError` for what cannot be read."""
    import diffusers.loaders as loaders
    from safetensors import safe_open

    _metadata(file)  # a one-line error for a truncated or foreign file
    with safe_open(str(file), "pt") as f:
        keys = list(f.keys())  # the names only: the tensors are read once, by diffusers' loader
    fmt = lora_format(keys)
    if fmt == "lycoris":
        raise AuditError(f"{file}: a LyCORIS / LoKr file (keys like {keys[0]!r}); diffusers has no loader for it. "
                         "Save the LoRA as plain LoRA (SimpleTuner --lora_type standard, kohya networks.lora) or "
                         "merge it into the model and audit the model folder")
    if fmt == "kohya" and family == "sd3":
        raise AuditError(f"{file}: a kohya-format SD3 LoRA; diffusers has no converter for it (it would load with no "
                         "effect, sd-scripts #1743). Convert it to diffusers / PEFT keys, or audit the merged model")
    if fmt == "unknown":
        raise AuditError(f"{file}: not a LoRA file diffusers can read (keys like {keys[:2]}); expected PEFT "
                         "(lora_A / lora_B), diffusers or kohya (lora_unet_*) keys")
    mixin = getattr(loaders, _MIXINS[family])
    try:
        out = mixin.lora_state_dict(str(file))
    except Exception as err:
        raise AuditError(f"{file}: diffusers' {_MIXINS[family]} could not read it ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None
    state, alphas = (out if isinstance(out, tuple) else (out, None))[:2]
    return dict(state), alphas, fmt


def _check_fits(model: nn.Module, state: dict[str, Any], prefix: str, file: Path) -> None:
    """An :class:`AuditError` naming the LoRA's modules the base model lacks."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    sub = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
    if not sub:
        raise AuditError(f"{file}: no LoRA weights for the {prefix} (keys start with "
                         f"{sorted({k.split('.')[0] for k in state})}); is it a text-encoder-only LoRA?")
    targets = {k.split(".lora_")[0] for k in convert_unet_state_dict_to_peft(sub)}
    names = {n for n, _ in model.named_modules()}
    missing = sorted(targets - names)
    if missing:
        raise AuditError(f"{file}: the LoRA does not fit the base model: {len(missing)} of its {len(targets)} "
                         f"modules are not in the base's {type(model).__name__}, e.g. {missing[:3]}")


@contextlib.contextmanager
def applied(checkpoint: Checkpoint, model: nn.Module, family: str, adapter: str = "audit") -> Iterator[str]:
    """The checkpoint's weights in ``model`` for the block: a LoRA loaded as a peft adapter (removed on exit), or a
    full model's weights (the base's put back on exit). Yields the LoRA file's format (``full`` for a model)."""
    import torch

    if checkpoint.kind == "full":
        import diffusers

        config_file = checkpoint.weights / "config.json"
        class_name = json.loads(config_file.read_text()).get("_class_name", type(model).__name__)
        cls = getattr(diffusers, class_name, type(model))
        loaded = cls.from_pretrained(str(checkpoint.weights))
        base = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}  # not a 2nd copy on GPU
        try:
            missing = model.load_state_dict(loaded.state_dict(), strict=False)
        except RuntimeError as err:
            reason = str(err).splitlines()[0]
            raise AuditError(f"{checkpoint.weights}: the model does not fit the base ({reason})") from None
        if missing.missing_keys or missing.unexpected_keys:
            model.load_state_dict(base)
            raise AuditError(f"{checkpoint.weights}: the model does not fit the base: missing "
                             f"{missing.missing_keys[:3]}, unexpected {missing.unexpected_keys[:3]}")
        try:
            yield "full"
        finally:
            model.load_state_dict(base)
        return
    prefix = "unet" if family in ("sd", "sdxl") else "transformer"
    state, alphas, fmt = read_lora(checkpoint.weights, family)
    _check_fits(model, state, prefix, checkpoint.weights)
    try:
        with torch.no_grad():
            model.load_lora_adapter(state, prefix=prefix, network_alphas=alphas, adapter_name=adapter)
    except (RuntimeError, ValueError, KeyError) as err:
        raise AuditError(f"{checkpoint.weights}: the LoRA does not fit the base model "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    try:
        yield fmt
    finally:
        model.delete_adapters(adapter)
