"""The ``flexunet`` command: prepare, train, evaluate, infer, summary, and (from the search
package, through the ``flexunet.commands`` entry point) ``search``.

Errors the user can fix print as one line, ``flexunet: error: ...``, and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path

from flexunet.errors import FlexUNetError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _tensorflow() -> None:
    from flexunet._tf import quiet_import

    quiet_import()


def _cmd_prepare(args: argparse.Namespace) -> int:
    from flexunet.data import ct_ich
    from flexunet.data.split import parse_fractions

    if args.folds is not None and args.split is not None:
        raise FlexUNetError("give --folds or --split, not both")
    test_patients = None
    if args.test_patients is not None:
        test_patients = [f"{int(p):03d}" if p.strip().isdigit() else p.strip() for p in args.test_patients.split(",")]
    fractions = parse_fractions(args.split) if args.split else (0.7, 0.15, 0.15)
    print(f"preparing CT-ICH from {args.src} into {args.out}", flush=True)
    report = ct_ich.prepare(Path(args.src), Path(args.out), size=args.size, fractions=fractions,
                            folds=args.folds, seed=args.seed, only_hemorrhage=args.only_hemorrhage,
                            force=args.force, test_patients=test_patients,
                            hemorrhage_types=args.hemorrhage_types)
    for line in report.lines():
        print(line)
    from flexunet.config import CONFIG_FILE

    config = Path(args.out) / ("fold_0" if args.folds else "") / CONFIG_FILE
    print(f"split by patient: {Path(args.out) / ct_ich.SPLIT_FILE}")
    print(f"ready to train: flexunet train {config}")
    return 0


def _load_config(path: str):
    from flexunet import config

    return config.load(path)


def _cmd_train(args: argparse.Namespace) -> int:
    from flexunet.data.dataset import load_split

    config = _load_config(args.config)
    data = load_split(config, "train"), load_split(config, "valid")  # bad input fails fast, before TensorFlow
    _tensorflow()
    from flexunet.train import MODEL_FILE, train

    result = train(config, data=data)
    print(f"best epoch {result.best_epoch} of {result.epochs_run} ({result.stop_reason}): "
          f"validation foreground Dice {result.best_val_dice:.4f}")
    print(f"model: {config.train.model_dir / MODEL_FILE}")
    print(f"log and curves: {config.train.eval_dir}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    _tensorflow()
    from flexunet.evaluate import evaluate, format_table

    result = evaluate(config, Path(args.model) if args.model else None)
    print(format_table(result.summary))
    print(f"written: {config.eval.output_dir / 'evaluation.csv'}, {config.eval.output_dir / 'evaluation.json'}")
    return 0


def _cmd_infer(args: argparse.Namespace) -> int:
    from flexunet.config import BINARY_RGB_MAP, ImageConfig, MaskConfig, require_dir

    if args.config:
        config = _load_config(args.config)
        images = Path(args.images) if args.images else require_dir(config.infer.images_dir, "infer", "images_dir")
        out = Path(args.out) if args.out else config.infer.output_dir
        model_path = Path(args.model) if args.model else None
    else:
        if not (args.model and args.images and args.out):
            raise FlexUNetError("infer needs CONFIG, or all of --model, --images and --out")
        config, images, out, model_path = None, Path(args.images), Path(args.out), Path(args.model)
    if not images.is_dir():
        raise FlexUNetError(f"{images}: images folder not found")
    _tensorflow()
    from flexunet.evaluate import _check_shapes, load_model
    from flexunet.infer import infer_folder, model_config_of
    from flexunet.postprocess import PostProcessing
    from flexunet.train import MODEL_FILE

    if config is not None:
        network = load_model(model_path or config.train.model_dir / MODEL_FILE)
        _check_shapes(network, config)
        model, image, mask = config.model, config.image, config.mask
    else:
        network = load_model(model_path)
        model, image = model_config_of(network), ImageConfig()
        mask = MaskConfig(rgb_map=dict(BINARY_RGB_MAP))
    postprocessing = config.postprocess if config is not None else PostProcessing()
    result = infer_folder(network, images, out, model, image, mask.palette(max(2, model.num_classes)),
                          postprocessing=postprocessing)
    print(f"{result.images} images, {result.foreground_images} with predicted foreground")
    print(f"written: {out}/masks (class index per pixel), {out}/colorized, {out}/overlays")
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from flexunet.model import estimate_cost

    config = _load_config(args.config)
    cost = estimate_cost(config.model)
    m = config.model
    print(f"FlexUNet {m.image_width}x{m.image_height}x{m.image_channels} -> {m.num_classes} classes, "
          f"{m.num_layers} levels, base {m.base_filters} filters, kernels {m.base_kernels}")
    print(f"parameters: {cost.params:,}")
    print(f"forward pass: {cost.flops / 1e9:.2f} GFLOPs per image")
    print(f"training memory (batch {config.train.batch_size}): about "
          f"{cost.train_bytes(config.train.batch_size) / 2**30:.2f} GiB")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexunet", description="FlexUNet segmentation: prepare data, train, evaluate, infer, and search "
                                     "architectures and training settings with Optuna (flexunet search).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prepare = commands.add_parser("prepare", help="turn a downloaded dataset into train/valid/test folders")
    kinds = prepare.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    ct = kinds.add_parser("ct-ich", help="CT-ICH (PhysioNet ct-ich): JPG release, NIfTI release or hu_slices")
    ct.add_argument("src", help="the downloaded dataset folder")
    ct.add_argument("out", help="the folder to create")
    ct.add_argument("--size", type=int, help="resize slices to SIZE x SIZE pixels")
    ct.add_argument("--folds", type=int, help="write K patient folds (fold_0 .. fold_K-1) instead of one split")
    ct.add_argument("--split", help="train,valid,test fractions of slices (default 0.7,0.15,0.15)")
    ct.add_argument("--seed", type=int, default=0, help="seed of the patient split (default 0)")
    ct.add_argument("--test-patients", metavar="IDS",
                    help="comma-separated patient numbers for the test part (e.g. 49,50); the others are "
                         "split into train and valid by --split's first two fractions")
    ct.add_argument("--only-hemorrhage", action="store_true",
                    help="keep only slices with hemorrhage (the seed's choice; hides false positives)")
    ct.add_argument("--hemorrhage-types", action="store_true",
                    help="one class per hemorrhage type (1 intraventricular, 2 intraparenchymal, 3 subarachnoid, "
                         "4 epidural, 5 subdural; colour masks), from the slices whose hemorrhage is of one type")
    ct.add_argument("--force", action="store_true", help="replace OUT if flexunet wrote it before")
    ct.set_defaults(func=_cmd_prepare)

    train = commands.add_parser("train", help="train FlexUNet from a train_eval_infer.config")
    train.add_argument("config")
    train.set_defaults(func=_cmd_train)

    evaluate = commands.add_parser("evaluate", help="score the trained model on the [test] split")
    evaluate.add_argument("config")
    evaluate.add_argument("--model", help="a .keras model (default: [train] model_dir/best_model.keras)")
    evaluate.set_defaults(func=_cmd_evaluate)

    infer = commands.add_parser("infer", help="predict masks for a folder of images")
    infer.add_argument("config", nargs="?")
    infer.add_argument("--model", help="a .keras model")
    infer.add_argument("--images", help="folder of images (default: [infer] images_dir)")
    infer.add_argument("--out", help="output folder (default: [infer] output_dir)")
    infer.set_defaults(func=_cmd_infer)

    summary = commands.add_parser("summary", help="parameters, FLOPs and memory of a config's model")
    summary.add_argument("config")
    summary.set_defaults(func=_cmd_summary)

    for entry in entry_points(group="flexunet.commands"):
        entry.load()(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="flexunet: %(levelname)s: %(message)s" if args.verbose else "%(message)s",
                        stream=sys.stderr)
    logging.getLogger("flexunet.config").setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except FlexUNetError as exc:
        print(f"flexunet: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("flexunet: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
