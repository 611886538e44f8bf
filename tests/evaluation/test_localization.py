"""Kim & Lee's localisation protocol (resize, log1p, global min-max, 101-threshold sweep) and pixel AUROC."""

import math

import numpy as np
import pytest
import torch

from mnemoguard.evaluation import (
    KIM_LEE_THRESHOLDS,
    localization_sweep,
    normalize_maps_global,
    pixel_auroc,
    upsample_maps,
)


def _raw(v):
    """Raw maps whose log1p is exactly ``v`` (up to rounding)."""
    return torch.expm1(torch.tensor(v, dtype=torch.float64))


def _hand_case():
    # after log1p + global min-max (min 0, max 1) the maps are exactly these values
    maps = _raw([[[0.0, 1.0], [0.0, 0.5]], [[0.25, 0.0], [0.0, 0.0]]])
    masks = torch.tensor([[[0, 1], [0, 1]], [[0, 0], [0, 0]]])  # sample 1 is a non-memorized (empty) mask
    return maps, masks


def test_thresholds_are_kim_lee_sweep():
    assert KIM_LEE_THRESHOLDS.numel() == 101
    assert KIM_LEE_THRESHOLDS[0].item() == pytest.approx(-1e-6)
    assert KIM_LEE_THRESHOLDS[-1].item() == pytest.approx(1 + 1e-6)


def test_sweep_hand_computed_curves():
    maps, masks = _hand_case()
    res = localization_sweep(maps, masks)
    # lowest threshold (just below 0): everything predicted.
    #   sample 0: inter 2, union 4 -> IoU 1/2; sample 1: inter 0, union 4 -> 0.  mIoU 1/4, gIoU 2/8, acc 2/8
    assert res.mean_iou[0].item() == pytest.approx(0.25)
    assert res.global_iou[0].item() == pytest.approx(0.25)
    assert res.accuracy[0].item() == pytest.approx(0.25)
    # highest threshold: nothing predicted. sample 0: IoU 0; sample 1: empty union -> IoU 1.
    #   mIoU 1/2, gIoU 0/2 = 0, acc (2 + 4)/8
    assert res.mean_iou[-1].item() == pytest.approx(0.5)
    assert res.global_iou[-1].item() == 0.0
    assert res.accuracy[-1].item() == pytest.approx(0.75)
    # thresholds in [0.25, 0.5): exactly the masked pixels are predicted -> all metrics 1.
    #   index 25 is 0.2499995 < 0.25: sample 0 is perfect but sample 1's pixel is still predicted -> mIoU (1 + 0) / 2;
    #   index 26 (0.26) is the first perfect threshold
    assert res.mean_iou[25].item() == pytest.approx(0.5)
    for best, thr in (
        (res.best_mean_iou, res.best_mean_iou_threshold),
        (res.best_global_iou, res.best_global_iou_threshold),
        (res.best_accuracy, res.best_accuracy_threshold),
    ):
        assert best == pytest.approx(1.0)
        assert thr == pytest.approx(0.26, abs=1e-5)


def test_each_metric_picks_its_own_best_threshold():
    # one sample, normalised values (0, 0.2, 0.6, 1) with only the 0.2 pixel in the mask.
    # IoU: threshold -1e-6 predicts all 4 pixels (1/4); 0.0099990 predicts {0.2, 0.6, 1} (1/3, the best);
    # higher thresholds drop the masked pixel (0). Accuracy: predicting nothing (3 of 4 right) beats every other cut.
    maps = _raw([[[0.0, 0.2, 0.6, 1.0]]])
    masks = torch.tensor([[[0, 1, 0, 0]]])
    res = localization_sweep(maps, masks)
    assert res.best_mean_iou == pytest.approx(1 / 3)
    assert res.best_mean_iou_threshold == pytest.approx(0.01, abs=1e-5)
    assert res.best_accuracy == pytest.approx(0.75)  # predict nothing: 3 of 4 correct
    assert res.best_accuracy_threshold == pytest.approx(1.0, abs=1e-5)


def test_normalisation_is_global_not_per_map():
    maps = _raw([[[0.0, 1.0]], [[0.0, 0.5]]])
    norm = normalize_maps_global(maps)
    torch.testing.assert_close(norm, torch.tensor([[[0.0, 1.0]], [[0.0, 0.5]]], dtype=torch.float64))


def test_weak_map_stays_dark_in_the_sweep():
    # identical shapes, one 10x weaker: with global normalisation its pixels fall below mid thresholds
    strong = _raw([[[0.0, 1.0]]])
    weak = _raw([[[0.0, 0.1]]])
    masks = torch.tensor([[[0, 1]], [[0, 1]]])
    res = localization_sweep(torch.cat([strong, weak]), masks)
    assert res.best_mean_iou == pytest.approx(1.0)
    assert res.mean_iou[50].item() == pytest.approx(0.5)  # at 0.5 the weak map predicts nothing


