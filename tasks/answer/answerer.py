"""Ask a fine-tuned LXMERT a question about an image: detector in memory, model, answers, attention.

Data flow for one question::

    image file --extract.images.load_image--> (3, H, W) BGR --VGDetector.extract--> region record (as a store
      holds it) --normalize_boxes, tokenizer--> LxmertForQuestionAnswering --> softmax over the answer logits,
      [CLS]->region attention of the last cross-modality layer (mean over heads)

The image goes through exactly the steps ``extract-features`` runs (same decoding, resize, detector call and
box selection), so the answers equal those of extracting into a store and running the model on the store's
record. Several questions about one image reuse one extraction (a small cache keyed by the file's path, size
and modification time)::

    answerer = Answerer.load("runs/vqa/best", ExtractConfig(out="", weights="faster_rcnn_from_caffe_attr.pkl"))
    result = answerer.answer("photo.jpg", "What is the man holding?")
    result.answers[0].answer, result.answers[0].prob, result.regions[0].object

A model folder (``lxmert-train`` fine-tuning output) holds ``model.safetensors`` + ``config.json``,
``label2ans.json`` (the answer strings, in label order), ``extractor.json`` (the extractor settings of the
feature stores it was trained on, as recorded in the stores' metadata) and ``features.json`` (whose
``standardize`` mean / std, when set, is applied to the features as in training). A Hugging Face Hub model
carries none of them: pass the answer table (``answers=``); without an extractor record the settings are not
checked.
"""

from __future__ import annotations

import os
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from common.distributed import DeviceError, resolve_device
from extract.images import ImageError, load_image
from extract.runner import ExtractConfig, SetupError, extractor_settings, load_detector
from extract.store import normalize_boxes
from extract.vg_vocab import load_vg_vocab
from model import LxmertForQuestionAnswering, LxmertTokenizer
from tasks.answer.results import (
    WEIGHTS_KEYS,
    Answer,
    AnswerError,
    AnswerInputError,
    AnswerResult,
    AnswerSetupError,
    ExtractorCheck,
    Region,
    compare_extractor,
)
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

__all__ = [
    "Answer",
    "AnswerError",
    "AnswerInputError",
    "AnswerResult",
    "AnswerSetupError",
    "Answerer",
    "ExtractorCheck",
    "Region",
    "compare_extractor",
]


