import math

import pytest
import torch

from mnemoguard.callbacks import DensitySampler, NoiseGapScheduler, TrainerControl, TrainerState
from mnemoguard.signals.danger_zone import DangerZone

from ..contexts import make_context

T = 1000


def chi_square_critical(dof: int, z: float = 3.09) -> float:
    """Upper quantile of chi-square (Wilson–Hilferty); z = 3.09 is the 0.999 normal quantile."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def chi_square(samples: torch.Tensor, probs: torch.Tensor, bins: int = 20) -> tuple[float, int]:
    """Pearson's statistic of ``samples`` binned into ``bins`` equal ranges vs the expected counts from ``probs``."""
    n, width = samples.numel(), probs.numel() // bins
    observed = torch.bincount(samples // width, minlength=bins).double()
    expected = probs.reshape(bins, width).sum(1) * n
    keep = expected > 0
    assert observed[~keep].sum() == 0, "samples fell where the distribution has no mass"
    stat = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    return stat, int(keep.sum()) - 1


def sched(**kw) -> NoiseGapScheduler:
    return NoiseGapScheduler(num_train_timesteps=T, **kw)


def test_none_draws_exactly_what_the_uniform_sampler_draws():
    s = sched()
    t, w = s(64, "cpu", generator=torch.Generator().manual_seed(3))
    from diffusers import DDPMScheduler

    from mnemoguard.family import noise_schedule

    uniform = DensitySampler(noise_schedule(DDPMScheduler(num_train_timesteps=T)))
    t_ref, w_ref = uniform(64, "cpu", generator=torch.Generator().manual_seed(3))
    assert torch.equal(t, t_ref) and torch.equal(w, w_ref)
    assert torch.allclose(s.distribution(), torch.full((T,), 1 / T, dtype=torch.float64))


@pytest.mark.parametrize(
    ("kw", "band", "mult"),
    [
        ({"timestep_bias_strategy": "earlier", "timestep_bias_multiplier": 3.0, "timestep_bias_portion": 0.2},
         (0, 200), 3.0),
        ({"timestep_bias_strategy": "later", "timestep_bias_multiplier": 2.0, "timestep_bias_portion": 0.3},
         (700, 1000), 2.0),
        ({"timestep_bias_strategy": "range", "timestep_bias_multiplier": 0.5, "timestep_bias_begin": 100,
          "timestep_bias_end": 400}, (100, 400), 0.5),
        ({"timestep_bias_strategy": "gap", "timestep_bias_multiplier": 0.0, "timestep_bias_begin": 300,
          "timestep_bias_end": 700}, (300, 700), 0.0),
    ],
)
def test_static_strategies_follow_the_diffusers_vocabulary(kw, band, mult):
    q = sched(**kw).distribution()
    m = torch.ones(T, dtype=torch.float64)
    m[band[0]:band[1]] = mult
    assert torch.allclose(q, m / m.sum()) and q.sum().item() == pytest.approx(1.0)


def test_samples_match_the_intended_distribution_chi_square():
    s = sched(timestep_bias_strategy="gap", timestep_bias_multiplier=0.2, timestep_bias_begin=300,
              timestep_bias_end=700)
    t, _ = s(20_000, "cpu", generator=torch.Generator().manual_seed(0))
    stat, dof = chi_square(t, s.distribution())
    assert stat < chi_square_critical(dof), (stat, dof)
    # The test has power: the same samples against the uniform distribution are rejected by far.
    wrong, _ = chi_square(t, torch.full((T,), 1 / T, dtype=torch.float64))
    assert wrong > 10 * chi_square_critical(dof)
    # An excluded band is never drawn, and the adaptive gap is sampled as intended too.
    s.activate((0, 100), strength=1.0)
    t, _ = s(20_000, "cpu", generator=torch.Generator().manual_seed(1))
    assert int(((t >= 0) & (t < 100)).sum()) == 0
    stat, dof = chi_square(t, s.distribution())
    assert stat < chi_square_critical(dof), (stat, dof)


@pytest.mark.parametrize("importance", [0.0, 0.5, 1.0])
def test_loss_weights_average_one_under_the_sampling_distribution(importance):
    s = sched(timestep_bias_strategy="gap", timestep_bias_multiplier=0.25, timestep_bias_begin=200,
              timestep_bias_end=600, importance=importance)
    q, w = s.distribution(), s.loss_weight_table()
    assert float((q * w).sum()) == pytest.approx(1.0, abs=1e-12)  # E_q[w] = 1: same batch-mean scale as uniform
    t, bw = s(50_000, "cpu", generator=torch.Generator().manual_seed(0))
    assert torch.equal(bw, w[t].float()) and float(bw.mean()) == pytest.approx(1.0, abs=0.02)
    loss = torch.linspace(2.0, 0.1, T, dtype=torch.float64)  # any per-timestep loss curve
    gapped, uniform = float((q * w * loss).sum()), float(loss.mean())
    if importance == 0.0:
        assert torch.all(w == 1.0)  # the biased objective E_q[loss]: the band is under-trained
    if importance == 1.0:
        assert gapped == pytest.approx(uniform, rel=1e-12)  # full importance weighting undoes the gap exactly


def test_importance_weights_ignore_an_excluded_band():
    s = sched(timestep_bias_strategy="gap", timestep_bias_begin=200, timestep_bias_end=600, timestep_bias_multiplier=0,
              importance=1.0)
    q, w = s.distribution(), s.loss_weight_table()
    assert torch.all(w[200:600] == 0) and torch.allclose(w[q > 0], torch.ones(600, dtype=torch.float64))


def test_adaptive_gap_follows_activate_and_deactivate():
    s = sched(timestep_bias_strategy="later", timestep_bias_multiplier=2.0, timestep_bias_portion=0.5)
    static = s.distribution()
    s.activate((200, 400), strength=0.5)
    m = torch.ones(T, dtype=torch.float64)
    m[500:] = 2.0
    m[200:400] *= 0.5
    assert torch.allclose(s.distribution(), m / m.sum())
    assert s.metrics() == {"mem/noise_gap/strength": 0.5, "mem/noise_gap/band_begin": 200.0,
                           "mem/noise_gap/band_end": 400.0, "mem/noise_gap/band_mass": pytest.approx(100 / 1400)}
    s.activate(DangerZone(0.5, 2.0, t_lo=300, t_hi=599), strength=1.0)  # inclusive t_lo..t_hi
    assert s.band == (300, 600) and s.distribution()[300:600].sum() == 0
    s.deactivate()
    assert torch.equal(s.distribution(), static) and s.metrics()["mem/noise_gap/strength"] == 0.0


def test_activate_with_no_band_uses_the_configured_one_and_bad_input_is_rejected():
    s = sched(adaptive_band=(400, 600))
    s.activate(strength=1.0)
    assert s.band == (400, 600)
    with pytest.raises(ValueError, match="strength must be in"):
        s.activate((0, 10), strength=1.5)
    with pytest.raises(ValueError, match="0 <= begin < end <= num_train_timesteps=1000"):
        s.activate((10, 2000))
    with pytest.raises(ValueError, match="leaves no timestep"):
        s.activate((0, 1000), strength=1.0)
    assert s.band == (400, 600) and s.strength == 1.0  # a failed activate leaves the previous state


def test_invalid_static_configurations_are_clear_errors():
    with pytest.raises(ValueError, match="'gap' needs timestep_bias_multiplier in \\[0, 1\\)"):
        sched(timestep_bias_strategy="gap", timestep_bias_multiplier=1.0)
    with pytest.raises(ValueError, match="use strategy 'gap'"):
        sched(timestep_bias_strategy="range", timestep_bias_multiplier=0.0)
    with pytest.raises(ValueError, match="timestep_bias_strategy must be one of"):
        sched(timestep_bias_strategy="middle")
    with pytest.raises(RuntimeError, match="does not know num_train_timesteps"):
        NoiseGapScheduler()(4, "cpu")


def test_installs_itself_logs_and_round_trips_its_state():
    s = NoiseGapScheduler(timestep_bias_strategy="gap", timestep_bias_begin=100, timestep_bias_end=300,
                          timestep_bias_multiplier=0.5)
    context = make_context()
    state, control = TrainerState(global_step=1), TrainerControl()
    s.on_train_begin(state, control, context=context)
    assert context.timesteps.sampler is s and context.timesteps.owner == "noise_gap" and s.num_train_timesteps == T
    logs: dict = {}
    s.on_step_end(state, control, logs=logs)
    assert control.should_log and all(isinstance(v, float) for v in logs.values())
    assert logs["mem/noise_gap/band_begin"] == 100.0 and state.is_fresh("mem/noise_gap/band_mass")
    s.activate((500, 800), strength=0.75)
    restored = NoiseGapScheduler(timestep_bias_strategy="gap", timestep_bias_begin=100, timestep_bias_end=300,
                                 timestep_bias_multiplier=0.5, num_train_timesteps=T)
    restored.load_state_dict(s.state_dict())
    assert restored.band == (500, 800) and restored.strength == 0.75
    assert torch.equal(restored.distribution(), s.distribution())
    from diffusers import DDPMScheduler

    with pytest.raises(ValueError, match="built for num_train_timesteps=1000"):
        sched().on_train_begin(state, control, context=make_context(scheduler=DDPMScheduler(num_train_timesteps=50)))
