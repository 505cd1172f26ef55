"""How long a dataset's fingerprint takes for thousands of slices (issue 21: "seconds").

    python bench/fingerprint.py --slices 2500 --json bench/results/fingerprint.json

Builds a seed-format dataset of ``--slices`` real CT slices at native size (the bundled
sample's 650 x 650 JPG slices and their JPG masks, copied under new patient names: a file
count like the full CT-ICH set's ~2,500), then times
:func:`search.spec.fingerprint.of_config` on it, and :func:`search.spec.fingerprint.of_ct_ich`
on the bundled sample itself. The last line is ``fingerprint_seconds_per_1000_slices: S``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from _common import SAMPLE, headline, log, machine, write_json


def build(root: Path, slices: int) -> Path:
    """A config of ``slices`` JPG image/mask pairs copied from the sample's Patients_CT."""
    pairs = sorted((p, p.with_name(p.stem + "_HGE_Seg.jpg")) for p in (SAMPLE / "Patients_CT").glob("*/*/*.jpg")
                   if not p.stem.endswith("_Seg") and p.with_name(p.stem + "_HGE_Seg.jpg").is_file())
    images, masks = root / "train" / "images", root / "train" / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for i in range(slices):
        image, mask = pairs[i % len(pairs)]
        name = f"p{i // 30:04d}_{i % 30:02d}.jpg"
        shutil.copyfile(image, images / name)
        shutil.copyfile(mask, masks / name)
    config = root / "train_eval_infer.config"
    config.write_text(f"""[model]
image_width = 512
image_height = 512
num_classes = 2
image_channels = 1
[dataset]
patient_pattern = "(?P<patient>p\\\\d+)_(?P<slice>\\\\d+)"
[mask]
mask_file_format = ".jpg"
[train]
images_dir = "{images}"
masks_dir = "{masks}"
""", encoding="utf-8")
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=2500)
    parser.add_argument("--quick", action="store_true", help="250 slices")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    from search.spec import fingerprint

    slices = 250 if args.quick else args.slices
    started = time.perf_counter()
    sample = fingerprint.of_ct_ich(SAMPLE)
    sample_s = time.perf_counter() - started
    log(f"bundled sample: {sample.images} slices in {sample_s:.2f} s")
    with tempfile.TemporaryDirectory(prefix="fingerprint-bench-") as tmp:
        config = build(Path(tmp), slices)
        started = time.perf_counter()
        fp = fingerprint.of_config(config)
        seconds = time.perf_counter() - started
    log(f"{fp.images} slices of {fp.patients} patients, native {fp.native_sizes}: {seconds:.1f} s "
        f"({seconds / fp.images * 1000:.1f} ms per slice)")
    write_json(args.json, {"machine": machine(), "sample_slices": sample.images, "sample_seconds": sample_s,
                           "slices": fp.images, "seconds": seconds})
    headline("fingerprint_seconds_per_1000_slices", seconds / fp.images * 1000, ".2f")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
