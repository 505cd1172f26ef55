"""What pruning saves: the sample study with its pruner against the same study without one.

Two arms. ``--arm cv`` (the default): the sample study as it ships, a cross-validated study
(``[study] folds``; a trial reports at step ``fold * max_epochs + epoch``, search/trial/cv.py).
``--arm split``: the same study on one train/valid split (``folds`` removed from the copy), the
arm measured before studies were cross-validated.

For each sampler seed, two copies of studies/ct_ich_sample.toml are written (sampler seed set,
dataset source made absolute, the study's wall-clock timeout removed so that both copies get the
same trial budget; one keeps the study's pruner, the other has NopPruner) and each is run by the
real command, ``flexunet search run COPY --out DIR --n-trials N --max-epochs E --image-size S``,
on SQLite in a temporary folder. Runs alternate (pruned first for even seeds, unpruned first for
odd ones). For each run: epochs trained, summed over trials from their ``epochs_run`` attribute
(for a CV trial: the epochs of every fold it trained, pruned folds included), wall time, best
value (CV: pooled out-of-fold foreground Dice; split: validation foreground Dice), trials by
state.

    python bench/pruning.py [--quick] [--arm cv|split] [--seeds 0 1 2] [--image-size 64]
                            [--n-trials 10] [--max-epochs 10] [--keep DIR] [--json FILE]
    python bench/pruning.py --analyse DIR     # only the early-vs-final analysis of kept runs
    python bench/pruning.py --keep DIR --reuse --pruner-set min_resource=4   # a what-if pruner,
                                              # against the unpruned runs kept in DIR

It also reports what a pruner has to go on: over the unpruned studies' trials, the Spearman rank
correlation between a trial's reported value at a step (split: epochs 3, 5 and 7; CV: the
pruner's rungs) and its final value; and, for the trials whose parameters appear in both studies
of a seed (the same sampler seed proposes the same trials until the studies diverge), what the
pruner did to each, in particular to the unpruned study's best trial.

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


def study_pruner() -> dict[str, Any]:
    import tomllib

    return dict(tomllib.loads(c.SAMPLE_STUDY.read_text(encoding="utf-8"))["pruner"])


def study_folds() -> int:
    import tomllib

    return int(tomllib.loads(c.SAMPLE_STUDY.read_text(encoding="utf-8"))["study"].get("folds", 1))


def _run_name(arm: str, seed: int, kind: str, tag: str) -> str:
    # The single-split arm keeps the folder names of its first runs (BENCHMARKS.md section 2).
    return f"seed{seed}-{kind}{tag}" if arm == "split" else f"cv-seed{seed}-{kind}{tag}"


def run_study(folder: Path, seed: int, pruned: bool, args: argparse.Namespace) -> dict[str, Any]:
    import optuna

    kind = "pruned" if pruned else "unpruned"
    tag = "".join(f"-{k}{v}" for k, v in sorted(args.pruner_set.items())) if pruned else ""
    work = folder / _run_name(args.arm, seed, kind, tag)
    work.mkdir(parents=True, exist_ok=True)
    study_file = work / "study.toml"
    study_name = f"bench-pruning-{'' if args.arm == 'split' else 'cv-'}{kind}-seed{seed}"
    changes: dict[str, dict[str, Any]] = {"sampler": {"seed": seed}, "study": {"name": study_name}}
    drop = {"budget": ["timeout"]}
    if args.arm == "split":
        drop["study"] = ["folds"]
    elif args.folds:
        changes["study"]["folds"] = args.folds
    if args.steps:
        changes["fixed"] = {"steps_per_epoch": args.steps}
    if not pruned:
        changes["pruner"] = {"name": "NopPruner"}
    elif args.pruner_set:
        changes["pruner"] = dict(args.pruner_set)
    text = c.study_copy(study_file, changes, drop=drop)
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
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{work / 'run' / 'study.db'}")
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    epochs = sum(int(t.user_attrs.get("epochs_run") or 0) for t in trials)
    # A trial that failed inside a fold (non-finite loss) has no epochs_run: counted apart.
    uncounted = sum(1 for t in trials if t.state == optuna.trial.TrialState.FAIL and "epochs_run" not in t.user_attrs)
    infeasible = sum(1 for t in trials if t.user_attrs.get("stop_reason") == "infeasible")
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    best_trial = max(complete, key=lambda t: t.values[0], default=None)
    best = best_trial.values[0] if best_trial is not None else float("nan")
    baseline = next((t for t in trials if t.user_attrs.get("baseline")), None)
    train_seconds = sum(float(t.user_attrs.get("train_seconds") or 0) for t in trials)
    pruner = study_pruner()["name"] + tag if pruned else "NopPruner"
    result = {
        "arm": args.arm, "seed": seed, "pruner": pruner, "wall_s": round(wall, 1),
        "epochs": epochs, "uncounted_failed_trials": uncounted, "best_dice": best,
        "best_trial": None if best_trial is None else best_trial.number,
        "trials": len(trials), "states": states, "infeasible": infeasible,
        "train_seconds": round(train_seconds, 1),
        "baseline_dice": baseline.values[0] if baseline is not None and baseline.values else None,
        "per_trial": [{"number": t.number, "state": t.state.name, "epochs_run": t.user_attrs.get("epochs_run"),
                       "fold_epochs_run": t.user_attrs.get("fold_epochs_run"),
                       "fold_dice": t.user_attrs.get("fold_val_foreground_dice"),
                       "stop_reason": t.user_attrs.get("stop_reason"),
                       "value": None if t.values is None else round(t.values[0], 4),
                       "params": t.params} for t in trials],
        "command": " ".join(command), "study_file": text,
        "overrides": [args.n_trials, args.max_epochs, args.image_size],
    }
    stored.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def rung_steps(max_epochs: int, folds: int) -> tuple[int, ...]:
    """The 1-based steps at which the sample study's SuccessiveHalvingPruner decides (step
    ``min_resource * reduction_factor ** r``, 0-based, is the first one counted), within the
    ``folds * max_epochs`` steps of a trial."""
    pruner = study_pruner()
    if pruner.get("name") != "SuccessiveHalvingPruner":
        return (3, 5, 7)
    low, factor = int(pruner.get("min_resource", 1)), int(pruner.get("reduction_factor", 4))
    steps, r = [], 0
    while low * factor**r < folds * max_epochs:
        steps.append(low * factor**r + 1)
        r += 1
    return tuple(steps)


def early_vs_final(folder: Path, arm: str, steps: tuple[int, ...]) -> dict[str, Any]:
    """In the unpruned studies: how well a trial's reported value at an early step (1-based:
    split, an epoch; CV, ``fold * max_epochs + epoch``) predicts its final value -- Spearman
    rank correlation over every trained trial, per step. A pruner deciding at that step is only
    as good as this ranking."""
    import optuna
    from scipy.stats import spearmanr

    result: dict[str, Any] = {}
    trials = []
    pattern = "seed*-unpruned/run/study.db" if arm == "split" else "cv-seed*-unpruned/run/study.db"
    for db in sorted(folder.glob(pattern)):
        if arm == "split" and db.parts[-3].startswith("cv-"):
            continue
        storage = f"sqlite:///{db}"
        for summary in optuna.get_all_study_summaries(storage):
            study = optuna.load_study(study_name=summary.study_name, storage=storage)
            trials += [t for t in study.get_trials(deepcopy=False) if t.values and t.intermediate_values]
    for k in steps:
        pairs = [(t.intermediate_values[k - 1], t.values[0]) for t in trials if (k - 1) in t.intermediate_values]
        if len(pairs) >= 3:
            rho = spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic
            result[str(k)] = {"trials": len(pairs), "spearman": float(rho)}
            # Trials that never segment anything (final 0) are easy to rank: the figure without them.
            learned = [(a, b) for a, b in pairs if b > 0]
            if len(learned) >= 3:
                result[str(k)]["spearman_final_above_0"] = float(
                    spearmanr([a for a, _ in learned], [b for _, b in learned]).statistic)
                result[str(k)]["trials_final_above_0"] = len(learned)
            c.log(f"unpruned trials: value at step {k} against final value, Spearman {rho:+.2f} over {len(pairs)} trials"
                  + (f"; {result[str(k)]['spearman_final_above_0']:+.2f} over the {len(learned)} with final value > 0"
                     if len(learned) >= 3 else ""))
    return result


def rung_values(folder: Path, arm: str, steps: tuple[int, ...]) -> dict[str, dict[int, dict[str, float]]]:
    """Every kept run's trials and their reported values at ``steps`` (1-based): what the
    pruner compared at each rung."""
    import optuna

    out: dict[str, dict[int, dict[str, float]]] = {}
    prefix = "seed" if arm == "split" else "cv-seed"
    for db in sorted(folder.glob(f"{prefix}*/run/study.db")):
        storage = f"sqlite:///{db}"
        for summary in optuna.get_all_study_summaries(storage):
            study = optuna.load_study(study_name=summary.study_name, storage=storage)
            out[db.parts[-3]] = {t.number: {str(k): round(t.intermediate_values[k - 1], 4) for k in steps
                                            if (k - 1) in t.intermediate_values}
                                 for t in study.get_trials(deepcopy=False)}
    return out


def shared_trials(pair: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The trials of the unpruned study whose parameters the pruned study also tried, and
    what became of them there: the pruner's decisions on trials whose final value is known."""
    pruned_by_params = {json.dumps(t["params"], sort_keys=True): t for t in pair["pruned"]["per_trial"]}
    matches = []
    for t in pair["unpruned"]["per_trial"]:
        other = pruned_by_params.get(json.dumps(t["params"], sort_keys=True))
        if other is not None and t["value"] is not None:
            matches.append({"unpruned_trial": t["number"], "final": t["value"], "pruned_trial": other["number"],
                            "state_when_pruning": other["state"], "stop_reason": other["stop_reason"],
                            "value_when_pruning": other["value"]})
    best = pair["unpruned"]["best_trial"]
    fate = next((m for m in matches if m["unpruned_trial"] == best), None)
    stopped = [m for m in matches if m["state_when_pruning"] == "PRUNED" and m["stop_reason"] != "infeasible"]
    return {"matches": matches, "unpruned_best_trial": best,
            "unpruned_best_fate": None if fate is None else fate["state_when_pruning"],
            "stopped_known": len(stopped),
            # trials the pruner stopped that, left to run, end above the pruned study's best
            "stopped_would_beat_pruned_best": sum(1 for m in stopped if m["final"] > pair["pruned"]["best_dice"])}


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _spread(values: list[float], scale: float = 1.0, fmt: str = ".4f") -> str:
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    return (f"mean {format(scale * mean, fmt)}, median {format(scale * c.median(values), fmt)}, "
            f"range {format(scale * min(values), fmt)}..{format(scale * max(values), fmt)}, n={len(values)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a run of under three minutes")
    parser.add_argument("--arm", choices=("cv", "split"), default="cv",
                        help="cv: the sample study's cross-validated trials (default); split: one train/valid split")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--n-trials", type=int)
    parser.add_argument("--max-epochs", type=int, help="per trial (split) or per fold (cv)")
    parser.add_argument("--steps", type=int, help="override the study's fixed steps_per_epoch")
    parser.add_argument("--folds", type=int, help="cv: override the study's [study] folds")
    parser.add_argument("--keep", help="keep the runs (study copies, databases, logs) in this folder")
    parser.add_argument("--json", help="write every figure to this file")
    parser.add_argument("--analyse", metavar="DIR", help="only analyse the runs kept in DIR by --keep")
    parser.add_argument("--pruner-set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="change the study pruner's arguments, e.g. min_resource=4 (a what-if)")
    parser.add_argument("--reuse", action="store_true",
                        help="with --keep: reuse a kept run of the same study copy and overrides instead of running it")
    args = parser.parse_args()
    args.pruner_set = {k: _number(v) for k, v in (item.split("=", 1) for item in args.pruner_set)}
    if args.quick:  # CV: 2 folds of 2 epochs, so that the rung at step 3 (fold 2, epoch 1) is reached
        defaults = dict(seeds=[0], image_size=32, n_trials=2, max_epochs=2 if args.arm == "cv" else 3,
                        steps=1 if args.arm == "cv" else 2, folds=2 if args.arm == "cv" else None)
    elif args.arm == "split":
        defaults = dict(seeds=[0, 1, 2], image_size=64, n_trials=10, max_epochs=10, steps=None)
    else:
        defaults = dict(seeds=[0, 1], image_size=64, n_trials=8, max_epochs=None, steps=None)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    folds = (args.folds or study_folds()) if args.arm == "cv" else 1
    if args.arm == "cv" and folds < 2:
        raise SystemExit(f"--arm cv: {c.SAMPLE_STUDY} has no [study] folds >= 2 (or --folds is under 2)")
    if args.max_epochs is None:  # CV: the study's own epochs per fold, so its rungs fall where it says
        import tomllib

        args.max_epochs = int(tomllib.loads(c.SAMPLE_STUDY.read_text(encoding="utf-8"))["budget"]["max_epochs"])
    steps = (3, 5, 7) if args.arm == "split" else rung_steps(args.max_epochs, folds)
    if args.analyse:
        result = early_vs_final(Path(args.analyse), args.arm, steps)
        c.write_json(args.json, {"early_vs_final": result, "rung_values": rung_values(Path(args.analyse), args.arm, steps)})
        first = min(result, key=int) if result else None
        c.headline(f"spearman_step{first}_vs_final", result[first]["spearman"] if first else float("nan"), ".2f")
        return
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    unit = "epochs per trial" if args.arm == "split" else f"epochs per fold, {folds} folds"
    c.log("machine:", c.machine())
    c.log(f"sample study, arm {args.arm}, {args.image_size} px, {args.n_trials} trials, at most {args.max_epochs} {unit}, "
          f"steps per epoch {args.steps or 'as the study file'}; sampler seeds {args.seeds}; pruner {study_pruner()}")
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-pruning-"))
    folder.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    try:
        for i, seed in enumerate(args.seeds):
            for pruned in ((True, False) if i % 2 == 0 else (False, True)):
                result = run_study(folder, seed, pruned, args)
                runs.append(result)
                c.log(f"seed {seed} {result['pruner']:<22} epochs {result['epochs']:4d}  wall {result['wall_s']:7.1f} s  "
                      f"best Dice {result['best_dice']:.4f} (trial {result['best_trial']})  states {result['states']}")
                c.log(f"    {result['command']}")
        correlation = early_vs_final(folder, args.arm, steps)
        at_rungs = rung_values(folder, args.arm, steps)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    by_seed: dict[int, dict[str, dict[str, Any]]] = {}
    for r in runs:
        by_seed.setdefault(r["seed"], {})["pruned" if r["pruner"] != "NopPruner" else "unpruned"] = r
    saved, wall_saved, dice_gap, shared = [], [], [], {}
    value = "best val Dice" if args.arm == "split" else "best pooled OOF Dice"
    print()
    print(f"| seed | pruner | trials (complete/pruned/other) | {'epochs' if args.arm == 'split' else 'fold-epochs'} "
          f"| wall s | {value} (trial) |")
    print("|---|---|---|---|---|---|")
    for seed, pair in sorted(by_seed.items()):
        for kind in ("pruned", "unpruned"):
            r = pair[kind]
            s = r["states"]
            other = r["trials"] - s.get("COMPLETE", 0) - s.get("PRUNED", 0)
            print(f"| {seed} | {r['pruner']} | {s.get('COMPLETE', 0)}/{s.get('PRUNED', 0)}/{other} "
                  f"(infeasible {r['infeasible']}) | {r['epochs']} | {r['wall_s']} | {r['best_dice']:.4f} ({r['best_trial']}) |")
        saved.append(1 - pair["pruned"]["epochs"] / pair["unpruned"]["epochs"])
        wall_saved.append(1 - pair["pruned"]["wall_s"] / pair["unpruned"]["wall_s"])
        dice_gap.append(pair["unpruned"]["best_dice"] - pair["pruned"]["best_dice"])
        shared[seed] = shared_trials(pair)
    print()
    for seed, s in sorted(shared.items()):
        c.log(f"seed {seed}: trials tried by both studies (unpruned number -> final value; fate in the pruned study): "
              + ", ".join(f"{m['unpruned_trial']}->{m['final']:.3f} {m['state_when_pruning']}"
                          f"{' (' + m['stop_reason'] + ')' if m['state_when_pruning'] == 'PRUNED' else ''}"
                          for m in s["matches"]))
        c.log(f"seed {seed}: the unpruned study's best trial ({s['unpruned_best_trial']}) in the pruned study: "
              f"{s['unpruned_best_fate'] or 'not tried (the studies had diverged)'}; of the {s['stopped_known']} "
              f"trials it stopped whose final value is known, {s['stopped_would_beat_pruned_best']} would have "
              "ended above the pruned study's best")
    if any(r["uncounted_failed_trials"] for r in runs):
        c.log("note: failed trials without an epochs_run attribute (not counted):",
              {f"{r['seed']}-{r['pruner']}": r["uncounted_failed_trials"] for r in runs if r["uncounted_failed_trials"]})
    c.log(f"{'epochs' if args.arm == 'split' else 'fold-epochs'} saved by pruning: "
          f"{', '.join(f'{100 * x:.1f}%' for x in saved)} (per seed); {_spread(saved, 100, '.1f')} %")
    c.log(f"wall time saved: {', '.join(f'{100 * x:.1f}%' for x in wall_saved)}; {_spread(wall_saved, 100, '.1f')} %")
    c.log(f"best Dice, unpruned - pruned: {', '.join(f'{x:+.4f}' for x in dice_gap)}; {_spread(dice_gap)}; "
          f"within 0.02 for {sum(1 for x in dice_gap if x <= 0.02)}/{len(dice_gap)} seeds")
    c.log(f"target (>= 40% fewer epochs, best Dice within 0.02): "
          f"{'met' if c.median(saved) >= 0.40 and all(x <= 0.02 for x in dice_gap) else 'NOT met'}")
    c.write_json(args.json, {"quick": args.quick, "arm": args.arm, "folds": folds, "machine": c.machine(),
                             "args": vars(args), "runs": runs, "early_vs_final": correlation, "shared_trials": shared,
                             "values_at_steps": at_rungs,
                             "epochs_saved": saved, "wall_saved": wall_saved, "dice_gap_unpruned_minus_pruned": dice_gap})
    c.headline("epochs_saved_pct", 100 * c.median(saved), ".1f")


if __name__ == "__main__":
    main()
