"""Training and inference throughput.

Training: images per second of what a search trial really runs -- ``flexunet.train.fit`` with
``Batches`` (uint8 batches, one-hot targets and augmentation built on the device), every callback
of a trial (best checkpoint, resume checkpoint uploaded to the artifact store, CSV log, Optuna's
``PruningReporter`` reporting to a SQLite study inside ``study.optimize``, with NopPruner so that
no timed run is cut short)
-- against plain ``model.fit`` on in-memory numpy arrays, for the same model (built and compiled
by flexunet), the same images per epoch and the same validation set. Runs alternate (plain,
trial, trial, plain, ...); the first epoch of each run (tracing) is not timed; the ratio is the
median over repeats of trial / plain. Images per CPU second of this process (all threads) are
reported beside images per wall-clock second: on a shared machine they drift less. The trial's
wrap-up after ``fit`` (the best model's file, learning-curve PNG, overlays, uploads: once per
trial) is timed apart and
printed with the ratio it would give if these short runs counted it.

Inference: images per second of an exported model through Keras ``predict`` (the reloaded
``.keras`` file), the TF SavedModel's ``serve`` and onnxruntime, at 128 and 256 px, interleaved,
median over repeats; outputs are checked to agree.

    python bench/throughput.py [--quick] [--json FILE]

Last line: ``train_throughput_ratio: R`` (trial loop / plain model.fit, median).
"""

from __future__ import annotations

import argparse
import gc
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as c


def prepared(size: int, root: Path):  # -> flexunet.config.Config
    from flexunet import config as cfg
    from flexunet.data import ct_ich

    out = root / f"data-{size}"
    if not out.exists():
        ct_ich.prepare(c.SAMPLE, out, size=size, seed=0)
    return cfg.load(out / "train_eval_infer.config")


def bench_config(base, args: argparse.Namespace, augmentation: float):  # -> Config
    """The data's own default model (flexunet prepare: base 16, 3x3, batch norm, CE+Dice) at the
    benchmark's size, trained with fixed steps per epoch and no early stopping."""
    from flexunet import config as cfg

    config = cfg.override(base, "model", {"num_layers": args.levels, "base_filters": args.filters}, "bench")
    return cfg.override(config, "train", {
        "epochs": args.epochs, "batch_size": args.batch, "steps_per_epoch": args.steps, "patience": 0,
        "learning_rate_reducer": False, "augmentation": augmentation > 0,
        "augmentation_strength": augmentation, "epoch_change_infer": False, "seed": 1,
    }, "bench")


class EpochStarts:
    """Records when each epoch begins (wall clock and this process's CPU time, all threads); the
    run's end is taken after fit returns."""

    def __init__(self) -> None:
        import keras

        class _CB(keras.callbacks.Callback):
            def __init__(cb) -> None:
                super().__init__()
                cb.starts: list[tuple[float, float]] = []

            def on_epoch_begin(cb, epoch: int, logs: Any = None) -> None:
                cb.starts.append((time.perf_counter(), time.process_time()))

        self.callback = _CB()

    def rate(self, images_per_epoch: int) -> tuple[float, float, list[float]]:
        """Images per wall-clock second and per CPU second over epochs 2..E (the first, with
        tracing, excluded), and every epoch's wall-clock seconds. Call right after fit returns.

        On a shared machine the wall clock also counts other processes' use of the cores; CPU
        seconds count only this process's work (all its threads), so their ratio drifts less."""
        bounds = self.callback.starts + [(time.perf_counter(), time.process_time())]
        seconds = [b[0] - a[0] for a, b in zip(bounds, bounds[1:])]
        cpu = [b[1] - a[1] for a, b in zip(bounds, bounds[1:])]
        n = images_per_epoch * (len(seconds) - 1)
        return n / sum(seconds[1:]), n / sum(cpu[1:]), seconds


