"""The danger-zone tracker: on an analytic denoiser that memorizes its training points in a known noise band, the
live measurement finds that band; the band logic and its hysteresis; the tracker in a real guarded run (scalars,
state round trip, the noise gap following the band, the default stop rule)."""

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from mnemoguard.callbacks.danger_zone import band_from_excess, band_timesteps, return_flags, return_profile
from mnemoguard.denoiser import Denoiser
from mnemoguard.sampling import denoise_from, sampling_steps
from mnemoguard.signals import empirical_optimal_denoiser, sigmas_from_alphas_cumprod


class BandMemorizer(torch.nn.Module):
    """An ε-prediction model with ``UNet2DConditionModel``'s call signature whose clean-image estimate is the
    empirical optimal denoiser of ``train`` (it returns training points: memorization) for σ_t in ``[lo, hi]``, and
    the posterior mean of a Gaussian fitted to the data elsewhere (it generalizes)."""

    def __init__(self, train: torch.Tensor, alphas_cumprod: torch.Tensor, lo: float, hi: float) -> None:
        super().__init__()
        self.train_points, self.abar, self.lo, self.hi = train.double(), alphas_cumprod.double(), lo, hi
        self.mean, self.var = train.double().mean(0), train.double().var()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # device and dtype for the sampler
        self.config = SimpleNamespace(in_channels=train.shape[1], sample_size=train.shape[-1])

    def forward(self, x, t, encoder_hidden_states=None, return_dict=True):
        a = self.abar[int(torch.as_tensor(t).reshape(-1)[0])]  # the sampler calls every row at one timestep
        sigma = math.sqrt((1 - a) / a)
        y = x.double() / a.sqrt()  # the VE view: y = x0 + σ n
        if self.lo <= sigma <= self.hi:
            x0 = empirical_optimal_denoiser(y, self.train_points, sigma)
        else:
            x0 = self.mean + (y - self.mean) * self.var / (self.var + sigma**2)
        eps = (x.double() - a.sqrt() * x0) / (1 - a).sqrt()
        return SimpleNamespace(sample=eps.float())


def test_the_live_measurement_finds_the_band_where_a_model_memorizes():
    gen = torch.Generator().manual_seed(0)
    train = torch.rand(24, 1, 4, 4, generator=gen) * 1.6 - 0.8  # "images" of 16 pixels in [-1, 1]
    held = torch.rand(12, 1, 4, 4, generator=gen) * 1.6 - 0.8
    sched = DDPMScheduler(num_train_timesteps=1000)
    lo, hi = 0.1, 0.5
    model = BandMemorizer(train, sched.alphas_cumprod, lo, hi)
    steps = 25
    den = Denoiser(model, sched)
    timesteps = [int(t) for t, _ in sampling_steps(den, steps)]
    sigmas = [float(sigmas_from_alphas_cumprod(sched.alphas_cumprod)[t]) for t in timesteps]
    probes = torch.cat([train[:8], held])
    draws = 4
    x0 = probes.repeat_interleave(draws, 0)
    noise = torch.randn(x0.shape, generator=gen)
    images = denoise_from(den, x0, noise, list(range(steps)), torch.zeros(x0.shape[0], 1, 1),
                          num_inference_steps=steps)
    reference = ((torch.cat([train, held]) + 1) / 2)
    own = torch.cat([torch.arange(8), 24 + torch.arange(12)]).repeat_interleave(draws)
    is_training = torch.tensor([True] * 24 + [False] * 12)
    returns, lands = return_flags(images, reference, own, is_training, 1 / 3)
    kind = torch.tensor([True] * 8 + [False] * 12).repeat_interleave(draws)
    profile = return_profile(timesteps, sigmas, returns, lands, {"at_risk": kind, "heldout": ~kind})
    excess = profile.excess()
    inside = [k for k, s in enumerate(profile.sigmas) if lo <= s <= hi]
    below = [k for k, s in enumerate(profile.sigmas) if s < lo / 2]
    assert inside and below
    # Inside the band the training probes come back as themselves and held-out images do not (they land on a
    # training point); well below it every image comes back (plain denoising): no excess.
    assert all(profile.rates["at_risk"][k] >= 0.9 for k in inside)
    assert all(profile.rates["heldout_self"][k] == 0.0 and profile.rates["heldout_copy"][k] > 0.5 for k in inside)
    assert all(abs(excess[k]) < 0.2 for k in below)
    band = band_from_excess(excess, 0.5)
    assert band is not None and band[0] <= inside[0] and band[1] >= inside[-1]
    assert profile.sigmas[band[0]] >= lo / 2  # the band starts at the memorizing band, not at the smallest σ
    assert profile.sigmas[band[1]] > 1.5 * hi  # trajectories that start above the band and enter it come back too
    # Above it a probe loses its identity before its trajectory reaches the band: it returns less and less.
    assert profile.sigmas[band[1]] < 4 * hi and all(profile.rates["at_risk"][k] <= 0.1 for k, s in
                                                     enumerate(profile.sigmas) if s > 5)


