"""Soft-score question answering over region features: what VQA and GQA share.

Items are LXMERT's JSON (one file or several, concatenated)::

    [{"img_id": "COCO_val2014_000000393267", "sent": "What is the man holding?",
      "question_id": 393267002, "label": {"frisbee": 1.0, "disc": 0.3}, ...}, ...]

``label`` is optional (test splits have none). The answer table (``trainval_label2ans.json``, a list, or
``trainval_ans2label.json``, a dict; see :func:`tasks.answer_table.load_answer_table`) gives the answer of
every output of the head. Each item's target is the dense vector of its soft scores over the table
``(num_answers,)``; label answers outside the table are counted, reported once, and ignored for training
(the original drops them too; at evaluation the item keeps its other answers, so predicting a dropped one
can never score).

Text is ``[CLS] word_pieces[:max_seq_length - 2] [SEP]``, padded to ``max_seq_length`` (the original).

Losses (on the answer logits ``(B, A)``):

- ``bce`` (VQA, GQA; the original): ``BCEWithLogits(logits, soft_targets)`` (mean over ``B * A``) ``* A``;
- ``ce`` (GQA's ``--mceLoss``): cross-entropy on the argmax answer of each item (mean) ``* A``, as the original;
  items with no answer in the table are left out (the original would train them towards answer 0).

Training-time metric (LXMERT's, printed as "Valid" by the original): the soft score of the argmax answer,
summed and divided by the number of questions. It equals the official VQA accuracy up to the official
answer normalisation; for GQA (scores 1.0 on the single answer) it is top-1 accuracy. The official metrics
live in :mod:`tasks.metrics`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import LxmertConfig, LxmertForQuestionAnswering, LxmertTokenizer, read_checkpoint
from model.answers import qa_model_from_pretraining
from tasks.answer_table import load_answer_table, normalize_answer
from tasks.config import TrainConfig
from tasks.features import FeatureStats, RegionFeatures, collate_regions
from tasks.task import StepOutput
from tasks.trainer import to_device

logger = logging.getLogger(__name__)
T = TypeVar("T")

LABEL2ANS_FILE = "label2ans.json"
EXTRACTOR_FILE = "extractor.json"
FEATURES_FILE = "features.json"


class TaskDataError(ValueError):
    """A task's data file that cannot be used: names the file, the entry and what to do."""


