"""``flexunet search plan``: from a dataset and a time budget to a study sized for this device.

Three steps, each a plain function, so that a plan can be checked figure by figure:

1. :func:`choose_size` reads the dataset's fingerprint (:mod:`search.spec.fingerprint`) and picks the
   image side from the lesions: the smallest side at which the 10th-percentile lesion of every
   class covers at least :data:`MIN_LESION_PIXELS` pixels (a 3x3 kernel's footprint), never
   above the native side. What it costs is stated: how many lesions fall under that threshold.
2. :func:`measure_device` trains two small FlexUNets for a few epochs on synthetic slices of that
   side (under a minute on a 2-core CPU) and fits the seconds per training image as ``a + b *
   GFLOPs`` (:class:`Throughput`). ``--throughput FILE`` reads a measurement instead (a GPU
   table, or the one a shipped study was planned from).
3. :func:`size_study` sizes the search: folds, epochs, batches per epoch, the largest
   ``max_gflops`` (and side, if the lesion rule asks for more than the budget allows) such that
   :data:`MIN_TRIALS` trials, each trained in full (every fold to ``max_epochs``, no early stop,
   no pruning) at the middle of the space's cost, fit in the search's share of the time with the
   workers given; pruning and early stopping make most trials cheaper, so a study decides more.
   The space's ranges are then cut so that its most expensive corner is within ``max_gflops``
   and ``max_params``: no trial is refused for cost.

:func:`plan` does all three and :func:`write_study` writes the commented study file; the CLI is a
thin layer over them.

Example (a throughput given, no device measured)::

    >>> t = Throughput(device="cpu", image_size=96, seconds_per_image=(0.02, 0.03), gflops=(0.1, 0.6),
    ...                build_seconds=10.0)
    >>> round(t.seconds(0.35), 3)
    0.025
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexunet.errors import ConfigError, DataError
from search import paths
from search.spec import budget
from search.spec.fingerprint import Fingerprint
from search.spec.study_file import RefitSpec

MIN_LESION_PIXELS = 9.0  # a 3x3 kernel's footprint: smaller lesions are a few pixels of noise
LESION_PERCENTILE = "p10"
MIN_TRIALS = 8  # searched trials a plan must bring to a decision
SIDES = (32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 1024)
EXPORT_SECONDS = 60.0  # `search export` of a 3-fold ensemble measured 31-45 s on 2 cores (BENCHMARKS 9)
FOLD_RESET_SECONDS = 5.0  # a later fold resets the trial's model: DESIGN/sample study, 4-6 s
VALIDATION_SHARE = 0.15  # an epoch's validation and checkpoints, on top of its training batches
STEPS_PER_EPOCH = 8
MAX_EPOCHS = 8
BATCH_SIZES = (2, 4, 8)
KERNELS = (3, 5, 7)


@dataclass(frozen=True)
class Throughput:
    """Training seconds per image on one worker's device, as a line in GFLOPs per image."""

    device: str  # "cpu" or the GPU's name
    image_size: int  # the side it was measured at
    seconds_per_image: tuple[float, ...]
    gflops: tuple[float, ...]
    build_seconds: float  # building and tracing a new model: once per trial
    note: str = ""  # where a stated (not measured) table comes from: written into the study file

    def seconds(self, gflops: float) -> float:
        """Seconds per training image of a model of ``gflops`` per image (least squares)."""
        g, s = self.gflops, self.seconds_per_image
        if len(g) < 2 or max(g) == min(g):
            return s[0] * max(gflops, 1e-9) / max(g[0], 1e-9)
        mean_g, mean_s = sum(g) / len(g), sum(s) / len(s)
        slope = sum((x - mean_g) * (y - mean_s) for x, y in zip(g, s)) / sum((x - mean_g) ** 2 for x in g)
        slope = max(slope, 1e-6)
        return max(mean_s + slope * (gflops - mean_g), 0.1 * min(s))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1) + "\n"

    @classmethod
    def read(cls, path: Path) -> Throughput:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(device=str(data["device"]), image_size=int(data["image_size"]),
                       seconds_per_image=tuple(float(v) for v in data["seconds_per_image"]),
                       gflops=tuple(float(v) for v in data["gflops"]), build_seconds=float(data["build_seconds"]),
                       note=str(data.get("note", "")))
        except FileNotFoundError:
            raise ConfigError(f"{path}: throughput file not found") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: not a throughput file written by `flexunet search plan` ({exc})") from None

    def at(self, size: int) -> Throughput:
        """The same device at another side: seconds per image scale with the pixels."""
        scale = (size / self.image_size) ** 2
        return dataclasses.replace(self, image_size=size, seconds_per_image=tuple(s * scale for s in self.seconds_per_image),
                                   gflops=tuple(g * scale for g in self.gflops))


@dataclass(frozen=True)
class SizeChoice:
    side: int
    wanted: int  # what the lesion rule asked for
    lesions: int
    lesions_under: int  # lesions smaller than MIN_LESION_PIXELS at ``side``


