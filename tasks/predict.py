"""Evaluation and predictions with a fine-tuned model: ``lxmert-train vqa|gqa|nlvr2 --eval-only``.

::

    lxmert-train vqa --eval-only --load RUN_DIR/best --data test.json --output OUT_DIR
    lxmert-train vqa --eval-only --load RUN_DIR/best --data minival.json \\
        --annotations v2_mscoco_val2014_annotations.json --output OUT_DIR

The config is ``--config`` when given, else the run's own ``config.yaml`` (``RUN_DIR/best/../config.yaml``), else the
defaults; ``KEY=VALUE`` overrides apply on top (e.g. ``data.features=[test2015.lmdb]``). Without ``data.answers``
the answer table is the model folder's ``label2ans.json``; without ``data.features`` the stores recorded in its
``features.json``. Inference is batched (``data.eval_batch_size``) on ``train.device`` (CUDA when available),
under ``train.amp``.

OUT_DIR receives:

- the official result file of the split, whether or not it has labels: VQA ``predictions.json``
  ``[{"question_id": int, "answer": str}]`` (the server's test-dev / test-std format), GQA ``predictions.json``
  ``[{"questionId": str, "prediction": str}]`` (the server's submission format), NLVR2 ``predictions.csv``
  ``identifier,True|False`` lines;
- ``scores.json`` when there is something to score: with ``--annotations`` (the raw official file: VQA
  annotations, GQA questions, NLVR2 JSON lines) the official metric (:mod:`tasks.metrics`), under ``"official"``;
  when the split's items carry labels, LXMERT's own accuracy under ``"lxmert_accuracy"`` (VQA / GQA: soft score
  of the argmax answer / N; NLVR2: accuracy), in [0, 1].
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from common.config import load_config
from common.distributed import resolve_device

from . import gqa, nlvr2, vqa
from .config import TrainConfig
from .trainer import resolve_amp

logger = logging.getLogger(__name__)

BUILDERS = {"vqa": vqa.build, "gqa": gqa.build, "nlvr2": nlvr2.build}


def eval_config(
    task: str, load: str, config_path: str | None = None, overrides: list[str] | None = None
) -> TrainConfig:
    """The config of an evaluation: ``config_path``, else the run's ``config.yaml`` beside ``load`` (a
    ``RUN_DIR/best`` folder), else the defaults; ``overrides`` on top; ``task`` set."""
    if config_path is None:
        beside = Path(load).parent / "config.yaml"
        if Path(load).is_dir() and beside.is_file():
            config_path = str(beside)
            logger.info("config: %s (the run's own)", beside)
    config = load_config(TrainConfig, config_path, list(overrides or []))
    config.task = task  # type: ignore[assignment]
    return config


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def run_eval_only(
    config: TrainConfig, load: str, data: str, output: str | Path, annotations: str | None = None
) -> dict[str, Any]:
    """Predict every item of ``data`` (an LXMERT JSON file) with the model at ``load``; write OUT_DIR (see the
    module doc). Returns ``{"predictions": path, "count": int, "scores": {...} or None}``."""
    name = config.task
    if name not in BUILDERS:
        raise ValueError(f"--eval-only works for vqa, gqa and nlvr2, not {name!r}")
    if annotations and not Path(annotations).is_file():  # before the (long) inference, not after it
        raise FileNotFoundError(
            f"--annotations {annotations}: no such file; give the raw official file of the split (VQA annotations, "
            "GQA questions, NLVR2 JSON lines) or leave --annotations out"
        )
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    task = BUILDERS[name](config, model_folder=load)
    device = resolve_device(config.train.device or None)
    amp_dtype = resolve_amp(config.train.amp, device)
    model = task.build_model(load).to(device).eval()
    dataset = task.dataset([data], "eval")
    loader = DataLoader(
        dataset,
        batch_size=config.data.eval_batch_size,
        shuffle=False,
        collate_fn=task.collate,
        num_workers=config.data.workers,
        pin_memory=device.type == "cuda",
    )
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    with torch.no_grad(), autocast:
        preds, _ = task.predict(model, loader, device)

    if name == "nlvr2":
        pred_path = out_dir / "predictions.csv"
        _write_atomic(pred_path, task.submission_csv(preds))
        lxmert = [p.correct for p in preds if p.correct is not None]
    else:
        pred_path = out_dir / "predictions.json"
        _write_atomic(pred_path, json.dumps(task.submission(preds), indent=1) + "\n")
        lxmert = [p.score for p in preds if p.score is not None]
    if len(preds) < len(dataset.items) or len(dataset.items) < len(task.items([data])):
        logger.warning(
            "%d of the %d items of %s have no prediction (their images are in no store); the result file is "
            "incomplete for a submission",
            len(task.items([data])) - len(preds), len(task.items([data])), data,
        )  # fmt: skip

    scores: dict[str, Any] | None = None
    if lxmert or annotations:
        scores = {"task": name, "model": str(load), "data": str(data), "count": len(preds)}
        if lxmert:
            scores["lxmert_accuracy"] = sum(lxmert) / len(lxmert)
            scores["lxmert_accuracy_note"] = "LXMERT's training-time metric: " + (
                "accuracy" if name == "nlvr2" else "soft score of the argmax answer / number of questions"
            )
        if annotations:
            scores["official"] = task.official_metric(preds, annotations)
            scores["annotations"] = str(annotations)
        _write_atomic(out_dir / "scores.json", json.dumps(scores, indent=1) + "\n")
    return {"predictions": str(pred_path), "count": len(preds), "scores": scores}


def summary_lines(result: dict[str, Any]) -> list[str]:
    """What ``lxmert-train --eval-only`` prints."""
    lines = [f"{result['count']} predictions -> {result['predictions']}"]
    scores = result["scores"]
    if scores is None:
        lines.append("no labels and no --annotations: nothing scored (the file above is the submission)")
        return lines
    if "lxmert_accuracy" in scores:
        lines.append(f"LXMERT accuracy: {100 * scores['lxmert_accuracy']:.2f}%")
    official = scores.get("official")
    if official:
        if scores["task"] == "vqa":
            lines.append(
                f"official VQA accuracy: {official['overall']:.2f}%  per answer type: {official['perAnswerType']}"
            )
        elif scores["task"] == "gqa":
            lines.append(
                f"official GQA accuracy: {official['accuracy']:.2f}%  binary {official['binary']:.2f}%  "
                f"open {official['open']:.2f}%"
            )
        else:
            lines.append(
                f"official NLVR2 accuracy: {100 * official['accuracy']:.2f}%  "
                f"consistency {100 * official['consistency']:.2f}%"
            )
    return lines


def eval_only_command(config: TrainConfig, args: Any) -> int:
    """``lxmert-train TASK --eval-only`` (``args``: the CLI's ``load``, ``data``, ``annotations``, ``output``,
    ``config``, ``overrides``). Without ``--config`` the run's own ``config.yaml`` beside ``--load`` is the base.
    Prints the result; returns the exit status (2: bad arguments, 1: the evaluation failed)."""
    prog = f"lxmert-train {args.task} --eval-only"
    missing = [flag for flag, value in (("--load", args.load), ("--data", args.data)) if not value]
    if missing:
        print(
            f"{prog}: error: {' and '.join(missing)} required (the model folder and the split's JSON)",
            file=sys.stderr,
        )
        return 2
    try:
        if args.config is None:
            config = eval_config(args.task, args.load, None, args.overrides)
        result = run_eval_only(config, args.load, args.data, args.output, args.annotations)
    except (ValueError, FileNotFoundError, KeyError) as err:  # TaskDataError, MetricInputError, ConfigError
        print(f"{prog}: {err}", file=sys.stderr)
        return 1
    for line in summary_lines(result):
        print(line)
    return 0
