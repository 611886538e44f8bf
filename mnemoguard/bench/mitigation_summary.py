"""The mitigation table and early stopping vs the oracle, from ``mnemoguard bench`` runs of several arms and seeds.

    python scripts/summarize_mitigation.py outputs/mitigation/*_s? --out docs/bench

Each run's arm is its ``train.mitigation`` (``+ stop`` with ``train.stop``: the guard's stop rule live); ``none``
of the same seed is its reference. Of the weights each run exports (a stopped run: its rollback checkpoint's):

* **memorized**: planted captions' generations that reproduce their training image (d1/d2 < 1/3), at w = 1 and at
  the users' guidance; ratio to the unmitigated run (target <= 1/10);
* **held-out loss**: the denoising loss of held-out image + caption pairs, mean over the noise bands (each band's
  loss at fixed noise draws); change relative to the unmitigated run (target <= +5 %);
* **fidelity**: the share of never-trained captions' generations a pixel classifier assigns to the class they name;
  difference to the unmitigated run in points (target within 2).

Early stopping is replayed on the unmitigated runs' monitor curves with the real
:class:`~mnemoguard.callbacks.early_stopping.EarlyStopping` (one rule, several thresholds): its stop step beside the
oracle step, the first checkpoint where the ground truth reaches 5 % memorized (and where it reaches 10 %).
"""

from __future__ import annotations

import statistics
from typing import Any

from .summary import _cell, onset_step

__all__ = ["STOPPED", "arm_metrics", "arm_name", "early_stop_step", "mitigation_markdown", "stopping_markdown"]

TARGETS = {"ratio": 0.1, "heldout_change": 0.05, "fidelity_points": 2.0}


def arm_metrics(run: dict[str, Any]) -> dict[str, float]:
    """Memorized fractions, held-out loss and fidelity of the weights a run exports (``exported``: after a stop and
    rollback, the rollback checkpoint's; bench.json files written before it existed: the last checkpoint)."""
    cp = run.get("exported") or run["checkpoints"][-1]
    ws = sorted(cp["ground_truth"], key=lambda w: float(w.split("=")[1]))
    guided = ws[-1]
    fid = cp.get("fidelity", {})
    held = cp["loss_by_band"].get("held_out")
    return {
        "step": cp["step"],
        "mem_w1": cp["ground_truth"]["w=1"]["planted"]["memorized_fraction"]["fraction"],
        "mem_guided": cp["ground_truth"][guided]["planted"]["memorized_fraction"]["fraction"],
        "guided": float(guided.split("=")[1]),
        "heldout_loss": statistics.fmean(held) if held else float("nan"),
        "fidelity_w1": fid.get("w=1", {}).get("negatives", float("nan")),
        "fidelity_guided": fid.get(guided, {}).get("negatives", float("nan")),
    }


STOPPED = " + stop"  # suffix of an arm run with the guard's stop rule live (train.stop: true)


def arm_name(run: dict[str, Any]) -> str:
    """``train.mitigation``, with :data:`STOPPED` when the run had the stop rule on."""
    train = run["config"]["train"]
    return train.get("mitigation", "none") + (STOPPED if train.get("stop") else "")


