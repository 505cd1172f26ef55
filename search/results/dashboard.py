"""``flexunet search dashboard``: optuna-dashboard over a study's storage and artifact store,
and the study note (markdown) the dashboard shows on the study's page.

The dashboard has no authentication and can delete studies, so it listens on 127.0.0.1 unless
told otherwise, and says so when it is not.
"""

from __future__ import annotations

import ipaddress
import logging
import shlex
import socketserver
from collections.abc import Sequence
from typing import Any, BinaryIO
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna
import optuna_dashboard
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import TrialState

from flexunet.errors import FlexUNetError
from search import keys
from search.store.artifacts import Location, Store, open_store, recorded
from search.results.status import baseline_trial, best_trials

_logger = logging.getLogger(__name__)
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
# The last line of every note flexunet writes: a note without it was edited by a person and is
# left alone.
NOTE_FOOTER = "_Written by flexunet search; delete this line to keep your own edits of this note._"


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def exposure_warning(host: str) -> str | None:
    """The warning to print before listening on ``host``, or None for a loopback address."""
    if is_loopback(host):
        return None
    return (f"warning: the dashboard listens on {host}, not only on this machine; it has no "
            "authentication, and anyone who reaches it can read, edit and delete the studies in "
            "this storage (use an SSH tunnel to 127.0.0.1 instead)")


# ---------------------------------------------------------------------------------------------
# The study note


def write_study_note(study: optuna.Study, masked_storage: str) -> str:
    """Build the study's dashboard note and save it, unless a person has edited it (the footer
    is gone); returns the note text that was built."""
    text = study_note(study, masked_storage)
    current = optuna_dashboard.get_note(study)
    if current and NOTE_FOOTER not in current:
        _logger.info("study %s: the dashboard note was edited by hand; left as it is", study.study_name)
        return text
    if current != text:
        optuna_dashboard.save_note(study, text)
    return text


def study_note(study: optuna.Study, masked_storage: str) -> str:
    """The note's markdown: dataset and patient split, search space, fixed settings, budget,
    sampler and pruner, the baseline against the best, and how to export."""
    attrs = study.user_attrs
    objectives = attrs.get(keys.STUDY_OBJECTIVES) or [f"objective {i}" for i in range(len(study.directions))]
    goals = ", ".join(f"{name} ({d.name.lower()})" for name, d in zip(objectives, study.directions))
    lines = [f"## FlexUNet study `{study.study_name}`", ""]
    head = [f"Storage `{masked_storage}`"]
    if attrs.get(keys.STUDY_FILE):
        head.append(f"study file `{attrs[keys.STUDY_FILE]}`")
    if attrs.get(keys.STUDY_IMAGE_SIZE):
        head.append(f"images {attrs[keys.STUDY_IMAGE_SIZE]} px")
    lines += [", ".join(head) + ".", f"Objectives: {goals}.", ""]
    lines += _dataset_section(attrs.get(keys.STUDY_DATASET) or {})
    lines += _space_section(attrs.get(keys.STUDY_SPACE) or [])
    fixed = attrs.get(keys.STUDY_FIXED) or {}
    lines += ["### Fixed settings", ""]
    lines += [f"- `{k}` = `{_fmt(v)}`" for k, v in sorted(fixed.items())] or ["- none (the dataset config's values)"]
    lines.append("")
    budget = {k: v for k, v in (attrs.get(keys.STUDY_BUDGET) or {}).items() if v is not None}
    lines += ["### Budget", "", ", ".join(f"{k} {_fmt(v)}" for k, v in budget.items()) or "not recorded", ""]
    algorithms = [attrs[k] for k in (keys.STUDY_SAMPLER, keys.STUDY_PRUNER) if attrs.get(k)]
    lines += ["### Sampler and pruner", "", (", ".join(algorithms) or "not recorded") + ".", ""]
    lines += _baseline_section(study)
    lines += _refit_section(study)
    lines += _export_section(study.study_name, masked_storage)
    lines += ["", NOTE_FOOTER]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return str(value)


def _dataset_section(dataset: dict[str, Any]) -> list[str]:
    lines = ["### Dataset", ""]
    what = f"Prepared from {dataset['prepared']}" if dataset.get("prepared") else "From a dataset config"
    lines.append(f"{what}; {_fmt(dataset.get('classes', '?'))} classes, {_fmt(dataset.get('channels', '?'))} "
                 "channel(s).")
    split, slices = dataset.get("split"), (dataset.get("slices") or {}).get("all", {})
    if split:
        lines += ["", "Split **by patient** (no patient is in two parts):", "",
                  "| part | patients | slices | patient ids |", "|---|---|---|---|"]
        for part, patients in split.items():
            lines.append(f"| {part} | {len(patients)} | {slices.get(part, '?')} | {', '.join(patients)} |")
    else:
        lines.append("The patient split is not recorded (the dataset was not prepared by flexunet).")
    return lines + [""]


