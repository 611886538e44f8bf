"""Reading a testbed back, and the helpers the benchmark uses with mnemoguard.evaluation."""

import json

import pytest
import torch

from mnemoguard.evaluation import find_duplicates, nearest_neighbour_ratio, template_verbatim
from mnemoguard.testbed import GroundTruthError, load_ground_truth


def test_unique_training_images_are_unique_and_aligned_with_captions(small_testbed):
    gt = small_testbed
    train = gt.unique_training_images()
    assert train.images.shape == (8 + 30 + 120, 1, 16, 16)
    assert train.images.min() >= -1 and train.images.max() <= 1
    assert find_duplicates(train.images) == []
    assert train.kinds.count("global") == 8 and len(train.labels) == len(train.files)
    # a perfect copy of a global image is memorized, and its nearest neighbour is that caption's own image
    caption = gt.captions("global")[2]
    (own,) = train.index_of(caption)
    result = nearest_neighbour_ratio(train.images[[own]], train.images)
    assert result.memorized().tolist() == [True] and int(result.indices[0, 0]) == own
    held, held_captions = gt.held_out_images()
    assert held.shape == (12, 1, 16, 16) and held_captions == gt.captions("held_out")
    assert not nearest_neighbour_ratio(held, train.images).ratio.eq(0).any()


def test_template_reference_matches_stamped_images_under_the_mask(small_testbed):
    gt = small_testbed
    ref = gt.template_reference()  # [1, C, H, W] in [0, 1]
    mask = gt.template_mask()[None]
    stamped = gt.load_images(gt.by_kind("template")[0].files, (0.0, 1.0))
    plain = gt.load_images(gt.by_kind("plain")[0].files[:5], (0.0, 1.0))
    tiny = 1e-6  # any positive threshold: the stamped image equals the stamp exactly on the mask
    assert template_verbatim(stamped, ref, mask, threshold=tiny).all()
    assert not template_verbatim(plain, ref, mask, threshold=tiny).any()


def test_probe_captions_and_masks(small_testbed):
    gt = small_testbed
    probes = gt.probe_captions()
    assert {k: len(v) for k, v in probes.items()} == {
        "global": 8, "template": 30, "plain": 10, "held_out": 12, "unseen_global": 9, "unseen_template": 7}
    captions = [probes["global"][0], probes["template"][0], probes["unseen_global"][0], probes["unseen_template"][0]]
    masks = gt.masks_for(captions)
    assert masks.shape == (4, 16, 16) and masks.dtype == torch.bool
    assert masks[0].all() and torch.equal(masks[1], gt.template_mask()) and not masks[2].any()
    assert torch.equal(masks[3], gt.template_mask())
    assert gt.record(probes["plain"][3]).class_name == "three"
    with pytest.raises(KeyError, match="is not part of the testbed"):
        gt.record("a photo of a cat")
    with pytest.raises(ValueError, match=r"kind must be one of .* found 'memorized'"):
        gt.by_kind("memorized")


def test_recipe_overrides_point_the_trainer_at_the_training_folder(small_testbed):
    overrides = small_testbed.recipe_overrides()
    assert f"data.source={small_testbed.train_dir}" in overrides
    assert "data.random_flip=false" in overrides and "model.tiny.channels=1" in overrides
    from mnemoguard.config import load_config

    cfg = load_config(None, overrides)
    assert cfg.data.source == str(small_testbed.train_dir) and cfg.model.tiny.sample_size == 16


def test_loader_errors(tmp_path, small_testbed):
    with pytest.raises(GroundTruthError, match="expected a testbed folder with ground_truth.json"):
        load_ground_truth(tmp_path)
    data = json.loads((small_testbed.root / "ground_truth.json").read_text())
    (tmp_path / "ground_truth.json").write_text(json.dumps({**data, "version": 99}))
    with pytest.raises(GroundTruthError, match="expected version 1, found 99"):
        load_ground_truth(tmp_path)
    data["records"][0]["kind"] = "memorized"
    (tmp_path / "ground_truth.json").write_text(json.dumps(data))
    with pytest.raises(GroundTruthError, match=r"record 0: kind must be one of .* found 'memorized'"):
        load_ground_truth(tmp_path)
