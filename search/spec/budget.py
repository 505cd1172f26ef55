"""The time model of a study: how long its refit will take, and when its search must stop.

One budget, the study's ``[budget] timeout``, covers the search and the refit (search/trial/refit.py).
The refit's cost is estimated from what the search measured: each configuration to refit has a
``seconds_per_epoch`` user attr (for a cross-validated trial, its folds' seconds over their
epochs, building and tracing included). A refit model trains ``[refit] epochs`` epochs of
``steps_per_epoch`` batches at ``image_size``; an epoch's cost is scaled by the ratio of batches
and of pixels. Early stopping may end a model sooner: the estimate is an upper bound on the
epochs, which is the safe side for a deadline.

The search stops early enough to leave the refit its estimate, but never more than
:data:`MAX_REFIT_SHARE` of the timeout: a refit estimated above that is warned about (the run
may overrun), not allowed to eat the search.

These are plain functions of numbers, so that a planner (issue 21, ``flexunet search plan``)
sizes studies with the same model.

Example::

    >>> from search.spec.study_file import RefitSpec
    >>> refit = RefitSpec(seeds=2, epochs=30, steps_per_epoch=16, patience=8)
    >>> round(refit_seconds([1.5], search_steps=8, search_size=96, refit=refit, folds=3))
    630
    >>> search_deadline(1000.0, 900.0, 600.0)   # capped at a third of the 900 s
    1600.0
    >>> search_deadline(1000.0, 900.0, 120.0)
    1780.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from search.spec.study_file import RefitSpec

MAX_REFIT_SHARE = 1 / 3  # of the study's timeout, at most, kept for the refit
# Per refit model, on top of its epochs: loading the data, building and tracing the model,
# predicting its validation slices and uploading its files. DESIGN.md measured tracing alone at
# 12-65 s on a 2-core CPU for a new model; the search's seconds_per_epoch already carries a
# trial's tracing spread over its epochs, so this is the part a refit pays again per model.
MODEL_OVERHEAD_SECONDS = 15.0


def epoch_seconds(seconds_per_epoch: float, *, search_steps: int, search_size: int, steps: int,
                  size: int) -> float:
    """The measured seconds of a search epoch scaled to ``steps`` batches at ``size`` px.

    >>> epoch_seconds(2.0, search_steps=8, search_size=96, steps=16, size=192)
    16.0
    """
    if seconds_per_epoch < 0 or search_steps < 1 or search_size < 1:
        raise ValueError("seconds_per_epoch must be >= 0, search_steps and search_size >= 1")
    return seconds_per_epoch * (steps / search_steps) * (size / search_size) ** 2


def refit_seconds(seconds_per_epoch: Sequence[float], *, search_steps: int, search_size: int,
                  refit: RefitSpec, folds: int, workers: int = 1) -> float:
    """Estimated wall seconds of a refit of the configurations whose measured search epochs
    took ``seconds_per_epoch`` (one value each), trained as ``folds`` x ``refit.seeds`` models
    of ``refit.epochs`` epochs each, spread over ``workers`` workers (the measured seconds are a
    worker's, with the search's number of workers sharing the machine). A refit's models are
    independent, so the wall time is their total over the workers, and at least the longest.

    >>> refit_seconds([1.0, 3.0], search_steps=8, search_size=96, folds=2, workers=2,
    ...               refit=RefitSpec(epochs=10, steps_per_epoch=8))
    70.0
    """
    if workers < 1 or folds < 1:
        raise ValueError("workers and folds must be >= 1")
    size = refit.image_size or search_size
    models = []
    for seconds in seconds_per_epoch:
        epoch = epoch_seconds(seconds, search_steps=search_steps, search_size=search_size,
                              steps=refit.steps_per_epoch, size=size)
        models += [refit.epochs * epoch + MODEL_OVERHEAD_SECONDS] * (folds * refit.seeds)
    if not models:
        return 0.0
    return max(sum(models) / workers, max(models))


def refit_reserve(estimate: float, timeout: float) -> float:
    """The seconds the search leaves the refit: its estimate, at most a third of the timeout."""
    return min(max(estimate, 0.0), timeout * MAX_REFIT_SHARE)


def search_deadline(start: float, timeout: float | None, refit_estimate: float | None) -> float | None:
    """When the search must stop starting trials (epoch seconds), so that a refit estimated at
    ``refit_estimate`` seconds ends within ``timeout`` of ``start``; None without a timeout.
    Before the search has measured anything (``refit_estimate`` None) the whole reserve, a
    third of the timeout, is kept."""
    if timeout is None:
        return None
    reserve = timeout * MAX_REFIT_SHARE if refit_estimate is None or not math.isfinite(refit_estimate) \
        else refit_reserve(refit_estimate, timeout)
    return start + timeout - reserve


def over_share(estimate: float, timeout: float | None) -> bool:
    """Whether a refit estimated at ``estimate`` seconds needs more than its share of the
    timeout (the launcher warns: the run will end late)."""
    return timeout is not None and estimate > timeout * MAX_REFIT_SHARE