# --------------------------------------------------------------------------------------------- answerer
class Answerer:
    """The VG detector (the project's own, in memory) and a fine-tuned LXMERT QA model, ready to answer.

    Build it with :meth:`load`; then :meth:`answer` ``(image path, question)``. Not thread-safe (one forward
    at a time per object).

    Attributes:
        extract_config: the extractor's settings (no store is written; ``out`` is unused).
        settings: those settings as a feature store records them (:func:`extract.runner.extractor_settings`).
        extractor_check: the comparison with the model's ``extractor.json``.
        answers: the answer strings, index = answer label.
        feature_stats: the per-dimension standardisation the model was fine-tuned with (``features.json``), or None.
        load_s: seconds spent loading, by part (``model``; ``detector``, reading and hashing its weights
            included; ``tokenizer``).
    """

    def __init__(
        self,
        model: LxmertForQuestionAnswering,
        detector: Any,
        extract_config: ExtractConfig,
        answers: list[str],
        *,
        settings: dict[str, Any] | None = None,
        extractor_check: ExtractorCheck | None = None,
        feature_stats: FeatureStats | None = None,
        device: torch.device | str = "cpu",
        tokenizer: LxmertTokenizer | None = None,
        cache_size: int = 8,
    ) -> None:
        self.model = model.eval()
        self.detector = detector
        self.extract_config = extract_config
        self.answers = list(answers)
        self.settings = settings if settings is not None else extractor_settings(extract_config, None)
        self.extractor_check = extractor_check or ExtractorCheck()
        self.feature_stats = feature_stats
        self.device = torch.device(device)
        self.tokenizer = tokenizer or LxmertTokenizer()
        self.vocab = load_vg_vocab()
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, dict] = OrderedDict()
        self.load_s: dict[str, float] = {}
        _check_table(self.answers, model)

    # -- building ------------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model_path: str | os.PathLike,
        extract_config: ExtractConfig,
        *,
        answers: str | os.PathLike | None = None,
        strict: bool = False,
        warn: bool = True,
    ) -> Answerer:
        """Load the model at ``model_path`` (a model folder, a checkpoint file or a Hub id) and build the detector.

        Args:
            model_path: anything :meth:`model.LxmertForQuestionAnswering.from_pretrained` reads; a folder may
                hold ``label2ans.json`` and ``extractor.json``.
            extract_config: detector config, weights (or ``random_weights``), box selection and image sizes, as
                for ``extract-features``; its ``device`` (None: CUDA when available) and ``amp`` (autocast dtype)
                serve the detector and the model.
            answers: the answer table (``label2ans.json``, ``ans2label.json`` or ``all_ans.json``), needed when
                the model folder carries none; overrides the folder's.
            strict: refuse (``AnswerSetupError``) when the model's extractor record differs from this extractor.
            warn: emit a ``UserWarning`` naming the differences (``lxmert-answer`` prints them itself).

        Raises:
            AnswerSetupError: naming the file and what to do.
        """
        try:
            dev = resolve_device(extract_config.device)
        except DeviceError as e:
            raise AnswerSetupError(str(e)) from None
        except RuntimeError as e:  # not a device name
            raise AnswerSetupError(
                f"device {extract_config.device!r}: {e}; use cpu, cuda or cuda:N"
            ) from None
        load_s: dict[str, float] = {}
        folder = Path(model_path) if Path(model_path).is_dir() else None

        _check_model_path(model_path, folder)
        table = _answer_table(model_path, folder, answers)
        recorded = _extractor_record(folder)
        stats = _feature_stats(folder)

        # Settings known before loading are checked first (a --strict refusal costs nothing), the weights' sha256
        # once they are loaded (hashed while reading them).
        early = compare_extractor(
            recorded, extractor_settings(extract_config, None), str(model_path), ignore=WEIGHTS_KEYS
        )
        _refuse_if(strict, model_path, early)

        start = time.perf_counter()
        model = _load_model(model_path, dev)
        load_s["model"] = time.perf_counter() - start
        _check_table(table, model)

        start = time.perf_counter()
        try:
            detector, report = load_detector(extract_config, dev)
        except SetupError as e:
            raise AnswerSetupError(str(e)) from None
        load_s["detector"] = time.perf_counter() - start
        if int(detector.feature_dim) != int(model.config.visual_feat_dim):
            raise AnswerSetupError(
                f"the detector config {extract_config.config!r} gives {detector.feature_dim}-d region features but "
                f"{model_path} expects {model.config.visual_feat_dim}-d; use the detector config the model was "
                "trained with"
            )
        sha, layout = (report.sha256, getattr(report, "layout", None)) if report is not None else (None, None)
        settings = extractor_settings(extract_config, sha, layout)
        check = compare_extractor(recorded, settings, source=str(model_path))
        _refuse_if(strict, model_path, check)
        if check.differences and warn:
            warnings.warn(
                f"{model_path} was trained on features from another extractor: "
                + "; ".join(check.differences),
                stacklevel=2,
            )
        start = time.perf_counter()
        answerer = cls(
            model,
            detector,
            extract_config,
            table,
            settings=settings,
            extractor_check=check,
            feature_stats=stats,
            device=dev,
        )
        load_s["tokenizer"] = time.perf_counter() - start
        answerer.load_s = load_s
        return answerer

    # -- regions -------------------------------------------------------------------------------------
    def regions(self, image: str | os.PathLike) -> tuple[dict[str, Any], float]:
        """The image's region record, exactly as ``extract-features`` stores it, and the seconds it took (0.0
        when cached).

        Returns ``({"features" (n, D) float32, "boxes" (n, 4) float32 x1,y1,x2,y2 original pixels, "obj_ids",
        "obj_conf", "attr_ids", "attr_conf" (n,), "img_h", "img_w"}, seconds)``.

        Raises:
            AnswerInputError: the file cannot be read as an image, or the detector fails on it.
        """
        path = str(image)
        try:
            st = os.stat(path)
            key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
        except OSError:
            key = None  # load_image names the problem
        if key is not None and key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key], 0.0
        cfg = self.extract_config
        start = time.perf_counter()
        try:
            loaded = load_image(path, cfg.min_size, cfg.max_size, cfg.max_pixels)
        except ImageError as e:
            raise AnswerInputError(f"image {e.path}: {e.reason}") from None
        try:
            record = self.detector.extract(
                [loaded.image.to(self.device)], [loaded.orig_size], cfg.selection, amp_dtype=cfg.amp_dtype
            )[0]
        except Exception as e:
            h, w = loaded.size
            raise AnswerInputError(
                f"image {path}: the detector failed on the {w}x{h} resized image ({type(e).__name__}: {e})"
            ) from None
        record["img_h"], record["img_w"] = (int(v) for v in loaded.orig_size)
        seconds = time.perf_counter() - start
        if key is not None and self.cache_size > 0:
            self._cache[key] = record
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return record, seconds

    # -- answering -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def answer(self, image: str | os.PathLike, question: str, top_k: int = 5) -> AnswerResult:
        """Answer ``question`` about the image file ``image``.

        Returns the ``top_k`` answers by probability (softmax over all answer logits) and every region with its
        VG object / attribute names and the attention the [CLS] token of the last cross-modality layer pays it
        (mean over heads).

        Raises:
            AnswerInputError: empty question, unreadable image, no region found.
        """
        if not isinstance(question, str) or not question.strip():
            raise AnswerInputError(f"empty question about {image}; give the question as text")
        record, extract_s = self.regions(image)
        n = int(record["features"].shape[0])
        if n == 0:
            raise AnswerInputError(f"image {image}: the detector found no region to answer from")
        start = time.perf_counter()
        feats = np.asarray(record["features"], dtype=np.float32)
        if self.feature_stats is not None:  # as the training data was read (tasks.data.regions)
            feats = self.feature_stats.apply(feats)
        feats = torch.from_numpy(feats)[None].to(self.device)
        boxes = normalize_boxes(record["boxes"], record["img_h"], record["img_w"])
        pos = torch.from_numpy(boxes)[None].to(self.device)
        enc = {k: v.to(self.device) for k, v in self.tokenizer(question).items()}
        dtype = self.extract_config.amp_dtype
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = self.model(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                token_type_ids=enc["token_type_ids"],
                visual_feats=feats,
                visual_pos=pos,
                output_attentions=True,
            )
        probs = F.softmax(out.question_answering_score[0].float(), dim=-1)
        top = torch.topk(probs, k=max(1, min(int(top_k), probs.numel())))
        cross = out.cross_encoder_attentions
        attention = cross[-1][0, :, 0, :].float().mean(0) if cross else torch.zeros(n)
        model_s = time.perf_counter() - start
        vocab = self.vocab
        regions = [
            Region(
                box=[float(v) for v in record["boxes"][i]],
                object=vocab.object_name(record["obj_ids"][i]),
                attribute=vocab.attribute_name(record["attr_ids"][i]),
                attention=float(attention[i]),
            )
            for i in range(n)
        ]
        answers = [
            Answer(self.answers[int(i)], float(p)) for p, i in zip(top.values.tolist(), top.indices.tolist())
        ]
        return AnswerResult(str(image), question, answers, regions, extract_s=extract_s, model_s=model_s)


