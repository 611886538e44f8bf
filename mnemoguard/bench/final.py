"""The benchmark's end-of-training analyses: localisation maps on template captions, and the danger zone (curves of
the training data beside the per-noise-level memorization rate)."""

from __future__ import annotations

import time
from typing import Any

import torch

from ..evaluation import nearest_neighbour_ratio
from ..sampling import sampling_steps
from ..signals import danger_zone_band, danger_zone_curves, distinct_rows
from ..testbed.ground_truth import GroundTruth, TrainingImages
from .config import BenchConfig
from .probes import (
    ProbeModel,
    denoise_from,
    probe_latents,
    sample_with_trajectory,
    template_verbatim_rate,
)
from .signals import localization_maps, localization_metrics, nearest_step

__all__ = [
    "caption_token_mask",
    "danger_zone_analysis",
    "final_analyses",
    "localization_analysis",
    "phrase_token_mask",
]


def final_analyses(cfg: BenchConfig, gt: GroundTruth, train: TrainingImages, model: ProbeModel,
                   tokenizer: Any) -> dict[str, Any]:
    """``{"localization": ..., "danger_zone": ...}`` for the model as it is now (the last checkpoint)."""
    out: dict[str, Any] = {}
    if cfg.localization.enabled and gt.template and gt.captions("template"):
        out["localization"] = localization_analysis(cfg, gt, model, tokenizer)
    if cfg.danger_zone.enabled:
        out["danger_zone"] = danger_zone_analysis(cfg, gt, train, model)
    return out


