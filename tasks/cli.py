"""`lxmert-train`: pretrain or fine-tune LXMERT with the shared trainer.

    lxmert-train pretrain --config tasks/configs/pretrain_tiny.yaml --output runs/tiny [KEY=VALUE ...]
    lxmert-train pretrain --config CONFIG.yaml --output RUN_DIR --resume
    torchrun --nproc_per_node 4 --no-python lxmert-train pretrain --config CONFIG.yaml --output RUN_DIR

The config file fills :class:`tasks.config.TrainConfig`; ``KEY=VALUE`` overrides any key (the value read as
YAML: ``optim.lr=1e-4 data.features=[coco.lmdb,vg.lmdb]``). Config errors print one line and exit 2; a run
that has to stop (non-finite losses, no usable checkpoint, bad input data) prints why and exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable

from common.config import ConfigError, field_choices, field_default, load_config

from . import gqa, nlvr2, predict, pretrain, vqa
from .checkpointing import CheckpointError
from .config import TrainConfig, TrainLoopConfig
from .task import Task
from .trainer import TrainingStopped, train

#: Task name -> its module's ``build(config) -> Task``. Fine-tuning tasks register here.
BUILDERS: dict[str, Callable[[TrainConfig], Task]] = {
    "pretrain": pretrain.build,
    "vqa": vqa.build,
    "gqa": gqa.build,
    "nlvr2": nlvr2.build,
}
#: Task name -> ``evaluate(config, args) -> exit status`` for ``--eval-only`` (``args.load``, ``args.data``,
#: ``args.annotations``, ``args.output``); tasks with an evaluation-only path register here.
EVALUATORS: dict[str, Callable[[TrainConfig, argparse.Namespace], int]] = {
    name: predict.eval_only_command for name in ("vqa", "gqa", "nlvr2")
}

TASKS = field_choices(TrainConfig, "task")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lxmert-train",
        description="Pretrain or fine-tune LXMERT on region features from LMDB feature stores "
        "(one process, or one per device under torchrun).",
    )
    parser.add_argument("task", choices=TASKS, help="which task to train")
    parser.add_argument(
        "--config",
        metavar="CONFIG.yaml",
        help="the run's config (YAML); required for training (--eval-only: default RUN_DIR/config.yaml of --load)",
    )
    parser.add_argument(
        "--output",
        required=True,
        metavar="RUN_DIR",
        help="run directory: logs, checkpoints, final/ and best/",
    )
    parser.add_argument(
        "--load", metavar="CHECKPOINT", help="starting weights: any LXMERT checkpoint (directory or file)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from RUN_DIR/checkpoints/latest (or the newest intact one)",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        metavar="N",
        help="stop once the run has taken N optimizer steps in all (a checkpoint is saved); the learning-rate "
        "schedule still follows train.epochs, so --resume later continues the same run",
    )
    parser.add_argument(
        "--amp",
        choices=field_choices(TrainLoopConfig, "amp"),
        help="mixed precision (same as train.amp=...; default: the config's, "
        f"{field_default(TrainLoopConfig, 'amp')!r} = bf16 on CUDA and on CPUs with native bf16, else none)",
    )
    parser.add_argument(
        "--eval-only",
        action="store_true",
        help="evaluate --load on --data instead of training (fine-tuning tasks)",
    )
    parser.add_argument("--data", metavar="SPLIT.json", help="--eval-only: the items to evaluate")
    parser.add_argument(
        "--annotations", metavar="RAW", help="--eval-only: official annotations for the metric"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=5e-5"
    )
    return parser


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """The config file + overrides, with ``task`` from the command line (refused if the file names another)."""
    overrides = list(args.overrides) + ([f"train.amp={args.amp}"] if args.amp else [])
    config = load_config(TrainConfig, args.config, overrides)
    if config.task != args.task and config.task != field_default(TrainConfig, "task"):
        raise ConfigError(
            f"{args.config}: task is {config.task!r}, but the command is `lxmert-train {args.task}`"
        )
    return dataclasses.replace(config, task=args.task)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if args.config is None and not args.eval_only:
        print("lxmert-train: error: --config is required for training", file=sys.stderr)
        return 2
    try:
        config = resolve_config(args)
    except ConfigError as err:
        print(f"lxmert-train: error: {err}", file=sys.stderr)
        return 2
    build = BUILDERS.get(args.task)
    if build is None:
        print(
            f"lxmert-train: error: the task {args.task!r} is not available in this install", file=sys.stderr
        )
        return 2
    if args.max_steps is not None and args.max_steps < 1:
        print("lxmert-train: error: --max-steps must be >= 1", file=sys.stderr)
        return 2
    is_main = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.eval_only:
        evaluate = EVALUATORS.get(args.task)
        if evaluate is None:
            print(f"lxmert-train: error: {args.task} has no --eval-only path", file=sys.stderr)
            return 2
        return evaluate(config, args)
    try:
        task = build(config)
        summary = train(
            config, task, args.output, load=args.load, resume=args.resume, max_steps=args.max_steps
        )
    except ConfigError as err:
        print(f"lxmert-train: error: {err}", file=sys.stderr)
        return 2
    except (TrainingStopped, CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"lxmert-train {args.task}: {err}", file=sys.stderr)
        return 1
    if is_main:
        valid = ", ".join(f"{k} {v:.4f}" for k, v in summary["valid"].items() if isinstance(v, (int, float)))
        print(
            f"lxmert-train {args.task}: {'done' if summary['completed'] else 'stopped'} at step {summary['step']}"
            f"/{summary['t_total']} ({summary['epochs_done']} epochs) in {summary['seconds']:.0f} s; last train loss "
            f"{summary['train_loss']:.4f}" + (f"; valid: {valid}" if valid else "")
            + (f"; {summary['bad_steps']} steps skipped (non-finite loss)" if summary["bad_steps"] else "")
            + f"\n  model: {summary['final']}" + (f"\n  best:  {summary['best']}" if summary["best"] else "")
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
