"""Shared test set-up: offline, single-threaded torch, tiny diffusers models built from configs."""

import os

# Never reach a model hub from tests; keep caches inside the test session.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two torch jobs at 2 threads stall each other on a 2-core CI box; tests are tiny, one thread is plenty.
torch.set_num_threads(int(os.environ.get("MNEMOGUARD_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.getbasetemp() / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """accelerate keeps one process-wide state (mixed precision, ...): each test builds its own Accelerator."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def make_tiny_unet(
    in_channels: int = 1, sample_size: int = 16, cross_attention_dim: int = 32, seed: int = 0
) -> "torch.nn.Module":
    """The CPU-sized conditional UNet used across tests (~1 M parameters)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )


@pytest.fixture
def tiny_unet():
    return make_tiny_unet().eval()


@pytest.fixture
def ddpm_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
