"""A dataset's fingerprint: what a plan needs to know of it, read from the masks at native size.

As nnU-Net's ``nnUNetv2_plan_and_preprocess`` starts from a fingerprint of the dataset, so does
``flexunet search plan``: images, patients, native sizes, channels, classes; per class its pixel
share, the share of slices that hold it, and the sizes (pixels, 8-connected components, at
native size) of its lesions. Images are not decoded beyond what their size and channels need:
masks carry the rest.

Two sources are read: a CT-ICH download (what ``prepare`` reads: :func:`of_ct_ich`) and a
seed-format config of folder pairs (:func:`of_config`).

Example::

    >>> import numpy as np
    >>> masks = [np.zeros((8, 8), np.uint8) for _ in range(2)]
    >>> masks[0][1:3, 1:3] = 1; masks[0][6, 6] = 1          # two lesions: 4 px and 1 px
    >>> fp = from_masks(masks, ["p1_1", "p2_1"], ["p1", "p2"], channels=1, num_classes=2)
    >>> fp.classes[1].lesions, fp.classes[1].lesion_percentiles["p50"], fp.classes[1].slice_share
    (2, 2.5, 0.5)
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from flexunet.errors import ConfigError, DataError

PERCENTILES = (5, 10, 25, 50, 75, 90, 95)
_EIGHT = np.ones((3, 3), bool)


@dataclass(frozen=True)
class ClassFingerprint:
    """One foreground class."""

    pixel_share: float  # of all pixels of all slices
    slice_share: float  # of slices whose mask holds the class
    slices: int
    patients: int
    lesions: int  # connected components
    lesion_percentiles: dict[str, float]  # "p5".."p95", "min", "max": component sizes in native pixels
    # The same, as a share of their slice's area: independent of the native size, so that a
    # lesion's pixels at any image side s are share * s**2 (slices of several sizes mix here).
    lesion_share_percentiles: dict[str, float] = field(default_factory=dict)
    lesion_shares: tuple[float, ...] = ()  # every lesion's share of its slice, ascending (4 digits)

    def lesions_under(self, pixels: float, side: int) -> int:
        """How many of the lesions cover fewer than ``pixels`` pixels on ``side`` x ``side`` slices."""
        return int(np.searchsorted(np.asarray(self.lesion_shares), pixels / side**2, side="left"))


@dataclass(frozen=True)
class Fingerprint:
    """What :mod:`search.spec.planner` sizes a study from."""

    images: int
    patients: int
    native_sizes: dict[str, int]  # "HxW" -> slices
    channels: int
    num_classes: int  # labels of the masks, background included
    classes: dict[int, ClassFingerprint] = field(default_factory=dict)
    source: str = ""

    @property
    def native_side(self) -> int:
        """The longer side of the most common native size."""
        common = max(self.native_sizes.items(), key=lambda kv: kv[1])[0]
        h, w = (int(v) for v in common.split("x"))
        return max(h, w)


    @classmethod
    def read(cls, path: Path) -> Fingerprint:
        """A fingerprint written by :meth:`to_json` (``flexunet search plan``'s
        ``STUDY.fingerprint.json``)."""

        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            classes = {int(k): ClassFingerprint(**{**v, "lesion_shares": tuple(v.get("lesion_shares", ()))})
                       for k, v in data.pop("classes").items()}
            return cls(**{**data, "classes": classes})
        except FileNotFoundError:
            raise ConfigError(f"{path}: fingerprint file not found") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{path}: not a fingerprint written by `flexunet search plan` ({exc})") from None

    def to_json(self) -> str:
        data = asdict(self)
        data["classes"] = {str(k): v for k, v in data["classes"].items()}
        return json.dumps(data, indent=1) + "\n"

    def lines(self) -> list[str]:
        """The fingerprint in a few lines, for the terminal."""
        sizes = ", ".join(f"{k} ({v})" for k, v in sorted(self.native_sizes.items(), key=lambda kv: -kv[1])[:3])
        out = [f"dataset: {self.images} slices of {self.patients} patients, native {sizes}, "
               f"{self.channels} channel(s), {self.num_classes} labels (background included)"]
        for c, f in sorted(self.classes.items()):
            p = f.lesion_percentiles
            out.append(f"  class {c}: {f.pixel_share:.3%} of pixels, in {f.slice_share:.0%} of slices "
                       f"({f.patients} patients), {f.lesions} lesions of {p.get('min', 0):.0f}-{p.get('max', 0):.0f} px "
                       f"(p10 {p.get('p10', 0):.0f}, median {p.get('p50', 0):.0f}) at native size")
        return out


def from_masks(masks: Iterable[np.ndarray], names: Sequence[str], patients: Sequence[str], *, channels: int,
               num_classes: int, source: str = "") -> Fingerprint:
    """The fingerprint of class masks (H,W uint8 each, native size) with their slices' patients."""
    from scipy import ndimage

    sizes: Counter[str] = Counter()
    pixels: Counter[int] = Counter()
    slices_with: Counter[int] = Counter()
    patients_with: dict[int, set[str]] = {}
    components: dict[int, list[int]] = {}
    shares: dict[int, list[float]] = {}
    total = 0
    count = 0
    for mask, patient in zip(masks, patients):
        count += 1
        sizes[f"{mask.shape[0]}x{mask.shape[1]}"] += 1
        total += mask.size
        counts = np.bincount(mask.ravel())  # far cheaper than np.unique's sort on big masks
        for c in np.flatnonzero(counts[1:]) + 1:
            c, n = int(c), int(counts[c])
            pixels[c] += n
            slices_with[c] += 1
            patients_with.setdefault(c, set()).add(patient)
            labels, k = ndimage.label(mask == c, structure=_EIGHT)
            found = np.bincount(labels.ravel())[1:].tolist() if k else []
            components.setdefault(c, []).extend(found)
            shares.setdefault(c, []).extend(n / mask.size for n in found)
    if count == 0:
        raise DataError(f"{source or 'dataset'}: no slices")
    if count != len(names):
        raise DataError(f"{source or 'dataset'}: {count} masks for {len(names)} slices")
    if not pixels:
        raise DataError(f"{source or 'dataset'}: no mask holds any foreground: nothing to segment, nothing to plan")
    classes = {}
    for c in sorted(pixels):
        found = np.asarray(components.get(c, []), np.float64)
        classes[c] = ClassFingerprint(pixel_share=pixels[c] / total, slice_share=slices_with[c] / count,
                                      slices=slices_with[c], patients=len(patients_with[c]), lesions=len(found),
                                      lesion_percentiles=_percentiles(found),
                                      lesion_share_percentiles=_percentiles(np.asarray(shares.get(c, []))),
                                      lesion_shares=tuple(float(f"{v:.4g}") for v in sorted(shares.get(c, []))))
    return Fingerprint(images=count, patients=len(set(patients)), native_sizes=dict(sizes), channels=channels,
                       num_classes=max(num_classes, max(classes) + 1), classes=classes, source=source)


