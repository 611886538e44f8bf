"""Small testbeds built once per session (the default sizes are exercised through the plan, without writing)."""

import pytest

from mnemoguard.testbed import build_testbed

# Every planted case on, at a size that builds in about a second.
SMALL = {
    "seed": 3,
    "plain": {"num_images": 120},
    "duplicated": {"num_images": 8, "copies": 5},
    "template": {"num_images": 30},
    "held_out": {"num_images": 12},
    "unseen": {"num_global_style": 9, "num_template_style": 7},
}


@pytest.fixture(scope="session")
def small_testbed(tmp_path_factory):
    """Grayscale 16 px digits testbed with every planted case."""
    return build_testbed(SMALL, tmp_path_factory.mktemp("testbed") / "small")


@pytest.fixture(scope="session")
def rgb_testbed(tmp_path_factory):
    """RGB 32 px animals testbed, stamp in the top-left corner, 2 px border."""
    cfg = {
        **SMALL,
        "resolution": 32,
        "channels": 3,
        "source": {"name": "animals"},
        "template": {"num_images": 30, "corner": "top_left", "margin": 1},
        "constraint": {"width": 2, "color": [20, 60, 200]},
    }
    return build_testbed(cfg, tmp_path_factory.mktemp("testbed") / "rgb")
