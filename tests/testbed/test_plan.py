"""Selection and captioning at the default sizes (no files written), source limits, de-duplication."""

import numpy as np
import pytest

from mnemoguard.testbed import Layout, PlanError, load_source, load_testbed_config
from mnemoguard.testbed.plan import make_plan


def _plan(data):
    cfg = load_testbed_config(data)
    return make_plan(cfg, load_source(cfg.source.name), Layout.from_config(cfg))


def _count(plan, kind, style=None):
    return sum(p.kind == kind and (style is None or p.style == style) for p in plan.captions)


def test_default_plan_offers_100_planted_and_100_unseen_captions():
    plan = _plan(None)
    assert _count(plan, "global") == 100 and _count(plan, "template") == 200
    assert _count(plan, "unseen", "global") == 100 and _count(plan, "unseen", "template") == 100
    assert _count(plan, "held_out") == 100
    assert sum(len(p.source_indices) for p in plan.captions if p.kind == "plain") == 1000
    indices = [i for p in plan.captions for i in p.source_indices]
    assert len(indices) == len(set(indices)) == 1400  # disjoint pools


def test_pools_are_stable_when_a_later_pool_grows():
    a, b = _plan({"plain": {"num_images": 100}}), _plan({"plain": {"num_images": 300}})
    pick = lambda plan, kind: [i for p in plan.captions if p.kind == kind for i in p.source_indices]  # noqa: E731
    for kind in ("global", "template", "held_out"):
        assert pick(a, kind) == pick(b, kind)
    captions = lambda plan: [p.caption for p in plan.captions if p.kind == "global"]  # noqa: E731
    assert captions(a) == captions(b)


def test_small_source_error_says_what_is_needed():
    with pytest.raises(PlanError, match=r"source 'faces' has 200 usable images .* needs 1400 \(duplicated.num_images"):
        _plan({"source": {"name": "faces"}})
    plan = _plan({"source": {"name": "faces"}, "plain": {"num_images": 100}, "duplicated": {"num_images": 20},
                  "template": {"num_images": 60}, "held_out": {"num_images": 20}})
    assert _count(plan, "plain") == 2 and plan.captions[0].caption.startswith("a photo of a")


def test_animals_natural_duplicates_are_removed_by_default():
    small = {"source": {"name": "animals"}, "plain": {"num_images": 10}}
    plan = _plan(small)
    assert plan.num_source_images == 10000 and plan.num_duplicates_removed >= 284
    kept = _plan({**small, "source": {"name": "animals", "deduplicate": False}})
    assert kept.num_duplicates_removed == 0


def test_shared_template_captions_group_images_by_class():
    plan = _plan({"template": {"unique_captions": False}, "plain": {"num_images": 0}})
    template = [p for p in plan.captions if p.kind == "template"]
    assert len(template) == 10 and sum(len(p.source_indices) for p in template) == 200
    assert template[7].caption == "a handwritten digit seven with the red stamp"
    assert all(np.array_equal(p.images.shape[1:], (16, 16, 1)) for p in template)
    assert all(", form " in p.caption for p in plan.captions if p.kind == "unseen" and p.style == "template")


def test_disabled_cases_and_empty_training_set():
    plan = _plan({"duplicated": {"enabled": False}, "template": {"enabled": False}, "plain": {"num_images": 50}})
    assert _count(plan, "global") == _count(plan, "template") == _count(plan, "unseen") == 0
    with pytest.raises(PlanError, match="trains on no images"):
        _plan({"duplicated": {"enabled": False}, "template": {"enabled": False}, "plain": {"num_images": 0}})


def test_planted_classes_and_clean_negatives_keep_negatives_off_planted_digits():
    plan = _plan({"duplicated": {"num_images": 12, "classes": [0, 1, 2]},
                  "held_out": {"num_images": 40, "avoid_planted_classes": True},
                  "unseen": {"num_global_style": 50, "avoid_planted_classes": True}})
    planted = {p.label for p in plan.captions if p.kind == "global"}
    assert planted == {0, 1, 2}
    assert all(p.label not in planted for p in plan.captions if p.kind == "held_out")
    unseen = [p for p in plan.captions if p.kind == "unseen" and p.style == "global"]
    assert len(unseen) == 50 and all(p.label not in planted for p in unseen)
    assert {p.label for p in plan.captions if p.kind == "plain"} == set(range(10))  # plain images keep every digit


def test_negatives_keep_every_class_unless_asked():
    plan = _plan({"duplicated": {"num_images": 12, "classes": [0, 1, 2]}})
    assert {p.label for p in plan.captions if p.kind == "held_out"} & {0, 1, 2}


def test_class_restrictions_that_cannot_be_met_say_why():
    with pytest.raises(PlanError, match=r"every class has a planted image"):
        _plan({"duplicated": {"num_images": 40}, "unseen": {"avoid_planted_classes": True}})
    with pytest.raises(PlanError, match=r"duplicated.num_images: expected 300 images from planted classes \[0\]"):
        _plan({"duplicated": {"num_images": 300, "classes": [0]}})
    with pytest.raises(PlanError, match=r"classes 0..9, found \[12\]"):
        _plan({"duplicated": {"classes": [12]}})