def phrase_token_mask(tokenizer: Any, captions: list[str], phrase: str) -> torch.Tensor | None:
    """``[B, L]`` bool: the tokens of ``phrase`` inside each caption's token ids (as the text encoder sees them);
    ``None`` when a caption does not contain the phrase's tokens."""
    tok = tokenizer
    length = tok.model_max_length  # the text encoder's caption length (the tiny models set it to text_max_length)
    ids = tok(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt")["input_ids"]
    target = tok(phrase, add_special_tokens=False)["input_ids"]
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for b, row in enumerate(ids.tolist()):
        hits = [i for i in range(len(row) - len(target) + 1) if row[i : i + len(target)] == target]
        if not hits or not target:
            return None
        mask[b, hits[0] : hits[0] + len(target)] = True
    return mask


def caption_token_mask(tokenizer: Any, captions: list[str]) -> torch.Tensor:
    """``[B, L]`` bool: every real token of each caption (the attention mask without special tokens)."""
    tok = tokenizer
    length = tok.model_max_length  # the text encoder's caption length (the tiny models set it to text_max_length)
    enc = tok(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt",
              return_special_tokens_mask=True)
    real = enc["attention_mask"].bool() if "attention_mask" in enc else torch.ones_like(enc["input_ids"], dtype=bool)
    return real & ~enc["special_tokens_mask"].bool()


def localization_analysis(cfg: BenchConfig, gt: GroundTruth, model: ProbeModel, tokenizer: Any) -> dict[str, Any]:
    """Maps on template captions vs the template square and the constraint border, plus the template-verbatim rate
    of template and unseen template-style captions at every probe guidance."""
    lc, pc = cfg.localization, cfg.probes
    captions = gt.captions("template")[: lc.num_captions]
    unseen = gt.captions("unseen", "template")[: lc.num_captions]
    w = max(pc.guidance)
    cond = model.encode(captions)
    latents = probe_latents([cfg.seed * 1_000_003 + 500_000 + i for i in range(len(captions))], model.image_shape)
    traj = sample_with_trajectory(model, cond, latents, w, pc.num_inference_steps, pc.batch_size)
    i = lc.step_index % len(traj.timesteps)
    t = traj.timesteps[i]
    tokens, token_choice = None, None
    if lc.cross_attention:
        tokens, token_choice = phrase_token_mask(tokenizer, captions, gt.template["phrase"]), "phrase"
        if tokens is None:  # the phrase was cut by the token limit, or tokenised differently in context
            tokens, token_choice = caption_token_mask(tokenizer, captions), "all caption tokens"
    maps, passes, seconds = localization_maps(model, traj.x[i], t, cond, num_probes=lc.num_probes, method=lc.method,
                                              seed=cfg.seed, token_mask=tokens)
    tmask, cmask = gt.template_mask(), gt.constraint_mask() if gt.constraint else None
    table = {}
    for name, m in maps.items():
        table[name] = {**localization_metrics(m, tmask, cmask), "passes": passes[name] + 2 * i,
                       "seconds": seconds[name] + traj.seconds * (i + 1) / len(traj.timesteps)}
    verbatim: dict[str, dict[str, float]] = {}
    unseen_latents = probe_latents([cfg.seed * 1_000_003 + 600_000 + k for k in range(len(unseen))], model.image_shape)
    for group, caps, z in (("template", captions, latents), ("unseen_template", unseen, unseen_latents)):
        if not caps:
            continue
        c = cond if group == "template" else model.encode(caps)
        for g in sorted(set(pc.guidance)):
            if group == "template" and g == w:
                imgs = traj.images
            else:
                imgs = sample_with_trajectory(model, c, z, g, pc.num_inference_steps, pc.batch_size).images
            verbatim.setdefault(group, {})[f"w={g:g}"] = template_verbatim_rate(gt, imgs)
    return {
        "captions": captions,
        "timestep": t,
        "guidance": w,
        "cross_attention_tokens": token_choice,
        "metrics": table,
        "template_verbatim": verbatim,
        "examples": {"images": traj.images[:4, 0].tolist(), "maps": {k: v[:4].tolist() for k, v in maps.items()}},
        "template_mask": tmask.tolist(),
        "constraint_mask": cmask.tolist() if cmask is not None else None,
    }


def danger_zone_analysis(cfg: BenchConfig, gt: GroundTruth, train: TrainingImages, model: ProbeModel) -> dict:
    """W_σ of the distinct training images (copies as their multiplicity) and C_σ of the held-out images against
    them (Dodson et al.'s estimators), the band they imply, and the memorization rate of training images noised to
    several σ and denoised back (our per-noise-level protocol), per kind (global, plain)."""
    dz, pc = cfg.danger_zone, cfg.probes
    start = time.perf_counter()
    files = [f for r in gt.records if r.trained for f in r.files]
    rows, multiplicity, _ = distinct_rows(gt.load_images(files))  # [-1, 1], what the model is trained on
    held_out = gt.held_out_images()[0] if gt.by_kind("held_out") else None
    lo, hi = dz.sigma_range
    sigmas = torch.logspace(torch.log10(torch.tensor(lo)), torch.log10(torch.tensor(hi)), dz.num_sigmas,
                            dtype=torch.float64)
    curves = danger_zone_curves(rows, sigmas, num_probes=dz.num_probes, generator=torch.Generator().manual_seed(
        cfg.seed), multiplicity=multiplicity, population=held_out)
    schedule = model.denoiser.schedule
    band = danger_zone_band(curves.sigmas, curves.max_posterior_weight, curves.coverage,
                            level_sigmas=schedule.level_sigmas())
    curve_seconds = time.perf_counter() - start
    ts = [int(schedule.levels_of(torch.tensor(t))) for t, _ in sampling_steps(model.denoiser,
                                                                                pc.num_inference_steps)]
    starts = sorted({nearest_step(ts, t) for t in dz.start_timesteps}, reverse=True)
    rates: dict[str, list[float]] = {}
    for kind in ("global", "plain"):
        idx = [k for k, kk in enumerate(train.kinds) if kk == kind][: dz.num_images]
        if not idx:
            continue
        x0 = train.images[idx] * 2 - 1
        cond = model.encode([train.captions[k] for k in idx])
        for s in starts:
            imgs, _ = denoise_from(model, x0, cond, s, pc.num_inference_steps, seed=cfg.seed + s)
            res = nearest_neighbour_ratio(imgs, train.images, value_range=(0.0, 1.0))
            own = res.indices[:, 0] == torch.tensor(idx)
            rates.setdefault(kind, []).append(float(((res.ratio < pc.ratio_threshold) & own).float().mean()))
    start_t = [ts[s] for s in starts]  # levels of the starts
    sigma_t = schedule.level_sigmas()  # the danger-zone axis of each level
    return {
        "sigmas": curves.sigmas.tolist(),
        "max_posterior_weight": curves.max_posterior_weight.tolist(),
        "coverage": curves.coverage.tolist(),
        "band": {"sigma_lo": band.sigma_lo, "sigma_hi": band.sigma_hi, "t_lo": band.t_lo, "t_hi": band.t_hi,
                 "empty": band.empty},
        "start_timesteps": start_t,
        "start_sigmas": [float(sigma_t[t]) for t in start_t],
        "memorization_rate": rates,
        "num_train_rows": len(files),
        "num_distinct_images": int(rows.shape[0]),
        "seconds": {"curves": curve_seconds, "total": time.perf_counter() - start},
    }