# ----------------------------------------------------------------------------------------------------------
# Reading LXMERT's JSON
# ----------------------------------------------------------------------------------------------------------
def read_json_document(path: str | Path, what: str) -> Any:
    """A JSON file's content; :class:`TaskDataError` naming the file (and line / column) otherwise."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise TaskDataError(f"{path}: no such file ({what}); check the path") from None
    except (OSError, UnicodeDecodeError) as err:
        raise TaskDataError(f"{path}: cannot read it ({err})") from None
    except json.JSONDecodeError as err:
        raise TaskDataError(
            f"{path}: not valid JSON at line {err.lineno} column {err.colno} ({err.msg}); expected {what}"
        ) from None


def read_json_list(path: str | Path, what: str) -> list[Any]:
    """The top-level list of a JSON file; :class:`TaskDataError` naming the file otherwise."""
    data = read_json_document(path, what)
    if not isinstance(data, list):
        raise TaskDataError(f"{path}: the top level is a {type(data).__name__}, expected a list ({what})")
    return data


@dataclass
class QAItem:
    """One question: ``label`` maps answers to soft scores in [0, 1], or is None (no annotation)."""

    question_id: int | str
    img_id: str
    sent: str
    label: dict[str, float] | None


QA_FORMAT = 'LXMERT\'s question list [{"img_id", "sent", "question_id", "label": {answer: score}}, ...]'


def load_qa_items(paths: Sequence[str | Path]) -> list[QAItem]:
    """The questions of one or more LXMERT QA JSON files, in file order.

    Raises :class:`TaskDataError` naming the file, the entry index and the question id for a malformed entry,
    and both places for a question id given twice (within or across files).
    """
    items: list[QAItem] = []
    seen: dict[Any, str] = {}
    for path in paths:
        for i, entry in enumerate(read_json_list(path, QA_FORMAT)):
            where = f"{path}: entry {i}"
            if not isinstance(entry, dict):
                raise TaskDataError(f"{where} is a {type(entry).__name__}, expected an object ({QA_FORMAT})")
            missing = [k for k in ("img_id", "sent", "question_id") if k not in entry]
            if missing:
                raise TaskDataError(f"{where} (keys {sorted(entry)}) lacks {missing}; expected {QA_FORMAT}")
            qid = entry["question_id"]
            where = f"{where} (question_id {qid!r})"
            if not isinstance(qid, int | str) or isinstance(qid, bool):
                raise TaskDataError(f"{where}: question_id must be an int (VQA) or a str (GQA)")
            if not isinstance(entry["img_id"], str) or not isinstance(entry["sent"], str):
                raise TaskDataError(f"{where}: img_id and sent must be strings")
            label = entry.get("label")
            if label is not None:
                if not isinstance(label, dict) or not all(
                    isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
                    for k, v in label.items()
                ):
                    raise TaskDataError(
                        f"{where}: label must be {{answer: score}} with numeric scores, got {label!r}"
                    )
                label = {k: float(v) for k, v in label.items()}
            if qid in seen:
                raise TaskDataError(
                    f"{where}: question_id {qid!r} is given twice (first at {seen[qid]}); question ids must be "
                    "unique: remove the duplicate or do not list a split twice in data.train"
                )
            seen[qid] = f"{path}: entry {i}"
            items.append(QAItem(qid, entry["img_id"], entry["sent"], label))
    return items


# ----------------------------------------------------------------------------------------------------------
# Targets, loss, metric
# ----------------------------------------------------------------------------------------------------------
def soft_target(label: dict[str, float] | None, ans2label: dict[str, int], num_answers: int) -> Tensor:
    """``(num_answers,)`` float32: the item's soft scores at their answers' indices, 0 elsewhere; answers
    outside the table are ignored. ``None`` (no annotation) gives zeros."""
    target = torch.zeros(num_answers, dtype=torch.float32)
    for ans, score in (label or {}).items():
        index = ans2label.get(ans)
        if index is not None:
            target[index] = score
    return target


@dataclass
class LabelStats:
    """How many label answers (and whole questions) fall outside the answer table."""

    questions: int = 0
    labelled: int = 0
    answers_outside: int = 0
    questions_without_answer: int = 0  # labelled, but no answer of theirs is in the table

    def summary(self, name: str) -> str:
        return (
            f"{name}: {self.questions} questions, {self.labelled} labelled; {self.answers_outside} label answers "
            f"outside the answer table (ignored for training, scored as wrong), "
            f"{self.questions_without_answer} questions with no answer in the table"
        )


def label_stats(items: Sequence[QAItem], ans2label: dict[str, int]) -> LabelStats:
    stats = LabelStats(questions=len(items))
    for item in items:
        if item.label is None:
            continue
        stats.labelled += 1
        outside = sum(1 for a in item.label if a not in ans2label)
        stats.answers_outside += outside
        if outside == len(item.label) and item.label:
            stats.questions_without_answer += 1
    return stats


def qa_loss(logits: Tensor, target: Tensor, loss: str) -> Tensor:
    """LXMERT's fine-tuning loss on ``logits`` ``(B, A)`` and soft ``target`` ``(B, A)`` (see the module doc)."""
    logits = logits.float()
    num_answers = logits.shape[1]
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(logits, target) * num_answers
    if loss == "ce":
        best, labels = target.max(1)
        labels = torch.where(best > 0, labels, torch.full_like(labels, -100))
        total = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
        # the original's --mceLoss: mean cross-entropy x the number of answers, like the BCE loss
        return total / (labels != -100).sum().clamp(min=1) * num_answers
    raise ValueError(f"finetune.loss must be 'bce' or 'ce', got {loss!r}")


