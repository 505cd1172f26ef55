"""The export of a cross-validated trial chooses its post-processing on out-of-fold predictions
made as the exported ensemble predicts (each fold model on the slices it did not train on, with
the horizontal flip), under the guards of flexunet.postprocess, and says so in metrics.json and
the model card; ``--no-tta`` on a single-split trial is an error, not silently ignored.

The study is the one tests/test_search_export_ensemble.py builds (two tiny fold models on the
bundled sample at 32 px, stored as a CV trial stores them, and a single-split trial beside it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_user_error, run_cli
from test_search_export_ensemble import FOLDS, CVStudy, _export, _pool, cv_study  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow


def _flip_tta_oof(cv: CVStudy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Out-of-fold probabilities recomputed here: each slice by its fold's model, averaged with
    that model's prediction of the mirrored slice (mirrored back)."""
    import keras

    from flexunet import config as cfg

    with np.load(cv.oof) as arrays:
        names, folds, masks = [str(n) for n in arrays["names"]], arrays["folds"], arrays["masks"]
    pool = _pool(cfg.load(cv.data_config))
    images = pool.images[[pool.names.index(n) for n in names]].astype(np.float32)
    out = np.zeros((*masks.shape, 2), np.float32)
    for k, path in enumerate(cv.fold_models):
        model = keras.models.load_model(path, compile=False)
        rows = folds == k
        x = images[rows]
        out[rows] = (model.predict(x, verbose=0) + model.predict(x[:, :, ::-1], verbose=0)[:, :, ::-1]) / 2
    return out, masks, folds


def test_cv_export_chooses_postprocessing_on_flipped_out_of_fold_predictions(cv_study: CVStudy,  # noqa: F811
                                                                           tmp_path: Path) -> None:
    from flexunet import config as cfg
    from flexunet import postprocess
    from flexunet.postprocess import PostProcessing

    out = tmp_path / "export"
    metrics = _export(cv_study, out)
    probabilities, masks, folds = _flip_tta_oof(cv_study)
    expected = postprocess.select(probabilities, masks, folds)
    config = cfg.load(out / "train_eval_infer.config")
    assert config.postprocess == expected.rules
    cv = metrics["cross_validation"]
    assert cv["oof_foreground_dice_pooled"] == pytest.approx(expected.dice, abs=1e-4)
    assert cv["oof_foreground_dice_pooled_postprocessed"] == pytest.approx(expected.dice_postprocessed, abs=1e-4)
    assert cv["oof_fold_foreground_dice"] == pytest.approx(list(expected.fold_dice), abs=1e-4)
    assert len(cv["oof_fold_foreground_dice_postprocessed"]) == FOLDS
    # The trial's own value (no flip) is kept beside it, from the stored predictions.
    with np.load(cv_study.oof) as arrays:
        stored = postprocess.pooled_dice(arrays["probabilities"], arrays["masks"], PostProcessing())
    assert cv["oof_foreground_dice_pooled_stored"] == pytest.approx(stored, abs=1e-6)
    pp = metrics["postprocess"]
    assert pp["chosen_on"] == f"out-of-fold predictions of the {FOLDS} fold models with the horizontal flip"
    assert pp["guards"] == {"min_gain": postprocess.TOLERANCE, "no_fold_worse": True,
                            "max_true_lesions_removed": postprocess.MAX_LESIONS_REMOVED,
                            "max_min_component_size": [postprocess.size_cap(masks == 1)]}
    card = (out / "model_card.md").read_text()
    assert f"chosen on the out-of-fold predictions of the {FOLDS} fold models with the horizontal flip" in card
    assert "leaves no fold worse" in card


def test_no_tta_on_a_single_split_trial_is_an_error(cv_study: CVStudy, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "export"
    run = run_cli("search", "export", "--study", "cv-export", "--storage", cv_study.storage, "--out", out,
                  "--trial", "1", "--no-tta")
    assert_user_error(run, "--no-tta", "trial 1", "single-split")
    assert not out.exists()
    # Without --no-tta the same trial exports as its one model.
    metrics = _export(cv_study, out, "--trial", "1")
    assert metrics["inference"]["models"] == 1 and metrics["cross_validation"] is None