def run_plain(config, train, valid) -> tuple[float, float, list[float]]:
    """Plain Keras: model.fit on numpy arrays holding exactly the images a trial epoch sees."""
    import keras
    import numpy as np

    from flexunet.data.augment import one_hot
    from flexunet.model import build
    from flexunet.train import compile_model

    m, t = config.model, config.train
    keras.utils.set_random_seed(t.seed)
    network = build(m)
    compile_model(network, m)
    per_epoch = t.steps_per_epoch * t.batch_size
    order = np.resize(np.random.default_rng(0).permutation(len(train)), per_epoch)
    x = train.images[order].astype(np.float32)
    y = keras.ops.convert_to_numpy(one_hot(train.masks[order], m.num_classes))
    xv, yv = valid.images.astype(np.float32), keras.ops.convert_to_numpy(one_hot(valid.masks, m.num_classes))
    timer = EpochStarts()
    network.fit(x, y, batch_size=t.batch_size, epochs=t.epochs, validation_data=(xv, yv),
                validation_batch_size=t.batch_size, shuffle=True, verbose=0, callbacks=[timer.callback])
    return timer.rate(per_epoch)


def run_trial(config, train, valid, work: Path, objective, study) -> tuple[tuple[float, float, list[float]],
                                                                          tuple[float, float]]:
    """What ``search.trial.objective.Objective._train`` runs inside ``study.optimize`` (as the worker
    calls it: heartbeat thread included), with a timer added to its callbacks: the training
    loop's rate as :meth:`EpochStarts.rate` gives it, and the wall-clock and CPU seconds of the
    trial's wrap-up after ``fit`` returns (``Objective._keep_artifacts``: the best model's file,
    learning curves, overlays, uploads), which is paid once per trial and not counted in the rate."""
    from flexunet.train import MODEL_FILE, TrainOutputs, fit
    from search.paths import LOG_FILE
    from search.trial.training import PruningReporter

    timed: dict[str, Any] = {}

    def one_trial(trial) -> float:
        reporter = PruningReporter(trial)
        timer = EpochStarts()
        folder = Path(tempfile.mkdtemp(prefix=f"trial-{trial.number}-", dir=work))
        outputs = TrainOutputs(model_path=folder / MODEL_FILE, log_csv=folder / LOG_FILE, model_at_end=False)
        result = fit(config.model, config.train, train, valid, outputs=outputs,
                     extra_callbacks=[reporter, timer.callback], verbose=0, checkpoint_dir=folder, resume=False,
                     on_checkpoint=lambda f, epoch: objective._save_resume_point(trial, f, epoch))
        t = config.train
        timed["rate"] = timer.rate(t.steps_per_epoch * t.batch_size)
        started, cpu = time.perf_counter(), time.process_time()
        objective._keep_artifacts(trial, result, valid, config, folder)
        timed["wrap_up"] = (time.perf_counter() - started, time.process_time() - cpu)
        shutil.rmtree(folder, ignore_errors=True)
        return result.best_val_dice if math.isfinite(result.best_val_dice) else 0.0

    study.optimize(one_trial, n_trials=1)
    return timed["rate"], timed["wrap_up"]


class CallbackClock:
    """Seconds spent in each per-epoch hook of a trial (wraps the methods while active)."""

    def __init__(self) -> None:
        from flexunet import callbacks as cb
        from flexunet.data.batches import Batches
        from search.trial.objective import Objective
        from search.trial.training import PruningReporter
        import keras

        self.targets = [(cb.BestCheckpoint, "on_epoch_end"), (cb.EpochCheckpoint, "on_epoch_end"),
                        (cb.LearningCurves, "on_epoch_end"), (cb.LearningRateLog, "on_epoch_end"),
                        (keras.callbacks.CSVLogger, "on_epoch_end"), (PruningReporter, "on_epoch_end"),
                        (Objective, "_save_resume_point"), (Batches, "batch")]
        self.seconds: dict[str, float] = {}
        self._saved: list[tuple[type, str, Any]] = []

    def __enter__(self) -> CallbackClock:
        for cls, name in self.targets:
            original = cls.__dict__[name]
            label = f"{cls.__name__}.{name}"

            def wrapped(*a: Any, _orig: Any = original, _label: str = label, **k: Any) -> Any:
                started = time.perf_counter()
                try:
                    return _orig(*a, **k)
                finally:
                    self.seconds[_label] = self.seconds.get(_label, 0.0) + time.perf_counter() - started

            self._saved.append((cls, name, original))
            setattr(cls, name, wrapped)
        return self

    def __exit__(self, *exc: Any) -> None:
        for cls, name, original in self._saved:
            setattr(cls, name, original)
        self._saved.clear()