def soft_score_accuracy(logits: Tensor, target: Tensor) -> Tensor:
    """LXMERT's training-time accuracy summed over the batch: ``sum_b target[b, argmax(logits[b])]``."""
    return target.gather(1, logits.argmax(1, keepdim=True)).sum()


# ----------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------
def encode_text(tokenizer: LxmertTokenizer, sent: str, max_seq_length: int) -> dict[str, Tensor]:
    """``[CLS] pieces[:max_seq_length - 2] [SEP]`` padded to ``max_seq_length``: ids, mask, segments ``(L,)``."""
    enc = tokenizer(sent, max_length=max_seq_length, return_tensors=None)
    return {k: torch.tensor(v[0], dtype=torch.long) for k, v in enc.items()}


class TextItemsDataset(torch.utils.data.Dataset):
    """Items with a sentence over the feature stores (the fine-tuning datasets' shared part): ``items``
    (each with ``sent`` and ``label``), the stores, the tokenizer. Deterministic (no random draws):
    :meth:`set_epoch` is a no-op kept for the trainer's contract."""

    def __init__(self, items: list[Any], features: RegionFeatures, max_seq_length: int) -> None:
        self.items = items
        self.features = features
        self.max_seq_length = max_seq_length
        self.tokenizer = LxmertTokenizer(max_length=max_seq_length)

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        pass

    @property
    def has_labels(self) -> bool:
        return any(item.label is not None for item in self.items)

    def encode(self, index: int) -> dict[str, Any]:
        """Item ``index``'s text: ``input_ids`` / ``attention_mask`` / ``token_type_ids`` ``(L,)``."""
        return encode_text(self.tokenizer, self.items[index].sent, self.max_seq_length)


class QADataset(TextItemsDataset):
    """Questions over the feature stores. Item ``i``: ``input_ids`` / ``attention_mask`` / ``token_type_ids``
    ``(L,)``, ``regions`` (:class:`tasks.features.Regions`: features ``(n, D)`` float32, boxes ``(n, 4)``
    x1, y1, x2, y2 divided by the image width / height), ``target`` ``(A,)`` soft scores, ``index`` (position in
    :attr:`items`).

    """

    def __init__(
        self,
        items: list[QAItem],
        features: RegionFeatures,
        ans2label: dict[str, int],
        num_answers: int,
        max_seq_length: int,
    ) -> None:
        super().__init__(items, features, max_seq_length)
        self.ans2label = ans2label
        self.num_answers = num_answers

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        out = self.encode(index)
        out.update(
            regions=self.features[item.img_id],
            target=soft_target(item.label, self.ans2label, self.num_answers),
            index=index,
        )
        return out


