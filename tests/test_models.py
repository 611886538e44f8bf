import pytest
import torch

from mnemoguard.config import LoraSettings, TinyModelConfig
from mnemoguard.trainer.models import add_lora, build_tiny_components, load_components


def _unet_out(parts, batch=2):
    torch.manual_seed(1)
    cfg = parts.unet.config
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    emb = parts.encode_prompt(["a cat", "the dog"][:batch]).embeds
    with torch.no_grad():
        return parts.unet(x, torch.tensor([10, 500][:batch]), emb).sample


@pytest.mark.parametrize("latent", [False, True])
def test_tiny_components_save_and_reload_offline(tmp_path, latent):
    parts = build_tiny_components(TinyModelConfig(text_encoder="clip", latent=latent, channels=3), tmp_path / "b")
    assert parts.latent == latent and parts.image_size == (32 if latent else 16)
    parts.save_pretrained(tmp_path / "model")
    loaded = load_components(tmp_path / "model")
    assert loaded.latent == latent and loaded.text_max_length == 16
    torch.testing.assert_close(_unet_out(parts), _unet_out(loaded))
    torch.testing.assert_close(parts.encode_prompt(["a cat"]).embeds, loaded.encode_prompt(["a cat"]).embeds)


def test_latent_tiny_model_is_a_real_stable_diffusion_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    parts = build_tiny_components(TinyModelConfig(text_encoder="clip", latent=True, channels=3), tmp_path / "b")
    parts.save_pretrained(tmp_path / "model")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "model", safety_checker=None,
                                                   requires_safety_checker=False)
    images = pipe(["a cat"], num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3)


def test_minilm_text_encoder_gives_real_per_token_states(tmp_path):
    parts = build_tiny_components(TinyModelConfig(text_encoder="minilm"), tmp_path)
    emb = parts.encode_prompt(["a photo of a cat", "a photo of a kitten", "a handwritten digit seven"]).embeds
    assert emb.shape == (3, 16, 384) and parts.unet.config.cross_attention_dim == 384
    pooled = torch.nn.functional.normalize(emb.mean(1), dim=-1)
    assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2]


def test_lora_trains_only_the_adapters_and_starts_at_the_base_model(tmp_path):
    parts = build_tiny_components(TinyModelConfig(text_encoder="clip"), tmp_path)
    base = _unet_out(parts)
    add_lora(parts.unet, LoraSettings(enabled=True, rank=4))
    trainable = [n for n, p in parts.unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    torch.testing.assert_close(_unet_out(parts), base)


def test_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no diffusers directory"):
        load_components(tmp_path / "absent")
    (tmp_path / "half" / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="missing scheduler/, text_encoder/, tokenizer/"):
        load_components(tmp_path / "half")
