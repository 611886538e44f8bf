"""The end of a guarded run: what was exported, and a last check that every process must take part in."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["EXPORT_SOURCES", "every_rank", "exported_weights"]

EXPORT_SOURCES = ("last", "best", "ema", "last finite checkpoint")


def exported_weights(exported: str | Mapping[str, Any] | None, step: int, ema: Any) -> dict[str, Any] | None:
    """``{"source", "step"}`` from what ``Guard.end(exported=...)`` was given (a source name or a mapping; None: the
    last weights). ``"ema"`` needs an EMA the guard can read (yours through ``Guard(ema=...)``, or its own)."""
    if exported is None:
        return None
    out = {"source": exported} if isinstance(exported, str) else dict(exported)
    source = out.get("source", "last")
    if source not in EXPORT_SOURCES:
        raise ValueError(f"Guard.end: exported must be one of {EXPORT_SOURCES[:3]} (or a mapping with 'source'); "
                         f"found {source!r}")
    if source == "ema" and ema is None:
        raise ValueError("Guard.end(exported='ema'): the guard has no EMA to measure; pass your EMA to Guard(ema=...) "
                         "(diffusers' --use_ema EMAModel) or let the guard keep one (ema=True)")
    out["source"] = source
    out.setdefault("step", int(step))
    return out


@contextlib.contextmanager
def every_rank(what: str, num_processes: int) -> Iterator[None]:
    """Turn the error a collective raises when the other processes have left (``what`` was called on one rank only,
    e.g. inside ``if accelerator.is_main_process:``) into one line that says what to do."""
    if num_processes <= 1:
        yield
        return
    try:
        yield
    except RuntimeError as err:  # gloo / NCCL: DistBackendError is a RuntimeError
        text = str(err)
        if not any(k in text for k in ("Connection closed", "Connection reset", "Broken pipe", "DistBackendError",
                                       "timed out", "Timeout")) and type(err).__name__ != "DistBackendError":
            raise
        raise RuntimeError(f"{what} must be called on every process ({num_processes} here): its last check splits its "
                           "probes across them. Call it outside `if accelerator.is_main_process:` (the other "
                           f"processes had left: {text.splitlines()[0] if text else type(err).__name__})") from err