def test_the_one_step_return_marks_exactly_the_noise_levels_where_the_denoiser_memorizes():
    gen = torch.Generator().manual_seed(0)
    train = torch.rand(24, 1, 4, 4, generator=gen) * 1.6 - 0.8
    held = torch.rand(12, 1, 4, 4, generator=gen) * 1.6 - 0.8
    sched = DDPMScheduler(num_train_timesteps=1000)
    lo, hi = 0.1, 0.5
    den = Denoiser(BandMemorizer(train, sched.alphas_cumprod, lo, hi), sched)
    steps, draws = 25, 4
    timesteps = [int(t) for t, _ in sampling_steps(den, steps)]
    sigmas = [float(sigmas_from_alphas_cumprod(sched.alphas_cumprod)[t]) for t in timesteps]
    x0 = torch.cat([train[:8], held]).repeat_interleave(draws, 0)
    noise = torch.randn(x0.shape, generator=gen)
    rows = den.adapter.rows
    images = denoise_from(den, x0, noise, list(range(steps)), torch.zeros(x0.shape[0], 1, 1),
                          num_inference_steps=steps, num_steps=1)
    assert den.adapter.rows - rows == x0.shape[0] * steps  # one network row per probe, draw and start
    own = torch.cat([torch.arange(8), 24 + torch.arange(12)]).repeat_interleave(draws)
    returns, lands = return_flags(images, (torch.cat([train, held]) + 1) / 2, own,
                                  torch.tensor([True] * 24 + [False] * 12), 1 / 3)
    kind = torch.tensor([True] * 8 + [False] * 12).repeat_interleave(draws)
    profile = return_profile(timesteps, sigmas, returns, lands, {"at_risk": kind, "heldout": ~kind})
    # One step of the optimal denoiser snaps a training probe onto itself inside [lo, hi] and nowhere above it
    # (the Gaussian posterior mean shrinks towards the data mean): the band is the memorizing σ, no wider (the
    # multi-step return also counts trajectories that start above the band and enter it on the way down).
    band = band_from_excess(profile.excess(), 0.5)
    inside = [k for k, s in enumerate(profile.sigmas) if lo <= s <= hi]
    assert band == (inside[0], inside[-1])
    assert all(profile.rates["at_risk"][k] == 0.0 for k, s in enumerate(profile.sigmas) if s > hi)


def test_the_excess_is_what_memorization_adds_to_plain_denoising():
    from mnemoguard.callbacks.danger_zone import ReturnProfile

    rates = {"at_risk": [1.0, 1.0, 0.8, 0.2], "random": [1.0, 0.5, 0.0, 0.0], "heldout_self": [1.0, 0.0, 0.0, 0.0]}
    profile = ReturnProfile([0, 300, 600, 900], [0.01, 0.5, 2.0, 8.0], rates, {})
    assert profile.excess() == pytest.approx([0.0, 1.0, 0.8, 0.2])  # at-risk minus held-out
    no_heldout = ReturnProfile([0, 300, 600, 900], [0.01, 0.5, 2.0, 8.0],
                               {k: v for k, v in rates.items() if k != "heldout_self"}, {})
    assert no_heldout.excess() == pytest.approx([0.0, 0.5, 0.8, 0.2])  # the random probes stand in
    no_risk = ReturnProfile([0, 300], [0.01, 0.5], {"train": [1.0, 0.6], "heldout_self": [1.0, 0.1]}, {})
    assert no_risk.excess() == pytest.approx([0.0, 0.5])


def test_band_logic_and_its_timestep_mapping():
    assert band_from_excess([0.0, 0.3, 0.7, 0.6, 0.1], 0.5) == (2, 3)
    assert band_from_excess([0.0, 0.3, 0.7, 0.6, 0.1, 0.8], 0.5) == (5, 5)  # the run around the largest value
    assert band_from_excess([0.0, 0.2], 0.5) is None
    assert band_from_excess([float("nan")] * 3, 0.5) is None
    ts = [1, 101, 201, 301]
    assert band_timesteps(ts, 1, 2, 1000) == (51, 251)
    assert band_timesteps(ts, 0, 3, 1000) == (0, 351)  # half a grid spacing beyond the grid's ends
    trailing = [166, 332, 499, 666, 832, 999]  # the tracker's grid: it starts at the top of the schedule
    assert band_timesteps(trailing, 0, 5, 1000) == (83, 1000)


