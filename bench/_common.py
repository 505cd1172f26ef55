"""Helpers shared by the benchmark scripts in bench/ (not a benchmark itself).

Every script prints its figures as it goes and its headline as the LAST line, ``name: value``.
With ``--json FILE`` a script also writes everything it measured there.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "studies" / "data" / "ct-ich"
SAMPLE_STUDY = ROOT / "studies" / "ct_ich_sample.toml"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def quiet_tf() -> None:
    """Import Keras and its backend without their start-up chatter."""
    from flexunet._tf import quiet_import

    quiet_import()
    import logging

    for name in ("tensorflow", "absl", "tf2onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)


def machine() -> dict[str, Any]:
    """What the figures were taken on."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(), "python": platform.python_version(), "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["memory_gib"] = round(int(mem) / 2**20, 1)
    except OSError:
        pass
    for module in ("tensorflow", "jax", "keras", "optuna", "onnxruntime"):
        mod = sys.modules.get(module)
        if mod is not None:
            info[module] = getattr(mod, "__version__", "?")
    if "keras" in sys.modules:
        info["keras_backend"] = sys.modules["keras"].backend.backend()
    if "tensorflow" in sys.modules:
        info["gpus"] = [d.name for d in sys.modules["tensorflow"].config.list_physical_devices("GPU")]
    elif "jax" in sys.modules:
        info["gpus"] = [str(d) for d in sys.modules["jax"].devices() if d.platform == "gpu"]
    return info


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def spread(values: list[float]) -> str:
    """'median (min..max, n=N)' for a list of figures."""
    if not values:
        return "n/a"
    return f"{median(values):.4g} (min {min(values):.4g}, max {max(values):.4g}, n={len(values)})"


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")


def headline(name: str, value: float | str, fmt: str = ".3f") -> None:
    """The script's last line."""
    text = format(value, fmt) if isinstance(value, float) else str(value)
    print(f"{name}: {text}", flush=True)


def log(*parts: Any) -> None:
    print(time.strftime("[%H:%M:%S]"), *parts, flush=True)


def toml_dumps(data: dict[str, Any]) -> str:
    """A study file's tables as TOML (enough for study files: tables of scalars, lists and
    inline tables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        raise TypeError(f"cannot write {v!r} as TOML")

    lines: list[str] = []
    for table, entries in data.items():
        lines.append(f"[{table}]")
        for key, v in entries.items():
            lines.append(f"{key} = {value(v)}")
        lines.append("")
    return "\n".join(lines)


def study_copy(path: Path, changes: dict[str, dict[str, Any]], drop: dict[str, list[str]] | None = None,
               refit: bool = False) -> str:
    """The sample study file as TOML text with some keys changed (and some removed), its
    dataset source made absolute so that the copy can live anywhere. Without ``refit`` its
    ``[refit]`` section goes: a benchmark of the search measures the search alone."""
    import tomllib

    data = tomllib.loads(SAMPLE_STUDY.read_text(encoding="utf-8"))
    if not refit:
        data.pop("refit", None)
    prepare = data["dataset"]["prepare"]
    prepare["source"] = str((SAMPLE_STUDY.parent / prepare["source"]).resolve())
    for table, keys in (drop or {}).items():
        for key in keys:
            data.get(table, {}).pop(key, None)
    for table, entries in changes.items():
        if table in ("sampler", "pruner") and "name" in entries:
            data[table] = {}  # a different class: its own keyword arguments only
        data.setdefault(table, {}).update(entries)
    text = toml_dumps(data)
    path.write_text(text, encoding="utf-8")
    return text


def search_outcome(run_dir: Path) -> dict[str, Any]:
    """What a finished `flexunet search run` in ``run_dir`` (SQLite) did: its search study's
    trials, the searched ones decided (complete, or pruned while training) and the infeasible
    share of the searched ones (issue 21's checks)."""
    import optuna

    from search import keys
    from search.store import storage

    db = storage.open_storage(f"sqlite:///{run_dir / 'study.db'}", heartbeat=False, create=False)
    name = next(n for n in optuna.get_all_study_names(db) if not n.endswith(":refit"))
    trials = optuna.load_study(study_name=name, storage=db).get_trials(deepcopy=False)
    searched = [t for t in trials if not t.user_attrs.get(keys.BASELINE)]
    infeasible = sum(1 for t in searched if t.user_attrs.get(keys.STOP_REASON) == keys.STOP_INFEASIBLE)
    decided = sum(1 for t in searched if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
                  and t.user_attrs.get(keys.STOP_REASON) != keys.STOP_INFEASIBLE)
    return {"trials": len(trials), "decided": decided, "infeasible_share": infeasible / max(len(searched), 1)}
