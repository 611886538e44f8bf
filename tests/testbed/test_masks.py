"""Template mask = exactly the stamp's square; constraint border constant in every image."""

import numpy as np
import pytest
import torch

from mnemoguard.testbed import Layout, LayoutError, TestbedConfig, load_testbed_config


def _all_images(gt):
    files = [f for r in gt.records for f in r.files]
    return gt.load_images(files, (0.0, 255.0)).round().to(torch.uint8)


@pytest.mark.parametrize("fixture", ["small_testbed", "rgb_testbed"])
def test_template_mask_is_exactly_the_stamp_region(fixture, request):
    gt = request.getfixturevalue(fixture)
    top, left, size = gt.template["box"]
    mask = gt.template_mask()
    expected = torch.zeros_like(mask)
    expected[top : top + size, left : left + size] = True
    assert torch.equal(mask, expected)
    ref = gt.template_reference((0.0, 255.0)).round().to(torch.uint8)[0]
    stamped = gt.load_images([f for r in gt.by_kind("template") for f in r.files], (0.0, 255.0))
    stamped = stamped.round().to(torch.uint8)
    # inside the mask every template image equals the stamp; outside the mask they vary
    assert torch.equal(stamped[:, :, mask], ref[:, mask].expand(len(stamped), -1, -1))
    free = ~(mask | gt.constraint_mask())
    assert (stamped[:, :, free].float().std(0) > 0).any()
    # the stamp pixels differ from the rest of the square's neighbourhood: the mask is not wider than the stamp
    others = gt.load_images([f for r in gt.by_kind("plain") for f in r.files], (0.0, 255.0)).round().to(torch.uint8)
    assert not torch.equal(others[:, :, mask], ref[:, mask].expand(len(others), -1, -1))


def test_stamp_placement_and_colour(rgb_testbed):
    gt = rgb_testbed
    assert gt.template["box"] == [3, 3, 8]  # top_left, 2 px border + 1 px margin, 32 // 4 px
    ref = gt.template_reference((0.0, 255.0)).round()[0]
    assert ref[:, 3, 3].tolist() == [230.0, 30.0, 30.0]  # outermost ring = red ink
    assert ref[:, 4, 4].tolist() == [255.0, 255.0, 255.0]  # next ring = paper


@pytest.mark.parametrize("fixture", ["small_testbed", "rgb_testbed"])
def test_constraint_region_is_constant_in_every_image(fixture, request):
    gt = request.getfixturevalue(fixture)
    width = gt.constraint["width"]
    mask = gt.constraint_mask()
    expected = torch.ones_like(mask)
    expected[width:-width, width:-width] = False
    assert torch.equal(mask, expected)
    images = _all_images(gt)  # training and held-out
    value = torch.tensor(gt.constraint["value"], dtype=torch.uint8)
    assert torch.equal(images[:, :, mask], value[None, :, None].expand(len(images), -1, int(mask.sum())))
    assert not (gt.template_mask() & mask).any()


@pytest.mark.parametrize("corner", ["top_left", "top_right", "bottom_left", "bottom_right"])
def test_layout_corners(corner):
    layout = Layout.from_config(load_testbed_config({"template": {"corner": corner, "size": 3}}))
    top, left, size = layout.stamp_box
    assert size == 3
    assert top == (1 if corner.startswith("top") else 12) and left == (1 if corner.endswith("left") else 12)
    assert int(layout.template_mask().sum()) == 9 and int(layout.constraint_mask().sum()) == 60


def test_grayscale_colours_use_pil_luma():
    layout = Layout.from_config(TestbedConfig())
    assert layout.stamp[0, 0].tolist() == [90] and layout.stamp[1, 1].tolist() == [255]  # red ink, white paper
    assert layout.border_value.tolist() == [128]


def test_stamp_that_does_not_fit_is_an_error():
    with pytest.raises(LayoutError, match=r"must fit inside the 14px interior .* found 15px > 14px"):
        Layout.from_config(load_testbed_config({"template": {"size": 12, "margin": 3}}))
    with pytest.raises(LayoutError, match="leaves no interior"):
        Layout.from_config(load_testbed_config({"constraint": {"width": 8}}))


def test_stamp_pattern_is_concentric_rings():
    from mnemoguard.testbed.render import stamp_pattern

    p = stamp_pattern(5, np.array([1], np.uint8), np.array([0], np.uint8))[..., 0]
    assert p.tolist() == [[1, 1, 1, 1, 1], [1, 0, 0, 0, 1], [1, 0, 1, 0, 1], [1, 0, 0, 0, 1], [1, 1, 1, 1, 1]]
