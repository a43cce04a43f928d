"""The parts :meth:`tasks.answer.answerer.Answerer.load` checks and loads, each refusing with one clear
:class:`~tasks.answer.results.AnswerSetupError`: the model path, its answer head and answer table, the model
folder's extractor and feature records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from model import LxmertForQuestionAnswering
from tasks.answer.results import AnswerSetupError, ExtractorCheck
from tasks.data.answer_table import load_answer_table
from tasks.data.jsonio import DataFormatError
from tasks.data.model_folder import (
    LABEL2ANS_FILE,
    WEIGHTS_NAME,
    ModelLoadError,
    read_extractor_record,
    read_feature_stats,
    reading_model,
)
from tasks.data.regions import FeatureStats


def check_table(answers: list[str], model: LxmertForQuestionAnswering) -> None:
    if len(answers) != model.config.num_qa_labels:
        raise AnswerSetupError(
            f"the answer table has {len(answers)} answers but the model's answer head has "
            f"{model.config.num_qa_labels} outputs; pass the label2ans.json the model was fine-tuned with"
        )


def check_model_path(model_path: Any, folder: Path | None) -> None:
    """Refuse, before anything slow and before asking for an answer table, a model path that names nothing
    (neither a local folder / file nor a Hub id ``owner/name``) and a local model folder whose weights hold no
    question-answering head (a backbone, or an NLVR2 pair head)."""
    text = str(model_path)
    if folder is None and not Path(text).exists():
        parts = text.split("/")
        if len(parts) != 2 or not all(parts) or text.startswith((".", "~")):
            raise AnswerSetupError(
                f"model {text}: no such folder or file; give a fine-tuned model folder (RUN_DIR/best), a checkpoint "
                "file or a Hugging Face Hub id (owner/name)"
            )
        return
    weights = folder / WEIGHTS_NAME if folder is not None else None
    if weights is None or not weights.is_file():
        return
    try:
        with safe_open(str(weights), framework="pt") as f:  # the header only: no tensor is read
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if "logit_fc" in k}
    except (OSError, ValueError, RuntimeError, SafetensorError):
        return  # unreadable (truncated, empty, not safetensors): the model loader names the problem
    out = next((shape for key, shape in shapes.items() if key.endswith("logit_fc.3.weight")), None)
    first = next((shape for key, shape in shapes.items() if key.endswith("logit_fc.0.weight")), None)
    if out is None:
        raise AnswerSetupError(
            f"{text} has no answer head ({weights.name} holds no answer_head.logit_fc.*): it is an encoder-only "
            "checkpoint; fine-tune it first (lxmert-train vqa / gqa) or pass a fine-tuned model folder"
        )
    if first is not None and len(first) == 2 and first[0] == first[1] and out[0] == 2:
        raise AnswerSetupError(
            f"{text} is an NLVR2 model (a true / false head over image pairs), not a question-answering one; pass "
            "a VQA or GQA model folder"
        )


def read_table(model_path: Any, folder: Path | None, answers: Any) -> list[str]:
    path = Path(answers) if answers is not None else (folder / LABEL2ANS_FILE if folder is not None else None)
    if path is None or not path.is_file():
        if answers is not None:
            raise AnswerSetupError(f"answer table {answers} not found; give the model's label2ans.json")
        hub = "" if Path(str(model_path)).exists() else f" (no local {model_path} exists: read as a Hub id)"
        raise AnswerSetupError(
            f"{model_path} carries no answer table ({LABEL2ANS_FILE}){hub}; pass --answers label2ans.json (e.g. "
            "LXMERT's vqa trainval_label2ans.json for unc-nlp/lxmert-vqa-uncased)"
        )
    try:
        return load_answer_table(path)
    except ValueError as e:
        raise AnswerSetupError(str(e)) from None


def read_extractor(folder: Path | None) -> Any:
    try:
        return read_extractor_record(folder)
    except DataFormatError as e:
        raise AnswerSetupError(f"{e}; restore the file or remove it") from None


def read_stats(folder: Path | None) -> FeatureStats | None:
    """The standardisation (per-dimension mean / std) the model was fine-tuned with (``features.json``), or None."""
    try:
        return read_feature_stats(folder)
    except DataFormatError as e:
        raise AnswerSetupError(
            f"{folder}: the model's feature record is unusable ({e}); restore it"
        ) from None


def refuse_if(strict: bool, model_path: Any, check: ExtractorCheck) -> None:
    if strict and check.differences:
        raise AnswerSetupError(
            f"{model_path} was trained on features from another extractor: "
            + "; ".join(check.differences)
            + ". Use the extractor settings it was trained with, or drop --strict to answer anyway"
        )


def load_qa_model(model_path: Any, device: torch.device) -> LxmertForQuestionAnswering:
    try:
        with reading_model(model_path):
            model = LxmertForQuestionAnswering.from_pretrained(model_path, map_location="cpu")
    except ModelLoadError as e:
        raise AnswerSetupError(str(e)) from None
    report = model.load_report
    head = [k for k in (report.missing if report else []) if k.startswith("answer_head.")]
    head += [k for k, *_ in (report.mismatched if report else []) if k.startswith("answer_head.")]
    if head:
        raise AnswerSetupError(
            f"{model_path} has no answer head (missing: {', '.join(head[:3])}); it is a pretraining or backbone "
            "checkpoint: fine-tune it first (lxmert-train vqa / gqa) or pass a fine-tuned model folder"
        )
    return model.to(device).eval()