def training(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    import keras
    import optuna

    from flexunet.data.dataset import load_split
    from flexunet.model import count_params
    from search.store import storage as st
    from search.trial import lifecycle
    from search.spec import study_file
    from search.trial.objective import Objective

    base = prepared(args.train_size, root)
    train, valid = load_split(base, "train"), load_split(base, "valid")
    variants = {"plain": bench_config(base, args, 0.0), "trial": bench_config(base, args, 0.0)}
    if args.augmented:
        variants["trial+augmentation"] = bench_config(base, args, 0.5)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = st.open_storage(f"sqlite:///{root / 'study.db'}", on_stale=lifecycle.stale_trial_callback)
    spec = study_file.load(c.SAMPLE_STUDY)
    # NopPruner: the reporter still reports and asks every epoch, but no timed run is cut short.
    study = optuna.create_study(storage=storage, study_name="throughput", pruner=optuna.pruners.NopPruner())
    objective = Objective(spec=spec, base=base, image_size=args.train_size,
                          artifacts=optuna.artifacts.FileSystemArtifactStore(str(root / "artifacts")))
    (root / "artifacts").mkdir(exist_ok=True)
    m = variants["plain"].model
    images_per_epoch = args.steps * args.batch
    c.log(f"training: {args.train_size} px, {m.num_layers} levels, base {m.base_filters}, "
          f"{count_params(m):,} parameters; "
          f"{len(train)} train / {len(valid)} valid slices; {args.steps} steps x batch {args.batch} "
          f"= {args.steps * args.batch} images per epoch; {args.epochs} epochs per run (first not timed), "
          f"{args.repeats} repeats")
    rates: dict[str, list[float]] = {k: [] for k in variants}
    cpu_rates: dict[str, list[float]] = {k: [] for k in variants}
    epochs: dict[str, list[list[float]]] = {k: [] for k in variants}
    hooks: dict[str, dict[str, list[float]]] = {}
    wrap_ups: dict[str, list[tuple[float, float]]] = {}
    names = list(variants)
    for r in range(args.repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            keras.backend.clear_session()
            gc.collect()
            if name == "plain":
                rate, cpu_rate, seconds = run_plain(variants[name], train, valid)
            else:
                with CallbackClock() as clock:
                    (rate, cpu_rate, seconds), wrap_up = run_trial(variants[name], train, valid, root, objective,
                                                                   study)
                wrap_ups.setdefault(name, []).append(wrap_up)
                for label, spent in clock.seconds.items():
                    hooks.setdefault(name, {}).setdefault(label, []).append(spent / len(seconds))
            rates[name].append(rate)
            cpu_rates[name].append(cpu_rate)
            epochs[name].append([round(s, 3) for s in seconds])
            c.log(f"  repeat {r + 1} {name:<20} {rate:7.2f} img/s, {cpu_rate:6.2f} img/CPU-s  "
                  f"epochs (s): {', '.join(f'{s:.2f}' for s in seconds)}")
    ratios = [t / p for t, p in zip(rates["trial"], rates["plain"])]
    cpu_ratios = [t / p for t, p in zip(cpu_rates["trial"], cpu_rates["plain"])]
    result = {"rates": rates, "cpu_rates": cpu_rates, "epoch_seconds": epochs, "ratios_trial_over_plain": ratios,
              "cpu_ratios_trial_over_plain": cpu_ratios, "cpu_ratio_median": c.median(cpu_ratios),
              "hook_seconds_per_epoch": {k: {h: c.median(v) for h, v in d.items()} for k, d in hooks.items()},
              "ratio_median": c.median(ratios),
              "setup": {"size": args.train_size, "levels": m.num_layers, "base_filters": m.base_filters,
                        "batch": args.batch, "steps": args.steps, "epochs": args.epochs, "repeats": args.repeats}}
    for name in variants:
        c.log(f"training {name:<20} img/s {c.spread(rates[name])}; img/CPU-s {c.spread(cpu_rates[name])}")
    c.log(f"training ratio trial/plain per repeat, wall clock: {', '.join(f'{x:.3f}' for x in ratios)} "
          f"(median {c.median(ratios):.3f}); CPU time: {', '.join(f'{x:.3f}' for x in cpu_ratios)} "
          f"(median {c.median(cpu_ratios):.3f})")
    # Without the last epoch (a trial's final saves: best model, curves, overlays) nor the first
    # (tracing): what each further epoch of a longer trial costs.
    steady = [c.median(p[1:-1] or p[1:]) / c.median(t[1:-1] or t[1:])
              for t, p in zip(epochs["trial"], epochs["plain"])]
    result["steady_epoch_ratios_trial_over_plain"] = steady
    c.log(f"steady-state epochs (neither the first nor the last), plain/trial seconds per repeat: "
          f"{', '.join(f'{x:.3f}' for x in steady)} (median {c.median(steady):.3f})")
    plain_epoch = images_per_epoch / c.median(rates["plain"])
    result["plain_epoch_seconds_median"] = plain_epoch
    for name, per_hook in result["hook_seconds_per_epoch"].items():
        c.log(f"per-epoch hooks of '{name}' (mean s per epoch, median over repeats; EpochCheckpoint includes "
              f"_save_resume_point; plain epoch {plain_epoch:.2f} s):")
        for label, spent in sorted(per_hook.items(), key=lambda kv: -kv[1]):
            c.log(f"    {label:<36} {spent:6.3f} s  ({100 * spent / plain_epoch:4.1f}% of a plain epoch)")
    # The trial's wrap-up after fit (best model file, curves, overlays, uploads): once per trial,
    # not per epoch; shown in plain epochs and as the ratio it would give if these runs counted it.
    plain_epoch_cpu = images_per_epoch / c.median(cpu_rates["plain"])
    timed_epochs = args.epochs - 1
    result["wrap_up_seconds"] = {k: [list(w) for w in v] for k, v in wrap_ups.items()}
    wall_up, cpu_up = c.median([w for w, _ in wrap_ups["trial"]]), c.median([u for _, u in wrap_ups["trial"]])
    with_wrap = [1 / (1 / r + w / (images_per_epoch * timed_epochs)) / p
                 for r, p, (w, _) in zip(rates["trial"], rates["plain"], wrap_ups["trial"])]
    cpu_with_wrap = [1 / (1 / r + u / (images_per_epoch * timed_epochs)) / p
                     for r, p, (_, u) in zip(cpu_rates["trial"], cpu_rates["plain"], wrap_ups["trial"])]
    result["ratios_with_wrap_up"], result["cpu_ratios_with_wrap_up"] = with_wrap, cpu_with_wrap
    c.log(f"trial wrap-up after fit (best model file, learning curves, overlays, uploads; once per trial): "
          f"{wall_up:.3f} s wall ({wall_up / plain_epoch:.2f} plain epochs), {cpu_up:.3f} CPU s "
          f"({cpu_up / plain_epoch_cpu:.2f} plain epochs); counted in these {timed_epochs}-epoch runs the ratio "
          f"would be {c.median(with_wrap):.3f} wall clock, {c.median(cpu_with_wrap):.3f} CPU time")
    if "trial+augmentation" in rates:
        aug = [a / p for a, p in zip(rates["trial+augmentation"], rates["plain"])]
        aug_cpu = [a / p for a, p in zip(cpu_rates["trial+augmentation"], cpu_rates["plain"])]
        result["ratios_augmented_over_plain"], result["cpu_ratios_augmented_over_plain"] = aug, aug_cpu
        c.log(f"training ratio trial+augmentation/plain: wall clock {c.spread(aug)}; CPU time {c.spread(aug_cpu)}")
    return result


def inference(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    import keras
    import numpy as np

    from flexunet.data.dataset import load_split
    from flexunet.model import build

    # The SavedModel and the ONNX export go through TensorFlow; on another Keras backend (JAX in
    # bench/gpu.sh where TensorFlow is not installed) only Keras predict is timed.
    exports = keras.backend.backend() == "tensorflow"
    results: dict[str, Any] = {}
    for size in args.infer_sizes:
        base = prepared(size, root)
        config = bench_config(base, args, 0.0)
        keras.backend.clear_session()
        keras.utils.set_random_seed(0)
        network = build(config.model)
        folder = root / f"export-{size}"
        folder.mkdir(exist_ok=True)
        network.save(folder / "best_model.keras")
        if exports:
            network.export(str(folder / "saved_model"), format="tf_saved_model", verbose=False)
            network.export(str(folder / "model.onnx"), format="onnx", verbose=False)
        del network
        keras.backend.clear_session()
        test = load_split(base, "test")
        images = np.resize(test.images.astype(np.float32), (args.infer_images, *test.images.shape[1:]))
        batch = args.infer_batch
        chunks = [images[i:i + batch] for i in range(0, len(images), batch)]

        model = keras.models.load_model(folder / "best_model.keras", compile=False)
        engines = {"keras_predict": lambda: model.predict(images, batch_size=batch, verbose=0)}
        if exports:
            import onnxruntime as ort
            import tensorflow as tf

            served = tf.saved_model.load(str(folder / "saved_model"))
            session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
            input_name = session.get_inputs()[0].name
            engines["saved_model"] = lambda: np.concatenate([served.serve(tf.constant(x)).numpy() for x in chunks])
            engines["onnxruntime"] = lambda: np.concatenate([session.run(None, {input_name: x})[0] for x in chunks])
        outputs = {name: run() for name, run in engines.items()}  # warm-up (tracing), not timed
        agree = {name: float(np.max(np.abs(out - outputs["keras_predict"]))) for name, out in outputs.items()}
        rates: dict[str, list[float]] = {k: [] for k in engines}
        cpu_rates: dict[str, list[float]] = {k: [] for k in engines}
        names = list(engines)
        for r in range(args.infer_repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                started, cpu = time.perf_counter(), time.process_time()
                engines[name]()
                rates[name].append(len(images) / (time.perf_counter() - started))
                cpu_rates[name].append(len(images) / (time.process_time() - cpu))
        medians = {k: c.median(v) for k, v in rates.items()}
        results[str(size)] = {"rates": rates, "median": medians, "cpu_rates": cpu_rates,
                              "cpu_median": {k: c.median(v) for k, v in cpu_rates.items()},
                              "max_abs_diff_vs_keras": agree,
                              "images": len(images), "batch": batch}
        for name in names:
            c.log(f"inference {size} px {name:<14} img/s {c.spread(rates[name])}; img/CPU-s "
                  f"{c.spread(cpu_rates[name])}  "
                  f"max |diff| vs Keras {agree[name]:.2e}")
        if exports:
            c.log(f"inference {size} px onnxruntime / keras_predict = "
                  f"{medians['onnxruntime'] / medians['keras_predict']:.2f}, saved_model / keras_predict = "
                  f"{medians['saved_model'] / medians['keras_predict']:.2f}")
        engines.clear()
        del model
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a run of under two minutes")
    parser.add_argument("--json", help="write every figure to this file")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--train-size", type=int, help="training image side (default 128; --quick 64)")
    parser.add_argument("--levels", type=int)
    parser.add_argument("--filters", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int, help="steps per epoch")
    parser.add_argument("--epochs", type=int, help="epochs per run, the first not timed")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--no-augmented", dest="augmented", action="store_false", default=None)
    parser.add_argument("--infer-sizes", type=int, nargs="+")
    parser.add_argument("--infer-images", type=int)
    parser.add_argument("--infer-batch", type=int)
    parser.add_argument("--infer-repeats", type=int)
    args = parser.parse_args()
    if args.quick:
        defaults = dict(train_size=64, levels=3, filters=16, batch=4, steps=6, epochs=3, repeats=2, augmented=False,
                        infer_sizes=[128], infer_images=16, infer_batch=8, infer_repeats=3)
    else:
        defaults = dict(train_size=128, levels=5, filters=16, batch=4, steps=16, epochs=5, repeats=4, augmented=True,
                        infer_sizes=[128, 256], infer_images=32, infer_batch=8, infer_repeats=7)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    c.quiet_tf()
    c.log("machine:", c.machine())
    payload: dict[str, Any] = {"quick": args.quick, "machine": c.machine()}
    root = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    try:
        if not args.skip_inference:
            payload["inference"] = inference(args, root)
        if not args.skip_training:
            payload["training"] = training(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    c.write_json(args.json, payload)
    if "training" in payload:
        c.headline("train_throughput_ratio", payload["training"]["ratio_median"])
    else:
        size = str(args.infer_sizes[-1])
        c.headline(f"onnx_images_per_s_{size}px", payload["inference"][size]["median"]["onnxruntime"], ".2f")


if __name__ == "__main__":
    main()
