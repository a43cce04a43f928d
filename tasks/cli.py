"""`lxmert-train`: pretraining and fine-tuning entry point.

The training tasks (pretrain, vqa, gqa, nlvr2) and the shared trainer land with their own issue; until
then this command names what exists and exits with status 2 instead of pretending to train.
"""

from __future__ import annotations

import argparse
import sys

TASKS = ("pretrain", "vqa", "gqa", "nlvr2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lxmert-train",
        description="Pretrain or fine-tune LXMERT on region features from an LMDB feature store.",
    )
    parser.add_argument("task", choices=TASKS, help="which task to train")
    parser.add_argument("--features", help="feature store (LMDB) written by extract-features or import-tsv")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(
        f"lxmert-train {args.task}: the training tasks are not implemented in this release yet. "
        "What exists today: `extract-features` (region features), `lxmert-features` (store tools) and the "
        "`model` package (LXMERT with checkpoint conversion).",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
