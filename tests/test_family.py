"""The model-family seam against diffusers' own arithmetic: noise schedules (DDPM, flow matching) and their levels,
the loops' timestep densities drawn exactly as the scripts draw them, the noise gap on top of a flow density, the
sampler step against diffusers' DDIM, the adapters against the scripts' own calls, the conditioning object."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from mnemoguard.denoiser import Denoiser
from mnemoguard.family import (
    Conditioning,
    DDPMSchedule,
    FlowMatchSchedule,
    TimestepDensity,
    as_conditioning,
    noise_schedule,
    pack_latents,
    unpack_latents,
)
from mnemoguard.sampling import generate, sampling_steps


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------- schedules
def test_ddpm_schedule_noises_exactly_as_diffusers_add_noise():
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012)
    schedule = noise_schedule(sched)
    assert isinstance(schedule, DDPMSchedule) and schedule.timestep_dtype == torch.long
    x0, noise = torch.randn(6, 4, 8, 8, generator=gen(0)), torch.randn(6, 4, 8, 8, generator=gen(1))
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    assert torch.equal(schedule.add_noise(x0, noise, t), sched.add_noise(x0, noise, t))
    assert torch.equal(schedule.levels_of(t), t) and torch.equal(schedule.timesteps_at(t), t)
    ab = sched.alphas_cumprod.double()
    torch.testing.assert_close(schedule.level_sigmas(), ((1 - ab) / ab).sqrt())
    torch.testing.assert_close(schedule.snr(t).double(), (ab[t] / (1 - ab[t])), rtol=1e-6, atol=0)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_schedule_is_the_linear_interpolant_on_the_schedulers_training_grid(shift):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    schedule = noise_schedule(sched)
    assert isinstance(schedule, FlowMatchSchedule) and schedule.prediction_type == "flow_prediction"
    # level k = the k-th least noisy training timestep: timesteps[T - 1 - k]
    levels = torch.arange(1000)
    assert torch.equal(schedule.timesteps_at(levels), sched.timesteps.flip(0))
    assert torch.equal(schedule.levels_of(sched.timesteps), 999 - levels)
    # σ = t / T (what the scripts' get_sigmas reads from the scheduler's sigmas), α = 1 − σ
    alpha, sigma = schedule.alpha_sigma(sched.timesteps, dtype=torch.float64)
    torch.testing.assert_close(sigma, sched.sigmas.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(alpha, 1 - sigma)
    x0, noise = torch.randn(5, 4, 8, 8, generator=gen(0)), torch.randn(5, 4, 8, 8, generator=gen(1))
    t = sched.timesteps[[0, 10, 400, 800, 999]]
    s = sched.sigmas[[0, 10, 400, 800, 999]].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(schedule.add_noise(x0, noise, t), (1.0 - s) * x0 + s * noise)
    ve = schedule.ve_sigma(t)
    assert math.isinf(float(ve[0])) and torch.allclose(ve[1:], (s / (1 - s)).reshape(-1)[1:].double(), rtol=1e-5)
    # a scheduler whose set_timesteps ran still gives the training grid
    used = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    used.set_timesteps(10)
    assert torch.equal(noise_schedule(used).grid, schedule.grid)


def test_a_schedule_refuses_a_parameterisation_it_cannot_run():
    with pytest.raises(ValueError, match="flow-matching schedule runs networks that predict the velocity"):
        noise_schedule(FlowMatchEulerDiscreteScheduler()).check_prediction_type("epsilon")
    with pytest.raises(ValueError, match="DDPM schedule runs networks that predict epsilon, v_prediction or sample"):
        noise_schedule(DDPMScheduler()).check_prediction_type("flow_prediction")
    with pytest.raises(TypeError, match="expected a diffusers DDPM-family scheduler"):
        noise_schedule(object())


# ---------------------------------------------------------------------------------------------------- densities
@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode", "cosmap"])
def test_the_density_draws_with_the_random_numbers_of_the_scripts(scheme):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    density = TimestepDensity(scheme)
    torch.manual_seed(7)
    u = compute_density_for_timestep_sampling(scheme, 64, logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
    expected = sched.timesteps[(u * 1000).long()]
    torch.manual_seed(7)
    schedule = noise_schedule(sched)
    got = schedule.timesteps_at(density.draw_levels(schedule, 64))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode"])
def test_the_density_of_the_levels_is_the_probability_of_the_draw(scheme):
    schedule = noise_schedule(FlowMatchEulerDiscreteScheduler())
    density = TimestepDensity(scheme)
    p = density.probabilities(schedule)
    assert p.shape == (1000,) and math.isclose(float(p.sum()), 1.0, rel_tol=1e-12)
    n = 400_000
    draws = density.draw_levels(schedule, n, generator=gen(3))
    observed = torch.bincount(draws // 50, minlength=20).double() / n  # 20 bins of 50 levels
    expected = p.reshape(20, 50).sum(1)
    # binomial standard error of each bin; 5 of them is far beyond chance and far below any real mismatch
    se = (expected * (1 - expected) / n).sqrt()
    assert ((observed - expected).abs() <= 5 * se + 1e-9).all(), (observed - expected) / se


def test_a_flow_density_on_a_ddpm_loop_is_refused():
    with pytest.raises(ValueError, match="a DDPM loop draws its timesteps uniformly"):
        TimestepDensity("logit_normal").draw_levels(noise_schedule(DDPMScheduler()), 4)
    with pytest.raises(ValueError, match="weighting_scheme must be one of"):
        TimestepDensity("lognorm")


def test_the_noise_gap_sits_on_top_of_the_loops_flow_density():
    from types import SimpleNamespace

    from mnemoguard.callbacks import NoiseGapScheduler, TimestepSlot, TrainerControl, TrainerState

    schedule = noise_schedule(FlowMatchEulerDiscreteScheduler(shift=3.0))
    density = TimestepDensity("logit_normal")
    context = SimpleNamespace(num_train_timesteps=1000, schedule=schedule, density=density,
                              timesteps=TimestepSlot(None))
    gap = NoiseGapScheduler(importance=1.0)
    gap.on_train_begin(TrainerState(), TrainerControl(), context=context)
    base = density.probabilities(schedule)
    torch.testing.assert_close(gap.distribution(), base)
    torch.manual_seed(5)
    t, w = gap(32, "cpu")
    torch.manual_seed(5)
    assert torch.equal(t, schedule.timesteps_at(density.draw_levels(schedule, 32))) and torch.equal(w, torch.ones(32))
    gap.activate((300, 600), strength=0.75)
    q, weights = gap.distribution(), gap.loss_weight_table()
    expected = base.clone()
    expected[300:600] *= 0.25
    torch.testing.assert_close(q, expected / expected.sum())
    torch.testing.assert_close((q * weights).sum(), torch.tensor(1.0, dtype=torch.float64))
    ratio = base / q
    torch.testing.assert_close(weights, ratio / (q * ratio).sum())  # importance 1: E_q[w ℓ] = E_p[ℓ]
    t, _ = gap(20_000, "cpu", generator=gen(1))
    assert t.is_floating_point() and set(t.tolist()) <= set(schedule.grid.tolist())
    inside = ((schedule.levels_of(t) >= 300) & (schedule.levels_of(t) < 600)).double().mean()
    assert abs(float(inside) - float(q[300:600].sum())) < 0.015


# ---------------------------------------------------------------------------------------------------- sampler
class _Unet(torch.nn.Module):
    """A linear 'UNet' (fixed random map of x and t): enough to compare two samplers call by call."""

    def __init__(self, channels: int = 2) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.config = type("C", (), {"in_channels": channels, "sample_size": 4})

    def forward(self, x, t, encoder_hidden_states=None, return_dict=True):
        out = self.conv(x) * (1 + torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1) / 1000)
        out = out + encoder_hidden_states.mean() if encoder_hidden_states is not None else out
        return (out,) if not return_dict else type("O", (), {"sample": out})()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_generation_is_diffusers_ddim_for_ddpm_models(prediction_type):
    torch.manual_seed(0)
    unet = _Unet().eval()
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type, clip_sample=False)
    den = Denoiser(unet, sched)
    cond = torch.randn(3, 2, 4, generator=gen(1))
    latents = torch.randn(3, 2, 4, 4, generator=gen(2))
    ours = generate(den, cond, num_inference_steps=7, latents=latents)
    ddim = DDIMScheduler.from_config(sched.config, clip_sample=False, set_alpha_to_one=False)
    ddim.set_timesteps(7)
    x = latents.clone()
    with torch.no_grad():
        for t in ddim.timesteps:
            x = ddim.step(unet(x, t, encoder_hidden_states=cond).sample, t, x).prev_sample
    torch.testing.assert_close(ours, ((x + 1) / 2).clamp(0, 1), rtol=0, atol=2e-6)
    assert [t for t, _ in sampling_steps(den, 7)] == [int(t) for t in ddim.timesteps]


def test_the_adapter_counts_the_rows_of_every_weights_it_runs():
    unet, other = _Unet().eval(), _Unet().eval()
    den = Denoiser(unet, DDPMScheduler())
    generate(den, torch.randn(3, 2, 4, generator=gen(1)), num_inference_steps=5)  # 3 rows x 5 steps
    ema = den.with_model(other)  # another set of weights of the same model, as an EMA baseline runs it
    ema.eps(torch.randn(2, 2, 4, 4, generator=gen(2)), 10, torch.randn(2, 2, 4, generator=gen(3)))
    assert den.adapter.rows == ema.adapter.rows == 3 * 5 + 2  # one count: a measurement's cost includes baselines


def test_the_flow_sampler_step_is_the_euler_step_of_the_linear_interpolant():
    torch.manual_seed(0)
    net = _Unet().eval()
    den = Denoiser(net, FlowMatchEulerDiscreteScheduler(shift=3.0), prediction_type="flow_prediction")
    steps = sampling_steps(den, 6)
    assert steps[0][0] == 1000.0 and steps[-1][1] is None  # from σ = 1 down to σ = 0
    cond = torch.randn(2, 2, 4, generator=gen(1))
    latents = torch.randn(2, 2, 4, 4, generator=gen(2))
    x = latents.clone()
    with torch.no_grad():
        for t, t_prev in steps:
            v = net(x, torch.full((2,), t), encoder_hidden_states=cond).sample
            x = x + ((t_prev or 0.0) - t) / 1000 * v
    torch.testing.assert_close(generate(den, cond, num_inference_steps=6, latents=latents),
                               ((x + 1) / 2).clamp(0, 1), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- adapters
def test_the_flux_adapter_makes_the_flux_scripts_call():
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8)).eval()
    den = Denoiser(model, FlowMatchEulerDiscreteScheduler())
    x = torch.randn(2, 4, 8, 8, generator=gen(1))
    cond = Conditioning(torch.randn(2, 5, 32, generator=gen(2)), torch.randn(2, 32, generator=gen(3)))
    t = torch.tensor([250.0, 750.0])
    assert torch.equal(unpack_latents(pack_latents(x), 8, 8), x)
    assert torch.equal(pack_latents(x), FluxPipeline._pack_latents(x, 2, 4, 8, 8))
    with torch.no_grad():
        ours = den.raw(x, t, cond)
        ref = model(hidden_states=FluxPipeline._pack_latents(x, 2, 4, 8, 8), timestep=t / 1000,
                    guidance=torch.tensor([3.5]).expand(2), pooled_projections=cond.pooled,
                    encoder_hidden_states=cond.embeds, txt_ids=torch.zeros(5, 3),
                    img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
                    return_dict=False)[0]
    torch.testing.assert_close(ours, FluxPipeline._unpack_latents(ref, 16, 16, 2))


def test_the_sd3_adapter_makes_the_sd3_scripts_call():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                  attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                  caption_projection_dim=32, pooled_projection_dim=16, pos_embed_max_size=8).eval()
    den = Denoiser(model, FlowMatchEulerDiscreteScheduler(shift=3.0))
    x = torch.randn(2, 4, 8, 8, generator=gen(1))
    cond = Conditioning(torch.randn(2, 6, 32, generator=gen(2)), torch.randn(2, 16, generator=gen(3)))
    t = den.schedule.timesteps_at(torch.tensor([100, 900]))
    with torch.no_grad():
        ref = model(hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled,
                    return_dict=False)[0]
        torch.testing.assert_close(den.raw(x, t, cond), ref)
        sigma = (t / 1000).reshape(-1, 1, 1, 1)
        torch.testing.assert_close(den.x0(x, t, cond), x - sigma * ref)  # the scripts' preconditioning
    with pytest.raises(ValueError, match="an SD3 transformer needs token and pooled embeddings"):
        den.raw(x, t, cond.embeds)


def test_an_unknown_transformer_is_a_clear_error():
    from mnemoguard.family import model_adapter

    class QwenImageTransformer2DModel(torch.nn.Module):
        config = None

    with pytest.raises(TypeError, match="no built-in adapter for QwenImageTransformer2DModel; wrap it"):
        model_adapter(QwenImageTransformer2DModel())


def test_a_user_adapter_wraps_another_transformer_in_a_few_lines():
    """The documented way (docs/guard.md, "Other models"): subclass ModelAdapter and make the call."""
    from mnemoguard.family import ModelAdapter

    class Toy(torch.nn.Module):  # a "transformer" that takes (x, σ, text, pooled) by other names
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.5))
            self.config = type("C", (), {"in_channels": 2, "sample_size": 4})

        def forward(self, latents, sigma, text, pooled):
            return self.w * latents * sigma.reshape(-1, 1, 1, 1) + text.mean() + pooled.mean()

    class ToyAdapter(ModelAdapter):
        family = "toy"
        prediction_type = "flow_prediction"
        pooled_key = "pooled_projections"

        def forward(self, x, t, cond, **kwargs):
            return self.module(x, t / 1000, cond.embeds, cond.pooled)

    den = Denoiser(ToyAdapter(Toy()), FlowMatchEulerDiscreteScheduler())
    cond = Conditioning(torch.ones(1, 3, 4), torch.ones(1, 2))
    x = torch.ones(2, 2, 4, 4)
    out = den.raw(x, 500.0, cond)
    torch.testing.assert_close(out, torch.full_like(x, 0.5 * 0.5 + 2.0))
    torch.testing.assert_close(den.eps(x, 500.0, cond), x + 0.5 * out)  # ε = x_t + α v


# ---------------------------------------------------------------------------------------------------- conditioning
def test_conditioning_batches_tile_split_and_replace_rows_whole():
    a = Conditioning(torch.zeros(2, 3, 4), torch.zeros(2, 5), {"time_ids": torch.ones(2, 6)})
    b = Conditioning(torch.ones(1, 3, 4), torch.ones(1, 5), {"time_ids": torch.full((1, 6), 2.0)})
    both = Conditioning.cat([a, b])
    assert len(both) == 3 and both.pooled.shape == (3, 5) and both.extra["time_ids"][2, 0] == 2.0
    assert len(b.tile(4)) == 4 and torch.equal(both[[2]].embeds, b.embeds) and len(both[1:]) == 2
    replaced = a.replace_rows([1], b)
    assert torch.equal(replaced.embeds[1], b.embeds[0]) and torch.equal(replaced.pooled[1], b.pooled[0])
    assert torch.equal(replaced.extra["time_ids"], a.extra["time_ids"])  # the image's micro-conditioning stays
    assert torch.equal(a.embeds, torch.zeros(2, 3, 4))  # a copy
    flux = as_conditioning((torch.zeros(1, 3, 4), torch.zeros(1, 5), torch.zeros(3, 3)))  # (embeds, pooled, ids)
    assert flux.pooled.shape == (1, 5)
    with pytest.raises(ValueError, match="different pieces"):
        Conditioning.cat([a, Conditioning(torch.zeros(1, 3, 4))])
    with pytest.raises(ValueError, match=r"Conditioning.pooled: expected one row per sample \(\[2, ...\]\)"):
        Conditioning(torch.zeros(2, 3, 4), torch.zeros(3, 5))


def test_the_prompt_encoder_caches_pooled_embeddings_with_the_tokens():
    from mnemoguard.prompts import PromptEncoder

    calls = []

    def encode(captions):
        calls.extend(captions)
        n = float(len(captions[0]))
        return torch.full((1, 2, 3), n), torch.full((1, 4), -n), torch.zeros(2, 3)

    enc = PromptEncoder(encode)
    out = enc(["ab", "abc", "ab"])
    assert calls == ["ab", "abc"] and out.embeds[:, 0, 0].tolist() == [2.0, 3.0, 2.0]
    assert out.pooled[:, 0].tolist() == [-2.0, -3.0, -2.0] and len(enc) == 2