def collate_qa(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch of :class:`QADataset` items: ``visual_feats`` ``(B, V, D)``, ``visual_pos`` ``(B, V, 4)``,
    ``visual_attention_mask`` ``(B, V)`` (only with uneven region counts), text ``(B, L)``, ``target`` ``(B, A)``,
    ``index`` ``(B,)``."""
    batch: dict[str, Any] = collate_regions([it["regions"] for it in items])
    batch.update(
        input_ids=torch.stack([it["input_ids"] for it in items]),
        attention_mask=torch.stack([it["attention_mask"] for it in items]),
        token_type_ids=torch.stack([it["token_type_ids"] for it in items]),
        target=torch.stack([it["target"] for it in items]),
        index=torch.tensor([it["index"] for it in items], dtype=torch.long),
    )
    return batch


MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "visual_feats",
    "visual_pos",
    "visual_attention_mask",
)


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


# ----------------------------------------------------------------------------------------------------------
# Features (shared with NLVR2)
# ----------------------------------------------------------------------------------------------------------
def model_folder_record(folder: str | None) -> dict[str, Any] | None:
    """``features.json`` of a model folder (the stores, feature size and standardisation it was trained with),
    or None."""
    if not folder:
        return None
    path = Path(folder) / FEATURES_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise TaskDataError(f"{path}: cannot read the model's feature record ({err})") from None


def feature_extras(features: RegionFeatures) -> dict[str, Any]:
    """The files saved beside every fine-tuned model that say which features it expects:

    - ``extractor.json``: the extractor settings of the training stores, one entry per distinct setting (a
      list; what ``lxmert-answer`` compares with its own extractor): weights file and sha256, box-selection
      rule, image sizes, ... or ``{"source": "tsv", "file": ...}`` for imported TSV features;
    - ``features.json``: :meth:`tasks.features.RegionFeatures.describe` (store paths, feature size, the
      standardisation mean / std when used), read back by ``--eval-only``.
    """
    return {EXTRACTOR_FILE: features.extractor_settings(), FEATURES_FILE: features.describe()}


def open_features(
    config: TrainConfig, model_folder: str | None, train_img_ids: Callable[[], list[str]]
) -> RegionFeatures:
    """The feature stores of ``data.features`` (else the stores named in the model folder's ``features.json``).

    Standardisation: when the model folder (``--load``) records statistics, they are used whatever
    ``data.standardize_features`` says (a fine-tuned model evaluates, and a pretrained one is fine-tuned, on the
    features it was trained on); otherwise ``data.standardize_features`` computes them over the training images.
    """
    record = model_folder_record(model_folder)
    paths = list(config.data.features)
    if not paths and record is not None:
        paths = [s["path"] for s in record.get("stores", [])]
        logger.info("data.features not set: using the stores the model was trained on: %s", paths)
    if not paths:
        raise TaskDataError(
            f"{config.task}: no feature store; set data.features=[STORE.lmdb, ...] (the stores holding the images)"
        )
    features = RegionFeatures(paths, zero_visual=config.data.zero_visual)
    saved = (record or {}).get("standardize")
    if saved:
        features.stats = FeatureStats.from_dict(saved)
        if not config.data.standardize_features:
            logger.warning(
                "%s was trained on standardised features: they are standardised with its statistics "
                "(features.json) although data.standardize_features is false",
                model_folder,
            )
    elif config.data.standardize_features:
        ids = sorted(set(train_img_ids()))
        missing = set(features.locate(ids))
        features.stats = features.compute_stats([i for i in ids if i not in missing])
        logger.info("feature standardisation: mean / std over %d regions", features.stats.num_regions)
    return features


def keep_found_images(
    features: RegionFeatures,
    config: TrainConfig,
    items: list[T],
    img_ids: Callable[[T], tuple[str, ...]],
    split: str,
    paths: Sequence[str | Path],
) -> list[T]:
    """``items`` whose images are all in the stores: :class:`tasks.features.MissingImagesError` naming the
    missing ones, or (``data.allow_missing_images``) the others dropped and counted."""
    counts: dict[str, int] = {}
    for item in items:
        for img_id in img_ids(item):
            counts[img_id] = counts.get(img_id, 0) + 1
    missing = features.check(
        counts,
        allow_missing=config.data.allow_missing_images,
        what=f"{config.task} {split} items",
        source=", ".join(map(str, paths)),
        counts=counts,
    )
    if not missing:
        return items
    return [it for it in items if not any(i in missing for i in img_ids(it))]


def check_annotations(config: TrainConfig) -> None:
    """Fail at the start, not after the first epoch, when ``finetune.annotations`` names no file."""
    path = config.finetune.annotations
    if path and not Path(path).is_file():
        raise TaskDataError(
            f"finetune.annotations: {path} is not a file; give the raw official file of the valid split (VQA "
            "annotations, GQA questions, NLVR2 JSON lines) or leave it empty"
        )


# ----------------------------------------------------------------------------------------------------------
# Building the model
# ----------------------------------------------------------------------------------------------------------
def answers_beside(load: str | None) -> list[str] | None:
    """``label2ans.json`` of a model folder (our fine-tuned / pretraining runs save one), or None."""
    if not load:
        return None
    path = Path(load) / LABEL2ANS_FILE
    return load_answer_table(path) if path.is_file() else None


def head_rows(load: str) -> int | None:
    """Outputs of the checkpoint's answer head (``answer_head.logit_fc.3``), None without one."""
    raw, _, container = read_checkpoint(load)
    for key, value in raw.items():
        if key.endswith("logit_fc.3.bias"):
            return int(value.shape[0])
    return None


def scratch_config(config: TrainConfig, **fields: Any) -> LxmertConfig:
    """The network's config from ``config.model`` (sizes for a run without ``--load``) plus ``fields``."""
    return LxmertConfig(**dataclasses.asdict(config.model), **fields)


def build_qa_model(config: TrainConfig, answers: list[str], load: str | None) -> nn.Module:
    """The QA model for ``answers`` (label order), from ``load`` or from scratch.

    - ``load`` already has a head over these very answers (our fine-tuned model folder, whose
      ``label2ans.json`` equals them): loaded as is (evaluation, or fine-tuning further).
    - ``load`` has another QA head (pretraining's 9500 answers): the head is built from it, answer by answer
      (:func:`model.answers.qa_model_from_pretraining`: rows of answers found in the pretraining table are
      copied, the others start at zero, as the original). The pretraining table is ``finetune.pretrain_answers``
      (LXMERT's ``all_ans.json``) or the ``label2ans.json`` beside the checkpoint.
    - ``load`` with a head of the task's size but no table naming its answers (``unc-nlp/lxmert-vqa-uncased``):
      loaded as is, with a warning that the answer order is assumed.
    - ``load`` without a QA head: backbone loaded, head initialised (logged).
    - no ``load``: the whole network from scratch with ``config.model``'s sizes.
    """
    num = len(answers)
    if not load:
        logger.info("QA model from scratch (%d answers): no --load given", num)
        return LxmertForQuestionAnswering(scratch_config(config, num_qa_labels=num))
    beside = answers_beside(load)
    if beside == answers:
        model = LxmertForQuestionAnswering.from_pretrained(load, num_qa_labels=num)
        logger.info("%s: loaded with its own %d-answer head (same answer table)", load, num)
        return model
    rows = head_rows(load)
    if rows is None:
        model = LxmertForQuestionAnswering.from_pretrained(load, num_qa_labels=num)
        logger.warning(
            "%s has no QA head: the %d-answer head starts from its random initialisation", load, num
        )
        return model
    tables = []
    if config.finetune.pretrain_answers:
        tables.append((config.finetune.pretrain_answers, load_answer_table(config.finetune.pretrain_answers)))
    if beside is not None:
        tables.append((str(Path(load) / LABEL2ANS_FILE), beside))
    source = next((table for _, table in tables if len(table) == rows), None)
    if source is None and rows == num:
        # e.g. unc-nlp/lxmert-vqa-uncased: a fine-tuned head of the task's size that carries no answer table
        model = LxmertForQuestionAnswering.from_pretrained(load, num_qa_labels=num)
        logger.warning(
            "%s: its %d-answer head is taken as is, assuming it was trained on this answer table in this order "
            "(the checkpoint names no answers)",
            load,
            num,
        )
        return model
    if source is None:
        given = ", ".join(f"{path} ({len(table)} answers)" for path, table in tables) or "none"
        raise TaskDataError(
            f"{load}: its QA head has {rows} answers, and no answer table of that size names them (given: {given}); "
            "set finetune.pretrain_answers to the table of that head (LXMERT's all_ans.json for the 9500-answer "
            "pretraining head) so the answer rows can be copied"
        )
    model, report = qa_model_from_pretraining(load, [normalize_answer(a) for a in answers], source)
    logger.info("%s (%d of %d answers start at zero)", report.summary(), report.total - report.matched, num)
    model.head_transfer = report
    return model


# ----------------------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Prediction:
    """One answered question: the argmax answer, its probability (sigmoid of the logit) and the soft score it
    earns (None without a label)."""

    question_id: int | str
    answer: str
    prob: float
    score: float | None


class QATask:
    """VQA / GQA fine-tuning (see the module doc); :mod:`tasks.vqa` and :mod:`tasks.gqa` set the differences:
    the name, the submission format and the official metric."""

    name = "qa"

    def __init__(self, config: TrainConfig, load: str | None = None) -> None:
        self.config = config
        self._features: RegionFeatures | None = None
        self._answers: list[str] | None = None
        self._items: dict[tuple[str, ...], list[QAItem]] = {}
        self._official_docs: dict[str, Any] = {}  # raw official files, read once
        self.model_folder = load  # where label2ans.json may be found when data.answers is empty (evaluation)

    # -- parts --------------------------------------------------------------------------------------------
    @property
    def answers(self) -> list[str]:
        """The answer table in label order: ``data.answers``, else the ``label2ans.json`` of the loaded model."""
        if self._answers is None:
            if self.config.data.answers:
                self._answers = load_answer_table(self.config.data.answers)
            else:
                beside = answers_beside(self.model_folder)
                if beside is None and self.model_folder and not Path(self.model_folder).exists():
                    raise TaskDataError(
                        f"{self.name}: {self.model_folder} is no local folder or file (a typo? a Hub id carries no "
                        "answer table: then set data.answers to the table its head was trained on)"
                    )
                if beside is None:
                    raise TaskDataError(
                        f"{self.name}: no answer table; set data.answers to trainval_label2ans.json (or "
                        f"trainval_ans2label.json), or load a model folder that carries {LABEL2ANS_FILE}"
                    )
                self._answers = beside
            if len(set(self._answers)) != len(self._answers):
                dup = sorted({a for a in self._answers if self._answers.count(a) > 1})[:5]
                raise TaskDataError(f"{self.config.data.answers}: answers listed twice: {dup}")
        return self._answers

    @property
    def ans2label(self) -> dict[str, int]:
        return {a: i for i, a in enumerate(self.answers)}

    @property
    def features(self) -> RegionFeatures:
        if self._features is None:
            self._features = open_features(
                self.config,
                self.model_folder,
                lambda: [it.img_id for it in self.items(self.config.data.train)],
            )
        return self._features

    def items(self, paths: Sequence[str | Path]) -> list[QAItem]:
        """The questions of ``paths`` (read once per list of paths)."""
        key = tuple(map(str, paths))
        if key not in self._items:
            self._items[key] = load_qa_items(paths)
        return self._items[key]

    def dataset(self, paths: Sequence[str | Path], split: str) -> QADataset:
        """The items of ``paths`` whose images are in the stores (missing images: an error naming them, or
        dropped and counted with ``data.allow_missing_images``); label statistics logged."""
        items = self.items(paths)
        if not items:
            raise TaskDataError(f"{self.name} {split}: no questions in {list(map(str, paths))}")
        items = keep_found_images(self.features, self.config, items, lambda it: (it.img_id,), split, paths)
        ans2label = self.ans2label
        logger.info("%s", label_stats(items, ans2label).summary(f"{self.name} {split}"))
        return QADataset(items, self.features, ans2label, len(self.answers), self.config.data.max_seq_length)

    # -- the trainer's contract ---------------------------------------------------------------------------
    def build_model(self, load: str | None) -> nn.Module:
        self.model_folder = self.model_folder or load
        return build_qa_model(self.config, self.answers, load)

    def train_dataset(self) -> QADataset:
        if not self.config.data.train:
            raise TaskDataError(f"{self.name}: data.train is empty; list the training JSON files")
        return self.dataset(self.config.data.train, "train")

    def valid_dataset(self) -> QADataset | None:
        check_annotations(self.config)
        return self.dataset([self.config.data.valid], "valid") if self.config.data.valid else None

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_qa(items)

    def step(self, model: nn.Module, batch: dict[str, Any], epoch: int) -> StepOutput:
        logits = model(**model_inputs(batch)).question_answering_score
        loss = qa_loss(logits, batch["target"], self.config.finetune.loss)
        return StepOutput(loss=loss, parts={"qa": loss.detach()}, batch_size=logits.shape[0])

    @torch.no_grad()
    def predict(self, model: nn.Module, loader: Any, device: torch.device) -> tuple[list[Prediction], float]:
        """Argmax answers of every question of ``loader`` (a loader over a :class:`QADataset`, in order) and the
        mean loss over the labelled ones (NaN when none is labelled)."""
        dataset: QADataset = loader.dataset
        answers = self.answers
        out: list[Prediction] = []
        loss_sum, labelled = 0.0, 0
        for batch in loader:
            batch = to_device(batch, device, non_blocking=device.type == "cuda")
            logits = model(**model_inputs(batch)).question_answering_score.float()
            target = batch["target"]
            best = logits.argmax(1)
            prob = torch.sigmoid(logits.gather(1, best[:, None]))[:, 0]
            earned = target.gather(1, best[:, None])[:, 0]
            has_label = torch.tensor(
                [dataset.items[i].label is not None for i in batch["index"].tolist()], device=logits.device
            )
            if has_label.any():
                rows = has_label.nonzero()[:, 0]
                n = int(rows.numel())
                loss_sum += float(qa_loss(logits[rows], target[rows], self.config.finetune.loss)) * n
                labelled += n
            for j, i in enumerate(batch["index"].tolist()):
                item = dataset.items[i]
                out.append(
                    Prediction(
                        item.question_id,
                        answers[int(best[j])],
                        float(prob[j]),
                        float(earned[j]) if item.label is not None else None,
                    )
                )
        return out, (loss_sum / labelled if labelled else float("nan"))

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        """``loss``, ``accuracy`` (LXMERT's soft score of the argmax answer / N: see the module doc) = ``score``,
        ``oracle`` (the best reachable: max soft score per question / N), and the official metric under
        ``official_*`` when ``finetune.annotations`` is set."""
        preds, loss = self.predict(model, loader, device)
        scored = [p.score for p in preds if p.score is not None]
        accuracy = sum(scored) / max(len(scored), 1)
        dataset: QADataset = loader.dataset
        oracle = sum(
            max((s for a, s in it.label.items() if a in dataset.ans2label), default=0.0)
            for it in dataset.items
            if it.label is not None
        ) / max(len(scored), 1)
        metrics = {"loss": loss, "loss_qa": loss, "accuracy": accuracy, "score": accuracy, "oracle": oracle}
        if self.config.finetune.annotations:
            official = self.official_metric(preds, self.config.finetune.annotations)
            metrics.update({f"official_{k}": v for k, v in official.items() if isinstance(v, int | float)})
        return metrics

    def checkpoint_extras(self) -> dict[str, Any]:
        return {LABEL2ANS_FILE: list(self.answers), **feature_extras(self.features)}

    # -- task specifics (vqa / gqa) ------------------------------------------------------------------------
    def submission(self, preds: Sequence[Prediction]) -> list[dict[str, Any]]:
        """The official result file's rows."""
        raise NotImplementedError

    def official_metric(self, preds: Sequence[Prediction], annotations: str) -> dict[str, Any]:
        """The official metric of ``preds`` against the raw annotations file."""
        raise NotImplementedError
