"""Denoiser: parameterisation conversions (checked against diffusers' scheduler math), batching, AD safety."""

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.models.attention_processor import AttnProcessor

from mnemoguard.denoiser import Denoiser, ad_safe
from mnemoguard.parameterisation import eps_from_prediction, x0_from_prediction
from tests.conftest import make_tiny_unet

PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]


def _scheduler(prediction_type="epsilon"):
    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type, clip_sample=False
    )


class _Stub(torch.nn.Module):
    """A 'UNet' returning a fixed output; records how it was called."""

    def __init__(self, out):
        super().__init__()
        self.out = out
        self.calls = []

    def forward(self, x, t, return_dict=True, **kwargs):
        self.calls.append((x.shape, t, kwargs))
        return (self.out.to(x.dtype),)


# ------------------------------------------------------------------------------------------------ schedule
def test_alpha_and_sigma_match_alphas_cumprod_and_satisfy_vp_identity(ddpm_scheduler):
    den = Denoiser(torch.nn.Identity(), ddpm_scheduler)
    t = torch.tensor([0, 10, 500, 999])
    ab = ddpm_scheduler.alphas_cumprod[t]
    torch.testing.assert_close(den.alpha(t), ab.sqrt())
    torch.testing.assert_close(den.sigma(t), (1 - ab).sqrt())
    torch.testing.assert_close(den.alpha(t) ** 2 + den.sigma(t) ** 2, torch.ones(4))


def test_float_timesteps_interpolate_alpha_bar_and_agree_at_integers(ddpm_scheduler):
    den = Denoiser(torch.nn.Identity(), ddpm_scheduler)
    ac = ddpm_scheduler.alphas_cumprod.double()
    torch.testing.assert_close(den.alpha_bar(torch.tensor([3.0, 999.0])), den.alpha_bar(torch.tensor([3, 999])))
    mid = den.alpha_bar(torch.tensor(3.25), dtype=torch.float64)
    torch.testing.assert_close(mid, ac[3] + 0.25 * (ac[4] - ac[3]))


def test_out_of_range_timesteps_raise(ddpm_scheduler):
    den = Denoiser(torch.nn.Identity(), ddpm_scheduler)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        den.alpha(torch.tensor([1000]))
    with pytest.raises(ValueError, match="timesteps"):
        den.sigma(-0.5)


def test_unknown_prediction_type_is_rejected(ddpm_scheduler):
    with pytest.raises(ValueError, match="prediction_type"):
        Denoiser(torch.nn.Identity(), ddpm_scheduler, prediction_type="flow")