@pytest.mark.parametrize("top,active,below", [(0.6, True, 0), (0.3, True, 0), (0.1, True, 1)])
def test_hysteresis_turns_on_at_the_on_level_and_off_after_release_patience(top, active, below):
    from mnemoguard.callbacks.danger_zone import DangerZoneTracker, ReturnProfile
    from mnemoguard.config.danger_zone import DangerZoneConfig

    tracker = DangerZoneTracker(DangerZoneConfig(on_level=0.5, release_level=0.25, release_patience=2),
                                monitor=SimpleNamespace())
    ts, sig = [1, 301, 601, 901], [0.01, 0.5, 2.0, 10.0]

    def profile(peak):
        return ReturnProfile(ts, sig, {"at_risk": [1.0, 1.0, 1.0, 0.0],
                                       "heldout_self": [1.0, 1.0 - peak, 1.0 - peak, 0.0]},
                             {"at_risk": 4, "heldout_self": 4})

    first = tracker.decide(10, profile(0.6), 1000)
    assert tracker.active and (first["band"]["t_begin"], first["band"]["t_end"]) == (151, 751)
    assert tracker.strength == pytest.approx(0.6) and tuple(tracker.zone) == (151, 751)
    tracker.decide(20, profile(top), 1000)
    assert (tracker.active, tracker._below) == (active, below)
    tracker.decide(30, profile(0.1), 1000)
    assert tracker.active == (top >= 0.25)  # two measurements below release_level turn it off


def test_the_tracker_in_a_guarded_run_writes_its_scalars_and_its_state_is_json(tmp_path):
    import json

    from mnemoguard.trainer import Trainer

    from ..trainer_utils import tiny_recipe
    from ._guard_run import guard_overrides

    cfg = tiny_recipe(tmp_path, "training.max_train_steps=4", *guard_overrides(policy=False),
                      "guard.danger_zone.enabled=true", "guard.danger_zone.num_inference_steps=4",
                      "guard.danger_zone.start_stride=1",
                      "guard.danger_zone.draws=2", "guard.danger_zone.prior_rows=64",
                      "guard.danger_zone.return_steps=0", "guard.danger_zone.copy_draws_max=0",
                      "guard.danger_zone.every_n_checks=1", "guard.danger_zone.curvature_probes=2",
                      "guard.noise_gap.follow_danger_zone=true")
    trainer = Trainer(cfg)
    state = trainer.train()
    tracker = trainer.guard.components.danger_zone
    assert [h["step"] for h in tracker.history] == [2, 4]
    assert tracker.prior["rows"] == 64 and len(tracker.prior["sigmas"]) == 32
    entry = tracker.history[-1]
    assert len(entry["profile"]["sigmas"]) == 4 and entry["profile"]["sigmas"] == sorted(entry["profile"]["sigmas"])
    assert set(entry["profile"]["rates"]) >= {"train", "random"} and len(entry["curvature"]) == 4
    assert 0.0 <= entry["copy_rate"] <= 1.0  # generations from the at-risk captions that copy their own image
    for name in ("excess", "copy_rate", "active", "strength", "rows"):
        assert state.metric_steps[f"mem/danger_zone/{name}"] == 4
    restored = type(tracker)(tracker.config, monitor=tracker.monitor)
    restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert restored.history == tracker.history and restored.prior == tracker.prior

    # The network rows of a measurement, counted by the adapter, are the protocol's: every probe x draw runs the
    # sampler's remaining steps from each of the 4 starts (4 + 3 + 2 + 1), every at-risk probe x draw one 4-step
    # generation (guidance 1: one row per step).
    tracker.config.curvature_probes = 0
    kinds = tracker.monitor.probe_set.kinds
    at_risk = sum(k in ("image_duplicate", "duplicate") for k in kinds) or sum(k != "heldout" for k in kinds)
    assert tracker.measure(5)["mem/danger_zone/rows"] == len(kinds) * 2 * 10 + at_risk * 2 * 4
    tracker.config.return_steps, tracker.config.copy_draws = 1, 1  # one step from each start, one generation each
    values = tracker.measure(6)
    assert values["mem/danger_zone/rows"] == len(kinds) * 2 * 4 + at_risk * 1 * 4
    assert 0.0 <= values["mem/danger_zone/copy_rate_lower"] <= values["mem/danger_zone/copy_rate"]


