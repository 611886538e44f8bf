"""MemorizationReport: report.md, PNG plots and a parseable summary.json after a real run; the safetensors metadata;
the per-probe verdict rules."""

import json
from types import SimpleNamespace

import pytest
from safetensors import safe_open

from mnemoguard.callbacks import TrainerState, memorization_metadata
from mnemoguard.callbacks.report import overall_verdict, probe_verdicts
from mnemoguard.config import ConfigError, ReportConfig

from ._guard_run import SIGNAL, guarded_run


def test_report_files_after_a_tiny_run():
    run = guarded_run()
    report = run.out / "report"
    assert (report / "report.md").is_file() and (report / "summary.json").is_file()
    summary = json.loads((report / "summary.json").read_text())
    assert summary["plots"] and all((report / name).is_file() for name in summary["plots"])
    assert {"signal_live_vs_ema.png", "verdicts.png", "generations.png"} <= set(summary["plots"])
    assert summary["run"]["global_step"] == 4 and summary["run"]["stop_step"] is None
    assert summary["verdict"] in ("ok", "suspect", "memorized")
    assert [s for s, _ in summary["curves"]["mem/live_vs_ema/band=mid/train"]] == [2, 4]
    assert len(summary["alarms"]) == 1 and summary["alarms"][0]["action"] == "gaussian_embedding_noise"
    assert summary["actions"]["gaussian_embedding_noise"]["strength"] == 1.0
    assert [v["split"] for v in summary["verdicts"]] == ["train"] * 4 + ["heldout"] * 2
    assert summary["monitor"]["bands"] == {"low": [0, 333], "mid": [333, 666], "high": [666, 1000]}
    text = (report / "report.md").read_text()
    assert "# Memorization report" in text and "![live_vs_ema](signal_live_vs_ema.png)" in text
    # What the decisions watched, with the rule's levels recomputed from its settings (release = 80 % of the
    # on-level by default), drawn first; the contrasts expected to run negative say so.
    assert summary["watched"] == [{"signal": SIGNAL, "by": f"rule gaussian_embedding_noise<-{SIGNAL}",
                                   "levels": {"threshold": 1e-9, "release": pytest.approx(0.8e-9)}}]
    assert "watched.png" in summary["plots"] and text.index("![watched](watched.png)") < text.index("## Alarms")
    assert set(summary["monitor"]["caveats"]) == {"live_vs_ema", "wen_gap"}
    assert "Note: the `wen_gap` contrast is expected negative with held-out image probes" in text

    meta = memorization_metadata(run.state, run.monitor, run.policy, loss_flags=run.loss_flags)
    assert meta and all(k.startswith("mnemoguard_") and isinstance(v, str) for k, v in meta.items())
    assert meta["mnemoguard_global_step"] == "4" and meta["mnemoguard_alarms"] == "1"
    assert json.loads(meta["mnemoguard_bands"])["mid"] == [333, 666]
    # The exported UNet carries it (and keeps its own keys); the frozen text encoder is left alone.
    with safe_open(str(run.out / "final" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        stamped = f.metadata()
    assert stamped["format"] == "pt" and stamped["mnemoguard_verdict"] == summary["verdict"]
    assert stamped["mnemoguard_report"] == "report/report.md"
    with safe_open(str(run.out / "final" / "text_encoder" / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("mnemoguard_") for k in (f.metadata() or {}))


def _fake_monitor(train_gap, heldout_gap, visual=None):
    probes = [{"id": i, "split": "train", "kind": "duplicate", "index": 10 + i, "caption": f"c{i}"}
              for i in range(len(train_gap))]
    probes += [{"id": len(train_gap) + j, "split": "heldout", "kind": "captions", "index": j, "caption": f"h{j}"}
               for j in range(len(heldout_gap))]
    entry = {"step": 10, "metrics": {}, "per_probe": {"live_vs_ema": {"mid": {"train": train_gap,
                                                                               "heldout": heldout_gap}}}}
    if visual:
        entry["visual"] = visual
    return SimpleNamespace(probes=lambda: probes, history=[entry], has_heldout=True)


def test_verdict_rules():
    import torch

    mon = _fake_monitor([1.0, 4.0, 1.0], [1.0, 2.0],
                        visual={"probe_ids": [0], "nn_ratio": [0.1], "nearest_is_own": [True]})
    counts = torch.zeros(2, 20, dtype=torch.float64)
    counts[:, 12] = torch.tensor([5.0, 9.0])  # row 12 (probe 2) flagged 5 of the 9 times it was trained on
    counts[1, 10:12] = 7.0
    flags = SimpleNamespace(row_counts=counts)
    v = {p["id"]: p for p in probe_verdicts(mon, ReportConfig(heldout_factor=1.5, min_flags=3), flags)}
    assert v[0]["verdict"] == "memorized" and "copies" in v[0]["reasons"][0]
    assert v[1]["verdict"] == "suspect" and "held-out max" in v[1]["reasons"][0]  # 4.0 > 1.5 x 2.0
    assert v[2]["verdict"] == "suspect" and "flagged it 5 of the 9 times" in v[2]["reasons"][0]
    assert (v[2]["flags"], v[2]["seen"]) == (5, 9) and probe_verdicts(mon)[2]["flags"] is None  # no rows known
    assert v[3]["verdict"] == v[4]["verdict"] == "held-out"
    assert v[1]["values"] == {"live_vs_ema": {"mid": 4.0}}
    assert overall_verdict(list(v.values())) == "memorized"
    clean = probe_verdicts(_fake_monitor([1.0], [1.0]))
    assert overall_verdict(clean) == "ok" and overall_verdict([]) == "unknown"
    meta = memorization_metadata(TrainerState(global_step=3, stop_reason="stop"), verdicts=[])
    assert meta["mnemoguard_stop_step"] == "3" and meta["mnemoguard_verdict"] == "unknown"
    with pytest.raises(ConfigError, match="min_flags"):
        ReportConfig(min_flags=0)
