"""Testbed config: defaults, strict keys, clear errors, overrides, YAML."""

import pytest

from mnemoguard.config import ConfigError
from mnemoguard.testbed import TestbedConfig, load_testbed_config


def test_defaults_follow_the_cpu_testbed_notes():
    cfg = TestbedConfig()
    assert (cfg.resolution, cfg.channels, cfg.source.name) == (16, 1, "digits")
    assert cfg.plain.num_images == 1000
    assert cfg.duplicated.num_images >= 100 and cfg.unseen.num_global_style >= 100


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) template.colour; valid keys in template: .*ink"):
        load_testbed_config({"template": {"colour": [1, 2, 3]}})


@pytest.mark.parametrize(
    "data, message",
    [
        ({"resolution": 100}, r"resolution: expected 8..64 pixels, found 100"),
        ({"channels": 2}, r"channels: expected 1 \(grayscale\) or 3 \(RGB\), found 2"),
        ({"source": {"name": "mnist"}}, r"source.name: expected one of .*'animals'.*found 'mnist'"),
        ({"template": {"corner": "middle"}}, r"template.corner: expected one of .*found 'middle'"),
        ({"constraint": {"color": [1, 2]}}, r"constraint.color: expected an RGB colour .*found \[1, 2\]"),
        ({"duplicated": {"copies": 0}}, r"duplicated.copies: expected >= 1, found 0"),
        ({"plain": {"num_images": "many"}}, r"plain.num_images: expected an integer, found str 'many'"),
    ],
)
def test_bad_values_say_what_was_expected_and_found(data, message):
    with pytest.raises(ConfigError, match=message):
        load_testbed_config(data)


def test_overrides_and_yaml_file(tmp_path):
    path = tmp_path / "tb.yaml"
    path.write_text("seed: 5\ntemplate:\n  phrase: with the blue seal\n")
    cfg = load_testbed_config(path, ["duplicated.copies=7", "source.name=animals"])
    assert (cfg.seed, cfg.template.phrase, cfg.duplicated.copies, cfg.source.name) == (
        5, "with the blue seal", 7, "animals")
    assert load_testbed_config(cfg) == cfg
    with pytest.raises(ConfigError, match="testbed config file not found"):
        load_testbed_config(tmp_path / "missing.yaml")
