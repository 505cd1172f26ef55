#!/usr/bin/env bash
# GPU figures from a bare start, in at most 9 minutes (results, and how they were taken:
# BENCHMARKS.md, section 6): the trial loop's ratio to plain model.fit, GPU utilisation with 1, 2
# and 4 workers per GPU, and trials per hour of a small study at each setting.
#
# On a fresh checkout of this repository on a machine with an NVIDIA GPU and Python 3.11+:
#
#     bash bench/gpu.sh
#
# 1. creates a virtual environment (.venv-gpu, or $VENV) and installs the project with the
#    `export` and `gpu` extras (tensorflow[and-cuda]); an existing environment is reused;
# 2. checks that Keras sees the GPU (stops otherwise: CPU figures are bench/throughput.py's);
# 3. bench/throughput.py on the GPU: training images/s of a search trial's loop against plain
#    model.fit at 256 px, and inference images/s (Keras, SavedModel, onnxruntime on the CPU) at
#    128 and 256 px;
# 4. for W in 1 2 4: a real study at 256 px on the bundled sample, on GPU 0:
#    flexunet search run studies/ct_ich_sample.toml --image-size 256 --n-trials N --max-epochs E \
#        --gpus 0 --workers-per-gpu W
#    (without --gpus a worker hides the GPUs and trains on the CPU), with GPU utilisation sampled
#    every 2 s; each study gets an equal part of the time left;
# 5. prints what it measured: `train_throughput_ratio_gpu: R`,
#    `gpu_utilisation_workers_per_gpu_W: U%`, `trials_per_hour_workers_per_gpu_W: T trained` and,
#    last, `gpu_trial_train_images_per_s_256px: X`.
#
# Every stage has a time limit so that the whole script ends within BUDGET seconds (default 540).
# Environment:
#   VENV           the virtual environment to create or reuse (.venv-gpu)
#   PYTHON         instead: an interpreter that already has the project and its dependencies
#                  (no venv, no install)
#   SKIP_INSTALL=1 use VENV as it is;  PIP_ARGS: extra pip arguments (e.g. a local wheel cache)
#   KERAS_BACKEND  jax where TensorFlow cannot be installed: training and the study run on
#                  Keras' JAX backend, and inference is timed through Keras alone
#   WORK           output folder (a new temporary one);  BUDGET (480 s)
#   SIZE (256)     training and study image side;  N_TRIALS (8), MAX_EPOCHS (6): each study;
#   WORKERS_PER_GPU ("1 2 4") the settings of step 4;
#   REPEATS (3)    interleaved throughput repeats
#   ALLOW_CPU=1    go on without a GPU, to check the script itself on a CPU machine:
#                  SKIP_INSTALL=1 VENV=.venv ALLOW_CPU=1 SIZE=64 N_TRIALS=2 MAX_EPOCHS=2 bash bench/gpu.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
START=$(date +%s)
BUDGET=${BUDGET:-540}
VENV=${VENV:-.venv-gpu}
WORK=${WORK:-$(mktemp -d -t flexunet-gpu-XXXXXX)}
N_TRIALS=${N_TRIALS:-8}
MAX_EPOCHS=${MAX_EPOCHS:-6}
SIZE=${SIZE:-256}
mkdir -p "$WORK"
export TF_CPP_MIN_LOG_LEVEL=3

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
log() { printf '[gpu.sh %4ss] %s\n' "$(elapsed)" "$*"; }

# --- 1. environment ---------------------------------------------------------------------------
if [[ -n "${PYTHON:-}" ]]; then
    # An interpreter that already has the project and its dependencies (no venv, no install).
    PY="$PYTHON"
    SKIP_INSTALL=1
else
    if [[ ! -x "$VENV/bin/python" ]]; then
        log "creating $VENV"
        python3 -m venv "$VENV"
    fi
    PY="$VENV/bin/python"
