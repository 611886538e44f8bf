"""Score-gap signals against literal re-computations in the style of the authors' code (Wen et al., Asthana & B.)."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from mnemoguard.denoiser import Denoiser
from mnemoguard.signals.score_gap import (
    ASTHANA_PRESETS,
    anisotropy_cosine,
    asthana_norm,
    asthana_score,
    band_mean,
    ddim_timesteps,
    live_baseline_gap,
    split_by_band,
    wen_norm,
    wen_score,
    wen_training_filter,
)
from tests.conftest import make_tiny_unet


def _ddim(prediction_type="epsilon"):
    return DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        steps_offset=1, clip_sample=False, set_alpha_to_one=False, prediction_type=prediction_type,
    )


def _prompts(num_prompts, num_generations, seed=0):
    """Text embeddings in diffusers' num_images_per_prompt layout (row p*G + j), plus the empty prompt."""
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(num_prompts, 4, 32, generator=g).repeat_interleave(num_generations, dim=0)
    return cond, torch.zeros(1, 4, 32)


# ------------------------------------------------------------------------------------------------ Wen et al.
def test_wen_score_matches_a_literal_cfg_sampling_loop_over_steps_and_generations():
    """Fast path (Denoiser + wen_score) vs the code's loop: norm per generation per step, then means."""
    unet, sched = make_tiny_unet().eval(), _ddim()
    P, G, steps = 2, 3, 4
    cond, uncond = _prompts(P, G)
    z0 = torch.randn(P * G, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    sched.set_timesteps(steps)

    # literal: one batch-2 style CFG call per step, python loops over generations
    z, total = z0.clone(), torch.zeros(P)
    with torch.no_grad():
        for t in sched.timesteps:
            emb = torch.cat([uncond.expand(P * G, -1, -1), cond])
            noise_u, noise_c = unet(torch.cat([z, z]), t, encoder_hidden_states=emb).sample.chunk(2)
            for p in range(P):
                for j in range(G):
                    total[p] += torch.norm(noise_c[p * G + j] - noise_u[p * G + j], p=2) / (steps * G)
            z = sched.step(noise_u + 7.5 * (noise_c - noise_u), t, z).prev_sample

    den = Denoiser(unet, sched)
    z, eps_cs, eps_us = z0.clone(), [], []
    with torch.no_grad():
        for t in sched.timesteps:
            eps_c, eps_u = den.eps_cond_uncond(z, t, cond, uncond)
            eps_cs.append(eps_c)
            eps_us.append(eps_u)
            z = sched.step(eps_u + 7.5 * (eps_c - eps_u), t, z).prev_sample
    torch.testing.assert_close(wen_score(eps_cs, eps_us, num_generations=G), total, atol=1e-5, rtol=1e-5)
    first = wen_score(eps_cs[0], eps_us[0], num_generations=G)
    torch.testing.assert_close(first, wen_norm(eps_cs[0], eps_us[0]).reshape(P, G).mean(1))


def test_wen_norm_is_the_l2_over_all_coordinates_of_each_sample():
    a, b = torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)
    a[0, 0, 0, 0], a[0, 1, 2, 2], a[1] = 3.0, 4.0, 1.0
    torch.testing.assert_close(wen_norm(a, b), torch.tensor([5.0, 6.0]))


def test_wen_score_rejects_a_batch_that_is_not_a_multiple_of_the_generations():
    with pytest.raises(ValueError, match="num_generations=2"):
        wen_score(torch.zeros(3, 1, 2, 2), torch.zeros(3, 1, 2, 2), num_generations=2)


def test_wen_training_filter_keeps_small_gaps_and_detaches():
    pred = torch.zeros(3, 1, 2, 2, requires_grad=True)
    uncond = torch.tensor([0.5, 1.5, 0.9]).reshape(3, 1, 1, 1).expand(3, 1, 2, 2)  # L2 = 2 * value
    gap, keep = wen_training_filter(pred, uncond, threshold=2.0)
    torch.testing.assert_close(gap, torch.tensor([1.0, 3.0, 1.8]))
    assert keep.tolist() == [True, False, True] and not gap.requires_grad
    assert wen_training_filter(pred, uncond, threshold=None)[1].all()


