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

import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from common.distributed import resolve_device
from tasks.config import TrainConfig
from tasks.data.jsonio import write_json, write_text
from tasks.engine.precision import autocast, resolve_amp, set_tf32

logger = logging.getLogger(__name__)

__all__ = ["run_config_beside", "run_eval_only", "summary_lines"]


def run_config_beside(load: str) -> str | None:
    """The run's own ``config.yaml`` beside a model folder (``RUN_DIR/best`` -> ``RUN_DIR/config.yaml``), or None."""
    beside = Path(load).parent / "config.yaml"
    if Path(load).is_dir() and beside.is_file():
        logger.info("config: %s (the run's own)", beside)
        return str(beside)
    return None


def run_eval_only(
    task: Any, config: TrainConfig, load: str, data: str, output: str | Path, annotations: str | None = None
) -> dict[str, Any]:
    """Predict every item of ``data`` (an LXMERT JSON file) with the model at ``load``, using ``task`` (a
    fine-tuning task built with ``load`` as its model folder); write OUT_DIR (see the module doc). Returns
    ``{"predictions": path, "count": int, "scores": {...} or None}``."""
    if annotations and not Path(annotations).is_file():  # before the (long) inference, not after it
        raise FileNotFoundError(
            f"--annotations {annotations}: no such file; give the raw official file of the split (VQA annotations, "
            "GQA questions, NLVR2 JSON lines) or leave --annotations out"
        )
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.train.device or None)
    amp_dtype = resolve_amp(config.train.amp, device)
    set_tf32(device, config.train.tf32)
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
    with torch.no_grad(), autocast(device, amp_dtype):
        preds, _ = task.predict(model, loader, device)

    pred_path = write_text(out_dir / task.prediction_file, task.submission_text(preds))
    lxmert = task.lxmert_scores(preds)
    total = len(task.items([data]))
    if len(preds) < total:
        logger.warning(
            "%d of the %d items of %s have no prediction (their images are in no store); the result file is "
            "incomplete for a submission",
            total - len(preds), total, data,
        )  # fmt: skip

    scores: dict[str, Any] | None = None
    if lxmert or annotations:
        scores = {"task": task.name, "model": str(load), "data": str(data), "count": len(preds)}
        if lxmert:
            scores["lxmert_accuracy"] = sum(lxmert) / len(lxmert)
            scores["lxmert_accuracy_note"] = "LXMERT's training-time metric: " + task.lxmert_metric
        if annotations:
            scores["official"] = task.official_metric(preds, annotations)
            scores["annotations"] = str(annotations)
        write_json(out_dir / "scores.json", scores, indent=1)
    summary = task.official_summary(scores["official"]) if scores and annotations else None
    return {"predictions": str(pred_path), "count": len(preds), "scores": scores, "official_summary": summary}


def summary_lines(result: dict[str, Any]) -> list[str]:
    """What ``lxmert-train --eval-only`` prints."""
    lines = [f"{result['count']} predictions -> {result['predictions']}"]
    scores = result["scores"]
    if scores is None:
        lines.append("no labels and no --annotations: nothing scored (the file above is the submission)")
        return lines
    if "lxmert_accuracy" in scores:
        lines.append(f"LXMERT accuracy: {100 * scores['lxmert_accuracy']:.2f}%")
    if result.get("official_summary"):
        lines.append(result["official_summary"])
    return lines