fi
BACKEND=${KERAS_BACKEND:-tensorflow}
if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
    log "installing the project with the export and gpu extras"
    # shellcheck disable=SC2086  # PIP_ARGS is a list of words on purpose
    timeout "$(left)" "$PY" -m pip install -q --disable-pip-version-check ${PIP_ARGS:-} -e ".[export,gpu]" \
        > "$WORK/pip.log" 2>&1 || { log "pip install failed or ran out of time; see $WORK/pip.log"; tail -5 "$WORK/pip.log"; exit 1; }
fi
log "installed: $("$PY" -c 'import keras, optuna; print("keras", keras.__version__, "backend", keras.backend.backend(), "optuna", optuna.__version__)' 2>/dev/null)"

# --- 2. the GPU -------------------------------------------------------------------------------
if command -v nvidia-smi > /dev/null; then
    log "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
fi
if [[ "$BACKEND" == jax ]]; then
    # Several processes share the GPU (this script, then the study's worker): no preallocation.
    export XLA_PYTHON_CLIENT_PREALLOCATE=false
    GPUS=$("$PY" -c 'import jax; print(sum(d.platform == "gpu" for d in jax.devices()))' 2>/dev/null || echo 0)
    log "Keras backend: JAX $("$PY" -c 'import jax; print(jax.__version__)' 2>/dev/null) (the SavedModel and ONNX figures need TensorFlow and are skipped)"
else
    GPUS=$("$PY" -c 'import tensorflow as tf; print(len(tf.config.list_physical_devices("GPU")))' 2>/dev/null || echo 0)
fi
GPU_FLAG=(--gpus 0)
if [[ "$GPUS" -lt 1 ]]; then
    if [[ "${ALLOW_CPU:-0}" != 1 ]]; then
        log "Keras ($BACKEND) sees no GPU; stopping (CPU figures: python bench/throughput.py)"
        exit 1
    fi
    log "Keras ($BACKEND) sees no GPU; ALLOW_CPU=1: going on on the CPU (a check of this script, not GPU figures)"
    GPU_FLAG=()
else
    log "Keras ($BACKEND) sees $GPUS GPU(s)"
fi

# --- 3. throughput ----------------------------------------------------------------------------
# Study time is kept for step 4: throughput gets at most 30% of what is left.
THROUGHPUT_LIMIT=$(( $(left) * 30 / 100 ))
log "throughput (limit ${THROUGHPUT_LIMIT}s)"
if timeout "$THROUGHPUT_LIMIT" "$PY" bench/throughput.py --train-size "$SIZE" --levels 5 --batch 8 --steps 16 \
        --epochs 6 --repeats "${REPEATS:-3}" --no-augmented --infer-sizes 128 "$SIZE" --infer-images 64 --infer-batch 16 \
        --infer-repeats 5 --json "$WORK/throughput.json" > "$WORK/throughput.log" 2>&1; then
    grep -E 'img/s|ratio|^train_throughput_ratio' "$WORK/throughput.log" | sed 's/^/    /'
else
    log "throughput did not finish (status $?); last lines:"
    tail -5 "$WORK/throughput.log"
fi