def test_the_noise_gap_follows_the_live_band_and_releases_it():
    from mnemoguard.callbacks import TrainerState
    from mnemoguard.config.checks import guard_tags
    from mnemoguard.guard.build import build_components, load_guard_config
    from mnemoguard.signals import DangerZone

    from ._drive import drive

    cfg, _ = load_guard_config({"danger_zone": {"enabled": True}, "noise_gap": {"follow_danger_zone": True},
                                "monitor": {"heldout_captions": ["a seven"]}})
    parts = build_components(cfg)
    tracker, gap = parts.danger_zone, parts.noise_gap
    assert gap is not None and {"mem/noise_gap/strength", "mem/policy/noise_gap"} <= guard_tags(cfg)
    gap._set_num_train_timesteps(1000)
    state = TrainerState()
    tracker.active, tracker.zone, tracker.strength = True, DangerZone(0.5, 2.0, 200, 599), 0.6
    drive(parts.policy, "mem/danger_zone/active", [1.0], state=state)  # the policy follows it: one route
    q = gap.distribution()
    assert gap.active and gap.band == (200, 600) and gap.strength == 0.6
    assert float(q[300] / q[100]) == pytest.approx(0.4)  # the band keeps 1 - strength of its weight
    tracker.zone, tracker.strength = DangerZone(1.0, 3.0, 400, 699), 0.8
    drive(parts.policy, "mem/danger_zone/active", [1.0], state=state, start_step=1)
    assert gap.band == (400, 700) and gap.strength == 0.8
    tracker.active = False
    drive(parts.policy, "mem/danger_zone/active", [0.0], state=state, start_step=2)
    assert not gap.active and torch.allclose(gap.distribution(), torch.full((1000,), 1e-3, dtype=torch.float64))


def test_the_default_stop_turns_the_tracker_on_and_rolls_back_to_the_last_check_before_the_onset():
    from mnemoguard.callbacks import EarlyStopping, TrainerControl, TrainerState
    from mnemoguard.config import ConfigError
    from mnemoguard.guard.build import build_components, load_guard_config

    cfg, _ = load_guard_config({"default_stop": True, "monitor": {"heldout_captions": ["a seven"]}})
    parts = build_components(cfg)
    es = parts.early_stopping
    assert parts.danger_zone is not None and es.rollback == "last_good"
    assert es.monitor == "mem/danger_zone/copy_rate_lower" and es.divergence_threshold == 0.05
    from mnemoguard.evaluation import binomial_lower_bound  # on the default 8 generations: 2 copies are no stop

    assert binomial_lower_bound(2, 8, 0.95) < 0.05 < binomial_lower_bound(3, 8, 0.95)
    with pytest.raises(ConfigError, match="give one stop rule"):
        load_guard_config({"default_stop": True, "early_stopping": {"enabled": True, "monitor": "train/loss"}})
    # Replayed on a copy-rate curve: each check below 5 % is the rollback target; the first above stops.
    es = EarlyStopping(monitor="x", patience=None, divergence_threshold=0.05, rollback="last_good")
    state, control = TrainerState(), TrainerControl()
    for step, value in [(50, 0.0), (100, 0.03), (150, 0.02), (200, 0.09)]:
        state.global_step = step
        stop = es.check(value, state, control)
    assert stop and state.best_step == 150 and "rolling back to step 150" in es.stop_reason


