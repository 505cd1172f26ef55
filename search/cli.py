"""``flexunet search ...``: run, status, export, dashboard, proxy and report, registered into the
``flexunet`` command through the ``flexunet.commands`` entry point."""

from __future__ import annotations

import argparse
import os
from typing import Any

from flexunet.errors import FlexUNetError

# Everything else is imported where used: the command starts without loading TensorFlow.


def _study(args: argparse.Namespace):  # -> search.OpenedStudy
    """The study a command names: a study file (with --study, --storage, --run-dir), or
    --study NAME with --storage URL."""
    from search.api import Study, load_study

    if args.study_file:
        study = Study.from_file(args.study_file, storage=args.storage, out=args.run_dir or None)
        study.name = args.study
        return study.open()
    if not args.study:
        raise FlexUNetError("name the study: give STUDY.toml or --study NAME")
    return load_study(args.study, args.storage)


def _exit_status(run: Any) -> int:
    """0 when ``run()`` spent the study's budget; the exit status of the StudyError it raised
    otherwise (the launcher has said why on the terminal). Bad input goes on to the one-line
    error of every flexunet command (status 2)."""
    from search.errors import BadInput, StudyError

    try:
        run()
    except BadInput:
        raise
    except StudyError as exc:
        return exc.exit_code
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from search.api import Study

    study = Study.from_file(args.study_file, storage=args.storage, out=args.out, artifacts=args.artifacts,
                            n_trials=args.n_trials, timeout=args.timeout, max_epochs=args.max_epochs,
                            image_size=args.image_size, refit=args.refit)
    gpus = tuple(g.strip() for g in args.gpus.split(",") if g.strip()) if args.gpus else ()
    return _exit_status(lambda: study.run(workers=args.workers, gpus=gpus, workers_per_gpu=args.workers_per_gpu))


def _cmd_refit(args: argparse.Namespace) -> int:
    from search.api import Study

    study = Study.from_file(args.study_file, storage=args.storage, out=args.out, artifacts=args.artifacts)
    gpus = tuple(g.strip() for g in args.gpus.split(",") if g.strip()) if args.gpus else ()
    return _exit_status(lambda: study.refit(workers=args.workers, gpus=gpus, workers_per_gpu=args.workers_per_gpu))


def _cmd_create(args: argparse.Namespace) -> int:
    from search.api import Study
    from search.results.status import summary_lines

    study = Study.from_file(args.study_file, storage=args.storage, out=args.out, artifacts=args.artifacts,
                            image_size=args.image_size)
    for line in summary_lines(study.create().optuna_study):
        print(line)
    print("workers join with: flexunet search run " + str(args.study_file) + " --storage URL")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    for line in _study(args).status():
        print(line)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from flexunet.evaluate import format_table

    result = _study(args).export(args.out, trial=args.trial, force=args.force, data=args.data,
                                 artifacts=args.artifacts, tta=args.tta, refit=args.refit)
    package = result.package
    if package.refit is not None:
        expected = package.selection.dice_postprocessed if package.selection else float("nan")
        low, high = package.oof_interval or (float("nan"), float("nan"))
        print(f"exported the refit ensemble ({package.members} models; configurations of trials "
              f"{', '.join(str(n) for n, w in zip(package.refit.configurations, package.refit.weights) if w)}; "
              f"TTA {package.tta_mode}) to {result.out}")
        print(f"expected Dice (pooled out-of-fold, as exported; optimistic: the same patients chose each model's "
              f"epoch and the ensemble): {expected:.4f}, 95% interval over patients {low:.4f}-{high:.4f}; "
              f"post-processing: {package.postprocessing.describe()}")
    else:
        print(f"exported trial {result.trial.number} (validation foreground Dice {result.trial.values[0]:.4f}) "
              f"to {result.out}")
    if package.refit is None and package.members > 1:
        print(f"ensemble of {package.members} fold models, horizontal-flip TTA {'on' if package.tta else 'off'}; "
              f"post-processing: {package.postprocessing.describe()}")
    print("test split:")
    print(format_table(result.test_summary))
    print("files: " + ", ".join(result.files))
    return 0


