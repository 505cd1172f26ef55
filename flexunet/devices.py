"""Sharing one GPU between several training processes: each gets a fixed share of its memory.

The launcher (``flexunet search run --gpus 0,1 --workers-per-gpu N``) gives every worker its GPU
and its share through the environment; the worker applies it when it imports Keras, before the
GPU is first touched. On TensorFlow the share is a logical-device memory limit, on JAX the
fraction of memory XLA preallocates. A trial that needs more than its share runs out of memory
in its own process (the trial fails with that reason) and the other workers on the GPU go on.

    >>> share = GpuShare(gpu="0", workers=2, total_mib=143771.0)
    >>> round(share.fraction, 2), int(share.mib)
    (0.45, 64696)
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

_logger = logging.getLogger(__name__)

GPU_MEMORY_ENV = "FLEXUNET_GPU_MEMORY_MB"  # TensorFlow: the worker's logical-device memory limit
JAX_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"
# Shared out among a GPU's workers; the rest is for each process's CUDA context (~0.5 GiB) and
# allocator slack.
USABLE = 0.9


@dataclass(frozen=True)
class GpuShare:
    """One worker's part of a GPU: ``workers`` processes share GPU ``gpu`` evenly."""

    gpu: str
    workers: int
    total_mib: float | None  # None where the GPU's memory could not be read

    @property
    def fraction(self) -> float:
        return USABLE / self.workers

    @property
    def mib(self) -> float | None:
        return None if self.total_mib is None else self.total_mib * self.fraction

    def env(self) -> dict[str, str]:
        """The variables that pin a worker to this GPU and its share of the memory."""
        env = {"CUDA_VISIBLE_DEVICES": self.gpu, JAX_FRACTION_ENV: f"{self.fraction:.3f}"}
        if self.mib is not None:
            env[GPU_MEMORY_ENV] = str(int(self.mib))
        return env


def shares(workers: int, gpus: Sequence[str], memory_mib: dict[str, float]) -> list[GpuShare]:
    """Each local worker's share when ``workers`` processes go round robin over ``gpus``."""
    counts = {gpu: 0 for gpu in gpus}
    for i in range(workers):
        counts[gpus[i % len(gpus)]] += 1
    return [GpuShare(gpus[i % len(gpus)], counts[gpus[i % len(gpus)]], memory_mib.get(gpus[i % len(gpus)]))
            for i in range(workers)]


def gpu_memory_mib() -> dict[str, float]:
    """Total memory of each GPU by index, from ``nvidia-smi`` ({} without one)."""
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.total", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        _logger.warning("nvidia-smi failed (%s): GPU memory shares are fractions only", exc)
        return {}
    return parse_memory(done.stdout)


def parse_memory(text: str) -> dict[str, float]:
    """``nvidia-smi --query-gpu=index,memory.total --format=csv,noheader,nounits`` -> {index: MiB}."""
    out = {}
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0].isdigit():
            try:
                out[fields[0]] = float(fields[1])
            except ValueError:
                continue
    return out


def apply_memory_limit() -> None:
    """Cap TensorFlow's use of this process's GPU at ``$FLEXUNET_GPU_MEMORY_MB`` (set by the
    launcher). JAX reads its fraction from the environment by itself."""
    value = os.environ.get(GPU_MEMORY_ENV)
    if not value:
        return
    import keras

    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return
    limit = int(float(value))
    tf.config.set_logical_device_configuration(gpus[0], [tf.config.LogicalDeviceConfiguration(memory_limit=limit)])
    _logger.info("GPU memory limited to %d MiB (this worker's share)", limit)