def test_the_dashboard_and_the_report_show_the_danger_zone(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mnemoguard.trainer import Trainer

    from ..trainer_utils import tiny_recipe
    from ._guard_run import guard_overrides

    cfg = tiny_recipe(tmp_path, "training.max_train_steps=4", *guard_overrides(policy=False),
                      "guard.danger_zone.enabled=true", "guard.danger_zone.num_inference_steps=3",
                      "guard.danger_zone.draws=1", "guard.danger_zone.prior_rows=32",
                      "guard.danger_zone.every_n_checks=1", "guard.noise_gap.follow_danger_zone=true")
    Trainer(cfg).train()
    logs = tmp_path / "logs" / "mnemoguard"
    acc = EventAccumulator(str(logs), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("mem/danger_zone/profile")] == [1, 2, 4]  # the prior first, then each check
    # The verdict group: the excess the band watches, with its on / release levels as lines; the band as the alarm,
    # the noise gap's strength as the action, at every step.
    assert [e.step for e in acc.Scalars("guard/danger_zone/excess")] == [2, 4]
    threshold = EventAccumulator(str(logs / "threshold"), size_guidance={"scalars": 0})
    threshold.Reload()
    assert {e.value for e in threshold.Scalars("guard/danger_zone/excess")} == {0.5}
    for tag in ("guard/alarm", "guard/action/noise_gap", "guard/stop"):
        assert [e.step for e in acc.Scalars(tag)] == [1, 2, 3, 4]
    report = tmp_path / "report"
    text = (report / "report.md").read_text()
    assert "## Danger zone" in text and "![danger zone](danger_zone.png)" in text
    assert (report / "danger_zone.png").is_file() and "| 4 |" in text


def test_a_tracker_without_a_reference_says_so(tmp_path):
    from mnemoguard.trainer import Trainer

    from ..trainer_utils import tiny_recipe
    from ._guard_run import guard_overrides

    cfg = tiny_recipe(tmp_path, "training.max_train_steps=2", *guard_overrides(policy=False),
                      "guard.monitor.num_random_probes=0", "guard.danger_zone.enabled=true",
                      "guard.danger_zone.num_inference_steps=2", "guard.danger_zone.draws=1",
                      "guard.danger_zone.prior=false")
    state = Trainer(cfg).train()
    assert any("the excess, and so the live band, cannot be measured" in w for w in state.warnings)


def test_one_batched_pass_from_every_start_equals_a_pass_per_start():
    gen = torch.Generator().manual_seed(1)
    train = torch.rand(6, 1, 4, 4, generator=gen) * 1.6 - 0.8
    sched = DDPMScheduler(num_train_timesteps=1000)
    den = Denoiser(BandMemorizer(train, sched.alphas_cumprod, 0.1, 0.5), sched)
    x0, noise, cond = train[:3], torch.randn(3, 1, 4, 4, generator=gen), torch.zeros(3, 1, 1)
    together = denoise_from(den, x0, noise, [0, 2, 5], cond, num_inference_steps=6, batch_size=4)
    for k, start in enumerate([0, 2, 5]):
        alone = denoise_from(den, x0, noise, [start], cond, num_inference_steps=6)
        torch.testing.assert_close(together[k], alone[0])


def test_the_alarm_ignores_noise_levels_the_sampler_does_not_visit_but_the_band_reaches_them():
    from mnemoguard.callbacks.danger_zone import DangerZoneTracker, ReturnProfile
    from mnemoguard.config.danger_zone import DangerZoneConfig

    tracker = DangerZoneTracker(DangerZoneConfig(), monitor=SimpleNamespace())
    tracker.prior = {"sigmas": [0.01, 0.1, 1.0, 10.0], "coverage": [0.0, 0.2, 0.6, 1.0]}
    assert tracker.coverage_floor() == 1.0  # where C_σ first reaches 0.5
    # Every training image comes back from σ = 0.5 and no held-out one does: below the floor, not memorization.
    low = ReturnProfile([100, 500, 900], [0.5, 2.0, 8.0], {"at_risk": [1.0, 0.1, 0.0], "heldout_self": [0.0] * 3}, {})
    assert tracker.decide(10, low, 1000)["band"] is None and not tracker.active
    high = ReturnProfile([100, 500, 900], [0.5, 2.0, 8.0], {"at_risk": [1.0, 0.9, 0.2], "heldout_self": [0.0] * 3},
                         {})
    entry = tracker.decide(20, high, 1000)
    # Decided at the covered σ (0.9 at σ = 2); the band then reaches down as far as the excess holds (σ = 0.5).
    assert tracker.active and entry["excess"] == pytest.approx(0.9) and entry["band"]["sigma_lo"] == 0.5


@pytest.mark.parametrize("flags,rounds", [
    ([[0, 0, 0, 0]], 1),  # no copy: decided at once, no more rows
    ([[1, 1, 1, 1]], 1),  # 4 of 4: the lower bound is far above 5 %
    ([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], 4),  # a close call: up to the most rounds
    ([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], 2),  # 3 of 8: the bound (0.111) passes 5 % after round 2
])
def test_the_copy_rate_draws_more_generations_only_while_the_call_is_close(flags, rounds):
    from mnemoguard.callbacks.danger_zone import sequential_copies
    from mnemoguard.evaluation import binomial_lower_bound

    calls = []

    def draw(start, count):
        calls.append((start, count))
        return torch.tensor([f for r in flags[start:start + count] for f in r], dtype=torch.bool)

    copies = sequential_copies(draw, 1, 4, 0.05, 0.95)
    assert copies.numel() == 4 * rounds and calls[0] == (0, 1) and all(c == 1 for _, c in calls[1:])
    assert (binomial_lower_bound(int(copies.sum()), copies.numel()) > 0.05) == (rounds < 4 and copies.any())
