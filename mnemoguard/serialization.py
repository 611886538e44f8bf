"""Plain data in and out: JSON-safe values for reports, and the run state as JSON + safetensors.

Nothing of the project's goes through pickle: a checkpoint's guard state is a JSON document (numbers, strings, lists,
dicts) whose tensors (EMA weights, generator states, running-mean tables) are stored in a safetensors file next to it
and referenced by key. Loading either can build only those types, so a crafted checkpoint cannot run code; a
document of the wrong shape is an error naming the file and the key (:func:`check_keys`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import StateFormatError

__all__ = ["StateFormatError", "check_keys", "load_state_files", "save_state_files", "to_jsonable", "write_atomic"]

_TENSOR = "__tensor__"




def to_jsonable(obj: Any, finite: bool = True) -> Any:
    """A deep copy made of dicts (string keys), lists, strings, numbers, booleans and None: tensors and numpy arrays
    become lists, numpy scalars Python numbers, paths strings, sets sorted lists; with ``finite``, NaN and infinities
    become None (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, finite) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, finite) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [to_jsonable(v, finite) for v in sorted(obj)]
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return to_jsonable(obj.tolist(), finite)
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, float) and finite and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"to_jsonable: {type(obj).__name__} is not plain data")


def check_keys(state: Any, kinds: Mapping[str, Any], where: str, required: tuple[str, ...] = ()) -> None:
    """``state`` must be a mapping whose keys are in ``kinds`` (with values of those types) and include
    ``required``; a :class:`StateFormatError` names ``where`` and the key otherwise."""
    if not isinstance(state, Mapping):
        raise StateFormatError(f"{where}: expected a mapping, found {type(state).__name__}")
    unknown = sorted(set(state) - set(kinds))
    if unknown:
        raise StateFormatError(f"{where}: unexpected key(s) {unknown}; expected {sorted(kinds)}")
    missing = [k for k in required if k not in state]
    if missing:
        raise StateFormatError(f"{where}: missing key(s) {missing}")
    for key, value in state.items():
        kind = kinds[key]
        if kind is None:
            continue
        allowed = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            expected = " or ".join(k.__name__ for k in allowed)
            raise StateFormatError(f"{where}.{key}: expected {expected}, found {type(value).__name__} {value!r:.80}")


def _split(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").contiguous().clone()
        return {_TENSOR: path}
    if isinstance(obj, Mapping):
        bad = [k for k in obj if not isinstance(k, str)]
        if bad:
            raise TypeError(f"{path}: state keys must be strings, found {bad[:3]}")
        return {k: _split(v, f"{path}/{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    return to_jsonable(obj, finite=False)


def _join(obj: Any, tensors: Mapping[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            key = obj[_TENSOR]
            if key not in tensors:
                raise StateFormatError(f"{where}: the document refers to tensor {key!r}, which the safetensors file "
                                       "does not hold")
            return tensors[key]
        return {k: _join(v, tensors, where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors, where) for v in obj]
    return obj


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file (named after this process) renamed into place: a reader,
    another process writing the same file, or a kill never leaves a half-written ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)


def save_state_files(state: Mapping[str, Any], directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write ``state`` as ``<name>.json`` (the document) + ``<name>.safetensors`` (its tensors) in ``directory``;
    each written to a temporary file and renamed into place. Returns both paths."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    document = _split(dict(state), "", tensors)
    doc_path, tensor_path = directory / f"{name}.json", directory / f"{name}.safetensors"
    write_atomic(doc_path, json.dumps(document))
    tmp = tensor_path.with_name(tensor_path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, tensor_path)
    return doc_path, tensor_path


def load_state_files(directory: str | os.PathLike, name: str) -> dict[str, Any] | None:
    """Read what :func:`save_state_files` wrote (None when ``<name>.json`` is absent). Only JSON and safetensors are
    parsed; a malformed file is a :class:`StateFormatError` naming it."""
    from safetensors.torch import load_file

    doc_path, tensor_path = Path(directory) / f"{name}.json", Path(directory) / f"{name}.safetensors"
    if not doc_path.is_file():
        return None
    try:
        document = json.loads(doc_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StateFormatError(f"{doc_path}: not a JSON document ({e})") from None
    try:
        tensors = load_file(str(tensor_path)) if tensor_path.is_file() else {}
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise StateFormatError(f"{tensor_path}: not a safetensors file ({e})") from None
    if not isinstance(document, dict):
        raise StateFormatError(f"{doc_path}: expected a JSON object at the top, found {type(document).__name__}")
    return _join(document, tensors, str(doc_path))
