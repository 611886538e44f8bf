"""Fine-tuning from a base UNet: the tiny model starts from saved weights; the testbed's variant avoids its images."""

import pytest
import torch

from mnemoguard.bench.config import load_bench_config
from mnemoguard.config import ConfigError, TinyModelConfig
from mnemoguard.testbed import Layout, load_source, load_testbed_config
from mnemoguard.testbed.plan import make_plan
from mnemoguard.trainer.base_model import BUILTIN_BASES, base_training_indices, resolve_base
from mnemoguard.trainer.models import build_tiny_components


def test_tiny_model_starts_from_the_base_weights(tmp_path):
    base = build_tiny_components(TinyModelConfig(text_encoder="clip", seed=3), tmp_path / "a").unet
    base.save_pretrained(tmp_path / "base")
    fresh = build_tiny_components(TinyModelConfig(text_encoder="clip", seed=0), tmp_path / "b").unet
    loaded = build_tiny_components(TinyModelConfig(text_encoder="clip", seed=0, base=str(tmp_path / "base")),
                                   tmp_path / "c").unet
    ref, got, rnd = base.state_dict(), loaded.state_dict(), fresh.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert not all(torch.equal(ref[k], rnd[k]) for k in ref)


def test_a_base_of_another_shape_is_refused_with_the_mismatch(tmp_path):
    other = build_tiny_components(TinyModelConfig(text_encoder="clip", block_out_channels=[32, 32]), tmp_path / "a")
    other.unet.save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match=r"does not fit model.tiny's UNet config \(.*base \(32,"):
        build_tiny_components(TinyModelConfig(text_encoder="clip", base=str(tmp_path / "base")), tmp_path / "b")


def test_unknown_bases_say_what_was_expected(tmp_path):
    with pytest.raises(ValueError, match=r"unknown builtin 'builtin:nope'; available: \['builtin:digits16'\]"):
        resolve_base("builtin:nope")
    with pytest.raises(FileNotFoundError, match=r"expected a diffusers UNet folder .* found '.*missing'"):
        resolve_base(tmp_path / "missing")


def test_the_shipped_base_is_small_and_fits_the_demo_model():
    path = resolve_base("builtin:digits16")
    assert path == BUILTIN_BASES["builtin:digits16"]
    size = (path / "diffusion_pytorch_model.safetensors").stat().st_size
    assert size <= 10 * 2**20  # the limit for a shipped base
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(path)
    assert (unet.config.sample_size, unet.config.in_channels, unet.config.cross_attention_dim) == (16, 1, 384)


def test_finetuning_testbed_uses_only_images_the_base_never_saw():
    cfg = load_testbed_config({"source": {"exclude_base": True}, "plain": {"num_images": 300},
                               "duplicated": {"num_images": 10}, "template": {"num_images": 50},
                               "held_out": {"num_images": 20}})
    plan = make_plan(cfg, load_source("digits"), Layout.from_config(cfg))
    used = {i for p in plan.captions for i in p.source_indices}
    assert len(used) == 380 and not used & set(base_training_indices(1797).tolist())


def test_bench_refuses_the_builtin_base_on_images_it_trained_on():
    with pytest.raises(ConfigError, match="testbed.source.exclude_base=true"):
        load_bench_config(None, ["train.base=builtin:digits16"])
    cfg = load_bench_config("recipes/bench/finetune_lora.yaml")
    assert cfg.train.lora and cfg.testbed.source.exclude_base and cfg.testbed.duplicated.num_images == 12
    with pytest.raises(ConfigError, match="source.exclude_base"):
        load_testbed_config({"source": {"name": "faces", "exclude_base": True}})


def test_bench_finetune_recipe_starts_from_the_base_with_lora(tmp_path):
    from mnemoguard.bench.recipe import bench_recipe
    from mnemoguard.testbed import build_testbed

    cfg = load_bench_config("recipes/bench/finetune_lora.yaml", ["train.monitor_every=0"])
    gt = build_testbed({"plain": {"num_images": 20}, "duplicated": {"num_images": 2, "copies": 2},
                        "template": {"enabled": False}, "held_out": {"num_images": 2},
                        "unseen": {"num_global_style": 2, "num_template_style": 0}}, tmp_path / "tb")
    recipe = bench_recipe(cfg, gt, tmp_path)
    assert recipe.model.tiny.base == "builtin:digits16"
    assert recipe.model.lora.enabled and recipe.model.lora.rank == 16 and recipe.training.learning_rate == 2e-3
    assert not recipe.guard.enabled
