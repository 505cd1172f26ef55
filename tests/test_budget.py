"""search/spec/budget.py: the time model that sizes the refit and the search's deadline."""

from __future__ import annotations

import pytest

from search.spec import budget
from search.spec.study_file import RefitSpec


def test_an_epoch_scales_with_batches_and_pixels() -> None:
    assert budget.epoch_seconds(2.0, search_steps=8, search_size=96, steps=8, size=96) == 2.0
    assert budget.epoch_seconds(2.0, search_steps=8, search_size=96, steps=16, size=96) == 4.0
    assert budget.epoch_seconds(2.0, search_steps=8, search_size=64, steps=8, size=128) == 8.0
    with pytest.raises(ValueError):
        budget.epoch_seconds(1.0, search_steps=0, search_size=96, steps=8, size=96)


def test_refit_seconds_counts_every_fold_and_seed_of_every_configuration() -> None:
    refit = RefitSpec(seeds=2, epochs=10, steps_per_epoch=16, image_size=None)
    # 2 configurations x 3 folds x 2 seeds = 12 models; one of 1 s/epoch at 8 steps is 2 s/epoch at 16.
    one = 10 * 2.0 + budget.MODEL_OVERHEAD_SECONDS
    two = 10 * 4.0 + budget.MODEL_OVERHEAD_SECONDS
    seconds = budget.refit_seconds([1.0, 2.0], search_steps=8, search_size=96, refit=refit, folds=3)
    assert seconds == pytest.approx(6 * one + 6 * two)
    # Spread over workers, but never below the longest model.
    assert budget.refit_seconds([1.0, 2.0], search_steps=8, search_size=96, refit=refit, folds=3,
                                workers=4) == pytest.approx((6 * one + 6 * two) / 4)
    assert budget.refit_seconds([1.0], search_steps=8, search_size=96, refit=RefitSpec(seeds=1, epochs=10,
                                steps_per_epoch=16), folds=2, workers=8) == pytest.approx(one)
    assert budget.refit_seconds([], search_steps=8, search_size=96, refit=refit, folds=3) == 0.0
    # A larger refit image costs its pixels.
    assert budget.refit_seconds([1.0], search_steps=8, search_size=64, folds=1,
                                refit=RefitSpec(epochs=1, steps_per_epoch=8, image_size=128)) == \
        pytest.approx(4.0 + budget.MODEL_OVERHEAD_SECONDS)


def test_the_search_leaves_the_refit_its_estimate_and_at_most_a_third() -> None:
    assert budget.search_deadline(100.0, 900.0, 120.0) == pytest.approx(100 + 900 - 120)
    assert budget.search_deadline(100.0, 900.0, 5000.0) == pytest.approx(100 + 600)  # capped
    assert budget.search_deadline(100.0, 900.0, None) == pytest.approx(100 + 600)  # nothing measured yet
    assert budget.search_deadline(100.0, None, 120.0) is None
    assert budget.refit_reserve(-5.0, 900.0) == 0.0
    assert budget.over_share(301.0, 900.0) and not budget.over_share(300.0, 900.0)
    assert not budget.over_share(1e9, None)
