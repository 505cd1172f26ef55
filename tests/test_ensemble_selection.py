"""flexunet.ensemble.select_greedy: Caruana's ensemble selection with replacement, on known inputs."""

from __future__ import annotations

import numpy as np
import pytest

from flexunet.ensemble import TTA_MODES, forward_passes, select_greedy


def _score(target: np.ndarray):
    return lambda p: -float(np.abs(p - target).sum())


def test_a_dominant_candidate_is_taken_alone() -> None:
    target = np.array([1.0, 0.0, 1.0])
    candidates = [np.array([0.0, 1.0, 0.0]), np.array([1.0, 0.0, 1.0]), np.array([0.5, 0.5, 0.5])]
    assert select_greedy(candidates, _score(target), rounds=5) == [0, 1, 0]


def test_two_complementary_candidates_are_averaged_and_replacement_gives_weights() -> None:
    target = np.array([1.0, 1.0])
    # Each is right on one pixel; their mean is nearer than either alone; a 2:1 mix is nearer still.
    a, b, c = np.array([1.5, 0.0]), np.array([0.0, 1.5]), np.array([-1.0, -1.0])
    counts = select_greedy([a, b, c], _score(target), rounds=6)
    assert counts[2] == 0 and counts[0] >= 1 and counts[1] >= 1
    mean = (counts[0] * a + counts[1] * b) / (counts[0] + counts[1])
    assert _score(target)(mean) > max(_score(target)(a), _score(target)(b))


def test_the_best_prefix_is_kept_when_later_rounds_only_hurt() -> None:
    target = np.array([1.0])
    counts = select_greedy([np.array([1.0]), np.array([3.0])], _score(target), rounds=4)
    assert counts == [1, 0]


def test_selection_refuses_nothing_to_choose_from() -> None:
    with pytest.raises(ValueError):
        select_greedy([], _score(np.array([1.0])), rounds=3)
    with pytest.raises(ValueError):
        select_greedy([np.array([1.0])], _score(np.array([1.0])), rounds=0)


def test_tta_modes_cost_one_pass_per_mirroring() -> None:
    assert [forward_passes(3, m) for m in ("none", "horizontal", "all")] == [3, 6, 12]
    assert forward_passes(2, True) == 4 and forward_passes(2, False) == 2
    assert set(TTA_MODES) == {"none", "horizontal", "all"}