# ------------------------------------------------------------------------------------------------ conversions
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_conversions_recover_noise_and_sample_built_by_the_scheduler(prediction_type):
    sched = _scheduler(prediction_type)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, 5, generator=g)
    noise = torch.randn(4, 3, 5, 5, generator=g)
    t = torch.tensor([1, 250, 600, 990])
    x_t = sched.add_noise(x0, noise, t)
    target = {"epsilon": noise, "v_prediction": sched.get_velocity(x0, noise, t), "sample": x0}[prediction_type]
    den = Denoiser(torch.nn.Identity(), sched)
    alpha, sigma = den.alpha(t), den.sigma(t)
    eps = eps_from_prediction(target, x_t, alpha, sigma, prediction_type)
    x0_hat = x0_from_prediction(target, x_t, alpha, sigma, prediction_type)
    torch.testing.assert_close(eps, noise, atol=2e-4, rtol=0)
    torch.testing.assert_close(x0_hat, x0, atol=2e-4, rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_prediction_matches_the_scheduler_step(prediction_type):
    sched = _scheduler(prediction_type)
    unet = make_tiny_unet().eval()
    den = Denoiser(unet, sched)
    g = torch.Generator().manual_seed(1)
    x_t, cond = torch.randn(2, 1, 16, 16, generator=g), torch.randn(2, 4, 32, generator=g)
    t = 400
    with torch.no_grad():
        raw = unet(x_t, t, encoder_hidden_states=cond).sample
        ref = sched.step(raw, t, x_t).pred_original_sample
        torch.testing.assert_close(den.x0(x_t, t, cond), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(den.raw(x_t, t, cond), raw)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_eps_score_and_x0_are_consistent_with_the_forward_process(prediction_type):
    g = torch.Generator().manual_seed(2)
    out = torch.randn(3, 2, 4, 4, generator=g)
    den = Denoiser(_Stub(out), _scheduler(prediction_type))
    x_t, t = torch.randn(3, 2, 4, 4, generator=g), torch.tensor([5, 300, 900])
    a, s = den.alpha(t)[:, None, None, None], den.sigma(t)[:, None, None, None]
    eps, x0 = den.eps(x_t, t), den.x0(x_t, t)
    torch.testing.assert_close(a * x0 + s * eps, x_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(den.score(x_t, t), -eps / s)


def test_learned_variance_channels_are_dropped():
    out = torch.randn(2, 6, 4, 4)
    den = Denoiser(_Stub(out), _scheduler())
    torch.testing.assert_close(den.eps(torch.randn(2, 3, 4, 4), 10), out[:, :3])


# ------------------------------------------------------------------------------------------------ UNet calls
def test_eps_on_the_tiny_unet_keeps_shape_dtype_device_and_leaves_no_gradients(tiny_unet, ddpm_scheduler):
    den = Denoiser(tiny_unet, ddpm_scheduler)
    x, cond = torch.randn(3, 1, 16, 16), torch.randn(1, 4, 32)  # cond batch 1 is tiled
    eps = den.eps(x, 500, cond)
    assert eps.shape == x.shape and eps.dtype == x.dtype and eps.device == x.device
    assert all(p.grad is None for p in tiny_unet.parameters())


def test_cond_and_uncond_come_from_one_batched_call_and_match_separate_calls(tiny_unet, ddpm_scheduler):
    den = Denoiser(tiny_unet, ddpm_scheduler)
    g = torch.Generator().manual_seed(3)
    x, cond, uncond = torch.randn(2, 1, 16, 16, generator=g), torch.randn(2, 4, 32, generator=g), torch.zeros(1, 4, 32)
    calls = []
    handle = tiny_unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        eps_c, eps_u = den.eps_cond_uncond(x, torch.tensor([100, 700]), cond, uncond)
    handle.remove()
    assert calls == [4]
    with torch.no_grad():
        torch.testing.assert_close(eps_c, den.eps(x, torch.tensor([100, 700]), cond), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(eps_u, den.eps(x, torch.tensor([100, 700]), uncond), atol=1e-5, rtol=1e-5)


def test_sdxl_pooled_embeddings_and_time_ids_reach_each_cfg_branch():
    from diffusers import UNet2DConditionModel

    from mnemoguard.family import Conditioning, SDXLUNetAdapter

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
    ).eval()
    den = Denoiser(unet, _scheduler())
    assert isinstance(den.adapter, SDXLUNetAdapter)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 1, 8, 8, generator=g)
    cond = Conditioning(torch.randn(2, 3, 32, generator=g), torch.randn(2, 16, generator=g),
                        {"time_ids": torch.ones(2, 6)})
    uncond = Conditioning(torch.zeros(1, 3, 32), torch.zeros(1, 16), {"time_ids": torch.ones(1, 6)})
    with torch.no_grad():
        eps_c, eps_u = den.eps_cond_uncond(x, 300, cond, uncond)
        torch.testing.assert_close(eps_c, den.eps(x, 300, cond), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(eps_u, den.eps(x, 300, uncond), atol=1e-5, rtol=1e-5)
        added = {"text_embeds": cond.pooled, "time_ids": cond.extra["time_ids"]}
        direct = unet(x, torch.tensor([300, 300]), cond.embeds, added_cond_kwargs=added).sample
        torch.testing.assert_close(eps_c, direct)
        # without time_ids (the guard's own probes): an uncropped image at the adapter's size (8 x 8 latent -> 64)
        plain = den.eps(x, 300, Conditioning(cond.embeds, cond.pooled))
        ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(2, 1)
        ref = unet(x, torch.tensor([300, 300]), cond.embeds,
                   added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": ids}).sample
        torch.testing.assert_close(plain, ref)


def test_mismatched_conditioning_batch_is_a_clear_error(tiny_unet, ddpm_scheduler):
    den = Denoiser(tiny_unet, ddpm_scheduler)
    with pytest.raises(ValueError, match="cond: batch size 2 does not divide the batch size of x_t \\(3\\)"):
        den.eps(torch.randn(3, 1, 16, 16), 10, torch.randn(2, 4, 32))


def test_float_timesteps_carry_a_tangent_through_the_unet(tiny_unet, ddpm_scheduler):
    den = Denoiser(tiny_unet, _scheduler("v_prediction"))
    x, cond = torch.randn(1, 1, 16, 16), torch.randn(1, 4, 32)
    t = torch.tensor([300.5])
    with den.ad_safe(), torch.no_grad():
        _, dt = torch.func.jvp(lambda tt: den.eps(x, tt, cond), (t,), (torch.ones(1),))
        h = 0.25
        fd = (den.eps(x, t + h, cond) - den.eps(x, t - h, cond)) / (2 * h)
    torch.testing.assert_close(dt, fd, atol=5e-4, rtol=1e-2)


# ------------------------------------------------------------------------------------------------ ad_safe
def test_ad_safe_swaps_processors_and_restores_them_even_on_error(tiny_unet):
    before = dict(tiny_unet.attn_processors)
    with ad_safe(tiny_unet):
        assert all(type(p) is AttnProcessor for p in tiny_unet.attn_processors.values())
    assert tiny_unet.attn_processors == before
    with pytest.raises(KeyError), Denoiser(tiny_unet, _scheduler()).ad_safe():
        raise KeyError("boom")
    after = tiny_unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


@pytest.mark.parametrize("backend", ["classic", "math"])
def test_forward_mode_ad_works_inside_ad_safe_and_agrees_with_finite_differences(tiny_unet, ddpm_scheduler, backend):
    den = Denoiser(tiny_unet, ddpm_scheduler)
    g = torch.Generator().manual_seed(5)
    x, v = torch.randn(2, 1, 1, 16, 16, generator=g)
    cond = torch.randn(1, 4, 32, generator=g)
    f = den.eps_fn(200, cond)
    with torch.no_grad():
        with den.ad_safe(backend):
            _, jv = torch.func.jvp(f, (x,), (v,))
        h = 1e-2
        fd = (f(x + h * v) - f(x - h * v)) / (2 * h)
    torch.testing.assert_close(jv, fd, atol=5e-3, rtol=5e-3)
