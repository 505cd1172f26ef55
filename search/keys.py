"""Study and trial attribute keys: what flexunet records in the storage, spelt once.

Study user attrs (``STUDY_*``) describe the study for ``status``, ``export``, ``report`` and the
dashboard; trial user attrs (``TRIAL_*`` and the reasons) say what a trial did and why it
ended. ``FAILED_TRIAL`` and ``RETRY_HISTORY`` are Optuna's own system attrs, set by
``optuna.storages.RetryHeartbeatStaleTrialCallback`` on a retried trial.
"""

from __future__ import annotations

# --- study user attrs -------------------------------------------------------------------------
STUDY_IMAGE_SIZE = "flexunet_image_size"
STUDY_DATASET_CONFIG = "flexunet_dataset_config"
STUDY_ARTIFACTS = "flexunet_artifacts"  # the URL of the store the trials keep their files in
STUDY_ARTIFACT_DIR = "flexunet_artifact_dir"  # what studies recorded before object stores (a folder)
STUDY_FILE = "flexunet_study_file"
STUDY_OBJECTIVES = "flexunet_objectives"
STUDY_DATASET = "flexunet_dataset"
STUDY_FOLDS = "flexunet_folds"
STUDY_BUDGET = "flexunet_budget"
STUDY_SPACE = "flexunet_space"
STUDY_FIXED = "flexunet_fixed"
STUDY_SAMPLER = "flexunet_sampler"
STUDY_PRUNER = "flexunet_pruner"

# --- trial user attrs: who ran it and what it is ------------------------------------------------
BASELINE = "baseline"  # the enqueued seed settings
HOST = "host"
PID = "pid"
PARAMS = "params"  # the model's parameter count (not Optuna's params)
GFLOPS = "gflops"
SETTINGS = "settings"

# --- trial user attrs: progress and outcome ----------------------------------------------------
EPOCH = "epoch"
LAST_VAL_DICE = "last_val_foreground_dice"
BEST_VAL_DICE = "best_val_foreground_dice"
EPOCHS_RUN = "epochs_run"
BEST_EPOCH = "best_epoch"
TRAIN_SECONDS = "train_seconds"
SECONDS_PER_EPOCH = "seconds_per_epoch"
STOP_REASON = "stop_reason"  # "pruned", "infeasible", "failed", "over budget", or fit's reason
FAIL_REASON = "fail_reason"  # why a trial is FAIL ("interrupted", "worker killed (SIGKILL)", ...)
PREVIOUS_FAIL_REASON = "previous_fail_reason"  # a retry's record of why its original failed
INFEASIBLE_REASON = "infeasible_reason"  # why a configuration was PRUNED before training

# --- trial user attrs: resuming -----------------------------------------------------------------
RESUME_ARTIFACT = "resume_artifact"  # artifact id of the trial's last epoch checkpoint
RESUME_EPOCH = "resume_epoch"  # epochs that checkpoint holds
RESUME_FOLD = "resume_fold"  # a cross-validated trial: the fold that checkpoint is of
RESUMED_FROM_EPOCH = "resumed_from_epoch"  # set on a retry that started from a checkpoint

# --- trial system attrs (Optuna's, from RetryHeartbeatStaleTrialCallback) -----------------------
FAILED_TRIAL = "failed_trial"  # the number of the first trial of a retry series
RETRY_HISTORY = "retry_history"  # the numbers of every earlier attempt, oldest first
# --- trial system attrs (ours) -------------------------------------------------------------------
OVER_BUDGET = "flexunet_over_budget"  # never trained, never counted: after the budget was full, or a duplicate copy

# Stop reasons set by the trial lifecycle (fit sets its own: "patience", "epochs", "pruned", ...).
STOP_INFEASIBLE = "infeasible"
STOP_FAILED = "failed"
STOP_OVER_BUDGET = "over budget"
STOP_DUPLICATE = "duplicate retry"  # a second copy of a trial that another process queued again too
FAIL_INTERRUPTED = "interrupted"

# --- trial user attrs: cross-validated trials (search/trial/cv.py), read by the export and the report ---
FOLDS = "folds"  # K, the number of folds the trial was cross-validated on
FOLD_DICE = "fold_val_foreground_dice"  # list: best validation foreground Dice of each finished fold
POOLED_DICE = "val_foreground_dice_pooled"  # the trial's value: one Dice over every out-of-fold slice
# list, one per foreground class (class 1 first): the validation Dice of each class, pooled over
# the out-of-fold slices (or the single split's validation slices, best epoch); None where the
# class is absent there (no reference, no prediction: it left the mean)
CLASS_DICE = "val_class_dice"
FOLD = "fold"  # 0-based fold in progress
FOLD_EPOCHS_RUN = "fold_epochs_run"  # list: epochs each finished fold trained
FOLD_BEST_EPOCH = "fold_best_epoch"  # list: each finished fold's best epoch
RESUMED_FROM_FOLD = "resumed_from_fold"  # a retry: the fold it resumed in (earlier ones were kept)

# --- the refit (search/trial/refit.py) ----------------------------------------------------------------
STUDY_REFIT = "flexunet_refit"  # on the search study: the refit study's name, configurations and spec
STUDY_REFIT_OF = "flexunet_refit_of"  # on the refit study: the search study it refits
STUDY_REFIT_MODELS = "flexunet_refit_models"  # on the refit study: how many fold x seed models it trains
STUDY_SEARCH_DEADLINE = "flexunet_search_deadline"  # epoch seconds after which no search trial starts
REFIT_SOURCE = "refit_source_trial"  # a refit trial: the search trial whose configuration it trains
REFIT_RANK = "refit_rank"  # 0 for the best configuration, 1 for the next...
REFIT_FOLD = "refit_fold"  # 0-based fold it validates on
REFIT_SEED = "refit_seed"  # 0-based seed of that fold's models
