"""Calibrate Wen et al.'s training-time filter threshold τ on a finished fine-tuning bench run.

    OMP_NUM_THREADS=1 python scripts/calibrate_wen_threshold.py outputs/bench_ft_full

The filter (``guard.regularizers.wen_filter``) drops a training sample when ``||eps(x_t, c) - eps(x_t, "")||_2``
(over all values of the sample) reaches τ. Its published value (2, SD 1.4 latents) need not suit other data, so this
reads the gap of every planted (duplicated) training image and of 200 plain ones, at 8 random timesteps each, under
the base UNet and the run's checkpoints, and prints quantiles and the fraction above τ for a few candidates. The
suggested τ drops 5 % of plain samples at the base model (its 95th percentile); BENCHMARKS.md records what it gave.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

from mnemoguard.denoiser import Denoiser  # noqa: E402
from mnemoguard.family import noise_schedule  # noqa: E402
from mnemoguard.testbed import load_ground_truth  # noqa: E402
from mnemoguard.trainer.base_model import resolve_base  # noqa: E402
from mnemoguard.trainer.models import load_components  # noqa: E402

KINDS = ("global", "plain")


@torch.no_grad()
def gaps(den: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
         batch: int = 256) -> torch.Tensor:
    """``||eps_c - eps_0||_2`` per row of ``x_t``."""
    out = []
    for s in range(0, len(x_t), batch):
        xb, tb, cb = x_t[s:s + batch], t[s:s + batch], cond[s:s + batch]
        out.append((den.eps(xb, tb, cb).float() - den.eps(xb, tb, uncond).float()).flatten(1).norm(dim=1))
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="a finished `mnemoguard bench` run of the fine-tuning variant")
    p.add_argument("--base", default="builtin:digits16")
    p.add_argument("--checkpoints", default="500,1000", help="checkpoint steps to read besides the base")
    p.add_argument("--draws", type=int, default=8, help="timesteps per image")
    p.add_argument("--num-plain", type=int, default=200)
    a = p.parse_args()

    gt = load_ground_truth(a.run / "testbed")
    images = gt.unique_training_images((-1.0, 1.0))
    kinds = np.array(images.kinds)
    rng = np.random.default_rng(0)
    plain = np.where(kinds == "plain")[0]
    rows = np.concatenate([np.where(kinds == "global")[0],
                           np.sort(rng.choice(plain, size=min(a.num_plain, len(plain)), replace=False))])
    kind = np.repeat(kinds[rows], a.draws)
    parts = load_components(a.run / "train" / "final")  # the run's text encoder, tokenizer and DDPM scheduler
    g = torch.Generator().manual_seed(1234)
    x0 = images.images[rows].repeat_interleave(a.draws, 0)
    t = torch.randint(0, parts.noise_scheduler.config.num_train_timesteps, (len(x0),), generator=g)
    x_t = noise_schedule(parts.noise_scheduler).add_noise(x0, torch.randn(x0.shape, generator=g), t)
    cond = parts.encode_prompt([images.captions[i] for i in rows]).embeds.repeat_interleave(a.draws, 0)
    uncond = parts.encode_prompt([""]).embeds

    models = {"base": resolve_base(a.base)}
    models.update({f"step {s}": a.run / "train" / f"checkpoint-{s}" / "unet" for s in a.checkpoints.split(",")})
    measured = {name: gaps(Denoiser(UNet2DConditionModel.from_pretrained(path).eval(), parts.noise_scheduler), x_t, t,
                           cond, uncond).numpy() for name, path in models.items()}
    print(f"gap quantiles 5/25/50/75/95 over {x0[0].numel()} values per sample, {a.draws} timesteps per image:")
    for name, gap in measured.items():
        for k in KINDS:
            q = np.percentile(gap[kind == k], [5, 25, 50, 75, 95])
            print(f"  {name:10s} {k:7s} " + " ".join(f"{v:6.2f}" for v in q))
    tau = float(np.percentile(measured["base"][kind == "plain"], 95))
    print(f"suggested tau (5 % of plain samples dropped at the base): {tau:.2f}")
    for cand in sorted({round(tau, 2), 1.5, 2.0, 2.5, 3.0}):
        cells = ", ".join(f"{name}: planted {np.mean(g_[kind == 'global'] >= cand):.2f} / plain "
                          f"{np.mean(g_[kind == 'plain'] >= cand):.2f}" for name, g_ in measured.items())
        print(f"  tau {cand:4.2f} drops {cells}")


if __name__ == "__main__":
    main()
