"""``flexunet search report``: a study as one self-contained HTML page, for people who would
rather look than read.

The page shows the optimisation history, the parameter importances, a parallel-coordinate plot
(and the Pareto front of a two-objective study), then the best trial against the seed baseline:
their figures, learning curves and the same test slices segmented by both. Every figure is
embedded in the page (base64 PNG; no script, no external file) and also written beside it as a
PNG. The page holds no absolute path and no password.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import html
import io
import math
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from flexunet import config as cfg
from flexunet import plots
from flexunet.data.dataset import SliceSet, load_split
from flexunet.evaluate import predict_classes, score
from flexunet.outputs import staged_dir, write_text_atomic
from flexunet.train import MODEL_FILE
from search import keys
from search.store.artifacts import MissingArtifact, Store, find
from search.results.export import choose_trial, fold_count, trial_network
from search.spec.space import recorded_config
from search import paths
from search.results.status import baseline_trial

REPORT_FILE = "report.html"
DICE = "validation foreground Dice"


@dataclass
class _Page:
    """The report being built: HTML sections in order, and the figures they embed."""

    sections: list[str] = field(default_factory=list)
    figures: dict[str, bytes] = field(default_factory=dict)
    missing: list[MissingArtifact] = field(default_factory=list)  # trial files the store did not give

    def mark_missing(self, problem: MissingArtifact) -> str:
        """Note a trial file that could not be read; returns the mark the page shows in place
        of what it would have drawn."""
        self.missing.append(problem)
        return f'<p class="missing">Missing: {_e(problem.fact())}.</p>'

    def figure(self, name: str, png: bytes, alt: str) -> str:
        self.figures[name] = png
        data = base64.b64encode(png).decode("ascii")
        return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


@dataclass(frozen=True)
class ReportResult:
    out: Path
    files: list[str]
    best: FrozenTrial
    baseline: FrozenTrial | None
    missing: list[MissingArtifact]  # trial files the page had to leave out


def write_report(study: optuna.Study, storage: Any, out: Path, *, base: cfg.Config, artifacts: Store,
                 public_storage: str, slices: int = 4, force: bool = False) -> ReportResult:
    """Write ``out/report.html`` and a PNG of each of its figures (all or nothing).

    Everything but the trials' files comes from the study's storage. A trial file ``artifacts``
    cannot give (another machine's folder, an unreachable bucket) leaves its figure out, with a
    mark on the page naming the trial, the file and the store; the result lists them."""
    best = choose_trial(study, None)
    baseline = baseline_trial(study)
    page = _Page()
    page.sections.append(_summary(study, public_storage))
    page.sections.append(_history(study, page))
    page.sections.append(_importances(study, page))
    page.sections.append(_parallel(study, page))
    if len(study.directions) == 2:
        page.sections.append(_pareto(study, page))
    page.sections.append(_comparison(storage, best, baseline, base, artifacts, slices, page))
    with staged_dir(out, replace=force) as stage:
        for name, png in page.figures.items():
            (stage / name).write_bytes(png)
        write_text_atomic(stage / REPORT_FILE, _html(study.study_name, page.sections))
    return ReportResult(out, [REPORT_FILE, *page.figures], best, baseline, page.missing)


# ---------------------------------------------------------------------------------------------
# Sections


def _summary(study: optuna.Study, public_storage: str) -> str:
    attrs = study.user_attrs
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name.lower() for t in trials)
    objectives = attrs.get(keys.STUDY_OBJECTIVES) or [f"objective {i}" for i in range(len(study.directions))]
    rows = [
        ("storage", public_storage),
        ("trials", f"{len(trials)}: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items()))),
        ("objectives", ", ".join(f"{o} ({d.name.lower()})" for o, d in zip(objectives, study.directions))),
        ("sampler, pruner", f"{attrs.get(keys.STUDY_SAMPLER, 'not recorded')}, "
                            f"{attrs.get(keys.STUDY_PRUNER, 'not recorded')}"),
        ("image size", f"{attrs[keys.STUDY_IMAGE_SIZE]} px" if attrs.get(keys.STUDY_IMAGE_SIZE) else "not recorded"),
    ]
    dataset = attrs.get(keys.STUDY_DATASET) or {}
    split, counts = dataset.get("split"), (dataset.get("slices") or {}).get("all", {})
    if split:
        rows.append(("patient split", "; ".join(
            f"{part} {len(ids)} patients, {counts.get(part, '?')} slices" for part, ids in split.items())))
    budget = {k: v for k, v in (attrs.get(keys.STUDY_BUDGET) or {}).items() if v is not None}
    if budget:
        rows.append(("budget", ", ".join(f"{k} {v}" for k, v in budget.items())))
    from search.store import _internals
    from search.trial import refit

    found = refit.status_lines(study, _internals.study_storage(study))
    if found:  # the refit's progress and its models' validation Dice (search/trial/refit.py)
        rows.append(("refit", "; ".join(line.strip() for line in found)))
    return (f"<h1>FlexUNet study <code>{_e(study.study_name)}</code></h1>\n"
            f"<p class=\"meta\">Report written {time.strftime('%Y-%m-%d %H:%M')} by "
            "<code>flexunet search report</code>.</p>\n" + _table(rows))


def _history(study: optuna.Study, page: _Page) -> str:
    title = "<h2>Optimisation history</h2>\n"
    done = _completed(study)
    if not done:
        return title + "<p>No trial has completed yet.</p>"
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.scatter([t.number for t in done], [t.values[0] for t in done], color="#2c7bb6", zorder=3,
               label="completed trial")
    pruned = [t for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)) if t.intermediate_values]
    if pruned:
        ax.scatter([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
                   marker="x", color="#888888", zorder=2, label="pruned (last reported value)")
    best = np.maximum.accumulate([t.values[0] for t in done])
    ax.step([t.number for t in done], best, where="post", color="#c0392b", label="best so far")
    base = baseline_trial(study)
    if base is not None and base.values:
        ax.scatter([base.number], [base.values[0]], marker="*", s=220, color="#f39c12", edgecolor="black",
                   zorder=4, label="baseline (seed settings)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(DICE)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return title + (f"<p>Each trial's {DICE} (the search maximises it), the best so far, and the seed "
                    "baseline.</p>\n" + page.figure("history.png", _png(fig), "optimisation history"))


def _importances(study: optuna.Study, page: _Page) -> str:
    title = "<h2>Parameter importances</h2>\n"
    done = _completed(study)
    if len(done) < 3:
        return title + (f"<p>Only {len(done)} completed trial{'s' if len(done) != 1 else ''}: too few to say "
                        "which parameters matter (it needs at least 3).</p>")
    try:
        with _quiet():
            # PED-ANOVA (Optuna's default, no scikit-learn) takes a target as lower-is-better.
            importances = optuna.importance.get_param_importances(
                study, target=None if len(study.directions) == 1 else (lambda t: -t.values[0]))
    except (ValueError, RuntimeError) as exc:  # e.g. no parameter varies across the completed trials
        return title + f"<p>Importances cannot be computed yet ({_e(str(exc).splitlines()[0])}).</p>"
    if not importances:
        return title + "<p>No parameter varies across the completed trials.</p>"
    plt = _pyplot()
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.2))
    ax.barh(names, [importances[n] for n in names], color="#3b75af")
    for y, name in enumerate(names):
        ax.text(importances[name], y, f" {importances[name]:.2f}", va="center", fontsize=9)
    ax.set_xlabel(f"importance for {DICE} (PED-ANOVA, normalised to sum to 1)")
    ax.set_xlim(0, max(importances.values()) * 1.2 or 1)
    ax.grid(axis="x", alpha=0.3)
    return title + (f"<p>How much of the variation of {DICE} over {len(done)} completed trials each parameter "
                    "explains.</p>\n" + page.figure("importances.png", _png(fig), "parameter importances"))


def _parallel(study: optuna.Study, page: _Page) -> str:
    title = "<h2>Parallel coordinates</h2>\n"
    done = _completed(study)
    if len(done) < 2 or not any(t.params for t in done):
        return title + "<p>Too few completed trials with parameters to draw (it needs at least 2).</p>"
    from optuna.visualization import matplotlib as vm

    with _quiet():
        # No target: Optuna then colours by the study's direction (with a target it assumes
        # minimisation), and a two-objective study by Pareto rank.
        ax = vm.plot_parallel_coordinate(study, target_name=DICE)
    ax.set_title("")
    ax.set_facecolor("#e8e8e8")  # the lowest Dice is drawn white: keep it visible
    ax.figure.set_size_inches(max(7.0, 1.6 * (len({p for t in done for p in t.params}) + 1)), 4.5)
    colour = "higher Dice" if len(study.directions) == 1 else "nearer the Pareto front"
    return title + (f"<p>One line per completed trial, through its objective and parameters (darker: {colour}).</p>\n"
                    + page.figure("parallel_coordinate.png", _png(ax.figure), "parallel coordinates"))


def _pareto(study: optuna.Study, page: _Page) -> str:
    from optuna.visualization import matplotlib as vm

    names = list(study.user_attrs.get(keys.STUDY_OBJECTIVES) or ["objective 0", "objective 1"])
    with _quiet():
        ax = vm.plot_pareto_front(study, target_names=names)
    ax.set_title("")
    return ("<h2>Pareto front</h2>\n<p>Each completed trial by both objectives; the front holds the trials "
            "no other beats on both.</p>\n" + page.figure("pareto_front.png", _png(ax.figure), "Pareto front"))


def _comparison(storage: Any, best: FrozenTrial, baseline: FrozenTrial | None, base: cfg.Config,
                artifacts: Store, slices: int, page: _Page) -> str:
    parts = ["<h2>Best trial against the baseline</h2>"]
    trials = [("best", best)]
    if baseline is None:
        parts.append("<p>The study has no baseline trial (its study file sets <code>baseline = false</code>).</p>")
    elif baseline.number == best.number:
        parts.append(f"<p>The baseline (trial {baseline.number}, the seed's hand-tuned settings) is the best "
                     "trial: the search has not beaten it.</p>")
    else:
        trials.append(("baseline", baseline))
    test = _test_predictions(storage, trials, base, artifacts, page)
    parts.append(_metrics_table(trials, test))
    parts.append(_curves(storage, trials, artifacts, page))
    parts.append(_overlays(trials, test, base, slices, page))
    return "\n".join(parts)


@dataclass
class _TestRun:
    """A trial's model on the test split: the slices, its class maps, its test Dice."""

    data: SliceSet
    predictions: np.ndarray | None
    dice: float | None
    problem: str | None = None  # the page's HTML saying why there are no predictions
    class_dice: dict[int, float] = field(default_factory=dict)  # per class; NaN where absent


def _test_predictions(storage: Any, trials: Sequence[tuple[str, FrozenTrial]], base: cfg.Config,
                      artifacts: Store, page: _Page) -> dict[int, _TestRun]:
    import keras

    with tempfile.TemporaryDirectory(prefix="report-") as tmp:  # the config's outputs: never written
        config = recorded_config(base, trials[0][1], Path(tmp))
        data = load_split(config, "test")
    runs: dict[int, _TestRun] = {}
    for _, trial in trials:
        if find(storage, trial, _first_model_file(trial)) is None:
            runs[trial.number] = _TestRun(data, None, None, f"<p>Trial {trial.number} saved no checkpoint.</p>")
            continue
        with tempfile.TemporaryDirectory(prefix=f"report-{trial.number}-") as tmp:
            try:
                network = trial_network(trial, storage, artifacts, Path(tmp))
            except MissingArtifact as problem:
                runs[trial.number] = _TestRun(data, None, None, page.mark_missing(problem))
                continue
        if tuple(network.input_shape[1:]) != tuple(data.images.shape[1:]):
            runs[trial.number] = _TestRun(data, None, None, f"<p>Trial {trial.number}'s model takes "
                                          f"{_e(tuple(network.input_shape[1:]))} inputs, not the study's.</p>")
            continue
        predicted = predict_classes(network, data)
        evaluation = score(predicted, data.masks, data.names, config.model.num_classes)
        summary = evaluation.summary
        runs[trial.number] = _TestRun(data, predicted, float(summary["foreground_dice_global"]),
                                      class_dice={c: v["dice_global"] for c, v in summary["classes"].items()})
        del network
        keras.backend.clear_session()
    return runs


def _class_rows(trials: Sequence[tuple[str, FrozenTrial]], test: dict[int, _TestRun]) -> list[tuple[str, ...]]:
    """Per class: validation and test Dice ("absent" where the class has no reference and no
    predicted pixels there, so that it is left out of the mean above)."""
    def cell(v: Any) -> str:
        return "absent" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

    classes = sorted({c for run in test.values() for c in run.class_dice}
                     | {i + 1 for _, t in trials for i in range(len(t.user_attrs.get(keys.CLASS_DICE) or []))})
    if len(classes) < 2:  # one foreground class: the means above are its figures
        return []
    rows = []
    for c in classes:
        val = [(t.user_attrs.get(keys.CLASS_DICE) or [])[c - 1:c] for _, t in trials]
        rows.append((f"class {c}: validation Dice", *[cell(v[0]) if v else "n/a" for v in val]))
        rows.append((f"class {c}: test Dice", *[cell(test[t.number].class_dice.get(c)) for _, t in trials]))
    return rows


def _metrics_table(trials: Sequence[tuple[str, FrozenTrial]], test: dict[int, _TestRun]) -> str:
    def value(t: FrozenTrial) -> str:
        if t.values:
            return f"{t.values[0]:.4f}"
        best = t.user_attrs.get(keys.BEST_VAL_DICE)
        return f"{best:.4f} ({t.state.name.lower()})" if isinstance(best, float) else t.state.name.lower()

    def attr(t: FrozenTrial, key: str, fmt: Callable[[Any], str] = str) -> str:
        v = t.user_attrs.get(key)
        return "n/a" if v is None else fmt(v)

    images = len(next(iter(test.values())).data)
    rows: list[tuple[str, ...]] = [
        ("trial", *[f"{t.number} ({role})" for role, t in trials]),
        (DICE, *[value(t) for _, t in trials]),
        (f"test foreground Dice ({images} slices)",
         *[f"{test[t.number].dice:.4f}" if test[t.number].dice is not None else "n/a" for _, t in trials]),
        *_class_rows(trials, test),
        ("parameters", *[attr(t, "params", lambda v: f"{v:,}") for _, t in trials]),
        ("GFLOPs per image", *[attr(t, "gflops") for _, t in trials]),
        ("epochs run (best epoch)", *[f"{attr(t, keys.EPOCHS_RUN)} ({attr(t, keys.BEST_EPOCH)})" for _, t in trials]),
        ("stop reason", *[attr(t, keys.STOP_REASON) for _, t in trials]),
        ("seconds per epoch", *[attr(t, keys.SECONDS_PER_EPOCH) for _, t in trials]),
    ]
    for name in dict.fromkeys(p for _, t in trials for p in t.params):
        rows.append((name, *[_fmt(t.params[name]) if name in t.params else "-" for _, t in trials]))
    return _table(rows, header=["", *[role for role, _ in trials]])


def _curves(storage: Any, trials: Sequence[tuple[str, FrozenTrial]], artifacts: Store, page: _Page) -> str:
    logs: dict[int, list[dict[str, float | None]]] = {}
    marks = []
    for _, trial in trials:
        try:
            logs[trial.number] = _training_log(storage, trial, artifacts)
        except MissingArtifact as problem:
            logs[trial.number] = []
            marks.append(page.mark_missing(problem))
    note = "\n".join(marks)
    if not any(logs.values()):
        return "<h3>Learning curves</h3>\n" + (note or "<p>No trial here left a training log.</p>")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for (role, trial), colour in zip(trials, ("#c0392b", "#2c7bb6")):
        log = logs[trial.number]
        if not log:
            continue
        epochs = np.arange(1, len(log) + 1)
        for ax, key in zip(axes, ("loss", "foreground_dice")):
            for prefix, style in (("", "-"), ("val_", "--")):
                values = [row.get(prefix + key) for row in log]
                if all(v is not None for v in values):
                    ax.plot(epochs, values, style, color=colour, marker="o", markersize=3,
                            label=f"{role} {'validation' if prefix else 'train'}")
    for ax, title in zip(axes, ("loss", "foreground Dice")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return ("<h3>Learning curves</h3>\n<p>Train (solid) and validation (dashed), per epoch.</p>\n" + note
            + page.figure(paths.CURVES_FILE, _png(fig), "learning curves"))


def _overlays(trials: Sequence[tuple[str, FrozenTrial]], test: dict[int, _TestRun], base: cfg.Config,
              slices: int, page: _Page) -> str:
    title = "<h3>Test slices</h3>\n"
    ready = [(role, t) for role, t in trials if test[t.number].predictions is not None]
    problems = [test[t.number].problem for _, t in trials if test[t.number].problem]
    note = "".join(problems)
    if not ready:
        return title + note
    data = test[ready[0][1].number].data
    chosen = pick_slices(data.masks, slices)
    columns = [("ground truth", data.masks[chosen])]
    columns += [(f"{role} (trial {t.number})", test[t.number].predictions[chosen]) for role, t in ready]  # type: ignore[index]
    strip = plots.comparison_strip(data.images[chosen], columns, base.mask.palette(max(2, base.model.num_classes)),
                                   [data.names[i] for i in chosen], min_side=256)
    import cv2

    ok, encoded = cv2.imencode(".png", cv2.cvtColor(strip, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding of the test overlays failed")
    legend = ", ".join(["input", *[name for name, _ in columns]])
    return title + (f"<p>The same {len(chosen)} test slices (patients never seen in training or validation), "
                    f"left to right: {_e(legend)}.</p>\n" + note
                    + page.figure("test_overlays.png", encoded.tobytes(), f"test slices: {legend}"))


def pick_slices(masks: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` slices to show: those with the most foreground, plus one without any
    (where there is one) to show false positives; in dataset order."""
    count = max(1, min(count, len(masks)))
    pixels = (masks > 0).reshape(len(masks), -1).sum(axis=1)
    positive = [int(i) for i in np.argsort(-pixels, kind="stable") if pixels[i] > 0]
    negative = [int(i) for i in range(len(masks)) if pixels[i] == 0]
    chosen = positive[:count - 1 if negative else count] + negative[:1]
    return sorted(chosen[:count])


# ---------------------------------------------------------------------------------------------
# Helpers


def _training_log(storage: Any, trial: FrozenTrial, artifacts: Store) -> list[dict[str, float | None]]:
    """The trial's per-epoch training log, or [] if it left none; raises MissingArtifact when
    it left one that ``artifacts`` cannot give."""
    log = paths.LOG_FILE if fold_count(trial) == 1 else paths.fold_log(0)  # a CV trial: its first fold
    if find(storage, trial, log) is None:
        return []
    text = artifacts.read(storage, trial, log).decode("utf-8", errors="replace")
    return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(text, newline=""))]


def _first_model_file(trial: FrozenTrial) -> str:
    """A checkpoint the trial uploads: its best model, or a CV trial's first fold model."""
    return MODEL_FILE if fold_count(trial) == 1 else paths.fold_model(0)


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def _completed(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Optuna's matplotlib plots and importances are marked experimental and say so each call."""
    _pyplot()  # the plots draw with whatever backend is active: make it Agg first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _e(text: Any) -> str:
    return html.escape(str(text))


def _table(rows: Sequence[Sequence[str]], header: Sequence[str] = ()) -> str:
    """Rows whose first cell names them; ``header`` titles the columns."""
    cells = ["<table>"]
    if header:
        cells.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        cells.append("<tr>" + f"<th>{_e(row[0])}</th>" + "".join(f"<td>{_e(c)}</td>" for c in row[1:]) + "</tr>")
    cells.append("</table>")
    return "\n".join(cells)


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.7em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .8em 0; } th, td { padding: .3em .8em; border: 1px solid #ddd;
text-align: left; vertical-align: top; } th { background: #f5f5f5; font-weight: 600; }
img { max-width: 100%; border: 1px solid #eee; } .meta { color: #666; } code { background: #f3f3f3;
padding: 0 .2em; } .missing { color: #8a4b00; background: #fff4e0; padding: .3em .6em; }
"""


def _html(name: str, sections: Sequence[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>FlexUNet study {_e(name)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(sections) + "\n</body>\n</html>\n")
