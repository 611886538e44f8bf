import pytest

from mnemoguard.config import ConfigError, RecipeConfig, load_config


def test_defaults_are_the_cpu_demo():
    cfg = load_config()
    assert isinstance(cfg, RecipeConfig)
    assert cfg.model.pretrained is None and cfg.data.source == "builtin:digits"
    assert cfg.data.resolution == cfg.model.tiny.sample_size


def test_unknown_key_is_an_error_that_lists_the_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) model\.lora\.rnk.*valid keys in model\.lora: enabled"):
        load_config({"model": {"lora": {"rnk": 8}}})


def test_wrong_type_says_what_was_expected_and_found():
    with pytest.raises(ConfigError, match=r"training\.max_train_steps: expected an integer, found str 'many'"):
        load_config({"training": {"max_train_steps": "many"}})
    with pytest.raises(ConfigError, match=r"mixed_precision: expected one of"):
        load_config({"training": {"mixed_precision": "fp8"}})


def test_set_overrides_parse_yaml_values_and_win_over_the_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  lora:\n    enabled: true\n    rank: 4\n")
    cfg = load_config(recipe, ["model.lora.rank=8", "training.snr_gamma=5", "validation.prompts=[a, b]"])
    assert cfg.model.lora.enabled and cfg.model.lora.rank == 8
    assert cfg.training.snr_gamma == 5.0 and cfg.validation.prompts == ["a", "b"]


def test_every_shipped_recipe_loads():
    from pathlib import Path

    recipes = sorted(Path(__file__).parent.parent.glob("recipes/*.yaml"))
    assert len(recipes) >= 4
    for path in recipes:
        load_config(path)


def test_missing_recipe_file_and_bad_override_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["training.seed"])


def test_scientific_notation_is_a_number_even_where_yaml_reads_a_string():
    assert load_config(None, ["training.learning_rate=1e-4"]).training.learning_rate == 1e-4
    with pytest.raises(ConfigError, match="expected a number, found str 'fast'"):
        load_config(None, ["training.learning_rate=fast"])


def test_literal_and_tuple_fields_are_checked():
    from dataclasses import dataclass
    from typing import Literal

    from mnemoguard.config import load_dataclass

    @dataclass
    class Section:
        mode: Literal["min", "max"] = "min"
        band: tuple[int, int] | None = None

    assert load_dataclass(Section, {"mode": "max", "band": [300, 700]}) == Section("max", (300, 700))
    with pytest.raises(ConfigError, match=r"mode: expected one of \['min', 'max'\], found 'up'"):
        load_dataclass(Section, {"mode": "up"})
    with pytest.raises(ConfigError, match="band: expected 2 values, found 3"):
        load_dataclass(Section, {"band": [1, 2, 3]})
