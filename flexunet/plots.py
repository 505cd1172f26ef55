"""Pictures for people: learning curves and image/ground-truth/prediction strips."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

from flexunet.config import Color
from flexunet.data import io as imio


def learning_curves(history: Mapping[str, Sequence[float]], path: Path, title: str = "") -> None:
    """Loss, foreground Dice and learning rate per epoch, train against validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", "loss"), ("foreground_dice", "foreground Dice")]
    if "dice_coef_multiclass" in history:
        panels.append(("dice_coef_multiclass", "seed Dice (background-inclusive)"))
    has_lr = "learning_rate" in history
    fig, axes = plt.subplots(1, len(panels) + has_lr, figsize=(4.2 * (len(panels) + has_lr), 3.4))
    epochs = None
    for ax, (key, label) in zip(axes, panels):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = history.get(prefix + key)
            if values:
                epochs = np.arange(1, len(values) + 1)
                ax.plot(epochs, values, style, marker="o", markersize=3,
                        label=("validation " if prefix else "train ") + label)
        ax.set_xlabel("epoch")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if has_lr:
        ax = axes[-1]
        lr = history["learning_rate"]
        ax.plot(np.arange(1, len(lr) + 1), lr, marker="o", markersize=3)
        ax.set_yscale("log")
        ax.set_title("learning rate")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


_VIVID: tuple[Color, ...] = ((255, 40, 40), (40, 220, 40), (40, 140, 255), (255, 210, 0), (220, 0, 220),
                             (0, 220, 220))


def vivid(palette: Sequence[Color]) -> list[Color]:
    """The mask colours for overlays on a scan: a gray or white class (a binary mask's 255)
    becomes a vivid colour, because gray blended onto a CT slice vanishes."""
    out = list(palette)
    for c in range(1, len(out)):
        if max(out[c]) - min(out[c]) < 40:
            out[c] = _VIVID[(c - 1) % len(_VIVID)]
    return out


def _label(picture: np.ndarray, text: str) -> np.ndarray:
    picture = picture.copy()
    scale = max(0.3, picture.shape[1] / 400)
    cv2.putText(picture, text, (3, int(14 * scale) + 2), cv2.FONT_HERSHEY_SIMPLEX, scale * 0.5,
                (255, 255, 0), 1, cv2.LINE_AA)
    return picture


def comparison_strip(images: np.ndarray, columns: Sequence[tuple[str, np.ndarray]], palette: list[Color],
                     names: Sequence[str] | None = None, min_side: int = 128) -> np.ndarray:
    """One row per image: the input, then each labelled class map as an overlay."""
    palette = vivid(palette)
    rows = []
    for i in range(len(images)):
        image = images[i]
        scale = max(1, int(np.ceil(min_side / image.shape[0])))
        if scale > 1:
            image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
            image = image[..., None] if image.ndim == 2 else image
        gray = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]
        tiles = [_label(gray, names[i] if names else "input")]
        for title, maps in columns:
            labels = maps[i]
            if scale > 1:
                labels = cv2.resize(labels, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
            tiles.append(_label(imio.overlay(image, labels, palette), title))
        separator = np.full((gray.shape[0], 2, 3), 255, np.uint8)
        rows.append(np.concatenate([t for tile in tiles for t in (tile, separator)][:-1], axis=1))
    gap = np.full((2, rows[0].shape[1], 3), 255, np.uint8)
    return np.concatenate([r for row in rows for r in (row, gap)][:-1], axis=0)
