"""The monitor's numbers recomputed independently: a probe row's noisy input rebuilt from the schedule, the UNet called
directly (live, unconditional, EMA weights by torch.func.functional_call), the gaps and the loss by hand, then the band
means and the contrasts with their signs. And the per-band aggregation keeps bands apart."""

import math

import torch

from mnemoguard.callbacks.monitor import aggregate

from ._guard_run import guarded_run


def _by_hand(run, band: str) -> dict[str, float]:
    """The check's band means and contrasts for ``band``, recomputed from the probe tensors and the live model."""
    mon = run.monitor
    tz, context = mon._tensors, mon._context
    unet = context.unwrapped_model.eval()
    lo, hi = mon.bands[band]
    ab = run.trainer.components.noise_scheduler.alphas_cumprod.double()  # diffusers' own table, not our schedule
    ema = context.ema.weights("ema")
    per_probe: dict[str, dict[int, list[float]]] = {"live_vs_ema": {}, "wen_gap": {}, "probe_loss": {}}
    with torch.no_grad():
        for row in range(tz.t.shape[0]):
            t = int(tz.t[row])
            if not lo <= t < hi:
                continue
            a = ab[t]
            x_t = (a.sqrt() * tz.x0[row].double() + (1 - a).sqrt() * tz.noise[row].double()).float()[None]
            tt = torch.tensor([t])
            eps_c = unet(x_t, tt, encoder_hidden_states=tz.cond.embeds[row][None]).sample
            eps_u = unet(x_t, tt, encoder_hidden_states=tz.uncond.embeds).sample
            kw = {"encoder_hidden_states": tz.cond.embeds[row][None]}
            eps_e = torch.func.functional_call(unet, dict(ema), (x_t, tt), kw, strict=False).sample
            p = int(tz.probe[row])
            per_probe["live_vs_ema"].setdefault(p, []).append(float((eps_c - eps_e).double().norm()))
            per_probe["wen_gap"].setdefault(p, []).append(float((eps_c - eps_u).double().norm()))
            per_probe["probe_loss"].setdefault(p, []).append(float((eps_c - tz.noise[row]).double().pow(2).mean()))
    P = tz.num_train_probes
    out = {}
    for sig, probes in per_probe.items():
        means = {p: sum(v) / len(v) for p, v in probes.items()}
        train = [m for p, m in means.items() if p < P]
        held = [m for p, m in means.items() if p >= P]
        out[f"{sig}/train"], out[f"{sig}/heldout"] = sum(train) / len(train), sum(held) / len(held)
    out["live_vs_ema/contrast"] = out["live_vs_ema/train"] - out["live_vs_ema/heldout"]  # gaps: train - held-out
    out["wen_gap/contrast"] = out["wen_gap/train"] - out["wen_gap/heldout"]
    out["probe_loss/contrast"] = out["probe_loss/heldout"] - out["probe_loss/train"]  # loss: held-out - train
    return out


def test_a_check_recomputed_by_hand_matches_the_logged_values_band_by_band():
    run = guarded_run()
    logged = run.monitor.history[-1]["metrics"]  # the last check, at the weights the run ended with
    for band in ("low", "mid", "high"):
        expected = _by_hand(run, band)
        for key, value in expected.items():
            sig, part = key.split("/")
            got = logged[f"mem/{sig}/band={band}/{part}"]
            assert math.isclose(got, value, rel_tol=1e-4, abs_tol=1e-6), (band, key, got, value)
    # The contrasts' signs are not the same formula for gaps and loss: a flipped sign would show.
    assert logged["mem/probe_loss/band=mid/contrast"] == (logged["mem/probe_loss/band=mid/heldout"]
                                                          - logged["mem/probe_loss/band=mid/train"])


def test_aggregation_keeps_every_band_to_its_own_rows():
    bands = {"low": (0, 10), "mid": (10, 20), "high": (20, 30)}
    t = torch.tensor([1, 15, 25, 5, 12, 28, 2, 11, 21])  # 3 probes x 3 bands
    probe = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    values = torch.zeros(9, 4, dtype=torch.float64)
    values[:, 1] = torch.tensor([1.0, 10.0, 100.0, 2.0, 20.0, 200.0, 4.0, 40.0, 400.0])  # wen_gap column
    metrics, per_probe = aggregate(values, t, probe, bands, {"wen_gap": "wen_gap"}, num_train_probes=2,
                                   has_heldout=True)
    assert metrics["mem/wen_gap/band=low/train"] == 1.5 and metrics["mem/wen_gap/band=low/heldout"] == 4.0
    assert metrics["mem/wen_gap/band=mid/train"] == 15.0 and metrics["mem/wen_gap/band=high/train"] == 150.0
    assert metrics["mem/wen_gap/band=high/contrast"] == 150.0 - 400.0
    assert per_probe["wen_gap"]["mid"] == {"train": [10.0, 20.0], "heldout": [40.0]}
    nan = values.clone()
    nan[4, 1] = float("nan")  # a diverged measurement stays non-finite in its band, never dropped
    metrics, _ = aggregate(nan, t, probe, bands, {"wen_gap": "wen_gap"}, 2, True)
    assert math.isnan(metrics["mem/wen_gap/band=mid/train"]) and metrics["mem/wen_gap/band=low/train"] == 1.5