def _percentiles(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {}
    out = {f"p{q}": float(np.percentile(values, q)) for q in PERCENTILES}
    out.update(min=float(values.min()), max=float(values.max()))
    return out


def of_ct_ich(src: Path, *, hemorrhage_types: bool = False) -> Fingerprint:
    """The fingerprint of a CT-ICH download, slice by slice as ``prepare`` would write them."""
    from flexunet.data import ct_ich

    report = ct_ich.PrepareReport()
    refs = ct_ich.find_slices(src, report)
    labels = ct_ich.slice_classes(src, refs, report, hemorrhage_types)
    kept = [r for r in refs if r.name in labels]

    def masks() -> Iterable[np.ndarray]:
        for ref in kept:
            mask = ref.load()[1]
            yield (mask > 0).astype(np.uint8) * labels[ref.name]

    return from_masks(masks(), [r.name for r in kept], [r.patient for r in kept], channels=1,
                      num_classes=len(ct_ich.HEMORRHAGE_TYPES) + 1 if hemorrhage_types else 2, source=str(src))


def of_config(path: Path) -> Fingerprint:
    """The fingerprint of the train, valid and test folder pairs a seed-format config names."""
    from flexunet import config as cfg
    from flexunet.config import require_dir
    from flexunet.data import io as imio
    from flexunet.data.dataset import pair_files, patient_of

    config = cfg.load(path)
    pairs: list[tuple[str, Path, Path]] = []
    for part, dirs in (("train", config.train), ("valid", config.valid), ("test", config.test)):
        if dirs.images_dir is None and part != "train":
            continue
        pairs += pair_files(require_dir(dirs.images_dir, part, "images_dir"), require_dir(dirs.masks_dir, part, "masks_dir"),
                            config.mask.mask_file_format)
    names = [stem for stem, _, _ in pairs]
    patients = [patient_of(stem, config.dataset.patient_pattern)[0] or stem for stem in names]

    def masks() -> Iterable[np.ndarray]:
        for _, image_path, mask_path in pairs:
            labels = imio.decode_mask(mask_path, config.mask.rgb_map, config.model.num_classes,
                                      config.mask.colour_tolerance).labels
            shape = imio.image_shape(image_path)
            if shape != labels.shape:
                raise DataError(f"{mask_path}: mask is {labels.shape[1]}x{labels.shape[0]} but its image "
                                f"{image_path.name} is {shape[1]}x{shape[0]}")
            yield labels

    channels = imio.read_image(pairs[0][1], config.model.image_channels, config.image.color_order).shape[-1]
    return from_masks(masks(), names, patients, channels=channels, num_classes=max(2, config.model.num_classes),
                      source=str(path))