# --- 4. real studies at 256 px, 1, 2 and 4 workers per GPU -----------------------------------
# One study per setting (its own folder and database), each with an equal part of the time
# left, GPU utilisation sampled every 2 s: mean utilisation, peak memory and trials per hour.
SETTINGS=(${WORKERS_PER_GPU:-1 2 4})
STUDY_TOTAL=$(( $(left) - 15 ))
PER_STUDY=$(( STUDY_TOTAL / ${#SETTINGS[@]} ))
if [[ "$PER_STUDY" -lt 60 ]]; then
    log "no time left for the studies (${PER_STUDY}s each)"
    SETTINGS=()
fi
for W in "${SETTINGS[@]}"; do
    FLAGS=("${GPU_FLAG[@]}")
    if [[ ${#GPU_FLAG[@]} -gt 0 ]]; then FLAGS+=(--workers-per-gpu "$W"); else FLAGS+=(--workers "$W"); fi
    OUT="$WORK/study-w$W"
    log "study, $W worker(s) per GPU: $N_TRIALS trials of at most $MAX_EPOCHS epochs at $SIZE px ${FLAGS[*]} (limit ${PER_STUDY}s)"
    UTIL_PID=""
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -l 2 \
            > "$WORK/gpu-utilisation-w$W.csv" 2>/dev/null &
        UTIL_PID=$!
    fi
    STUDY_START=$(date +%s)
    # --timeout: no trial starts after it; `timeout` stops a trial that would overrun the budget.
    set +e
    timeout --signal=INT --kill-after=20 "$PER_STUDY" "$PY" -m flexunet.cli search run studies/ct_ich_sample.toml \
        --image-size "$SIZE" --n-trials "$N_TRIALS" --max-epochs "$MAX_EPOCHS" "${FLAGS[@]}" \
        --timeout $(( PER_STUDY * 6 / 10 )) --out "$OUT" > "$WORK/study-w$W.log" 2>&1
    STATUS=$?
    set -e
    STUDY_SECONDS=$(( $(date +%s) - STUDY_START ))
    if [[ -n "$UTIL_PID" ]]; then kill "$UTIL_PID" 2>/dev/null || true; fi
    log "study with $W worker(s) per GPU finished with status $STATUS in ${STUDY_SECONDS}s"
    sed 's/^/    /' "$WORK/study-w$W.log" | tail -12
    UTIL="n/a"
    if [[ -s "$WORK/gpu-utilisation-w$W.csv" ]]; then
        UTIL=$(awk -F', *' '{u += $1; m = ($2 > m ? $2 : m); n++} END {if (n) printf "%.0f%% (mean of %d samples, peak memory %d MiB)", u / n, n, m}' \
            "$WORK/gpu-utilisation-w$W.csv")
    fi
    echo "gpu_utilisation_workers_per_gpu_$W: $UTIL" >> "$WORK/summary.txt"
    "$PY" - "$OUT/study.db" "$SIZE" "$STUDY_SECONDS" "$W" <<'PYEOF' >> "$WORK/summary.txt" || true
import sys
import optuna

optuna.logging.set_verbosity(optuna.logging.ERROR)
study = optuna.load_study(study_name="ct-ich-sample", storage=f"sqlite:///{sys.argv[1]}")
seconds, w = float(sys.argv[3]), sys.argv[4]
trials = study.get_trials(deepcopy=False)
trained = [t for t in trials if t.user_attrs.get("seconds_per_epoch")]
finished = [t for t in trials if t.state.is_finished()]
for t in trained:
    a = t.user_attrs
    print(f"    w{w} trial {t.number}: {t.state.name:<8} {a.get('params') or 0:>11,} params  "
          f"{a.get('epochs_run')} epochs x {a.get('seconds_per_epoch')} s  value {t.values[0] if t.values else None}")
print(f"trials_per_hour_workers_per_gpu_{w}: {3600 * len(trained) / seconds:.0f} trained "
      f"({3600 * len(finished) / seconds:.0f} finished, infeasible ones included; {len(trained)} trained in {seconds:.0f} s)")
PYEOF
done

# --- 5. summary -------------------------------------------------------------------------------
log "done in $(elapsed)s; outputs in $WORK"
if [[ ! -s "$WORK/throughput.json" ]]; then
    echo "gpu_trial_train_images_per_s_${SIZE}px: n/a (throughput did not finish)"
    [[ -s "$WORK/summary.txt" ]] && cat "$WORK/summary.txt"
    exit 0
fi
[[ -s "$WORK/summary.txt" ]] && cat "$WORK/summary.txt"
"$PY" - "$WORK/throughput.json" "$SIZE" <<'PYEOF' || echo "gpu_trial_train_images_per_s_${SIZE}px: n/a"
import json
import statistics
import sys

data = json.load(open(sys.argv[1]))
for size, r in data.get("inference", {}).items():
    print("inference " + size + " px img/s: " + ", ".join(f"{k} {v:.1f}" for k, v in r["median"].items()))
t = data["training"]
print(f"train_throughput_ratio_gpu: {t['ratio_median']:.3f}")
print(f"gpu_trial_train_images_per_s_{sys.argv[2]}px: {statistics.median(t['rates']['trial']):.1f}")
PYEOF