@dataclass(frozen=True)
class Plan:
    """A sized study: what :func:`study_text` writes, with the figures it was derived from."""

    name: str
    minutes: float
    workers: int
    gpus: tuple[str, ...]
    size: SizeChoice
    folds: int
    max_epochs: int
    steps_per_epoch: int
    max_gflops: float
    max_params: int
    base_filters: tuple[int, int]
    num_layers: tuple[int, int]
    kernels: tuple[int, ...]
    trial_seconds: float  # a trial at the middle of the space's cost, expected under the pruner
    search_seconds: float
    expected_trials: float  # decided trials the search's time holds at that cost (expected_decided)
    throughput: Throughput
    timeout: float = 0.0  # [budget] timeout: search and refit
    baseline: bool = True  # trial 0 is the seed's settings
    baseline_seconds: float = 0.0  # trial 0, trained in full
    refit: RefitSpec | None = None
    refit_seconds: float = 0.0  # the refit's estimate (search/spec/budget.py), inside the timeout
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        s = self.size
        return [
            f"image size {s.side} px (the lesion rule asked for {s.wanted}); {s.lesions_under} of {s.lesions} lesions "
            f"under {MIN_LESION_PIXELS:g} px at that size",
            f"{self.folds}-fold trials of at most {self.max_epochs} epochs x {self.steps_per_epoch} batches; "
            f"max_gflops {self.max_gflops:g}, base_filters {self.base_filters[0]}-{self.base_filters[1]}, "
            f"levels {self.num_layers[0]}-{self.num_layers[1]}, kernels {', '.join(map(str, self.kernels))}",
            f"time: {self.minutes:g} min = "
            + (f"baseline {self.baseline_seconds:.0f} s + " if self.baseline else "no baseline + ")
            + f"searched trials {self.search_seconds:.0f} s + "
            + (f"refit {self.refit_seconds:.0f} s ({self.refit.top_k} configuration(s) x {self.folds} folds x "
               f"{self.refit.seeds} seed(s), {self.refit.epochs} epochs of {self.refit.steps_per_epoch} batches) + "
               if self.refit else "")
            + f"export {EXPORT_SECONDS:.0f} s + one trial's overrun; sized so that {MIN_TRIALS} trials at the space's "
            f"middle cost fit at {MARGIN:g}x their long-run cost under the pruner (~{self.trial_seconds:.0f} s each); "
            f"~{self.expected_trials:.0f} expected to reach a decision with {self.parallel} in parallel, the first "
            "ones pruned less",
            *self.notes,
        ]

    @property
    def parallel(self) -> int:
        return max(1, len(self.gpus)) if self.gpus else 1


def choose_size(fp: Fingerprint, ceiling: int | None = None) -> SizeChoice:
    """The smallest side of :data:`SIDES` at which every class's 10th-percentile lesion covers
    :data:`MIN_LESION_PIXELS`, at most the native side (and ``ceiling``)."""
    native = fp.native_side
    top = min(native, ceiling or native)
    shares = [c.lesion_share_percentiles[LESION_PERCENTILE] for c in fp.classes.values() if c.lesions]
    need = max(MIN_LESION_PIXELS / min(shares), 1.0) if shares else 1.0
    wanted = next((s for s in SIDES if s * s >= need), SIDES[-1])
    side = wanted if wanted <= top else max([s for s in SIDES if s <= top] or [min(SIDES)])
    return SizeChoice(side, wanted, sum(c.lesions for c in fp.classes.values()),
                      sum(c.lesions_under(MIN_LESION_PIXELS, side) for c in fp.classes.values()))


def measure_device(side: int, channels: int, num_classes: int, *, epochs: int = 3) -> Throughput:
    """Train two small FlexUNets for ``epochs`` epochs of synthetic slices at ``side`` px and
    fit the seconds per training image against their GFLOPs (the first epoch's extra time is
    the model's building and tracing)."""
    import numpy as np

    from flexunet import config as cfg
    from flexunet.data.dataset import SliceSet
    from flexunet.model import estimate_cost
    from flexunet.train import fit
    from search.spec.space import max_layers

    rng = np.random.default_rng(0)
    n = 16
    images = rng.integers(0, 255, (n, side, side, channels), dtype=np.uint8)
    masks = (rng.random((n, side, side)) > 0.97).astype(np.uint8)
    data = SliceSet(images, masks, [str(i) for i in range(n)], [(side, side)] * n)
    layers = min(4, max_layers(side))
    seconds, gflops, builds = [], [], []
    for base in (8, 16):
        model = cfg.ModelConfig(image_width=side, image_height=side, image_channels=channels,
                                num_classes=max(2, num_classes), base_filters=base, num_layers=layers,
                                normalization=True, learning_rate=1e-3, metrics=())
        train = cfg.TrainConfig(epochs=epochs, batch_size=4, steps_per_epoch=STEPS_PER_EPOCH, patience=0,
                                save_overhead=0.0, learning_rate_reducer=False, augmentation=True)
        started = time.perf_counter()
        result = fit(model, train, data, data.subset(list(range(4))), verbose=0)
        wall = time.perf_counter() - started
        steady = float(np.median(result.seconds_per_epoch[1:])) if len(result.seconds_per_epoch) > 1 else wall / epochs
        seconds.append(steady / (STEPS_PER_EPOCH * 4))
        builds.append(max(wall - steady * epochs, 0.0))
        gflops.append(estimate_cost(model).flops / 1e9)
    import keras

    keras.backend.clear_session()
    return Throughput(device=_device_name(), image_size=side, seconds_per_image=tuple(seconds), gflops=tuple(gflops),
                      build_seconds=float(max(builds)))


