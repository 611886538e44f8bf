"""``mnemoguard audit --watch DIR``: live monitoring of any trainer by its checkpoints.

Every ``poll_seconds`` the folder is listed (:func:`~mnemoguard.audit.checkpoints.find_checkpoints`); a checkpoint
is measured once it is *settled*: the sizes and modification times of its files were the same at two successive
polls (a trainer still writing it changes them) and, for a safetensors file, its header reads. Each verdict is
printed and the outputs are rewritten with it; on a ``copying`` verdict ``on_copy`` runs as
``<CMD> <checkpoint> <step>`` (a shell command line with the two arguments appended, quoted).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .checkpoints import AuditError, Checkpoint, find_checkpoints
from .settings import AuditSettings

__all__ = ["settled", "watch"]


def _signature(c: Checkpoint) -> tuple:
    files = [c.weights] if c.weights.is_file() else sorted(p for p in c.path.rglob("*") if p.is_file())
    out = []
    for f in files:
        try:
            st = f.stat()
        except FileNotFoundError:  # renamed away between the listing and here
            return ("gone",)
        out.append((str(f), st.st_size, st.st_mtime_ns))
    return tuple(out)


def settled(previous: dict[str, tuple], found: list[Checkpoint]) -> tuple[list[Checkpoint], dict[str, tuple]]:
    """``(the checkpoints whose files did not change since the previous poll, this poll's signatures)``."""
    now = {str(c.path): _signature(c) for c in found}
    ready = [c for c in found if previous.get(str(c.path)) == now[str(c.path)] and now[str(c.path)] != ("gone",)]
    return ready, now


def _list(directory: str) -> list[Checkpoint]:
    try:
        return find_checkpoints([directory])
    except AuditError:  # nothing there yet
        return []


def watch(settings: AuditSettings, directory: str, on_copy: str | None = None, poll_seconds: float = 10.0,
          max_checkpoints: int | None = None, progress: bool = False) -> int:
    """Watch ``directory`` until interrupted (or ``max_checkpoints`` measured); returns the exit status."""
    from .outputs import write_outputs
    from .run import Auditor

    Path(directory).mkdir(parents=True, exist_ok=True)
    auditor: Any = None
    signatures: dict[str, tuple] = {}
    done: set[str] = set()
    print(f"mnemoguard audit: watching {directory} every {poll_seconds:g} s (Ctrl-C to stop)", flush=True)
    try:
        while max_checkpoints is None or len(done) < max_checkpoints:
            ready, signatures = settled(signatures, _list(directory))
            for c in (c for c in ready if str(c.path) not in done):
                if auditor is None:
                    auditor = Auditor(settings, [c])
                done.add(str(c.path))
                row = auditor.measure(c)
                if row is None:
                    continue
                result = auditor.result()
                if auditor.is_main:
                    write_outputs(result, settings)
                verdict = next(r["verdict"] for r in result.rows if r["file"] == str(c.path))
                print(f"step {c.step:>7}  {verdict:<8} copy rate {row['copy_rate']:.2f}  {c.path}", flush=True)
                if verdict == "copying" and on_copy and auditor.is_main:
                    command = f"{on_copy} {shlex.quote(str(c.path))} {int(c.step)}"
                    rc = subprocess.call(command, shell=True)
                    print(f"mnemoguard audit: --on-copy ran `{command}` (exit {rc})", flush=True)
                if max_checkpoints is not None and len(done) >= max_checkpoints:
                    break
            else:
                time.sleep(poll_seconds)
    except KeyboardInterrupt:
        print("mnemoguard audit: stopped watching", file=sys.stderr)
    return 0
