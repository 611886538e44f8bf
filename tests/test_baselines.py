"""Baselines ("the less-trained model"): each returns eps at the live inputs, and the live module is left as it was."""

import copy

import pytest
import torch
from diffusers import DDPMScheduler
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from mnemoguard.baselines import (
    AdapterDisabledBaseline,
    Baseline,
    UnconditionalBaseline,
    adapters_disabled,
    ema_baseline,
    load_lora_baseline,
    load_unet_baseline,
)
from mnemoguard.denoiser import Denoiser
from mnemoguard.ema import EMAModel
from mnemoguard.signals.curvature import curvature_diff_map
from tests.conftest import make_tiny_unet


def _scheduler():
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def _lora_unet(seed=0):
    unet = make_tiny_unet(seed=seed).eval()
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    _perturb_lora(unet, seed=seed)
    return unet


def _perturb_lora(unet, seed, scale=0.5):
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.add_(scale * torch.randn(p.shape, generator=g))


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 1, 16, 16, generator=g), torch.tensor([100, 700]), torch.randn(2, 4, 32, generator=g)


def _snapshot(module):
    return {n: (p.detach().clone(), p.requires_grad) for n, p in module.named_parameters()}


def _assert_unchanged(module, before):
    now = dict(module.named_parameters())
    assert now.keys() == before.keys()
    for n, (value, flag) in before.items():
        assert torch.equal(now[n], value) and now[n].requires_grad == flag, n


def test_unconditional_baseline_is_the_uncond_branch_of_the_batched_call(tiny_unet):
    den = Denoiser(tiny_unet, _scheduler())
    x, t, cond = _inputs()
    uncond = torch.zeros(1, 4, 32)
    base = UnconditionalBaseline(den, uncond)
    assert isinstance(base, Baseline)
    with torch.no_grad():
        _, eps_u = den.eps_cond_uncond(x, t, cond, uncond)
        torch.testing.assert_close(base.eps(x, t, cond), eps_u, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(base.eps_fn(t, cond)(x), eps_u, atol=1e-5, rtol=1e-5)


def test_disabled_adapters_give_the_base_model_and_the_live_lora_comes_back():
    unet = _lora_unet()
    den = Denoiser(unet, _scheduler())
    plain = Denoiser(make_tiny_unet(seed=0).eval(), _scheduler())  # same base weights, no LoRA
    x, t, cond = _inputs(1)
    before = _snapshot(unet)
    with torch.no_grad():
        live = den.eps(x, t, cond)
        base = AdapterDisabledBaseline(den).eps(x, t, cond)
        torch.testing.assert_close(base, plain.eps(x, t, cond), atol=1e-5, rtol=1e-5)
        assert (live - base).abs().max() > 1e-3
        torch.testing.assert_close(den.eps(x, t, cond), live)
    _assert_unchanged(unet, before)


def test_adapter_toggle_restores_each_layer_and_requires_grad_even_on_error():
    from peft.tuners.tuners_utils import BaseTunerLayer

    unet = _lora_unet()
    for n, p in unet.named_parameters():
        p.requires_grad_("lora_A" in n)  # an unusual trainable set that peft's toggle would rewrite
    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    layers[0].enable_adapters(False)  # one layer was already off: it must stay off
    before = _snapshot(unet)
    with pytest.raises(RuntimeError, match="boom"), adapters_disabled(unet):
        assert all(layer.disable_adapters for layer in layers)
        raise RuntimeError("boom")
    assert layers[0].disable_adapters and not any(layer.disable_adapters for layer in layers[1:])
    _assert_unchanged(unet, before)


def test_adapter_baseline_needs_a_lora(tiny_unet):
    with pytest.raises(ValueError, match="no peft adapter layers"):
        AdapterDisabledBaseline(Denoiser(tiny_unet, _scheduler()))


@pytest.mark.parametrize("source", ["ema", -1, 0])
def test_ema_and_snapshot_baselines_match_weights_copied_into_a_clone(source):
    unet = _lora_unet()
    ema = EMAModel(unet, decay=0.5, snapshot_every=1, num_snapshots=2)
    for step in range(3):
        _perturb_lora(unet, seed=step + 1, scale=0.3)
        ema.step(unet)
    _perturb_lora(unet, seed=9, scale=0.3)  # the live weights move on after the last snapshot
    den = Denoiser(unet, _scheduler())
    x, t, cond = _inputs(2)
    before = _snapshot(unet)
    clone = copy.deepcopy(unet)
    ema.copy_to(clone, source)
    with torch.no_grad():
        got = ema_baseline(den, ema, source).eps(x, t, cond)
        torch.testing.assert_close(got, Denoiser(clone, _scheduler()).eps(x, t, cond), atol=1e-5, rtol=1e-5)
        assert (got - den.eps(x, t, cond)).abs().max() > 1e-4
    _assert_unchanged(unet, before)


def test_ema_baseline_follows_the_moving_average():
    unet = make_tiny_unet().eval()
    ema = EMAModel(unet, decay=0.9)
    den = Denoiser(unet, _scheduler())
    base = ema_baseline(den, ema)
    x, t, cond = _inputs(3)
    with torch.no_grad():
        first = base.eps(x, t, cond)
        for p in unet.parameters():
            p.add_(0.01)
        ema.step(unet)
        ema.step(unet)
        assert (base.eps(x, t, cond) - first).abs().max() > 1e-6


def test_ema_of_another_model_is_rejected(tiny_unet):
    ema = EMAModel(_lora_unet())
    with pytest.raises(KeyError, match="the EMA tracks parameters the model lacks"):
        ema_baseline(Denoiser(tiny_unet, _scheduler()), ema)


def test_lora_checkpoint_baseline_reproduces_the_saved_adapter_without_loading_it(tmp_path):
    from diffusers import StableDiffusionPipeline

    unet = _lora_unet()
    den = Denoiser(unet, _scheduler())
    x, t, cond = _inputs(4)
    with torch.no_grad():
        saved_eps = den.eps(x, t, cond)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet))
    _perturb_lora(unet, seed=7)  # training goes on
    before = _snapshot(unet)
    for where in (tmp_path, tmp_path / "pytorch_lora_weights.safetensors"):
        base = load_lora_baseline(den, where)
        with torch.no_grad():
            torch.testing.assert_close(base.eps(x, t, cond), saved_eps, atol=1e-5, rtol=1e-5)
            assert (den.eps(x, t, cond) - saved_eps).abs().max() > 1e-3
    _assert_unchanged(unet, before)