def _arms(runs: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    """Each arm's exported metrics by seed, with the step its run ended at (``stopped_at``: the stop, for a run
    that stopped)."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for run in runs:
        out.setdefault(arm_name(run), {})[run["seed"]] = {**arm_metrics(run), "stopped_at": run.get("steps")}
    return out


def _vs(pairs: list[tuple[dict[str, float], dict[str, float] | None]], key: str, mode: str) -> list[float | None]:
    """Each seed's ``key`` against the unmitigated run of the same seed: ratio, relative change, or points."""
    out: list[float | None] = []
    for arm, ref in pairs:
        if ref is None or (mode == "ratio" and ref[key] <= 0):
            out.append(None)
        elif mode == "ratio":
            out.append(arm[key] / ref[key])
        elif mode == "change":
            out.append(arm[key] / ref[key] - 1)
        else:
            out.append(100 * (arm[key] - ref[key]))
    return out


def mitigation_markdown(runs: list[dict[str, Any]]) -> str:
    """The table: each arm's metrics (mean over seeds, then each seed) and its change vs ``none`` of the same seed;
    an arm run with the stop rule (``<arm> + stop``) is read at the weights it exported (the stop and the rollback
    step in its first cell)."""
    arms = _arms(runs)
    if "none" not in arms:
        raise ValueError(f"expected unmitigated runs (train.mitigation=none) among the arms, found {sorted(arms)}")
    ref = arms["none"]
    plain = ["none", *sorted(a for a in arms if a != "none" and not a.endswith(STOPPED))]
    order = [*plain, *sorted(a for a in arms if a.endswith(STOPPED))]
    g = next(iter(ref.values()))["guided"]
    lines = [
        f"| arm | seeds | memorized w=1 | memorized w={g:g} | ratio to none (w=1, w={g:g}) | held-out loss | "
        f"vs none | fidelity w=1 | fidelity w={g:g} | vs none (points, w={g:g}) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in order:
        seeds = sorted(arms[arm])
        m = [arms[arm][s] for s in seeds]
        pairs = [(arms[arm][s], ref.get(s)) for s in seeds]
        dash = arm == "none"
        ratio = f"{_cell(_vs(pairs, 'mem_w1', 'ratio'))}; {_cell(_vs(pairs, 'mem_guided', 'ratio'))}"
        read = ", ".join(f"{x['stopped_at']} → {int(x['step'])}" for x in m)
        steps = f" (ended at → exported: {read})" if arm.endswith(STOPPED) else ""
        lines.append(
            f"| {arm}{steps} | {','.join(map(str, seeds))} | {_cell([x['mem_w1'] for x in m], 100, 1)} % | "
            f"{_cell([x['mem_guided'] for x in m], 100, 1)} % | {'1' if dash else ratio} | "
            f"{_cell([x['heldout_loss'] for x in m], 1, 4)} | "
            f"{'-' if dash else _cell(_vs(pairs, 'heldout_loss', 'change'), 100, 1) + ' %'} | "
            f"{_cell([x['fidelity_w1'] for x in m], 100, 1)} % | "
            f"{_cell([x['fidelity_guided'] for x in m], 100, 1)} % | "
            f"{'-' if dash else _cell(_vs(pairs, 'fidelity_guided', 'points'), 1, 1)} |"
        )
    return "\n".join(lines)


def early_stop_step(history: list[dict[str, Any]], monitor: str, threshold: float, mode: str = "min",
                    patience: int | None = None, start_from_step: int = 0, rollback: str = "best"
                    ) -> tuple[int | None, int | None]:
    """``(stop step, rollback step)`` of :class:`EarlyStopping` with ``divergence_threshold=threshold`` replayed on a
    logged curve (``rollback="last_good"``: the default stop rule's rollback to the last check before the stop)."""
    from ..callbacks import TrainerControl, TrainerState
    from ..callbacks.early_stopping import EarlyStopping

    es = EarlyStopping(monitor=monitor, mode=mode, patience=patience, divergence_threshold=threshold,
                       start_from_step=start_from_step, rollback=rollback)
    state, control = TrainerState(), TrainerControl()
    for row in history:
        if monitor not in row or row[monitor] is None or row["step"] < start_from_step:
            continue
        state.global_step = row["step"]
        es.check(float(row[monitor]), state, control)
        if control.should_training_stop:
            return row["step"], es.best_step
    return None, None


def stopping_markdown(runs: list[dict[str, Any]], monitor: str, thresholds: list[float], rollback: str = "best"
                      ) -> str:
    """Oracle steps (5 % and 10 % memorized at w = 1) and the replayed stop step per threshold, per seed."""
    ref = sorted((r for r in runs if arm_name(r) == "none"), key=lambda r: r["seed"])
    head = "| seed | checkpoints every | oracle (5 %) | passes 10 % | " + " | ".join(
        f"stop at {monitor.removeprefix('mem/')} >= {t:g}" for t in thresholds) + " |"
    lines = [head, "|" + "---|" * (4 + len(thresholds))]
    for run in ref:
        oracle, ten = onset_step(run, 0.05), onset_step(run, 0.10)
        every = run["config"]["train"]["eval_every"]
        cells = []
        for t in thresholds:
            stop, back = early_stop_step(run["monitor"], monitor, t, rollback=rollback)
            if stop is None:
                cells.append("no stop")
                continue
            verdict = ""
            if oracle is not None:
                ok = abs(stop - oracle) <= 0.1 * oracle and (ten is None or stop < ten)
                verdict = f" ({stop / oracle - 1:+.0%}{', ok' if ok else ''})"
            cells.append(f"{stop}{verdict}" + (f", rollback {back}" if rollback == "last_good" else ""))
        lines.append(f"| {run['seed']} | {every} | {oracle} | {ten} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