def _device_name() -> str:
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return gpus[0].name if gpus else "cpu"


def _has_gpu() -> bool:
    return _device_name() != "cpu"


MIN_RESOURCE, REDUCTION_FACTOR = 2, 3  # the planned study's SuccessiveHalvingPruner


def pruner_min_resource(max_epochs: int) -> int:
    """The planned pruner's first rung: step 2 of fold 1 at 8 epochs, a quarter of a fold's
    epochs for longer training."""
    return max(MIN_RESOURCE, max_epochs // 4)


MARGIN = 1.5  # on the expected cost: the first trials of a rung are promoted, not pruned


def surviving_share(folds: int, epochs: int, min_resource: int = MIN_RESOURCE,
                    reduction_factor: int = REDUCTION_FACTOR) -> float:
    """The expected share of a full trial's epochs that a trial trains under successive
    halving: rung i at step ``min_resource * rf**i`` keeps the best 1/rf of the trials.

    >>> round(surviving_share(3, 8), 3)   # rungs at steps 2, 6, 18 of 24
    0.244
    """
    segments = _rung_segments(folds * epochs, min_resource, reduction_factor)
    return sum(length / reduction_factor**i for i, length in enumerate(segments)) / (folds * epochs)


def _rung_segments(total: int, min_resource: int, reduction_factor: int) -> list[int]:
    """The steps a trial trains before the first rung, between rungs, and after the last (rung i
    at step ``min_resource * rf**i``)."""
    rungs = [min_resource * reduction_factor**i for i in range(64) if min_resource * reduction_factor**i < total]
    bounds = [0, *[r + 1 for r in rungs], total]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def trial_share(i: int, folds: int, epochs: int, min_resource: int = MIN_RESOURCE,
                reduction_factor: int = REDUCTION_FACTOR) -> float:
    """The expected share of a full trial's epochs that the ``i``-th trial (from 1) of a study
    trains under successive halving. At each rung, of the ``n`` trials that have reached it, the
    best ``ceil(n / rf)`` go on: the first trial always does, the second half the time, and only
    after many trials does the share fall to :func:`surviving_share`'s. (The 20-minute plan of
    the bundled sample trained 46% of its searched trials' epochs, early stopping included; this
    gives 41% for its first 10 trials, :func:`surviving_share` 24%: BENCHMARKS.md section 12.2.)

    >>> [round(trial_share(i, 3, 8), 3) for i in (1, 2, 3, 10)]
    [1.0, 0.562, 0.417, 0.312]
    """
    total = folds * epochs
    segments = _rung_segments(total, min_resource, reduction_factor)
    reached, alive, trained = i, 1.0, float(segments[0])
    for segment in segments[1:]:
        alive *= math.ceil(reached / reduction_factor) / reached
        trained += alive * segment
        reached = max(1, math.ceil(reached / reduction_factor))
    return trained / total


def expected_decided(throughput: Throughput, gflops: float, seconds: float, *, folds: int, epochs: int, steps: int,
                     batch: int, limit: int = 100_000) -> int:
    """How many trials of ``gflops`` reach a decision in ``seconds`` of one device's time, each
    at its :func:`trial_share` of a full trial (the first ones cost the most)."""
    full = trial_seconds(throughput, gflops, folds=folds, epochs=epochs, steps=steps, batch=batch)
    spent, n = 0.0, 0
    min_resource = pruner_min_resource(epochs)
    while n < limit:
        cost = throughput.build_seconds + trial_share(n + 1, folds, epochs, min_resource) * (full - throughput.build_seconds)
        if spent + cost > seconds:
            break
        spent, n = spent + cost, n + 1
    return n


def expected_trial_seconds(throughput: Throughput, gflops: float, *, folds: int, epochs: int, steps: int,
                           batch: int) -> float:
    """A trial's expected seconds under the planned pruner: building once, and the share of
    its full training that :func:`surviving_share` gives."""
    full = trial_seconds(throughput, gflops, folds=folds, epochs=epochs, steps=steps, batch=batch)
    share = surviving_share(folds, epochs, pruner_min_resource(epochs))
    return throughput.build_seconds + share * (full - throughput.build_seconds)


def trial_seconds(throughput: Throughput, gflops: float, *, folds: int, epochs: int, steps: int, batch: int) -> float:
    """One trial trained in full: every fold to ``epochs``, building once and resetting per fold."""
    per_epoch = steps * batch * throughput.seconds(gflops) * (1 + VALIDATION_SHARE)
    return throughput.build_seconds + (folds - 1) * FOLD_RESET_SECONDS + folds * epochs * per_epoch


MAX_INFEASIBLE = 0.025  # of uniform draws from the planned space: half the 5% the issue allows, for TPE's bias


def space_bounds(side: int, channels: int, num_classes: int, max_gflops: float,
                 draws: int = 1500) -> tuple[tuple[int, int], tuple[int, int], tuple[int, ...], int]:
    """(base_filters, num_layers, kernels, max_params) of a space in which at most
    :data:`MAX_INFEASIBLE` of uniform draws cost more than ``max_gflops`` (estimated without
    Keras): the filters shrink first down to 16, then the largest kernel, then the depth down
    to 4. Base 16 with 4 levels and 3x3-5x5 kernels did best on the bundled sample
    (BENCHMARKS.md sections 4, 9), so the space never loses :data:`REFERENCE`; :func:`size_study`
    picks a side where it fits."""
    import numpy as np

    from search.spec.space import max_layers

    layers_hi = min(5, max_layers(side))
    layers_lo = min(3, layers_hi)
    filters_lo, filters_hi = 8, 32
    kernels = list(KERNELS)
    rng = np.random.default_rng(0)
    picks = rng.random((draws, 3))

    def over(filters: tuple[int, int], layers: tuple[int, int], kernel_choices: list[int]) -> tuple[float, int]:
        steps = (filters[1] - filters[0]) // 4 + 1
        costly, top = 0, 0
        for a, b, c in picks:
            model = _model(side, channels, num_classes, filters[0] + 4 * int(a * steps),
                           layers[0] + int(b * (layers[1] - layers[0] + 1)), kernel_choices[int(c * len(kernel_choices))])
            flops, params = _cost(model)
            costly += flops / 1e9 > max_gflops
            if flops / 1e9 <= max_gflops:
                top = max(top, params)
        return costly / draws, top

    while True:
        share, top_params = over((filters_lo, filters_hi), (layers_lo, layers_hi), kernels)
        if share <= MAX_INFEASIBLE:
            break
        if filters_hi > 16:
            filters_hi -= 4
        elif len(kernels) > 1:
            kernels.pop()
        elif layers_hi > max(layers_lo, min(REFERENCE[1], max_layers(side))):
            layers_hi -= 1
        elif filters_hi > filters_lo and filters_hi > REFERENCE[0]:
            filters_hi -= 4
        else:
            break
    return (filters_lo, filters_hi), (layers_lo, layers_hi), tuple(kernels), int(math.ceil(top_params * 1.05 / 1e5) * 1e5)


_COSTS: dict[tuple[int, ...], tuple[int, int]] = {}


def _model(side: int, channels: int, num_classes: int, base: int, layers: int, kernel: int) -> Any:
    from flexunet import config as cfg

    return cfg.ModelConfig(image_width=side, image_height=side, image_channels=channels, num_classes=max(2, num_classes),
                           base_filters=base, num_layers=layers, base_kernels=(kernel, kernel), normalization=True)


def _cost(model: Any) -> tuple[int, int]:
    from flexunet.model import estimate_cost

    key = (model.image_width, model.image_channels, model.num_classes, model.base_filters, model.num_layers,
           model.base_kernels[0])
    if key not in _COSTS:
        cost = estimate_cost(model)
        _COSTS[key] = (cost.flops, cost.params)
    return _COSTS[key]


DEFAULT_REFIT = RefitSpec(top_k=2, seeds=1, epochs=30, steps_per_epoch=16, patience=8)
MIN_REFIT_EPOCHS = 10


def _refit_for(t: Throughput, gflops: float, folds: int, side: int, timeout: float,
               refit: RefitSpec, fid: Fidelity) -> tuple[RefitSpec, float]:
    """``refit`` cut (epochs down to :data:`MIN_REFIT_EPOCHS`, then one configuration) until
    its estimate (:func:`search.spec.budget.refit_seconds`, from a search epoch at ``gflops``) fits
    the share of the timeout a refit may take."""
    epoch = fid.steps_per_epoch * 4 * t.seconds(gflops) * (1 + VALIDATION_SHARE)
    while True:
        estimate = budget.refit_seconds([epoch] * refit.top_k, search_steps=fid.steps_per_epoch, search_size=side,
                                        refit=refit, folds=folds)
        if estimate <= budget.MAX_REFIT_SHARE * timeout:
            return refit, estimate
        if refit.epochs > MIN_REFIT_EPOCHS:
            refit = dataclasses.replace(refit, epochs=max(MIN_REFIT_EPOCHS, refit.epochs - 5))
        elif refit.top_k > 1:
            refit = dataclasses.replace(refit, top_k=1)
        else:
            return refit, estimate


@dataclass(frozen=True)
class Shape:
    """What a study trains besides its searched trials: the folds of each trial, and whether
    trial 0 is the seed's baseline (trained in full before it is judged)."""

    folds: int
    baseline: bool


def shapes(patients: int) -> list[Shape]:
    """The shapes a plan tries, best first: 3 folds (2 for fewer than 6 patients to fold) with
    the baseline; without it; with 2 folds. A plan gives up the baseline, then a fold, before it
    gives up the lesions (see :func:`size_study`).

    >>> [(s.folds, s.baseline) for s in shapes(17)]
    [(3, True), (3, False), (2, False)]
    """
    folds = 3 if max(1, round(patients * 0.85)) >= 6 else 2
    ladder = [Shape(folds, True), Shape(folds, False)]
    return ladder + ([Shape(2, False)] if folds > 2 else [])


MAX_LESIONS_LOST = 0.5  # a plan that leaves more lesions than this under MIN_LESION_PIXELS is refused


def size_study(fp: Fingerprint, throughput: Throughput, minutes: float, *, name: str, workers: int = 1,
               gpus: Sequence[str] = (), refit: RefitSpec | None = DEFAULT_REFIT) -> Plan:
    """The study for ``fp`` in ``minutes`` on the measured device (see the module's rules).

    With ``refit`` (the default: the main command refits), the study's timeout covers the search
    and the refit, whose estimate (:mod:`search.spec.budget`, the model the launcher moves the
    search's deadline by) is kept within a third of it by cutting its epochs, then its
    configurations; the search gets the rest.

    Each :func:`shapes` in turn gets the largest side that fits; the first whose side leaves at
    most :data:`MAX_LESIONS_LOST` of the lesions under :data:`MIN_LESION_PIXELS` is the plan. A
    short budget so trades the baseline and a fold for resolution: the lesions are what the
    study is about, the baseline is a reference and a third fold a steadier estimate."""
    if minutes <= 0:
        raise ConfigError(f"--minutes {minutes}: expected a positive number")
    if workers < 1:
        raise ConfigError(f"--workers {workers}: need at least 1")
    parallel = max(1, len(gpus)) if gpus else 1  # CPU workers share the cores: one device's throughput
    size = choose_size(fp)
    ladder = shapes(fp.patients)
    lossy: Plan | None = None
    for shape in ladder:
        sized = _largest(fp, throughput, minutes, size, shape, name=name, workers=workers, gpus=gpus,
                         parallel=parallel, refit=refit)
        if sized is None:
            continue
        if sized.size.lesions_under / max(sized.size.lesions, 1) <= MAX_LESIONS_LOST:
            given_up = [what for what, lost in (("the baseline", ladder[0].baseline and not shape.baseline),
                                                (f"fold {ladder[0].folds}", shape.folds < ladder[0].folds)) if lost]
            if given_up:
                sized.notes.append(f"{' and '.join(given_up)} left out to keep {sized.size.side} px in {minutes:g} minutes")
            return sized
        if lossy is None or sized.size.side > lossy.size.side:
            lossy = sized
    cheapest = ladder[-1]
    if lossy is not None:
        need = needed_minutes(fp, throughput, size.side, cheapest.folds, parallel, refit, baseline=False)
        raise DataError(f"{fp.source or 'the dataset'}: {lossy.size.lesions_under} of {lossy.size.lesions} lesions are "
                        f"under {MIN_LESION_PIXELS:g} px at {lossy.size.side} px, the largest size {minutes:g} minutes "
                        f"allow; the lesions need {size.wanted} px ({math.ceil(need)} minutes)")
    need = needed_minutes(fp, throughput, min(SIDES), cheapest.folds, parallel, refit, baseline=False)
    raise ConfigError(f"--minutes {minutes:g}: too little time for {MIN_TRIALS} decided trials even at {min(SIDES)} px "
                      f"on this device; it needs at least {math.ceil(need)} minutes")


@dataclass(frozen=True)
class Fidelity:
    """How long a searched trial trains: epochs per fold and batches per epoch."""

    max_epochs: int
    steps_per_epoch: int

    @property
    def patience(self) -> int:
        """Early stopping's patience within a fold: a quarter of its epochs, at least 4."""
        return max(4, self.max_epochs // 4)


EPOCHS_LADDER = (MAX_EPOCHS, 12, 16, 24, 32, 48, 64, 80)
MODEL_ROOM = 4.0  # max_gflops at this many times the reference's cost before training grows longer
TARGET_TRIALS = 30  # decided trials a longer training must still leave room for


def fidelities(fp: Fingerprint, folds: int) -> list[Fidelity]:
    """The fidelities a plan may grow through, shortest first: the epochs of
    :data:`EPOCHS_LADDER`, and batches per epoch doubling from :data:`STEPS_PER_EPOCH` up to one
    pass over a fold's training slices at batch 4 (never fewer than 8).

    >>> fp = Fingerprint(images=46, patients=17, native_sizes={"512x512": 46}, channels=1, num_classes=2)
    >>> [(f.max_epochs, f.steps_per_epoch) for f in fidelities(fp, 3)][:3]
    [(8, 8), (12, 8), (16, 8)]
    """
    train_images = fp.images * 0.85 * (folds - 1) / max(folds, 2)
    one_pass = max(STEPS_PER_EPOCH, math.ceil(train_images / 4))
    return [Fidelity(epochs, min(one_pass, STEPS_PER_EPOCH * 2**i)) for i, epochs in enumerate(EPOCHS_LADDER)]


@dataclass(frozen=True)
class _Fit:
    max_gflops: float
    timeout: float
    refit: RefitSpec | None
    refit_seconds: float
    search: float
    baseline: float
    expected_trials: float


def _fit_at(t: Throughput, side: int, fp: Fingerprint, shape: Shape, fid: Fidelity, total: float, parallel: int,
            refit: RefitSpec | None) -> _Fit | None:
    """The largest ``max_gflops`` of the grid at which the study fits ``total`` seconds."""
    kw = {"folds": shape.folds, "epochs": fid.max_epochs, "steps": fid.steps_per_epoch}
    baseline = trial_seconds(t, seed_gflops(side, fp), batch=2, **kw) if shape.baseline else 0.0
    if refit is not None:  # the refit trains at least twice the search's fidelity
        refit = dataclasses.replace(refit, epochs=max(refit.epochs, 2 * fid.max_epochs),
                                    steps_per_epoch=max(refit.steps_per_epoch, fid.steps_per_epoch),
                                    patience=max(refit.patience, 2 * fid.patience))
    found = None
    for g in [g / 100 for g in range(5, 2001, 5)]:
        overrun = expected_trial_seconds(t, g / 2, batch=4, **kw) / parallel
        timeout = total - EXPORT_SECONDS - overrun
        refit_spec, refit_estimate = _refit_for(t, g / 2, shape.folds, side, timeout, refit, fid) if refit else (None, 0.0)
        search = timeout - refit_estimate - baseline / parallel
        if not (search > 0 and _fits(t, g, fid, shape.folds, search * parallel)):
            break
        found = _Fit(g, timeout, refit_spec, refit_estimate, search, baseline / parallel, 0.0)
    if found is None:
        return None
    decided = expected_decided(t, found.max_gflops / 2, found.search * parallel, batch=4, **kw)
    return dataclasses.replace(found, expected_trials=float(decided))


def _largest(fp: Fingerprint, throughput: Throughput, minutes: float, size: SizeChoice, shape: Shape, *, name: str,
             workers: int, gpus: Sequence[str], parallel: int, refit: RefitSpec | None) -> Plan | None:
    """The plan of ``shape`` at the largest side (at most the lesion rule's) that fits, or None.
    At that side a budget with room to spare buys models up to :data:`MODEL_ROOM` times the
    reference's cost first, then longer training (:func:`fidelities`) for as long as the
    models keep that room and :data:`TARGET_TRIALS` trials still fit, then bigger models."""
    total = minutes * 60.0
    ladder = fidelities(fp, shape.folds)
    for side in [s for s in SIDES if s <= size.side][::-1]:
        t = throughput.at(side)
        reference = reference_gflops(side, fp)
        fid, fit = ladder[0], _fit_at(t, side, fp, shape, ladder[0], total, parallel, refit)
        # The side must afford a space that holds what did well on the bundled sample (base
        # 16, 4 levels, 3x3: BENCHMARKS.md sections 4 and 9), with room above it.
        if fit is None or fit.max_gflops < REFERENCE_ROOM * reference:
            continue
        for longer in ladder[1:]:
            if fit.max_gflops < MODEL_ROOM * reference:
                break
            grown = _fit_at(t, side, fp, shape, longer, total, parallel, refit)
            if grown is None or grown.max_gflops < MODEL_ROOM * reference or grown.expected_trials < TARGET_TRIALS:
                break
            fid, fit = longer, grown
        chosen = dataclasses.replace(size, side=side, lesions_under=sum(
            c.lesions_under(MIN_LESION_PIXELS, side) for c in fp.classes.values()))
        notes = []
        if side < size.side:
            notes.append(f"the lesion rule asked for {size.side} px, but {MIN_TRIALS} trials fit only at {side} px "
                         f"in {minutes:g} minutes")
        filters, layers, kernels, max_params = space_bounds(side, fp.channels, fp.num_classes, fit.max_gflops)
        mid = expected_trial_seconds(t, fit.max_gflops / 2, folds=shape.folds, epochs=fid.max_epochs,
                                     steps=fid.steps_per_epoch, batch=4)
        return Plan(name=name, minutes=minutes, workers=workers, gpus=tuple(gpus), size=chosen, folds=shape.folds,
                    max_epochs=fid.max_epochs, steps_per_epoch=fid.steps_per_epoch, max_gflops=fit.max_gflops,
                    max_params=max_params, base_filters=filters, num_layers=layers, kernels=kernels,
                    trial_seconds=mid, search_seconds=fit.search, expected_trials=fit.expected_trials,
                    throughput=t, timeout=fit.timeout, baseline=shape.baseline, baseline_seconds=fit.baseline,
                    refit=fit.refit, refit_seconds=fit.refit_seconds, notes=notes)
    return None


def _fits(t: Throughput, max_gflops: float, fid: Fidelity, folds: int, seconds: float) -> bool:
    """Whether :data:`MIN_TRIALS` trials at the space's middle cost (half ``max_gflops``, batch
    4), at their expected cost under the pruner with :data:`MARGIN`, fit in ``seconds``, and
    one full trial of the space's most expensive corner (batch 8) in a third of them."""
    kw = {"folds": folds, "epochs": fid.max_epochs, "steps": fid.steps_per_epoch}
    return (MIN_TRIALS * MARGIN * expected_trial_seconds(t, max_gflops / 2, batch=4, **kw) <= seconds
            and trial_seconds(t, max_gflops, batch=8, **kw) <= seconds / 3)


def seed_gflops(side: int, fp: Fingerprint) -> float:
    """GFLOPs of the seed's settings at ``side`` (the baseline, exempt from ``max_gflops``)."""
    from flexunet import config as cfg
    from flexunet.model import estimate_cost
    from search.spec.space import SEED_BASELINE, seed_layers

    return estimate_cost(cfg.ModelConfig(
        image_width=side, image_height=side, image_channels=fp.channels, num_classes=max(2, fp.num_classes),
        base_filters=SEED_BASELINE["base_filters"], num_layers=seed_layers(side),
        base_kernels=(SEED_BASELINE["base_kernels"],) * 2, normalization=False)).flops / 1e9


REFERENCE = (16, 4, 3)  # base filters, levels, kernel: the space must hold it
REFERENCE_ROOM = 1.5  # max_gflops at least this many times the reference's cost


def reference_gflops(side: int, fp: Fingerprint) -> float:
    """GFLOPs of :data:`REFERENCE` at ``side`` (fewer levels where the side allows fewer)."""
    from search.spec.space import max_layers

    base, layers, kernel = REFERENCE
    return _cost(_model(side, fp.channels, fp.num_classes, base, min(layers, max_layers(side)), kernel))[0] / 1e9


def needed_minutes(fp: Fingerprint, throughput: Throughput, side: int, folds: int, parallel: int,
                   refit: RefitSpec | None, *, baseline: bool = True) -> float:
    """The minutes a plan at ``side`` needs: a space with room above :data:`REFERENCE` under
    the sizing rule of :func:`size_study`."""
    t = throughput.at(side)
    g = REFERENCE_ROOM * reference_gflops(side, fp)
    kw = {"folds": folds, "epochs": MAX_EPOCHS, "steps": STEPS_PER_EPOCH}
    search = max(MIN_TRIALS * MARGIN * expected_trial_seconds(t, g / 2, batch=4, **kw),
                 3 * trial_seconds(t, g, batch=8, **kw))
    baseline = trial_seconds(t, seed_gflops(side, fp), batch=2, **kw) if baseline else 0.0
    overrun = expected_trial_seconds(t, g / 2, batch=4, **kw)
    work = (search + baseline + overrun) / parallel
    # With a refit of at most a third of the timeout, the search keeps at least two thirds.
    share = 1.0 - budget.MAX_REFIT_SHARE if refit else 1.0
    return (work / share + EXPORT_SECONDS) / 60.0


@dataclass(frozen=True)
class Source:
    """What ``plan`` read: a CT-ICH download to prepare, or a config of folder pairs."""

    path: Path
    prepare: bool
    hemorrhage_types: bool = False


def fingerprint_of(source: Source) -> Fingerprint:
    from search.spec import fingerprint

    if source.prepare:
        return fingerprint.of_ct_ich(source.path, hemorrhage_types=source.hemorrhage_types)
    return fingerprint.of_config(source.path)


def source_of(data: Path, hemorrhage_types: bool = False, *, must_exist: bool = True) -> Source:
    """A folder is a CT-ICH download (``prepare``'s source); a file a seed-format config. With
    ``must_exist`` False (a fingerprint given instead of the data), a path that is not here is
    a folder unless it names a ``.config`` file."""
    if not must_exist and not data.exists():
        if data.suffix == ".config":
            return Source(data, prepare=False)
        return Source(data, prepare=True, hemorrhage_types=hemorrhage_types)
    if data.is_dir():
        return Source(data, prepare=True, hemorrhage_types=hemorrhage_types)
    if data.is_file():
        if hemorrhage_types:
            raise ConfigError(f"{data}: --hemorrhage-types applies to a CT-ICH download folder, not to a config")
        return Source(data, prepare=False)
    raise ConfigError(f"{data}: no such dataset folder or config file")


def plan(data: Path, minutes: float, *, out: Path, name: str | None = None, workers: int = 1,
         gpus: Sequence[str] = (), throughput: Path | None = None, hemorrhage_types: bool = False,
         fingerprint: Path | None = None) -> Plan:
    """Fingerprint ``data`` (or read ``fingerprint``, written by an earlier plan where the data
    is: then ``data`` need not be on this machine), measure this device (or read
    ``throughput``), size the study and write it to ``out`` with ``<stem>.fingerprint.json`` and
    ``<stem>.throughput.json`` beside it (:func:`search.paths.plan_fingerprint`,
    :func:`search.paths.plan_throughput`).

    Nothing is written when a step fails (a bad dataset, a budget too small).
    """
    source = source_of(data, hemorrhage_types, must_exist=fingerprint is None)
    fp = Fingerprint.read(fingerprint) if fingerprint else fingerprint_of(source)
    size = choose_size(fp)
    if gpus and throughput is None and not _has_gpu():
        raise ConfigError(f"--gpus {','.join(gpus)}: this machine has no GPU to measure; plan on the GPU machine, "
                          "or give --throughput FILE (a throughput.json written there)")
    measured = Throughput.read(throughput) if throughput else measure_device(size.side, fp.channels, fp.num_classes)
    sized = size_study(fp, measured, minutes, name=name or _name(out), workers=workers, gpus=gpus)
    text = study_text(sized, fp, source, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from flexunet.outputs import write_text_atomic

    write_text_atomic(paths.plan_fingerprint(out), fp.to_json())
    write_text_atomic(paths.plan_throughput(out), measured.to_json())
    write_text_atomic(out, text)
    return sized


def _name(out: Path) -> str:
    return out.stem.replace("_", "-") or "study"


def study_text(p: Plan, fp: Fingerprint, source: Source, out: Path) -> str:
    """The commented study file of a plan (what ``flexunet search run`` reads)."""
    import os

    relative = Path(os.path.relpath(source.path.resolve(), out.parent.resolve()))
    t = p.throughput
    lines = [
        f"# Planned by `flexunet search plan` for {p.minutes:g} minutes on {t.device}"
        + (f" ({len(p.gpus)} GPU(s))" if p.gpus else f" ({p.workers} worker(s))") + ".",
        "# Re-plan rather than edit the sizes: `flexunet search plan DATA --minutes M --out FILE`",
        f"# (--throughput {paths.plan_throughput(out).name} reuses this measurement).",
        "#",
        *[f"# {line}" for line in fp.lines()],
        *[f"# {line}" for line in p.lines()],
        *([f"# Throughput: {t.note}"] if t.note else []),
        f"# Throughput {'stated' if t.note else 'measured'} at {t.image_size} px: "
        + ", ".join(f"{g:.3g} GFLOPs {s * 1000:.1f} ms/image" for g, s in zip(t.gflops, t.seconds_per_image))
        + f"; building and tracing a model {t.build_seconds:.0f} s.",
        "# The timeout ends the search (n_trials is a ceiling); the last trial may run past it, so",
        "# the timeout leaves one trial's time and the export inside the minutes.",
        "",
        "[study]",
        f'name = "{p.name}"',
        f"image_size = {p.size.side}",
        f"baseline = {'true' if p.baseline else 'false'}",
        f"folds = {p.folds}",
        "",
        "[dataset]",
    ]
    if source.prepare:
        types = ", hemorrhage_types = true" if source.hemorrhage_types else ""
        lines.append(f'prepare = {{ dataset = "ct-ich", source = "{relative.as_posix()}", size = {p.size.side}, seed = 0{types} }}')
    else:
        lines.append(f'config = "{relative.as_posix()}"')
    multi = fp.num_classes > 2
    lines += [
        "",
        "[fixed]",
        "normalization = true",
        f"steps_per_epoch = {p.steps_per_epoch}",
        f"patience = {Fidelity(p.max_epochs, p.steps_per_epoch).patience}",
        "augmentation = true",
        f"reducer_patience = {max(3, p.max_epochs // 6)}",
        "seed = 137",
        "",
        "[budget]",
        "n_trials = 1000",
        f"timeout = {p.timeout:.0f}",
        f"max_epochs = {p.max_epochs}",
        f"max_params = {p.max_params}",
        f"max_gflops = {p.max_gflops:g}",
        "",
        "[sampler]",
        'name = "TPESampler"',
        "n_startup_trials = 5",
        "seed = 0",
        "",
        "[pruner]",
        'name = "SuccessiveHalvingPruner"',
        f"min_resource = {pruner_min_resource(p.max_epochs)}",
        "reduction_factor = 3",
        "",
        "[space]",
        f"base_filters = {{ type = \"int\", low = {p.base_filters[0]}, high = {p.base_filters[1]}, step = 4 }}",
        f"num_layers = {{ type = \"int\", low = {p.num_layers[0]}, high = {p.num_layers[1]} }}",
        f"base_kernels = {{ type = \"categorical\", choices = [{', '.join(map(str, p.kernels))}] }}",
        "dilation = { type = \"int\", low = 1, high = 2 }",
        "dropout_rate = { type = \"float\", low = 0.0, high = 0.1 }",
        "learning_rate = { type = \"float\", low = 3e-4, high = 5e-3, log = true }",
        f"batch_size = {{ type = \"categorical\", choices = [{', '.join(map(str, BATCH_SIZES))}] }}",
        "loss = { type = \"categorical\", choices = [\"categorical_crossentropy\", \"dice_loss\", "
        "\"categorical_crossentropy+dice_loss\"] }",
        *(["class_weights = { type = \"categorical\", choices = [\"none\", \"balanced\"] }",
           "class_sampling = { type = \"float\", low = 0.0, high = 0.5 }"] if multi else []),
        "augmentation_strength = { type = \"float\", low = 0.0, high = 1.0 }",
        "optimizer = { type = \"categorical\", choices = [\"Adam\", \"AdamW\"] }",
        "weight_decay = { type = \"float\", low = 1e-5, high = 1e-2, log = true, when = { optimizer = \"AdamW\" } }",
        "",
    ]
    if p.refit is not None:
        r = p.refit
        lines += [
            "[refit]",
            f"# After the search: the {r.top_k} best configuration(s) trained again as {p.folds} fold models x "
            f"{r.seeds} seed(s), estimated {p.refit_seconds:.0f} s",
            "# (search/spec/budget.py), inside the timeout: the search stops early enough to leave it.",
            f"top_k = {r.top_k}",
            f"seeds = {r.seeds}",
            f"epochs = {r.epochs}",
            f"steps_per_epoch = {r.steps_per_epoch}",
            f"patience = {r.patience}",
            "tta = [" + ", ".join(f'"{v}"' for v in r.tta) + "]",
            "",
        ]
    return "\n".join(lines)