def test_lora_checkpoint_with_other_targets_is_a_clear_error(tmp_path):
    from diffusers import StableDiffusionPipeline

    other = make_tiny_unet().eval()
    other.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["proj_in"]))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(other))
    with pytest.raises(KeyError, match="match no parameter of adapter 'default'"):
        load_lora_baseline(Denoiser(_lora_unet(), _scheduler()), tmp_path)


@pytest.mark.parametrize("layout", ["unet_folder", "pipeline_folder"])
def test_unet_checkpoint_baseline_loads_an_earlier_model_from_disk(tmp_path, tiny_unet, layout):
    earlier = make_tiny_unet(seed=3).eval()
    earlier.save_pretrained(tmp_path / "unet")
    den = Denoiser(tiny_unet, _scheduler())
    base = load_unet_baseline(tmp_path / "unet" if layout == "unet_folder" else tmp_path, like=den)
    x, t, cond = _inputs(5)
    with torch.no_grad():
        torch.testing.assert_close(base.eps(x, t, cond), Denoiser(earlier, _scheduler()).eps(x, t, cond))
    assert all(not p.requires_grad for p in base.denoiser.unet.parameters())
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_unet_baseline(tmp_path / "nowhere", like=den)


def test_baselines_plug_into_the_curvature_difference_map_without_touching_gradients():
    unet = _lora_unet()
    den = Denoiser(unet, _scheduler())
    x, _, cond = _inputs(6)
    base = AdapterDisabledBaseline(den)
    m = curvature_diff_map(den.eps_fn(1, cond), base.eps_fn(1, cond), x, num_probes=3, generator=0)
    assert m.shape == (2, 16, 16) and torch.isfinite(m).all()
    assert all(p.grad is None for p in unet.parameters())
