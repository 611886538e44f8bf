"""The written testbed: counts per kind, file layout, determinism, held-out separation, trainer compatibility."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from mnemoguard.config import DataConfig
from mnemoguard.data import ImageCaptionDataset, load_dataset_source
from mnemoguard.testbed import TestbedExistsError, build_testbed, load_ground_truth

from .conftest import SMALL


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_counts_per_kind(small_testbed):
    gt = small_testbed
    counts = {k: len(gt.by_kind(k)) for k in ("global", "template", "plain", "held_out", "unseen")}
    assert counts == {"global": 8, "template": 30, "plain": 10, "held_out": 12, "unseen": 16}
    assert len(gt.by_kind("unseen", "global")) == 9 and len(gt.by_kind("unseen", "template")) == 7
    assert all(r.copies == 5 and len(r.files) == 5 and len(r.distinct_files) == 1 for r in gt.by_kind("global"))
    assert all(r.copies == 1 and len(r.files) == 1 for r in gt.by_kind("template"))
    assert sum(len(r.files) for r in gt.by_kind("plain")) == 120
    assert all(r.copies == 0 and r.files == () for r in gt.by_kind("unseen"))
    rows = _rows(gt.train_dir)
    assert len(rows) == 120 + 8 * 5 + 30
    per_caption = {}
    for row in rows:
        per_caption[row["text"]] = per_caption.get(row["text"], 0) + 1
    assert all(per_caption[r.caption] == 5 for r in gt.by_kind("global"))
    assert all(per_caption[r.caption] == 1 for r in gt.by_kind("template"))
    assert sorted(per_caption) == sorted(r.caption for r in gt.records if r.trained)
    data = json.loads((gt.root / "ground_truth.json").read_text())
    assert data["counts"]["train_rows"] == len(rows) and data["counts"]["images"]["held_out"] == 12


def test_global_copies_are_identical_files_with_one_specific_caption(small_testbed):
    for r in small_testbed.by_kind("global"):
        assert len({_digest(small_testbed.root / f) for f in r.files}) == 1
        assert ", sample " in r.caption and " by writer " in r.caption and r.caption.startswith(r.class_caption)


def test_captions_are_unique_and_styled(small_testbed):
    texts = [r.caption for r in small_testbed.records]
    assert len(set(texts)) == len(texts)
    for r in small_testbed.by_kind("template") + small_testbed.by_kind("unseen", "template"):
        assert "with the red stamp, form " in r.caption and r.region == "template"
    assert {r.caption for r in small_testbed.by_kind("plain")} == {
        f"a handwritten digit {n}" for n in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                            "nine")}


def test_held_out_images_and_unseen_captions_are_never_trained(small_testbed):
    gt = small_testbed
    train_files = {p.resolve() for p in gt.train_dir.rglob("*.png")}
    train_hashes = {_digest(p) for p in train_files}
    rows = _rows(gt.train_dir)
    trained_texts = {row["text"] for row in rows}
    for r in gt.by_kind("held_out"):
        (f,) = r.files
        assert f.startswith("held_out/") and (gt.root / f).resolve() not in train_files
        assert _digest(gt.root / f) not in train_hashes
        assert r.caption not in trained_texts
    assert not trained_texts & set(gt.captions("unseen"))
    assert all((gt.train_dir / row["file_name"]).is_file() for row in rows)
    assert len(_rows(gt.held_out_dir)) == 12


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files_and_another_seed_another_selection(small_testbed, tmp_path):
    again = build_testbed(SMALL, tmp_path / "again")
    assert _tree(again.root) == _tree(small_testbed.root)
    other = build_testbed({**SMALL, "seed": 4}, tmp_path / "other")
    picked = lambda gt, kind: [i for r in gt.by_kind(kind) for i in r.source_indices]  # noqa: E731
    for kind in ("global", "template", "held_out"):
        assert picked(other, kind) != picked(small_testbed, kind)
    assert other.captions("global") != small_testbed.captions("global")
    metadata = "train/metadata.jsonl"
    assert (other.root / metadata).read_bytes() != (small_testbed.root / metadata).read_bytes()


def test_existing_output_needs_overwrite(tmp_path):
    cfg = {**SMALL, "plain": {"num_images": 10}, "template": {"enabled": False}, "duplicated": {"num_images": 2}}
    build_testbed(cfg, tmp_path)
    (tmp_path / "notes.txt").write_text("kept")
    with pytest.raises(TestbedExistsError, match="already holds testbed output .*overwrite=True"):
        build_testbed(cfg, tmp_path)
    gt = build_testbed({**cfg, "seed": 9}, tmp_path, overwrite=True)
    assert gt.seed == 9 and (tmp_path / "notes.txt").read_text() == "kept"
    assert not (tmp_path / "masks" / "template.png").exists() and gt.template is None


def test_training_folder_loads_through_the_trainer_pixel_exact(small_testbed):
    gt = small_testbed
    ds = ImageCaptionDataset(load_dataset_source(str(gt.train_dir)), DataConfig(resolution=gt.resolution), gt.channels)
    rows = _rows(gt.train_dir)
    assert len(ds) == len(rows)
    for i in (0, 7, len(ds) - 1):
        item = ds[i]
        assert item["caption"] == rows[i]["text"]
        expected = gt.load_images(["train/" + rows[i]["file_name"]])[0]
        assert torch.equal(item["pixel_values"], expected)


def test_testbed_root_as_data_source_reads_only_the_training_split(small_testbed):
    # datasets infers the "train" split from the train/ folder name; held_out/ and masks/ are not read
    ds = load_dataset_source(str(small_testbed.root))
    assert len(ds) == len(_rows(small_testbed.train_dir))
    assert set(ds["text"]) == {r.caption for r in small_testbed.records if r.trained}


def test_rgb_folder_loads_through_the_trainer(rgb_testbed):
    gt = rgb_testbed
    ds = ImageCaptionDataset(load_dataset_source(str(gt.train_dir)), DataConfig(resolution=32), 3)
    assert ds[0]["pixel_values"].shape == (3, 32, 32)
    reloaded = load_ground_truth(gt.root)
    assert reloaded.records == gt.records and reloaded.channels == 3
