"""``flexunet search ...``: run, status, export, dashboard and report, registered into the
``flexunet`` command through the ``flexunet.commands`` entry point."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flexunet.errors import FlexUNetError

if TYPE_CHECKING:  # imported where used: the command starts without loading them
    import optuna

    from flexunet.config import Config
    from search.artifacts import Store


@dataclass(frozen=True)
class _Target:
    """The study a command addresses: its name, storage URL and (with a study file) its folder."""

    name: str
    url: str
    out: Path | None
    spec: object | None


def _target(args: argparse.Namespace) -> _Target:
    from search import run as runner
    from search import storage as st
    from search import study_file

    if args.study_file:
        spec = study_file.load(args.study_file)
        out = runner.out_dir(spec, Path(args.run_dir) if args.run_dir else None)
        name = args.study or spec.name
        return _Target(name, st.resolve_url(args.storage, spec.storage, out), out, spec)
    if not args.study:
        raise FlexUNetError("name the study: give STUDY.toml or --study NAME")
    url = args.storage or os.environ.get(st.ENV_VAR)
    if not url:
        raise FlexUNetError(f"--study needs --storage URL (or ${st.ENV_VAR})")
    return _Target(args.study, st.normalize(url), None, None)


def _open(target: _Target):  # -> (storage, study)
    from search import storage as st

    storage = st.open_storage(target.url, heartbeat=False, create=False)
    return storage, st.load_study(storage, target.name)


def _cmd_run(args: argparse.Namespace) -> int:
    from search import run as runner
    from search import study_file

    spec = study_file.load(args.study_file).with_overrides(
        n_trials=args.n_trials, timeout=args.timeout, max_epochs=args.max_epochs, image_size=args.image_size)
    gpus = tuple(g.strip() for g in args.gpus.split(",") if g.strip()) if args.gpus else ()
    options = runner.RunOptions(storage=args.storage, workers=args.workers, gpus=gpus,
                                out=Path(args.out) if args.out else None, artifacts=args.artifacts)
    return runner.run(spec, options)


def _cmd_create(args: argparse.Namespace) -> int:
    from search import run as runner
    from search import study_file
    from search.status import summary_lines

    spec = study_file.load(args.study_file).with_overrides(image_size=args.image_size)
    study, _, _ = runner.setup(spec, runner.RunOptions(storage=args.storage, out=Path(args.out) if args.out else None,
                                                       artifacts=args.artifacts))
    for line in summary_lines(study):
        print(line)
    print("workers join with: flexunet search run " + str(args.study_file) + " --storage URL")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from search import storage as st
    from search.status import summary_lines

    target = _target(args)
    _, study = _open(target)
    for line in summary_lines(study, st.mask(target.url)):
        print(line)
    return 0


def _artifacts(args: argparse.Namespace, target: _Target, study: optuna.Study) -> Store:
    """The study's artifact store: --artifacts, else the study file's (or its folder's), else
    the one the study recorded. Only a store named with --artifacts must be there: without it,
    report draws what it can and export names the store it looked in."""
    from search import artifacts as af

    if args.artifacts:
        return af.open_store(af.parse(args.artifacts, where="--artifacts"))
    if target.out is not None:
        location = af.resolve(None, getattr(target.spec, "artifacts", None), target.out)
    else:
        location = af.recorded(study)
        if location is None:
            raise FlexUNetError(f"study {study.study_name!r} records no artifact store ({af.HINT})")
    return af.open_store(location, check=False)


def _study_files(args: argparse.Namespace, target: _Target, study: optuna.Study) -> tuple[Config, Store]:
    """The study's dataset config (loaded) and artifact store: from --data and --artifacts, the
    study file's folder, or what the study recorded."""
    from flexunet import config as cfg

    attrs = study.user_attrs
    if args.data:
        data_config = Path(args.data)
    elif target.spec is not None:
        from search.run import dataset_config_path

        data_config = dataset_config_path(target.spec, target.out)
    else:
        data_config = Path(attrs.get("flexunet_dataset_config", ""))
    if not data_config.is_file():
        raise FlexUNetError(f"{data_config}: the study's dataset config is not on this machine (pass --data)")
    return cfg.load(data_config), _artifacts(args, target, study)


def _open_with_files(args: argparse.Namespace):  # -> (target, storage, study, base config, artifact store)
    """The study a command names, its dataset config and artifact store, with Keras imported
    (export and report both train nothing but load models)."""
    from flexunet._tf import quiet_import

    target = _target(args)
    storage, study = _open(target)
    base, artifacts = _study_files(args, target, study)
    quiet_import()
    return target, storage, study, base, artifacts


def _cmd_export(args: argparse.Namespace) -> int:
    from search import storage as st

    target, storage, study, base, artifacts = _open_with_files(args)
    from flexunet.evaluate import format_table
    from search.export import export

    result = export(study, storage, Path(args.out), base=base, artifacts=artifacts,
                    masked_storage=st.public(target.url), trial_number=args.trial, force=args.force)
    print(f"exported trial {result.trial.number} (validation foreground Dice {result.trial.values[0]:.4f}) "
          f"to {result.out}")
    print("test split:")
    print(format_table(result.test_summary))
    print("files: " + ", ".join(result.files))
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    import sys

    import optuna

    from search import artifacts as af
    from search import dashboard as db
    from search import storage as st

    warning = db.exposure_warning(args.host)
    if warning:
        print(warning, file=sys.stderr)
    if args.study_file or args.study:
        target = _target(args)
        storage, study = _open(target)
        url, studies, first = target.url, [study], study
    else:
        url = args.storage or os.environ.get(st.ENV_VAR)
        if not url:
            raise FlexUNetError("name the study: give STUDY.toml, --study NAME or --storage URL")
        url = st.normalize(url)
        storage = st.open_storage(url, heartbeat=False, create=False)
        studies = [st.load_study(storage, name) for name in optuna.study.get_all_study_names(storage)]
        target, first = None, (studies[0] if len(studies) == 1 else None)
    if args.artifacts:
        stores, missing = [af.open_store(af.parse(args.artifacts, where="--artifacts"))], []
    elif target is not None and target.out is not None:
        stores, missing = db.artifact_stores(studies, [af.resolve(None, getattr(target.spec, "artifacts", None),
                                                                  target.out)])
    else:
        stores, missing = db.artifact_stores(studies)
    for line in missing:
        print(f"{line}: its artifacts are not shown ({af.HINT})", file=sys.stderr)
    for study in studies:
        if "flexunet_dataset" in study.user_attrs:  # a flexunet study: refresh its note
            db.write_study_note(study, st.mask(url))
    page = f"/dashboard/studies/{storage.get_study_id_from_name(first.study_name)}" if first else "/dashboard"
    print(f"optuna-dashboard: {len(studies)} {'study' if len(studies) == 1 else 'studies'} on {st.mask(url)}, "
          f"artifacts from {', '.join(str(s.location) for s in stores) or 'nowhere'}")
    db.serve(storage, stores, host=args.host, port=args.port,
             ready=lambda base: print(f"open {base}{page} (Ctrl-C stops it)", flush=True))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from search import storage as st

    if args.slices < 1:
        raise FlexUNetError(f"--slices {args.slices}: need at least 1")
    target, storage, study, base, artifacts = _open_with_files(args)
    from search.report import REPORT_FILE, write_report

    result = write_report(study, storage, Path(args.out), base=base, artifacts=artifacts,
                          public_storage=st.public(target.url), slices=args.slices, force=args.force)
    against = f" against the baseline (trial {result.baseline.number})" if result.baseline else ""
    print(f"report of study {study.study_name!r}: best trial {result.best.number}{against}")
    print(f"open {result.out / REPORT_FILE}")
    print("files: " + ", ".join(result.files))
    if result.missing:
        import sys

        from search.artifacts import HINT

        print(f"warning: the page lacks {len(result.missing)} trial file(s) the "
              f"{artifacts.location.describe()} does not give: "
              + "; ".join(f"trial {m.trial}'s {m.filename}" + (f" ({m.reason})" if m.reason else "")
                          for m in result.missing) + f" ({HINT})", file=sys.stderr)
    return 0


def _study_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study_file", nargs="?", metavar="STUDY.toml", help="the study file")
    parser.add_argument("--study", help="study name (default: the study file's)")
    parser.add_argument("--storage", help="storage URL (default: $FLEXUNET_STORAGE, the study file's, "
                                          "or SQLite in the study's folder)")
    parser.add_argument("--run-dir", help="the study's output folder, when not the default")


_ARTIFACTS_HELP_RUN = ("where trials keep their files: a folder or s3://BUCKET/PREFIX (endpoint and credentials "
                       "from AWS_* variables; default: the study file's, or OUT/artifacts)")
_ARTIFACTS_HELP = "the study's artifact store, a folder or s3://BUCKET/PREFIX (default: from the study)"


def register(commands: argparse._SubParsersAction) -> None:
    search = commands.add_parser("search", help="run, watch and export Optuna studies over FlexUNet")
    sub = search.add_subparsers(dest="search_command", required=True, metavar="SUBCOMMAND")

    run = sub.add_parser("run", help="run a study with K local workers (other machines join with the same command)")
    run.add_argument("study_file", metavar="STUDY.toml")
    run.add_argument("--storage", help="storage URL (default: $FLEXUNET_STORAGE, the study file's, "
                                       "or sqlite:///OUT/study.db)")
    run.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    run.add_argument("--gpus", help="comma-separated GPU ids, one per local worker (round robin)")
    run.add_argument("--n-trials", type=int, help="override [budget] n_trials")
    run.add_argument("--timeout", type=float, help="override [budget] timeout (seconds)")
    run.add_argument("--max-epochs", type=int, help="override [budget] max_epochs")
    run.add_argument("--image-size", type=int, help="override the image size (square, pixels)")
    run.add_argument("--out", help="output folder (default: runs/<study name>)")
    run.add_argument("--artifacts", help=_ARTIFACTS_HELP_RUN)
    run.set_defaults(func=_cmd_run)

    create = sub.add_parser("create", help="prepare the data and create the study (with its baseline) "
                                           "without running workers: do this before a batch launch")
    create.add_argument("study_file", metavar="STUDY.toml")
    create.add_argument("--storage", help="storage URL (as for run)")
    create.add_argument("--image-size", type=int, help="override the image size (square, pixels)")
    create.add_argument("--out", help="output folder (default: runs/<study name>)")
    create.add_argument("--artifacts", help=_ARTIFACTS_HELP_RUN)
    create.set_defaults(func=_cmd_create)

    status = sub.add_parser("status", help="trials by state, the best so far, the running trials")
    _study_arguments(status)
    status.set_defaults(func=_cmd_status)

    export = sub.add_parser("export", help="export the best trial's model, evaluate it on the test split")
    _study_arguments(export)
    export.add_argument("--out", required=True, help="the folder to create")
    export.add_argument("--trial", type=int, help="export this trial instead of the best")
    export.add_argument("--artifacts", help=_ARTIFACTS_HELP)
    export.add_argument("--data", help="the dataset's train_eval_infer.config (default: from the study)")
    export.add_argument("--force", action="store_true", help="replace OUT if flexunet wrote it before")
    export.set_defaults(func=_cmd_export)

    dashboard = sub.add_parser("dashboard", help="watch studies in optuna-dashboard, with every trial's artifacts")
    _study_arguments(dashboard)
    dashboard.add_argument("--artifacts", help=_ARTIFACTS_HELP)
    dashboard.add_argument("--host", default="127.0.0.1",
                           help="address to listen on (default 127.0.0.1; the dashboard has no authentication)")
    dashboard.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080; 0: any free)")
    dashboard.set_defaults(func=_cmd_dashboard)

    report = sub.add_parser("report", help="one self-contained HTML page of figures: the study, and the best "
                                           "trial against the baseline on test slices")
    _study_arguments(report)
    report.add_argument("--out", required=True, help="the folder to create")
    report.add_argument("--slices", type=int, default=4, help="test slices to draw (default 4)")
    report.add_argument("--artifacts", help=_ARTIFACTS_HELP)
    report.add_argument("--data", help="the dataset's train_eval_infer.config (default: from the study)")
    report.add_argument("--force", action="store_true", help="replace OUT if flexunet wrote it before")
    report.set_defaults(func=_cmd_report)
