"""Worker memory over consecutive trials: does a long-lived worker leak?

The sample study (a copy: image size, steps per epoch, epochs and trial count shrunk; the seed
baseline first, then TPE over the study's space, the study's pruner) runs in this one process exactly
as ``search.runtime.worker`` runs it (``search.runtime.context.create_study``, ``search.store.storage.load_study`` with the
study's sampler and pruner, ``search.trial.objective.Objective``, ``study.optimize(objective,
n_trials=1)`` per trial); the process's resident memory (psutil RSS) is recorded after every
trial.

    python bench/memory.py [--quick] [--trials 20] [--image-size 64] [--malloc-trim]
                           [--without-registry-cleanup] [--json FILE]

``--malloc-trim`` also calls glibc's ``malloc_trim(0)`` after each trial, to tell memory the
process still holds from memory it has freed but not returned to the system.
``--without-registry-cleanup`` turns off the objective's removal of the gradient functions
TensorFlow registers per trial (``search.trial.objective._forget_custom_gradients``), to measure the
leak it fixes.

Last line: ``rss_growth_mb: X`` (RSS after the last trial minus RSS after the first).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a run of under two minutes")
    parser.add_argument("--trials", type=int)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--max-epochs", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--malloc-trim", action="store_true")
    parser.add_argument("--without-registry-cleanup", action="store_true")
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args()
    defaults = (dict(trials=5, image_size=32, max_epochs=1, steps=2) if args.quick else
                dict(trials=20, image_size=64, max_epochs=2, steps=4))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    import psutil

    c.quiet_tf()
    import optuna

    import search.trial.objective
    from search.spec import algorithms, study_file
    from search.runtime import context as runner
    from search.store import storage as st
    from search.trial import lifecycle
    from search.trial.objective import Objective, TrialFailure
    from search.store import artifacts as af
    from search.paths import RunFolder

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.without_registry_cleanup:
        search.trial.objective._forget_custom_gradients = lambda before: None
    process = psutil.Process()
    trim = ctypes.CDLL("libc.so.6").malloc_trim if args.malloc_trim else None
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    try:
        path = tmp / "study.toml"
        c.study_copy(path, {"study": {"name": "bench-memory"}, "fixed": {"steps_per_epoch": args.steps}},
                     drop={"budget": ["timeout"]})
        spec = study_file.load(path).with_overrides(n_trials=args.trials, max_epochs=args.max_epochs,
                                                    image_size=args.image_size)
        out = tmp / "run"
        url = f"sqlite:///{out / 'study.db'}"
        out.mkdir()
        ctx = runner.RunContext.resolve(spec, out=out, storage=url, artifacts=None)
        ctx.prepare_dataset()
        data = ctx.open_dataset()
        runner.create_study(ctx, data)
        base, image_size, space = data.base, data.image_size, data.space
        RunFolder(out).artifacts.mkdir(parents=True, exist_ok=True)
        study = st.load_study(st.open_storage(url, on_stale=lifecycle.stale_trial_callback), spec.name, algorithms.make_sampler(spec, ""),
                              algorithms.make_pruner(spec))
        objective = Objective(spec=spec, base=base, image_size=image_size,
                              artifacts=af.open_store(af.resolve(None, spec.artifacts, out), create=True),
                              space=space)
        c.log("machine:", c.machine())
        c.log(f"sample study copy: {image_size} px, {args.trials} trials, {args.max_epochs} epochs of "
              f"{args.steps} steps; malloc_trim {'on' if trim else 'off'}; gradient registry cleanup "
              f"{'OFF' if args.without_registry_cleanup else 'on'}")
        gc.collect()
        rss = [process.memory_info().rss / 2**20]
        c.log(f"before the first trial: RSS {rss[0]:.0f} MB")
        rows: list[dict[str, Any]] = []
        for i in range(args.trials):
            started = time.perf_counter()
            study.optimize(objective, n_trials=1, catch=(TrialFailure,))
            if trim:
                trim(0)
            trial = study.get_trials(deepcopy=False)[-1]
            rss.append(process.memory_info().rss / 2**20)
            rows.append({"trial": trial.number, "state": trial.state.name, "params": trial.user_attrs.get("params"),
                         "epochs": trial.user_attrs.get("epochs_run"), "stop": trial.user_attrs.get("stop_reason"),
                         "rss_mb": round(rss[-1], 1), "seconds": round(time.perf_counter() - started, 1)})
            c.log(f"trial {trial.number:2d} {trial.state.name:<8} {str(trial.user_attrs.get('stop_reason')):<14} "
                  f"params {trial.user_attrs.get('params') or 0:>10,}  RSS {rss[-1]:7.1f} MB "
                  f"({rss[-1] - rss[-2]:+6.1f})  {rows[-1]['seconds']:5.1f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    growth = rss[-1] - rss[1]
    trained = [r for r in rows if r["epochs"]]
    tail = rss[len(rss) // 2:]
    slope = (tail[-1] - tail[0]) / max(1, len(tail) - 1)
    c.log(f"RSS: before {rss[0]:.0f} MB, after trial 1 {rss[1]:.0f} MB, after trial {len(rss) - 1} {rss[-1]:.0f} MB, "
          f"peak {max(rss):.0f} MB; growth after the first trial {growth:+.0f} MB over {len(rss) - 2} trials "
          f"({len(trained)} of {len(rows)} trials trained); second half {slope:+.1f} MB/trial")
    c.log(f"target (< 200 MB growth): {'met' if growth < 200 else 'NOT met'}")
    c.write_json(args.json, {"quick": args.quick, "machine": c.machine(), "args": vars(args), "rss_mb": rss,
                             "trials": rows, "growth_mb": growth, "second_half_mb_per_trial": slope})
    c.headline("rss_growth_mb", growth, ".0f")


if __name__ == "__main__":
    main()