# ------------------------------------------------------------------------------------------- loading parts
def _check_table(answers: list[str], model: LxmertForQuestionAnswering) -> None:
    if len(answers) != model.config.num_qa_labels:
        raise AnswerSetupError(
            f"the answer table has {len(answers)} answers but the model's answer head has "
            f"{model.config.num_qa_labels} outputs; pass the label2ans.json the model was fine-tuned with"
        )


def _check_model_path(model_path: Any, folder: Path | None) -> None:
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


def _answer_table(model_path: Any, folder: Path | None, answers: Any) -> list[str]:
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


def _extractor_record(folder: Path | None) -> Any:
    try:
        return read_extractor_record(folder)
    except DataFormatError as e:
        raise AnswerSetupError(f"{e}; restore the file or remove it") from None


def _feature_stats(folder: Path | None) -> FeatureStats | None:
    """The standardisation (per-dimension mean / std) the model was fine-tuned with (``features.json``), or None."""
    try:
        return read_feature_stats(folder)
    except DataFormatError as e:
        raise AnswerSetupError(
            f"{folder}: the model's feature record is unusable ({e}); restore it"
        ) from None


def _refuse_if(strict: bool, model_path: Any, check: ExtractorCheck) -> None:
    if strict and check.differences:
        raise AnswerSetupError(
            f"{model_path} was trained on features from another extractor: "
            + "; ".join(check.differences)
            + ". Use the extractor settings it was trained with, or drop --strict to answer anyway"
        )


def _load_model(model_path: Any, device: torch.device) -> LxmertForQuestionAnswering:
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
