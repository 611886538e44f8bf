"""What the up-front data check (``ImageCaptionDataset.check_rows``: every caption, every image header) costs, and
with ``--groups`` the duplicate-image scan of the probe choice (``mnemoguard.image_groups``).

Writes ``--rows`` PNG files (``--size`` pixels, RGB, random content; with ``--distinct`` every file its own image,
else one image under every name) and a ``metadata.jsonl`` into a temporary imagefolder, loads it the way training
does (``load_dataset_source`` + ``ImageCaptionDataset``) and times the check.

    python scripts/bench_check_rows.py --rows 100000 --size 64
    python scripts/bench_check_rows.py --rows 100000 --size 64 --distinct --groups
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mnemoguard.config.recipe import DataConfig
from mnemoguard.data import ImageCaptionDataset, load_dataset_source


def write_folder(root: Path, rows: int, size: int, distinct: bool = False) -> None:
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)  # one random image, saved under every name
    Image.fromarray(tile).save(root / "0.png")
    data = (root / "0.png").read_bytes()
    with open(root / "metadata.jsonl", "w") as meta:
        for i in range(rows):
            if i and distinct:
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"{i}.png")
            elif i:
                (root / f"{i}.png").write_bytes(data)
            meta.write(json.dumps({"file_name": f"{i}.png", "text": f"image {i}"}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--distinct", action="store_true", help="every file its own random image")
    parser.add_argument("--groups", action="store_true", help="also time the duplicate-image scan")
    args = parser.parse_args()
    timing: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        write_folder(root, args.rows, args.size, args.distinct)
        written = time.perf_counter() - start
        start = time.perf_counter()
        cfg = DataConfig(source=str(root), resolution=64)
        dataset = ImageCaptionDataset(load_dataset_source(cfg.source), cfg, channels=3)
        loaded = time.perf_counter() - start
        start = time.perf_counter()
        bad = dataset.check_rows()
        checked = time.perf_counter() - start
        if args.groups:
            from mnemoguard.config import MonitorConfig
            from mnemoguard.image_groups import find_image_groups

            for max_rows in (MonitorConfig().duplicate_scan_rows, None):
                start = time.perf_counter()
                groups = find_image_groups(len(dataset), dataset.canonical_image, max_rows=max_rows)
                timing[f"groups_s(max_rows={max_rows})"] = round(time.perf_counter() - start, 1)
                timing[f"groups_found(max_rows={max_rows})"] = len(groups.groups)
    print(json.dumps({"rows": args.rows, "size": args.size, "distinct": args.distinct, "write_s": round(written, 1),
                      "load_dataset_s": round(loaded, 1), "check_rows_s": round(checked, 2),
                      "per_row_us": round(1e6 * checked / args.rows, 1), "bad": len(bad), **timing}))


if __name__ == "__main__":
    main()