def _naive_sweep(maps, masks):
    up = upsample_maps(maps, tuple(masks.shape[1:]))
    a = torch.log1p(up)
    a = (a - a.min()) / (a.max() - a.min())
    gt = masks.bool()
    g_iou, m_iou, acc = [], [], []
    for th in KIM_LEE_THRESHOLDS:
        pred = a > th
        inter = (pred & gt).flatten(1).sum(1).double()
        union = (pred | gt).flatten(1).sum(1).double()
        ious = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
        m_iou.append(ious.mean().item())
        g_iou.append((inter.sum() / union.sum()).item() if union.sum() > 0 else 1.0)
        acc.append((pred == gt).double().mean().item())
    return np.array(g_iou), np.array(m_iou), np.array(acc)


@pytest.mark.parametrize("chunk_size", [1, 2, 64])
def test_sweep_matches_naive_threshold_loop_with_upsampling(chunk_size):
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(5, 4, 4, generator=g) ** 3 * 10
    masks = torch.rand(5, 8, 8, generator=g) > 0.6
    masks[2] = False  # an empty mask, as for non-memorized prompts
    res = localization_sweep(maps, masks, chunk_size=chunk_size)
    g_iou, m_iou, acc = _naive_sweep(maps, masks)
    np.testing.assert_allclose(res.global_iou.numpy(), g_iou, atol=1e-12)
    np.testing.assert_allclose(res.mean_iou.numpy(), m_iou, atol=1e-12)
    np.testing.assert_allclose(res.accuracy.numpy(), acc, atol=1e-12)


def test_upsampling_matches_pil_bilinear():
    pil = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    a = rng.random((8, 8)).astype(np.float32)
    expected = np.asarray(pil.fromarray(a, mode="F").resize((32, 32), pil.BILINEAR))
    got = upsample_maps(torch.from_numpy(a)[None], (32, 32))[0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_pixel_auroc_hand_computed():
    masks = torch.tensor([[[1, 0], [1, 0]]])
    assert pixel_auroc(torch.tensor([[[0.9, 0.1], [0.8, 0.2]]]), masks) == 1.0
    # positives {0.9, 0.05}, negatives {0.1, 0.2}: 0.9 wins 2, 0.05 wins 0 -> 2/4
    assert pixel_auroc(torch.tensor([[[0.9, 0.1], [0.05, 0.2]]]), masks) == pytest.approx(0.5)


def test_pixel_auroc_pools_pixels_over_the_set_and_matches_sklearn():
    sk_metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(3, 4, 4, generator=g)
    masks = torch.rand(3, 8, 8, generator=g) > 0.5
    up = upsample_maps(maps, (8, 8))
    expected = sk_metrics.roc_auc_score(masks.flatten().numpy(), up.flatten().numpy())
    assert pixel_auroc(maps, masks, chunk_size=2) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_with_all_empty_or_full_masks_raises():
    maps = torch.rand(2, 2, 2)
    with pytest.raises(ValueError, match="every mask is empty"):
        pixel_auroc(maps, torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="every mask is full"):
        pixel_auroc(maps, torch.ones(2, 2, 2))


@pytest.mark.parametrize(
    ("maps", "masks", "match"),
    [
        (torch.rand(2, 2, 2), torch.full((2, 2, 2), 0.7), "binary"),
        (torch.rand(2, 2, 2) - 0.5, torch.ones(2, 2, 2), "non-negative"),
        (torch.ones(2, 2, 2), torch.ones(2, 2, 2), "global min-max is undefined"),
        (torch.rand(2, 2, 2), torch.ones(3, 2, 2), "same number of samples"),
        (torch.rand(2, 1, 2, 2), torch.ones(2, 2, 2), r"\[N, h, w\]"),
        (torch.tensor([[[math.nan, 1.0]]]), torch.ones(1, 1, 2), "finite"),
    ],
)
def test_sweep_rejects_bad_input(maps, masks, match):
    with pytest.raises(ValueError, match=match):
        localization_sweep(maps, masks)


def test_custom_thresholds_must_ascend():
    maps, masks = _hand_case()
    with pytest.raises(ValueError, match="ascending"):
        localization_sweep(maps, masks, thresholds=[0.5, 0.1])
    res = localization_sweep(maps, masks, thresholds=[0.3])
    assert res.best_mean_iou == pytest.approx(1.0)
