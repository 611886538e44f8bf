"""Checkpoint directories ``checkpoint-{step}`` under the output directory: atomic writes, rotation, ``latest``."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ..errors import OutputDirError

_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first (half-written ``.tmp`` directories are ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str | os.PathLike) -> int:
    m = _PATTERN.match(Path(path).name)
    if not m:
        raise ValueError(f"not a checkpoint directory (expected checkpoint-<step>): {path}")
    return int(m.group(1))


def resolve_checkpoint(output_dir: str | os.PathLike, which: str) -> Path | None:
    """``"latest"`` -> the newest checkpoint in ``output_dir`` (``None`` if there is none); else the path given."""
    if which == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(which)
    if not path.is_dir():
        path = Path(output_dir) / which
    if not path.is_dir():
        raise FileNotFoundError(f"training.resume_from_checkpoint: no checkpoint directory {which!r}")
    checkpoint_step(path)
    return path


def temporary_path(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f".checkpoint-{step}.tmp"


def commit(output_dir: str | os.PathLike, step: int) -> Path:
    """Move a fully written temporary checkpoint into place (a rename: readers never see half a checkpoint)."""
    tmp, final = temporary_path(output_dir, step), Path(output_dir) / f"checkpoint-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def rotate(output_dir: str | os.PathLike, total_limit: int | None, keep: set[Path] = frozenset()) -> list[Path]:
    """Delete the oldest checkpoints beyond ``total_limit`` (never those in ``keep``); returns what was removed."""
    if total_limit is None:
        return []
    existing = [p for p in list_checkpoints(output_dir) if p not in keep]
    excess = len(existing) + len(keep) - total_limit
    removed = existing[: max(0, excess)]
    for path in removed:
        shutil.rmtree(path)
    return removed


def claim_output_dir(output_dir: str | os.PathLike, resume: bool, overwrite: bool) -> None:
    """Refuse an output directory that holds an earlier run (checkpoints, ``final/``, ``report/``) unless this run
    resumes it, or ``overwrite`` (then the earlier run's files are removed first)."""
    root = Path(output_dir)
    earlier = sorted(p.name for p in [*list_checkpoints(root), root / "final", root / "report"] if p.exists())
    if not earlier or resume:
        return
    if not overwrite:
        raise OutputDirError(f"training.output_dir={str(root)!r} holds an earlier run ({', '.join(earlier[:4])}); "
                             "resume it (training.resume_from_checkpoint=latest), choose another output_dir, or "
                             "replace it (--overwrite, training.overwrite_output_dir=true)")
    for name in [*earlier, "logs"]:
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