def _space_section(space: list[dict[str, Any]]) -> list[str]:
    lines = ["### Search space", ""]
    if not space:
        return lines + ["nothing searched", ""]
    lines += ["| parameter | type | values | when |", "|---|---|---|---|"]
    for p in space:
        if p.get("kind") == "categorical":
            values = ", ".join(_fmt(c) for c in p.get("choices", []))
        else:
            values = f"{_fmt(p.get('low'))} .. {_fmt(p.get('high'))}"
            if p.get("step"):
                values += f" step {_fmt(p['step'])}"
            if p.get("log"):
                values += " (log)"
        when = ", ".join(f"{k} in {_fmt(list(v) if isinstance(v, (list, tuple)) else v)}"
                         for k, v in (p.get("when") or {}).items())
        lines.append(f"| `{p.get('name')}` | {p.get('kind')} | {values} | {when} |")
    return lines + [""]


def _baseline_section(study: optuna.Study) -> list[str]:
    lines = ["### Baseline", ""]
    base = baseline_trial(study)
    if base is None:
        lines.append("No baseline trial (the study file sets `baseline = false`).")
    elif base.state == TrialState.COMPLETE and base.values:
        lines.append(f"Trial {base.number} runs the seed's hand-tuned settings: validation foreground Dice "
                     f"**{base.values[0]:.4f}**.")
    else:
        lines.append(f"Trial {base.number} runs the seed's hand-tuned settings: {base.state.name.lower()}, "
                     "no value yet.")
    best = best_trials(study)
    if best:
        top = best[0]
        line = f"Best so far: trial {top.number}, validation foreground Dice **{top.values[0]:.4f}**"
        if base is not None and base.values and top.number != base.number:
            line += f" ({top.values[0] - base.values[0]:+.4f} against the baseline)"
        lines.append("")
        lines.append(line + ".")
    return lines + [""]


def _refit_section(study: optuna.Study) -> list[str]:
    """The refit's progress and models (search/trial/refit.py), once it is planned."""
    from search.store import _internals
    from search.trial import refit

    found = refit.status_lines(study, _internals.study_storage(study))
    return ["### Refit", "", *[f"- {line.strip()}" for line in found], ""] if found else []


def _export_section(name: str, masked_storage: str) -> list[str]:
    command = (f"flexunet search export --study {shlex.quote(name)} --storage {shlex.quote(masked_storage)} "
               f"--out {shlex.quote(name + '-best')}")
    lines = ["### Export the best model", "", "```", command, "```"]
    if "***" in masked_storage:
        lines.append("(put the password back in place of `***`, or set `FLEXUNET_STORAGE`)")
    lines.append("or, on the machine that has the study file: `flexunet search export STUDY.toml --out DIR`. "
                 "`flexunet search report` draws the study as one HTML page.")
    return lines


# ---------------------------------------------------------------------------------------------
# Serving


def artifact_stores(studies: Sequence[optuna.Study],
                    locations: Sequence[Location] | None = None) -> tuple[list[Store], list[str]]:
    """The artifact stores to serve, opened: ``locations`` (default: the ones the studies
    recorded) that are reachable from this machine, and a line for each that is not."""
    named = ([(f"study {s.study_name!r}", location) for s in studies
              if (location := recorded(s)) is not None] if locations is None
             else [(f"artifact store {location}", location) for location in locations])
    found: list[Store] = []
    missing: list[str] = []
    seen: set[Location] = set()
    for name, location in named:
        if location in seen:  # several studies of one storage often share one store
            continue
        seen.add(location)
        try:
            found.append(open_store(location))
        except FlexUNetError as exc:
            missing.append(f"{name}: {location.describe()} is not reachable from this machine ({exc})")
    return found, missing


class _ChainedArtifactStore:
    """Several studies' artifact stores behind one: reads look in each in turn."""

    def __init__(self, stores: Sequence[Store]) -> None:
        self._stores = list(stores)

    def open_reader(self, artifact_id: str) -> BinaryIO:
        for store in self._stores:
            try:
                return store.open_reader(artifact_id)
            except ArtifactNotFound:
                continue
        raise ArtifactNotFound(f"artifact {artifact_id} is in none of the artifact stores")

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self._stores[0].write(artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        for store in self._stores:
            try:
                store.remove(artifact_id)
                return
            except ArtifactNotFound:
                continue
        raise ArtifactNotFound(f"artifact {artifact_id} is in none of the artifact stores")


def artifact_store(stores: Sequence[Store]) -> Any:
    """One artifact store over ``stores`` (None when there is none)."""
    if not stores:
        return None
    return stores[0] if len(stores) == 1 else _ChainedArtifactStore(stores)


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    # The browser loads the page, its bundle and each artifact at once; one thread per request.
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    """Request lines go to the debug log, not the terminal."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        _logger.debug("dashboard: " + format, *args)


def serve(storage: optuna.storages.BaseStorage, stores: Sequence[Store], *, host: str = DEFAULT_HOST,
          port: int = DEFAULT_PORT, ready: Any = None) -> None:
    """Serve optuna-dashboard until interrupted, with the trials' files from ``stores`` (any
    of search.store.artifacts' stores: folders, S3 buckets); ``ready(url)`` is called once it listens."""
    app = optuna_dashboard.wsgi(storage, artifact_store=artifact_store(stores))
    try:
        server = make_server(host, port, app, server_class=_Server, handler_class=_QuietHandler)
    except OSError as exc:
        raise FlexUNetError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    shown = f"[{host}]" if ":" in host else host
    if ready is not None:
        ready(f"http://{shown}:{server.server_port}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
