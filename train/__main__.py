"""`python -m train --data DIR --config tiny|r50|effv2s|... --out RUN_DIR [--steps N --batch-size B ...]`: train DELG.
`python -m train --data DIR --recipe NAME --out DIR [flags]` trains a recipe's stages one after another into
DIR/1-STAGE, DIR/2-STAGE, ... (each from the one before); the same command resumes it stage by stage.

Every TrainConfig field is a flag (--field-name) that overrides the named config; a flag of several numbers
takes them comma- or space-separated (--dynamic-margin 0.4,0.25,0.05).

With --strategy multiworker, start the same command on every worker, each with its own TF_CONFIG. Worker 0
(the chief) restores and writes RUN_DIR; the others take the chief's state at start and keep nothing of
their own. SIGTERM or Ctrl-C on any worker checkpoints the whole group at one step and stops it; when a
worker dies outright, the others end with one error line. Either way, restart every worker with the same
command: the group resumes at the chief's newest checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
from pathlib import Path

from common.cli import KitArgumentParser, UserError, check_not_an_input, run_main
from train.config import CONFIGS, FIELD_RULES, TrainConfig, get_config
from train.loop import train
from train.precision import legacy_mixed_precision
from train.recipes import RECIPES, recipe_help, run_recipe
from train.strategy import STRATEGIES

log = logging.getLogger("train")

SCALARS = {"str": str, "int": int, "float": float}
DEFAULT_CONFIG = "tiny"


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, typed from its annotation; unset flags keep the named config's value."""
    group = parser.add_argument_group("config overrides (defaults: the named --config)")
    for field in dataclasses.fields(TrainConfig):
        flag, kind = f"--{field.name.replace('_', '-')}", str(field.type)
        defaults = ", ".join(f"{name}: {getattr(cfg, field.name)}" for name, cfg in CONFIGS.items())
        if field.name in FIELD_RULES:
            defaults += f" ({FIELD_RULES[field.name][1]})"
        if kind == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=defaults)
        elif kind.startswith("tuple["):
            element = SCALARS[kind.removeprefix("tuple[").split(",")[0].rstrip("]")]
            group.add_argument(flag, type=comma_separated(element), nargs="+", default=None, help=defaults)
        else:
            group.add_argument(flag, type=SCALARS[kind], default=None, help=defaults)


def comma_separated(element: type):
    """An argparse type: 'a,b,c' (or one value) -> a list of `element`."""

    def parse(text: str) -> list:
        return [element(part) for part in text.split(",")]

    parse.__name__ = element.__name__  # argparse names it in "invalid float value"
    return parse


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The config fields given on the command line."""
    overrides = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None
    }
    overrides = {
        name: tuple(x for part in v for x in part) if isinstance(v, list) else v for name, v in overrides.items()
    }
    if overrides.get("init_from"):  # the run it continues gives the weights, not the named config's ImageNet
        overrides.setdefault("backbone_weights", "none")
    return overrides


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return get_config(args.config or DEFAULT_CONFIG, **overrides_from_args(args))


def main(argv: list[str] | None = None) -> int:
    summary, _, multiworker = __doc__.split("\n\n")
    parser = KitArgumentParser(
        prog="python -m train",
        description=summary,
        epilog=multiworker,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, help="GLDv2/Kaggle folder with train.csv and train/a/b/c/<id>.jpg")
    parser.add_argument("--tfrecords", type=Path, help="train from shards written by `python -m train.tfrecords`")
    parser.add_argument("--config", choices=sorted(CONFIGS), help=f"named config (default {DEFAULT_CONFIG})")
    parser.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        help="train a recipe's stages in order (its own config; flags apply to every stage): " + recipe_help(),
    )
    parser.add_argument("--out", type=Path, required=True, help="run folder: checkpoints, logs, metrics.json")
    parser.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="auto",
        help="tf.distribute strategy; auto: TPU if present, mirrored with >1 GPU, else default",
    )
    parser.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue from the newest checkpoint in --out when there is one (default on)",
    )
    parser.add_argument(
        "--mixed-precision",
        action="store_true",
        help="old spelling of --precision float16 on a GPU, bfloat16 elsewhere",
    )
    add_config_flags(parser)
    args = parser.parse_args(argv)
    if (args.data is None) == (args.tfrecords is None):
        raise UserError("give exactly one of --data and --tfrecords")
    check_not_an_input("--out", args.out, [("--data", args.data), ("--tfrecords", args.tfrecords)], replaces_out=False)
    if args.mixed_precision and args.precision is None:
        args.precision = legacy_mixed_precision()
        log.warning("--mixed-precision means --precision %s on this machine; use --precision", args.precision)
    if args.recipe and args.config:
        raise UserError(f"--recipe {args.recipe} trains its own config ({RECIPES[args.recipe].config}); drop --config")

    def train_run(cfg: TrainConfig, run_dir: Path) -> dict:
        return train(
            cfg,
            data_dir=args.data,
            run_dir=run_dir,
            strategy=args.strategy,
            resume=args.resume,
            tfrecords=args.tfrecords,
        )

    if args.recipe:
        metrics = run_recipe(args.recipe, args.out, overrides_from_args(args), train_run)
        args.out = Path(metrics["run_dir"])
    else:
        metrics = train_run(config_from_args(args), args.out)
    print(
        f"step {metrics['step']}/{metrics['steps']}: loss {metrics.get('loss_total', float('nan')):.4f}, "
        f"validation accuracy {metrics['validation_accuracy']}, {metrics.get('images_per_second', 0):.0f} "
        f"images/s, {metrics['skipped_images']} unreadable images skipped -> {args.out}"
    )
    stopped_by = metrics["stopped_by"]
    return 128 + signal.Signals[stopped_by].value if stopped_by else 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
