"""Inference on a folder of images: class-index masks at the original size, colourised masks
and overlays."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flexunet.config import IMAGE_SUFFIXES, Color, Config, ImageConfig, ModelConfig
from flexunet.data import io as imio
from flexunet.data.dataset import load_images
from flexunet.evaluate import predict_classes
from flexunet.outputs import staged_dir
from flexunet.plots import vivid
from flexunet.postprocess import PostProcessing


@dataclass(frozen=True)
class InferResult:
    images: int
    out_dir: Path
    foreground_images: int


def model_config_of(network: Any) -> ModelConfig:
    """The input/output shape a saved model needs, for inference without a config."""
    _, h, w, c = network.input_shape
    return ModelConfig(image_width=w, image_height=h, image_channels=c, num_classes=network.output_shape[-1],
                       num_layers=2)


def infer_folder(network: Any, images_dir: Path, out_dir: Path, model: ModelConfig, image: ImageConfig,
                 palette: list[Color], batch_size: int = 4,
                 postprocessing: PostProcessing = PostProcessing()) -> InferResult:
    """Predict every image of ``images_dir`` (post-processed at the model's size, then resized
    back); write ``masks/`` (class index per pixel, PNG),
    ``colorized/`` (classes in their rgb_map colour) and ``overlays/`` under ``out_dir``."""
    data = load_images(images_dir, model, image)
    files = imio.image_files(images_dir, IMAGE_SUFFIXES)
    classes = predict_classes(network, data, batch_size, postprocessing)
    foreground = 0
    overlay_palette = vivid(palette)
    with staged_dir(out_dir, replace=True) as stage:
        for kind in ("masks", "colorized", "overlays"):
            (stage / kind).mkdir()
        for i, name in enumerate(data.names):
            h, w = data.original_sizes[i]
            labels = imio.resize_mask(classes[i], w, h)
            foreground += int(bool(labels.any()))
            original = imio.read_image(files[name], model.image_channels, image.color_order)
            imio.write_png(stage / "masks" / f"{name}.png", labels)
            imio.write_png(stage / "colorized" / f"{name}.png", imio.classes_to_colors(labels, palette))
            imio.write_png(stage / "overlays" / f"{name}.png", imio.overlay(original, labels, overlay_palette))
    return InferResult(len(data), out_dir, foreground)


def latency_ms(network: Any, config: Config, repeats: int = 10) -> float:
    """Median CPU milliseconds to segment one image."""
    image = np.zeros((1, *config.model.input_shape), np.float32)
    network.predict_on_batch(image)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        network.predict_on_batch(image)
        times.append((time.perf_counter() - started) * 1000)
    return round(float(np.median(times)), 3)