def _cmd_proxy(args: argparse.Namespace) -> int:
    import logging
    import sys

    from search.results import dashboard as db
    from search.store import proxy_server
    from search.store import urls

    url = args.storage or os.environ.get(urls.ENV_VAR)
    if not url:
        raise FlexUNetError(f"the proxy needs --storage URL (or ${urls.ENV_VAR}): the study's database")
    if not db.is_loopback(args.host):
        print(f"warning: the proxy listens on {args.host}, not only on this machine; it has no authentication, "
              "and anyone who reaches it can read and write every study in the database (keep it on a "
              "private network)", file=sys.stderr)
    given = {name: value for name, value in (("port", args.port), ("threads", args.threads),
                                                ("connections", args.connections)) if value is not None}
    for name, value in given.items():
        if value < (0 if name == "port" else 1) or value > 65535:
            raise FlexUNetError(f"--{name} {value}: out of range")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s proxy %(levelname)s %(message)s")
    url = urls.normalize(url)
    proxy_server.serve(url, host=args.host, **given,
                ready=lambda client: print(f"proxy of {urls.mask(url)} listening; workers join with --storage {client} "
                                           "(Ctrl-C stops it)", flush=True))
    return 0


def _dashboard_needs_a_database(url: str) -> None:
    from search.store import urls

    if urls.kind(url) == "grpc":  # optuna-dashboard reads Optuna's tables, not the proxy's protocol
        raise FlexUNetError(f"--storage {url}: the dashboard needs the database itself, not the proxy: pass the "
                            "database URL that `flexunet search proxy` serves (postgresql://..., mysql://...)")


def _cmd_dashboard(args: argparse.Namespace) -> int:
    import sys

    import optuna

    from search.store import _internals
    from search.store import artifacts as af
    from search.results import dashboard as db
    from search.keys import STUDY_DATASET
    from search.store import storage as st
    from search.store import urls

    warning = db.exposure_warning(args.host)
    if warning:
        print(warning, file=sys.stderr)
    if args.study_file or args.study:
        target = _study(args)
        _dashboard_needs_a_database(target.url)
        study = target.optuna_study
        storage, url, studies, first = _internals.study_storage(study), target.url, [study], study
    else:
        url = args.storage or os.environ.get(urls.ENV_VAR)
        if not url:
            raise FlexUNetError("name the study: give STUDY.toml, --study NAME or --storage URL")
        url = urls.normalize(url)
        _dashboard_needs_a_database(url)
        storage = st.open_storage(url, heartbeat=False, create=False)
        studies = [st.load_study(storage, name) for name in optuna.study.get_all_study_names(storage)]
        target, first = None, (studies[0] if len(studies) == 1 else None)
    if args.artifacts:
        stores, missing = [af.open_store(af.parse(args.artifacts, where="--artifacts"))], []
    elif target is not None and target.store is not None:  # the study file's store, or <out>/artifacts
        stores, missing = db.artifact_stores(studies, [target.store])
    else:
        stores, missing = db.artifact_stores(studies)
    for line in missing:
        print(f"{line}: its artifacts are not shown ({af.HINT})", file=sys.stderr)
    for study in studies:
        if STUDY_DATASET in study.user_attrs:  # a flexunet study: refresh its note
            db.write_study_note(study, urls.mask(url))
    page = f"/dashboard/studies/{storage.get_study_id_from_name(first.study_name)}" if first else "/dashboard"
    print(f"optuna-dashboard: {len(studies)} {'study' if len(studies) == 1 else 'studies'} on {urls.mask(url)}, "
          f"artifacts from {', '.join(str(s.location) for s in stores) or 'nowhere'}")
    db.serve(storage, stores, host=args.host, port=args.port,
             ready=lambda base: print(f"open {base}{page} (Ctrl-C stops it)", flush=True))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from search.results.report import REPORT_FILE

    study = _study(args)
    result = study.report(args.out, slices=args.slices, force=args.force, data=args.data, artifacts=args.artifacts)
    print(f"report of study {study.name!r}: best trial {result.best.number}"
          + (f" against the baseline (trial {result.baseline.number})" if result.baseline else ""))
    print(f"open {result.out / REPORT_FILE}")
    print("files: " + ", ".join(result.files))
    if result.missing:
        import sys

        from search.store.artifacts import HINT

        print(f"warning: the page lacks {len(result.missing)} trial file(s) the "
              f"{result.missing[0].location.describe()} does not give: "
              + "; ".join(f"trial {m.trial}'s {m.filename}" + (f" ({m.reason})" if m.reason else "")
                          for m in result.missing) + f" ({HINT})", file=sys.stderr)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from pathlib import Path

    from search import paths
    from search.spec.planner import plan

    gpus = tuple(g.strip() for g in args.gpus.split(",") if g.strip()) if args.gpus else ()
    print(f"planning a study of {args.data} for {args.minutes:g} minutes"
          + (" (measuring this device: under a minute)" if not args.throughput else ""), flush=True)
    result = plan(Path(args.data), args.minutes, out=Path(args.out), name=args.name, workers=args.workers,
                  gpus=gpus, throughput=Path(args.throughput) if args.throughput else None,
                  hemorrhage_types=args.hemorrhage_types, fingerprint=Path(args.fingerprint) if args.fingerprint else None)
    for line in result.lines():
        print(line)
    out = Path(args.out)
    print(f"wrote {out} (and {paths.plan_fingerprint(out).name}, {paths.plan_throughput(out).name} beside it); "
          f"run it with: flexunet search run {out}")
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


