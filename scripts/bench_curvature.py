"""Benchmark: Kim & Lee curvature-difference maps with batched probes vs their sequential VJP loop.

The reference ("sequential") is the authors' computation: one forward pass on ``cat([z, z])`` with a graph, then
K ``autograd.grad(..., retain_graph=True)`` calls, one Rademacher probe each. The batched versions stack the K probes
along the batch and make one call (:func:`mnemoguard.signals.curvature.curvature_diff_map`):

- ``vjp``: one forward on 2K samples + one backward;
- ``jvp``: one ``torch.func.jvp`` on 2K samples (under ``ad_safe``: classic attention processors);
- ``fd``:  one forward on 4K samples, central finite differences (no AD).

Usage::

    OMP_NUM_THREADS=1 python scripts/bench_curvature.py                 # tiny UNet, CPU
    python scripts/bench_curvature.py --config sd15 --device cuda       # SD-1.5-sized UNet, random weights, fp16

Prints one line per method (ms per map, speed-up over the sequential loop) and the largest difference between the
sequential map and the batched VJP map computed with the same probes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mnemoguard.denoiser import Denoiser  # noqa: E402
from mnemoguard.signals.curvature import curvature_diff_map  # noqa: E402
from mnemoguard.signals.hutchinson import rademacher_probes  # noqa: E402


def build(config: str, device: str, dtype: torch.dtype):
    """UNet, scheduler, latent z and (cond, uncond) embeddings for one prompt."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    if config == "tiny":
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
            norm_num_groups=32,
        )
        size, seq, width = 16, 8, 32
    elif config == "sd15":  # runwayml/stable-diffusion-v1-5 unet/config.json (diffusers' defaults are SD 1.x)
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        size, seq, width = 64, 77, 768
    else:
        raise ValueError(f"--config must be 'tiny' or 'sd15', found {config!r}")
    unet = unet.to(device=device, dtype=dtype).eval().requires_grad_(False)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, steps_offset=1, clip_sample=False)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, size, size, generator=g).to(device=device, dtype=dtype)
    cond = torch.randn(1, seq, width, generator=g).to(device=device, dtype=dtype)
    uncond = torch.randn(1, seq, width, generator=g).to(device=device, dtype=dtype)
    return unet, sched, z, cond, uncond


def sequential_map(unet, z, t, cond, uncond, probes):
    """Kim & Lee's loop (compute_diag_h_diff_only / hutchinson_diag_from_output), probes given."""
    zg = z.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        eps_u, eps_c = unet(torch.cat([zg, zg]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        s = -(eps_c - eps_u)
        diag = torch.zeros_like(zg)
        for v in probes:
            (jtv,) = torch.autograd.grad((s * v).sum(), zg, retain_graph=True)
            diag += v * jtv
    diag = diag / len(probes)
    return (-diag.sum(dim=1)).relu().detach()


def timed(fn, repeats: int, device: str) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["tiny", "sd15"], default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                    help="default: float16 for sd15 on CUDA, float32 otherwise")
    ap.add_argument("--num-probes", type=int, default=16)
    ap.add_argument("--probe-batch", type=int, default=None, help="probes per batched call (memory bound)")
    ap.add_argument("--timestep", type=int, default=1, help="Kim & Lee use the last DDIM step, t=1")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--methods", default="vjp,jvp,fd")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype_name = args.dtype or ("float16" if args.config == "sd15" and args.device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    unet, sched, z, cond, uncond = build(args.config, args.device, dtype)
    den = Denoiser(unet, sched)
    t = torch.tensor(args.timestep, device=args.device)
    K = args.num_probes
    probes = rademacher_probes(z, K, generator=0)
    guidance = den.guidance_fn(t, cond, uncond)

    results = {"config": args.config, "device": args.device, "dtype": dtype_name, "num_probes": K,
               "torch_threads": torch.get_num_threads(), "probe_batch": args.probe_batch, "ms": {}}
    seq_ms, seq_map = timed(lambda: sequential_map(unet, z, t, cond, uncond, probes), args.repeats, args.device)
    results["ms"]["sequential_vjp"] = seq_ms
    print(f"{args.config} on {args.device} ({dtype_name}, {torch.get_num_threads()} threads), K={K}, "
          f"{args.repeats} repeats, median ms per map")
    print(f"  sequential VJP loop (Kim & Lee): {seq_ms:9.1f} ms")
    for method in [m for m in args.methods.split(",") if m]:
        def run(method=method):
            kw = dict(num_probes=K, generator=0, method=method, probe_batch=args.probe_batch,
                      fd_step=1e-2 if dtype != torch.float32 else 1e-3)
            if method == "jvp":
                with den.ad_safe():
                    return curvature_diff_map(guidance, None, z, **kw)
            return curvature_diff_map(guidance, None, z, **kw)

        ms, m = timed(run, args.repeats, args.device)
        results["ms"][f"batched_{method}"] = ms
        diff = (m.float() - seq_map.float()).abs().max().item()
        scale = seq_map.float().abs().max().item()
        results.setdefault("max_abs_diff_vs_sequential", {})[method] = diff
        note = "same probes: must match" if method == "vjp" else "different estimator of the same diagonal"
        print(f"  batched {method:3s}: {ms:9.1f} ms   speed-up x{seq_ms / ms:5.2f}   "
              f"max |map - sequential| = {diff:.2e} (max map {scale:.2e}; {note})")
    results["speedup"] = {k: seq_ms / v for k, v in results["ms"].items() if k != "sequential_vjp"}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
