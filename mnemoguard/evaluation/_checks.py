"""Input validation shared by the evaluation metrics.

Every check raises with what was expected and what was found; nothing is silently reshaped, rescaled or cast
beyond turning array-likes into tensors / arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

ArrayLike = Any  # torch.Tensor | np.ndarray | sequence of numbers


def as_tensor(x: ArrayLike, name: str, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Turn ``x`` into a tensor (no copy for tensors of the right dtype); reject non-numeric input."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be a tensor or array of numbers; got {type(x).__name__}") from err
    if t.dtype == torch.bool or t.is_complex():
        if dtype is None:
            return t
        if t.is_complex():
            raise TypeError(f"{name} must be real-valued; got dtype {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t


def as_numpy_1d(x: ArrayLike, name: str) -> np.ndarray:
    """A 1-D float64 numpy array from a tensor / array / sequence; checks dimension and finiteness."""
    if isinstance(x, torch.Tensor):
        arr = x.detach().cpu().numpy()
    else:
        arr = np.asarray(x)
    if arr.dtype == object:
        raise TypeError(f"{name} must be numeric; got an object array")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {tuple(arr.shape)}")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        bad = int(np.sum(~np.isfinite(arr)))
        raise ValueError(f"{name} must be finite; found {bad} NaN/inf value(s) out of {arr.size}")
    return arr


def check_finite(t: torch.Tensor, name: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} must be finite; found {bad} NaN/inf value(s) out of {t.numel()}")


def check_binary(t: torch.Tensor, name: str) -> torch.Tensor:
    """Return ``t`` as a bool tensor if it holds only 0/1 (or is bool); raise otherwise."""
    if t.dtype == torch.bool:
        return t
    is_zero = t == 0
    is_one = t == 1
    if not bool((is_zero | is_one).all()):
        bad = t[~(is_zero | is_one)]
        raise ValueError(
            f"{name} must be binary (bool, or only the values 0 and 1); found {bad.numel()} other value(s), "
            f"e.g. {bad.flatten()[0].item()!r}. Binarize it first (Kim & Lee use mask > 0.5)."
        )
    return is_one


def check_range(t: torch.Tensor, name: str, low: float, high: float) -> None:
    if t.numel() == 0:
        return
    lo, hi = float(t.min()), float(t.max())
    if lo < low or hi > high:
        raise ValueError(f"{name} must lie in [{low:g}, {high:g}]; found values in [{lo:g}, {hi:g}]")


def check_probability(value: float, name: str, *, open_low: bool = True, open_high: bool = True) -> None:
    ok_low = value > 0 if open_low else value >= 0
    ok_high = value < 1 if open_high else value <= 1
    if not (ok_low and ok_high):
        lb = "(" if open_low else "["
        rb = ")" if open_high else "]"
        raise ValueError(f"{name} must be in {lb}0, 1{rb}; got {value!r}")


def check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