def _worker_arguments(parser: argparse.ArgumentParser) -> None:
    """What the commands that start local workers (run, refit) take."""
    parser.add_argument("study_file", metavar="STUDY.toml")
    parser.add_argument("--storage", help="storage URL (default: $FLEXUNET_STORAGE, the study file's, "
                                          "or sqlite:///OUT/study.db)")
    parser.add_argument("--workers", type=int, help="local worker processes (default 1)")
    parser.add_argument("--gpus", help="comma-separated GPU ids, one per local worker (round robin); workers "
                                       "sharing a GPU share its memory evenly")
    parser.add_argument("--workers-per-gpu", type=int, metavar="N",
                        help="with --gpus: N workers on each GPU, each with 1/N of its memory")


def register(commands: argparse._SubParsersAction) -> None:
    search = commands.add_parser("search", help="run, watch and export Optuna studies over FlexUNet")
    sub = search.add_subparsers(dest="search_command", required=True, metavar="SUBCOMMAND")

    run = sub.add_parser("run", help="run a study with K local workers (other machines join with the same command)")
    _worker_arguments(run)
    run.add_argument("--n-trials", type=int, help="override [budget] n_trials")
    run.add_argument("--timeout", type=float, help="override [budget] timeout (seconds)")
    run.add_argument("--max-epochs", type=int, help="override [budget] max_epochs")
    run.add_argument("--image-size", type=int, help="override the image size (square, pixels)")
    run.add_argument("--no-refit", dest="refit", action="store_false",
                     help="search only, with the whole timeout; the study file's [refit] is left for "
                          "`flexunet search refit`")
    run.add_argument("--out", help="output folder (default: runs/<study name>)")
    run.add_argument("--artifacts", help=_ARTIFACTS_HELP_RUN)
    run.set_defaults(func=_cmd_run)

    refit = sub.add_parser("refit", help="train the best configurations again as fold x seed models ([refit] in "
                                         "the study file; `run` does it when the search ends)")
    _worker_arguments(refit)
    refit.add_argument("--out", help="output folder (default: runs/<study name>)")
    refit.add_argument("--artifacts", help=_ARTIFACTS_HELP_RUN)
    refit.set_defaults(func=_cmd_refit)

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
    export.add_argument("--trial", type=int, help="export this search trial instead of the refit (or the best trial)")
    export.add_argument("--no-refit", dest="refit", action="store_false",
                        help="export the best search trial even where the study has a refit")
    export.add_argument("--artifacts", help=_ARTIFACTS_HELP)
    export.add_argument("--data", help="the dataset's train_eval_infer.config (default: from the study)")
    export.add_argument("--force", action="store_true", help="replace OUT if flexunet wrote it before")
    export.add_argument("--no-tta", dest="tta", action="store_false",
                        help="a cross-validated trial's ensemble without horizontal-flip test-time augmentation")
    export.set_defaults(func=_cmd_export)

    dashboard = sub.add_parser("dashboard", help="watch studies in optuna-dashboard, with every trial's artifacts")
    _study_arguments(dashboard)
    dashboard.add_argument("--artifacts", help=_ARTIFACTS_HELP)
    dashboard.add_argument("--host", default="127.0.0.1",
                           help="address to listen on (default 127.0.0.1; the dashboard has no authentication)")
    dashboard.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080; 0: any free)")
    dashboard.set_defaults(func=_cmd_dashboard)

    proxy = sub.add_parser("proxy", help="serve a study database to any number of workers through Optuna's gRPC "
                                         "proxy (workers then use --storage grpc://HOST:PORT)")
    proxy.add_argument("--storage", help="the database URL to serve (default: $FLEXUNET_STORAGE)")
    proxy.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1; 0.0.0.0 for other machines: no authentication)")
    proxy.add_argument("--port", type=int, help="port to listen on (default 13000, Optuna's)")
    proxy.add_argument("--threads", type=int, help="request threads (default 16)")
    proxy.add_argument("--connections", type=int,
                       help="database connections the proxy holds for all its workers (default 4)")
    proxy.set_defaults(func=_cmd_proxy)

    report = sub.add_parser("report", help="one self-contained HTML page of figures: the study, and the best "
                                           "trial against the baseline on test slices")
    _study_arguments(report)
    report.add_argument("--out", required=True, help="the folder to create")
    report.add_argument("--slices", type=int, default=4, help="test slices to draw (default 4)")
    report.add_argument("--artifacts", help=_ARTIFACTS_HELP)
    report.add_argument("--data", help="the dataset's train_eval_infer.config (default: from the study)")
    report.add_argument("--force", action="store_true", help="replace OUT if flexunet wrote it before")
    report.set_defaults(func=_cmd_report)

    plan = sub.add_parser("plan", help="size a study for a dataset, this device and a time budget, and write it")
    plan.add_argument("data", metavar="DATA", help="a CT-ICH download folder (as prepare reads it) or a "
                                                   "train_eval_infer.config of folder pairs")
    plan.add_argument("--minutes", type=float, required=True, help="the whole study's wall time: search and export")
    plan.add_argument("--out", required=True, metavar="STUDY.toml", help="the study file to write")
    plan.add_argument("--name", help="the study's name (default: from the file name)")
    plan.add_argument("--workers", type=int, default=1, help="local workers it will run with (on a CPU they share "
                                                             "its cores)")
    plan.add_argument("--gpus", help="comma-separated GPU ids it will run on, one worker each")
    plan.add_argument("--throughput", metavar="FILE", help="a throughput.json written by an earlier plan, instead "
                                                           "of measuring this device")
    plan.add_argument("--fingerprint", metavar="FILE", help="a STUDY.fingerprint.json written by an earlier plan, "
                                                            "instead of reading DATA (which then need not be here)")
    plan.add_argument("--hemorrhage-types", action="store_true",
                      help="CT-ICH: plan the multi-class dataset (prepare --hemorrhage-types)")
    plan.set_defaults(func=_cmd_plan)
