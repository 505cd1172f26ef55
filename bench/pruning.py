"""What pruning saves: the sample study with its pruner against the same study without one.

For each sampler seed, two copies of studies/ct_ich_sample.toml are written (sampler seed set,
dataset source made absolute, the study's wall-clock timeout removed so that both copies get the
same trial budget; one keeps the study's pruner, the other has NopPruner) and each is run by the
real command, ``flexunet search run COPY --out DIR --n-trials N --max-epochs E --image-size S``,
on SQLite in a temporary folder. Runs alternate (pruned first for even seeds, unpruned first for
odd ones). For each run: total epochs trained (sum of the trials' ``epochs_run``), wall time,
best validation foreground Dice, trials by state.

    python bench/pruning.py [--quick] [--seeds 0 1 2] [--image-size 64] [--n-trials 10]
                            [--max-epochs 10] [--keep DIR] [--json FILE]
    python bench/pruning.py --analyse DIR     # only the early-vs-final analysis of kept runs
    python bench/pruning.py --keep DIR --reuse --pruner-set min_resource=4   # a what-if pruner,
                                              # against the unpruned runs kept in DIR

It also reports, over the unpruned studies' trials, the Spearman rank correlation between a
trial's validation Dice at epochs 3, 5 and 7 and its final Dice: what a pruner deciding there
has to go on.

Last line: ``epochs_saved_pct: P`` (median over seeds of 1 - pruned epochs / unpruned epochs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as c


def study_pruner() -> str:
    import tomllib

    return tomllib.loads(c.SAMPLE_STUDY.read_text(encoding="utf-8"))["pruner"]["name"]


def run_study(folder: Path, seed: int, pruned: bool, args: argparse.Namespace) -> dict[str, Any]:
    import optuna

    kind = "pruned" if pruned else "unpruned"
    tag = "".join(f"-{k}{v}" for k, v in sorted(args.pruner_set.items())) if pruned else ""
    work = folder / f"seed{seed}-{kind}{tag}"
    work.mkdir(parents=True, exist_ok=True)
    study_file = work / "study.toml"
    changes: dict[str, dict[str, Any]] = {"sampler": {"seed": seed},
                                          "study": {"name": f"bench-pruning-{kind}-seed{seed}"}}
    if args.steps:
        changes["fixed"] = {"steps_per_epoch": args.steps}
    if not pruned:
        changes["pruner"] = {"name": "NopPruner"}
    elif args.pruner_set:
        changes["pruner"] = dict(args.pruner_set)
    text = c.study_copy(study_file, changes, drop={"budget": ["timeout"]})
    stored = work / "result.json"
    if args.reuse and stored.exists():
        result = json.loads(stored.read_text(encoding="utf-8"))
        if result.get("study_file") == text and result.get("overrides") == [args.n_trials, args.max_epochs, args.image_size]:
            c.log(f"seed {seed} {kind}: reusing the run kept in {work}")
            return result
    command = [sys.executable, "-m", "flexunet.cli", "search", "run", str(study_file), "--out", str(work / "run"),
               "--n-trials", str(args.n_trials), "--max-epochs", str(args.max_epochs),
               "--image-size", str(args.image_size)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    wall = time.perf_counter() - started
    (work / "search-run.log").write_text(done.stdout + done.stderr, encoding="utf-8")
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    study = optuna.load_study(study_name=f"bench-pruning-{kind}-seed{seed}",
                              storage=f"sqlite:///{work / 'run' / 'study.db'}")
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    epochs = sum(int(t.user_attrs.get("epochs_run") or 0) for t in trials)
    infeasible = sum(1 for t in trials if t.user_attrs.get("stop_reason") == "infeasible")
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = max((t.values[0] for t in complete), default=float("nan"))
    baseline = next((t for t in trials if t.user_attrs.get("baseline")), None)
    train_seconds = sum(float(t.user_attrs.get("train_seconds") or 0) for t in trials)
    result = {
        "seed": seed, "pruner": (study_pruner() + tag) if pruned else "NopPruner", "wall_s": round(wall, 1),
        "epochs": epochs, "best_dice": best, "trials": len(trials), "states": states, "infeasible": infeasible,
        "train_seconds": round(train_seconds, 1),
        "baseline_dice": baseline.values[0] if baseline is not None and baseline.values else None,
        "per_trial": [(t.number, t.state.name, t.user_attrs.get("epochs_run"), t.user_attrs.get("stop_reason"),
                       None if t.values is None else round(t.values[0], 4)) for t in trials],
        "command": " ".join(command), "study_file": text,
        "overrides": [args.n_trials, args.max_epochs, args.image_size],
    }
    stored.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def early_vs_final(folder: Path, epochs: tuple[int, ...] = (3, 5, 7)) -> dict[str, Any]:
    """In the unpruned studies: how well a trial's validation Dice at an early epoch predicts its
    final (best) Dice -- Spearman rank correlation over every trained trial, per epoch. A pruner
    that decides at epoch k is only as good as this ranking."""
    import optuna
    from scipy.stats import spearmanr

    result: dict[str, Any] = {}
    trials = []
    for db in sorted(folder.glob("seed*-unpruned/run/study.db")):
        storage = f"sqlite:///{db}"
        for summary in optuna.get_all_study_summaries(storage):
            study = optuna.load_study(study_name=summary.study_name, storage=storage)
            trials += [t for t in study.get_trials(deepcopy=False) if t.values and t.intermediate_values]
    for k in epochs:
        pairs = [(t.intermediate_values[k - 1], t.values[0]) for t in trials if (k - 1) in t.intermediate_values]
        if len(pairs) >= 3:
            rho = spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic
            result[str(k)] = {"trials": len(pairs), "spearman": float(rho)}
            c.log(f"unpruned trials: Dice at epoch {k} against final Dice, Spearman {rho:+.2f} over {len(pairs)} trials")
    return result


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a run of under two minutes")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--n-trials", type=int)
    parser.add_argument("--max-epochs", type=int)
    parser.add_argument("--steps", type=int, help="override the study's fixed steps_per_epoch")
    parser.add_argument("--keep", help="keep the runs (study copies, databases, logs) in this folder")
    parser.add_argument("--json", help="write every figure to this file")
    parser.add_argument("--analyse", metavar="DIR", help="only analyse the runs kept in DIR by --keep")
    parser.add_argument("--pruner-set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="change the study pruner's arguments, e.g. min_resource=4 (a what-if)")
    parser.add_argument("--reuse", action="store_true",
                        help="with --keep: reuse a kept run of the same study copy and overrides instead of running it")
    args = parser.parse_args()
    args.pruner_set = {k: _number(v) for k, v in (item.split("=", 1) for item in args.pruner_set)}
    if args.analyse:
        result = early_vs_final(Path(args.analyse))
        c.write_json(args.json, {"early_vs_final": result})
        first = min(result, key=int) if result else None
        c.headline(f"spearman_epoch{first}_vs_final", result[first]["spearman"] if first else float("nan"), ".2f")
        return
    defaults = (dict(seeds=[0], image_size=32, n_trials=2, max_epochs=3, steps=2) if args.quick else
                dict(seeds=[0, 1, 2], image_size=64, n_trials=10, max_epochs=10, steps=None))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    c.log("machine:", c.machine())
    c.log(f"sample study, {args.image_size} px, {args.n_trials} trials, at most {args.max_epochs} epochs per trial, "
          f"steps per epoch {args.steps or 'as the study file'}; sampler seeds {args.seeds}")
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-pruning-"))
    folder.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    try:
        for i, seed in enumerate(args.seeds):
            for pruned in ((True, False) if i % 2 == 0 else (False, True)):
                result = run_study(folder, seed, pruned, args)
                runs.append(result)
                c.log(f"seed {seed} {result['pruner']:<22} epochs {result['epochs']:4d}  wall {result['wall_s']:7.1f} s  "
                      f"best Dice {result['best_dice']:.4f}  states {result['states']}")
                c.log(f"    {result['command']}")
        correlation = early_vs_final(folder)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    by_seed: dict[int, dict[str, dict[str, Any]]] = {}
    for r in runs:
        by_seed.setdefault(r["seed"], {})["pruned" if r["pruner"] != "NopPruner" else "unpruned"] = r
    saved, wall_saved, dice_gap = [], [], []
    print()
    print("| seed | pruner | trials (complete/pruned/other) | epochs | wall s | best val Dice |")
    print("|---|---|---|---|---|---|")
    for seed, pair in sorted(by_seed.items()):
        for kind in ("pruned", "unpruned"):
            r = pair[kind]
            s = r["states"]
            other = r["trials"] - s.get("COMPLETE", 0) - s.get("PRUNED", 0)
            print(f"| {seed} | {r['pruner']} | {s.get('COMPLETE', 0)}/{s.get('PRUNED', 0)}/{other} "
                  f"(infeasible {r['infeasible']}) | {r['epochs']} | {r['wall_s']} | {r['best_dice']:.4f} |")
        saved.append(1 - pair["pruned"]["epochs"] / pair["unpruned"]["epochs"])
        wall_saved.append(1 - pair["pruned"]["wall_s"] / pair["unpruned"]["wall_s"])
        dice_gap.append(pair["unpruned"]["best_dice"] - pair["pruned"]["best_dice"])
    print()
    c.log(f"epochs saved by pruning: {', '.join(f'{100 * x:.1f}%' for x in saved)} (per seed); "
          f"median {100 * c.median(saved):.1f}%")
    c.log(f"wall time saved: {', '.join(f'{100 * x:.1f}%' for x in wall_saved)}; median {100 * c.median(wall_saved):.1f}%")
    c.log(f"best Dice, unpruned - pruned: {', '.join(f'{x:+.4f}' for x in dice_gap)}; median {c.median(dice_gap):+.4f}; "
          f"within 0.02 for {sum(1 for x in dice_gap if x <= 0.02)}/{len(dice_gap)} seeds")
    c.log(f"target (>= 40% fewer epochs, best Dice within 0.02): "
          f"{'met' if c.median(saved) >= 0.40 and all(x <= 0.02 for x in dice_gap) else 'NOT met'}")
    c.write_json(args.json, {"quick": args.quick, "machine": c.machine(), "args": vars(args), "runs": runs,
                             "early_vs_final": correlation,
                             "epochs_saved": saved, "wall_saved": wall_saved, "dice_gap_unpruned_minus_pruned": dice_gap})
    c.headline("epochs_saved_pct", 100 * c.median(saved), ".1f")


if __name__ == "__main__":
    main()