# -------------------------------------------------------------------------------------------- live vs baseline, bands
def test_live_baseline_gap_is_per_sample_and_optionally_in_score_space():
    live, base = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    torch.testing.assert_close(live_baseline_gap(live, base), torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(live_baseline_gap(live, base, sigma=torch.tensor([0.5, 2.0])), torch.tensor([4.0, 1.0]))
    with pytest.raises(ValueError, match=r"same shape, found \(2, 1, 2, 2\) and \(1, 1, 2, 2\)"):
        live_baseline_gap(live, base[:1])


def test_band_split_keeps_bands_apart_and_marks_empty_bands_nan():
    values = torch.tensor([1.0, 2.0, 3.0, 10.0])
    t = torch.tensor([10, 150, 199, 800])
    bands = [(0, 200), (200, 600), (600, 1000)]
    parts = split_by_band(values, t, bands)
    assert list(parts) == bands
    assert parts[(0, 200)].tolist() == [1.0, 2.0, 3.0] and parts[(200, 600)].numel() == 0
    means = band_mean(values, t, bands)
    assert means[0] == 2.0 and torch.isnan(means[1]) and means[2] == 10.0
    with pytest.raises(ValueError, match="t_lo < t_hi"):
        split_by_band(values, t, [(500, 100)])


# ------------------------------------------------------------------------------------------------ Asthana & B.
def test_ddim_timesteps_are_the_sd_schedule_used_by_the_detector():
    ts = ddim_timesteps(50)
    sched = _ddim()
    sched.set_timesteps(50)
    assert ts == sched.timesteps.tolist()
    assert ts[0] == 981 and ts[-3] == 41 and ts[-1] == 1


def test_presets_carry_the_published_gammas():
    assert (ASTHANA_PRESETS["sd1"].gamma1, ASTHANA_PRESETS["sd1"].gamma2) == (1.0, 2.0)
    assert (ASTHANA_PRESETS["sd2"].gamma1, ASTHANA_PRESETS["sd2"].gamma2) == (1.0, 0.1)
    assert (ASTHANA_PRESETS["realistic_vision"].gamma1, ASTHANA_PRESETS["realistic_vision"].gamma2) == (2.0, 1.0)
    assert ASTHANA_PRESETS["sd2"].prediction_type == "v_prediction"


@pytest.mark.parametrize("mode", ["x,c|x", "x,x|c", "x|c,c|x"])
@pytest.mark.parametrize("normalization", [None, "L1", "L2"])
def test_anisotropy_cosine_matches_a_per_pixel_loop(mode, normalization):
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(2, 2, 4, 3, 3, generator=g, dtype=torch.float64)
    if normalization == "L2":
        cn, un = (e / (e.norm(dim=(2, 3), keepdim=True) + 1e-6) for e in (c, u))
    elif normalization == "L1":
        cn, un = (e / e.abs().sum(dim=(1, 2, 3), keepdim=True) for e in (c, u))
    else:
        cn, un = c, u
    ref = torch.zeros(2, dtype=torch.float64)
    for b in range(2):
        for h in range(3):
            for w in range(3):
                a, d = {"x,c|x": (un, cn - un), "x,x|c": (un, cn), "x|c,c|x": (cn, cn - un)}[mode]
                va, vd = a[b, :, h, w], d[b, :, h, w]
                ref[b] += (va @ vd) / (va.norm() * vd.norm()) / 9
    torch.testing.assert_close(anisotropy_cosine(c, u, mode=mode, normalization=normalization), ref)


def _asthana_literal(unet, sched, x_T, cond, uncond, *, G, sd_ver, gammas, mode="x,c|x"):
    """The detector as the authors' pipeline computes it: two CFG calls on x_T, chunk, per-generation means."""
    sched.set_timesteps(50)
    t, t_cos = sched.timesteps[0], sched.timesteps[-3]
    emb = torch.cat([uncond.expand(x_T.shape[0], -1, -1), cond])
    inp = torch.cat([x_T] * 2)
    with torch.no_grad():
        out = unet(inp, t, encoder_hidden_states=emb, return_dict=False)[0]
        out_cos = unet(inp, t_cos, encoder_hidden_states=emb, return_dict=False)[0]
    ab = sched.alphas_cumprod[t]
    if sd_ver == 1:
        uc, c = out.chunk(2)
        comb = c - uc
    else:
        uc, c = ((ab.sqrt() * out - inp) / (1 - ab)).chunk(2)
        comb = c - uc
    uc_cos, c_cos = out_cos.chunk(2)
    pair = {"x,c|x": (uc_cos, c_cos - uc_cos), "x,x|c": (c_cos, uc_cos), "x|c,c|x": (c_cos, c_cos - uc_cos)}[mode]
    cos = F.cosine_similarity(*pair, dim=1)
    norms = torch.norm(comb.view(x_T.shape[0], -1), dim=1)
    scores = []
    for p in range(x_T.shape[0] // G):
        n = norms[p * G : (p + 1) * G].mean()
        cs = torch.tensor([cos[p * G + j].mean() for j in range(G)]).mean()
        scores.append(gammas[0] * n + gammas[1] * cs)
    return torch.stack(scores)


@pytest.mark.parametrize("preset,prediction_type", [("sd1", "epsilon"), ("sd2", "v_prediction")])
def test_asthana_score_matches_the_authors_computation_on_a_tiny_unet(preset, prediction_type):
    unet, sched = make_tiny_unet().eval(), _ddim(prediction_type)
    P, G = 2, 2
    cond, uncond = _prompts(P, G, seed=1)
    x_T = torch.randn(P * G, 1, 16, 16, generator=torch.Generator().manual_seed(51))
    p = ASTHANA_PRESETS[preset]
    ref = _asthana_literal(
        unet, sched, x_T, cond, uncond, G=G, sd_ver=1 if preset == "sd1" else 2, gammas=(p.gamma1, p.gamma2)
    )

    den = Denoiser(unet, sched)
    ts = ddim_timesteps(p.num_inference_steps)
    t_hi, t_lo = ts[p.t_hi_index], ts[p.t_lo_index]
    with torch.no_grad():
        if prediction_type == "epsilon":
            hi, lo = den.eps_cond_uncond(x_T, t_hi, cond, uncond), den.eps_cond_uncond(x_T, t_lo, cond, uncond)
        else:  # their v-prediction path works on the raw v outputs
            hi, lo = den.raw_cond_uncond(x_T, t_hi, cond, uncond), den.raw_cond_uncond(x_T, t_lo, cond, uncond)
    score = asthana_score(*hi, *lo, preset=preset, alpha_bar_hi=den.alpha_bar(t_hi), num_generations=G)
    torch.testing.assert_close(score, ref, atol=1e-5, rtol=1e-5)


def test_asthana_norm_needs_alpha_bar_for_v_prediction():
    with pytest.raises(ValueError, match="alpha_bar"):
        asthana_norm(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), prediction_type="v_prediction")


def test_anisotropy_cosine_rejects_unknown_modes_and_flat_inputs():
    with pytest.raises(ValueError, match="mode must be one of"):
        anisotropy_cosine(torch.ones(1, 4, 2, 2), torch.ones(1, 4, 2, 2), mode="x,c")
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        anisotropy_cosine(torch.ones(1, 4), torch.ones(1, 4))
