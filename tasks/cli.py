"""`lxmert-train`: pretrain or fine-tune LXMERT with the shared trainer.

    lxmert-train pretrain --config tasks/configs/pretrain_tiny.yaml --output runs/tiny [KEY=VALUE ...]
    lxmert-train pretrain --config CONFIG.yaml --output RUN_DIR --resume
    torchrun --nproc_per_node 4 --no-python lxmert-train pretrain --config CONFIG.yaml --output RUN_DIR

The config file fills :class:`tasks.config.TrainConfig`; ``KEY=VALUE`` overrides any key (the value read as
YAML: ``optim.lr=1e-4 data.features=[coco.lmdb,vg.lmdb]``). Exit status: 0 trained (or, with ``--resume``, the
run had already finished: nothing to do); 2 refused before any work, one line (a config error or a value out of
its range, RUN_DIR in use by another run); 1 a run that has to stop (non-finite losses, no usable checkpoint, bad
input data or a damaged record, a full disk) prints why in one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from common.config import ConfigError, field_choices, field_default, load_config
from common.lock import FolderLocked
from tasks.config import TrainConfig, TrainLoopConfig
from tasks.engine.checkpointing import CheckpointError, find_resume_checkpoint, load_trainer_state
from tasks.engine.trainer import TrainingStopped, train
from tasks.finetune.evaluate import run_config_beside, run_eval_only, summary_lines
from tasks.registry import FINETUNE_TASKS, TASKS, build_task


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lxmert-train",
        description="Pretrain or fine-tune LXMERT on region features from LMDB feature stores "
        "(one process, or one per device under torchrun).",
    )
    parser.add_argument("task", choices=field_choices(TrainConfig, "task"), help="which task to train")
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
        "--load",
        metavar="CHECKPOINT",
        help="starting weights: any LXMERT checkpoint (directory, file or Hub id), or a BERT one "
        "(bert-base-uncased: the language side, as the original without --fromScratch)",
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
    """The config file + overrides (``--amp`` among them), with ``task`` from the command line (refused if the
    file names another). ``--eval-only`` without ``--config``: the run's own ``config.yaml`` beside ``--load``."""
    overrides = list(args.overrides) + ([f"train.amp={args.amp}"] if args.amp else [])
    path = args.config
    if path is None and args.eval_only and args.load:
        path = run_config_beside(args.load)
    config = load_config(TrainConfig, path, overrides)
    if config.task != args.task and config.task != field_default(TrainConfig, "task"):
        raise ConfigError(f"{path}: task is {config.task!r}, but the command is `lxmert-train {args.task}`")
    return dataclasses.replace(config, task=args.task)


def starting_load(args: argparse.Namespace) -> str | None:
    """``--load``, or with ``--resume`` the ``--load`` the run was started with."""
    if args.load or not args.resume:
        return args.load
    try:
        return load_trainer_state(find_resume_checkpoint(args.output)).get("load")
    except CheckpointError:
        return None  # the trainer says what is wrong


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if args.config is None and not args.eval_only:
        print("lxmert-train: error: --config is required for training", file=sys.stderr)
        return 2
    if args.max_steps is not None and args.max_steps < 1:
        print("lxmert-train: error: --max-steps must be >= 1", file=sys.stderr)
        return 2
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        print(
            f"lxmert-train: error: --output {args.output} is a file; give a run directory (a new one, or the "
            "run to continue with --resume)",
            file=sys.stderr,
        )
        return 2
    if args.task not in TASKS:
        print(
            f"lxmert-train: error: the task {args.task!r} is not available in this install", file=sys.stderr
        )
        return 2
    if args.eval_only:
        return eval_only(args)
    try:
        config = resolve_config(args)
    except ConfigError as err:
        print(f"lxmert-train: error: {err}", file=sys.stderr)
        return 2
    _setup_logging()
    try:
        load = starting_load(args)
        task = build_task(config, load)
        summary = train(config, task, args.output, load=load, resume=args.resume, max_steps=args.max_steps)
    except (ConfigError, FolderLocked) as err:
        print(f"lxmert-train: error: {err}", file=sys.stderr)
        return 2
    except (TrainingStopped, CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"lxmert-train {args.task}: {err}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(_summary_text(args.task, summary))
    return 0


def eval_only(args: argparse.Namespace) -> int:
    """``lxmert-train TASK --eval-only``: predict and score ``--data`` with ``--load``; prints the result; returns
    the exit status (2: bad arguments, 1: the evaluation failed)."""
    prog = f"lxmert-train {args.task} --eval-only"
    if args.task not in FINETUNE_TASKS:
        print(f"lxmert-train: error: {args.task} has no --eval-only path", file=sys.stderr)
        return 2
    missing = [flag for flag, value in (("--load", args.load), ("--data", args.data)) if not value]
    if missing:
        print(
            f"{prog}: error: {' and '.join(missing)} required (the model folder and the split's JSON)",
            file=sys.stderr,
        )
        return 2
    _setup_logging()
    try:
        config = resolve_config(args)
    except ConfigError as err:
        print(f"lxmert-train: error: {err}", file=sys.stderr)
        return 2
    try:
        task = build_task(config, args.load)
        result = run_eval_only(task, config, args.load, args.data, args.output, args.annotations)
    except (ValueError, FileNotFoundError, KeyError) as err:  # DataFormatError, MetricInputError, ConfigError
        print(f"{prog}: {err}", file=sys.stderr)
        return 1
    for line in summary_lines(result):
        print(line)
    return 0


def _setup_logging() -> None:
    is_main = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def _summary_text(task: str, summary: dict) -> str:
    if summary.get("nothing_to_do"):
        how = "finished" if summary["completed"] else "stopped (--max-steps)"
        return (
            f"lxmert-train {task}: already {how} at step {summary['step']}/{summary['t_total']} "
            f"({summary['epochs_done']} epochs); nothing to do\n  model: {summary['final']}"
            + (f"\n  best:  {summary['best']}" if summary["best"] else "")
        )
    valid = ", ".join(f"{k} {v:.4f}" for k, v in summary["valid"].items() if isinstance(v, (int, float)))
    loss = summary["train_loss"]
    return (
        f"lxmert-train {task}: {'done' if summary['completed'] else 'stopped'} at step {summary['step']}"
        f"/{summary['t_total']} ({summary['epochs_done']} epochs) in {summary['seconds']:.0f} s; last train loss "
        + (f"{loss:.4f}" if loss is not None else "-") + (f"; valid: {valid}" if valid else "")
        + (f"; {summary['bad_steps']} steps skipped (non-finite loss)" if summary["bad_steps"] else "")
        + _dropped_text(summary.get("dropped_items") or {})
        + f"\n  model: {summary['final']}" + (f"\n  best:  {summary['best']}" if summary["best"] else "")
    )  # fmt: skip


def _dropped_text(dropped: dict[str, int]) -> str:
    if not dropped:
        return ""
    counts = ", ".join(f"{split} {n}" for split, n in dropped.items())
    return f"\n  items left out (an image in no feature store): {counts}"


if __name__ == "__main__":
    raise SystemExit(main())
