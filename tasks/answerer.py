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

import json
import math
import os
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from safetensors import safe_open

from common.distributed import DeviceError, resolve_device
from extract.images import ImageError, decode_image, load_image
from extract.runner import ExtractConfig, SetupError, extractor_settings, load_detector
from extract.store import normalize_boxes
from extract.vg_vocab import load_vg_vocab
from model import LxmertForQuestionAnswering, LxmertTokenizer
from tasks.answer_table import load_answer_table
from tasks.checkpointing import WEIGHTS_NAME
from tasks.features import FeatureStats
from tasks.qa import EXTRACTOR_FILE, LABEL2ANS_FILE, TaskDataError, model_folder_record

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
    "draw_result",
]

#: Settings known only once the weights are loaded.
_WEIGHTS_KEYS = ("weights_sha256",)

#: Extractor settings compared between the model's record and the extractor used here. The weights' file name
#: (the sha256 decides) and ``amp`` (``--amp`` runs the detector and the model alike) are not compared.
_COMPARED = (
    "weights_sha256",
    "random_weights",
    "seed",
    "config",
    "opts",
    "selection",
    "min_boxes",
    "max_boxes",
    "conf_thresh",
    "nms_thresh",
    "min_size",
    "max_size",
)


class AnswerError(Exception):
    """Base of the answerer's errors; the message names the file / question and what to do."""


class AnswerSetupError(AnswerError):
    """The answerer cannot be built: model, answer table, detector weights, device, or (strict) settings."""


class AnswerInputError(AnswerError):
    """One (image, question) pair cannot be answered: unreadable image, empty question, ..."""


# ----------------------------------------------------------------------------------------------- results
@dataclass
class Answer:
    answer: str
    prob: float  # softmax over all answer logits


@dataclass
class Region:
    """One detected region: ``box`` x1, y1, x2, y2 in original image pixels; ``attention`` the last cross-modality
    layer's [CLS]->region attention, mean over heads (the regions' values sum to 1)."""

    box: list[float]
    object: str
    attribute: str
    attention: float


@dataclass
class AnswerResult:
    """One answered question. ``extract_s`` is 0 when the image's regions came from the cache."""

    image: str
    question: str
    answers: list[Answer]
    regions: list[Region]
    extract_s: float = 0.0
    model_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """``{"image", "question", "answers": [{"answer", "prob"}], "regions": [{"box", "object", "attribute",
        "attention"}]}`` (the ``lxmert-answer --json`` object)."""
        return {
            "image": self.image,
            "question": self.question,
            "answers": [{"answer": a.answer, "prob": a.prob} for a in self.answers],
            "regions": [
                {"box": r.box, "object": r.object, "attribute": r.attribute, "attention": r.attention}
                for r in self.regions
            ],
        }


# --------------------------------------------------------------------------------------- extractor check
@dataclass
class ExtractorCheck:
    """How the extractor used here compares with the one that made the model's training features.

    ``differences``: one line per differing setting (empty when they agree or cannot be compared);
    ``note``: why they could not be compared (no record, TSV-imported features), else None.
    """

    differences: list[str] = field(default_factory=list)
    note: str | None = None

    @property
    def ok(self) -> bool:
        return not self.differences


def compare_extractor(
    recorded: Any, current: dict[str, Any], source: str = "the model", ignore: tuple[str, ...] = ()
) -> ExtractorCheck:
    """Compare the model's ``extractor.json`` (a store's extractor settings, or a list of them: one per training
    store) with ``current`` (:func:`extract.runner.extractor_settings` of the extractor used here); the settings
    in ``ignore`` are not compared."""
    if recorded is None:
        return ExtractorCheck(
            note=f"{source} carries no extractor record ({EXTRACTOR_FILE}); cannot check that its training "
            "features came from this extractor (LXMERT's released models: Caffe features, i.e. --selection caffe "
            "--boxes 36 --min-size 600 --max-size 1000 with faster_rcnn_from_caffe_attr.pkl)"
        )
    records = recorded if isinstance(recorded, list) else [recorded]
    diffs: list[str] = []
    notes: list[str] = []
    for rec in records:
        if not isinstance(rec, dict):
            notes.append(f"{source}: unreadable extractor record {rec!r}")
            continue
        if rec.get("source") == "tsv":
            notes.append(
                f"{source} was trained on features imported from the TSV file {rec.get('file')!r} (the original "
                "Caffe extractor); its settings cannot be compared (the matching ones here: --selection caffe "
                "--boxes 36 --min-size 600 --max-size 1000 with faster_rcnn_from_caffe_attr.pkl)"
            )
            continue
        for key in _COMPARED:
            if key in ignore:
                continue
            if key == "seed" and not (rec.get("random_weights") and current.get("random_weights")):
                continue
            if key == "conf_thresh" and "caffe" not in (rec.get("selection"), current.get("selection")):
                continue
            was, now = rec.get(key, "<absent>"), current.get(key, "<absent>")
            if json.dumps(was) != json.dumps(now):
                line = f"{key}: model trained on {was!r}, here {now!r}"
                if line not in diffs:
                    diffs.append(line)
    return ExtractorCheck(differences=diffs, note="; ".join(notes) or None)


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
            recorded, extractor_settings(extract_config, None), str(model_path), ignore=_WEIGHTS_KEYS
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
        if self.feature_stats is not None:  # as the training data was read (tasks.features)
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
    except (OSError, ValueError, RuntimeError):
        return  # unreadable: the model loader names the problem
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
    if folder is None or not (folder / EXTRACTOR_FILE).is_file():
        return None
    path = folder / EXTRACTOR_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AnswerSetupError(
            f"{path}: cannot read the extractor record ({e}); restore it or remove it"
        ) from None


def _feature_stats(folder: Path | None) -> FeatureStats | None:
    """The standardisation (per-dimension mean / std) the model was fine-tuned with: ``features.json``'s
    ``standardize`` (``data.standardize_features``), or None."""
    try:
        record = model_folder_record(str(folder) if folder is not None else None)
        saved = (record or {}).get("standardize")
        return FeatureStats.from_dict(saved) if saved else None
    except (TaskDataError, KeyError, TypeError, ValueError) as e:
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
        model = LxmertForQuestionAnswering.from_pretrained(model_path, map_location="cpu")
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise AnswerSetupError(f"cannot load the model {model_path}: {e}") from None
    report = model.load_report
    head = [k for k in (report.missing if report else []) if k.startswith("answer_head.")]
    head += [k for k, *_ in (report.mismatched if report else []) if k.startswith("answer_head.")]
    if head:
        raise AnswerSetupError(
            f"{model_path} has no answer head (missing: {', '.join(head[:3])}); it is a pretraining or backbone "
            "checkpoint: fine-tune it first (lxmert-train vqa / gqa) or pass a fine-tuned model folder"
        )
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------- drawing
def draw_result(
    result: AnswerResult, out: str | os.PathLike, *, labelled: int = 6, max_pixels: int | None = None
) -> Path:
    """Write the image with its regions shaded by attention and the most attended ones labelled.

    Every pixel is darkened unless regions cover it: brightness ``0.25 + 0.75 * a / max(a)`` where ``a`` is the
    summed attention of the regions covering the pixel. The ``labelled`` most attended regions get a frame and
    ``"attribute object attention"`` (a label that would cover another is left out); the question and the top answers are written in a band at the bottom.
    The output has the image's size (after EXIF orientation, as the boxes); its format follows the suffix.
    """
    bgr = decode_image(result.image, max_pixels=max_pixels)
    rgb = bgr[:, :, ::-1].astype(np.float32)
    h, w = rgb.shape[:2]
    heat = np.zeros((h, w), dtype=np.float32)
    for region in result.regions:
        x1, y1, x2, y2 = _pixel_box(region.box, w, h)
        heat[y1:y2, x1:x2] += region.attention
    peak = float(heat.max())
    shade = 0.25 + 0.75 * (heat / peak if peak > 0 else np.ones_like(heat))
    img = Image.fromarray(np.clip(rgb * shade[:, :, None], 0, 255).astype(np.uint8))

    draw = ImageDraw.Draw(img, "RGBA")
    size = max(10, round(min(w, h) / 32))
    font = _font(size)
    line = max(1, round(min(w, h) / 250))
    ranked = sorted(result.regions, key=lambda r: -r.attention)[: max(0, labelled)]
    for region in ranked:
        x1, y1, x2, y2 = _pixel_box(region.box, w, h)
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=(255, 215, 0, 255), width=line)
    placed: list[tuple[int, int, int, int]] = []
    for region in ranked:  # labels of the most attended first; one that would cover another is left out
        x1, y1, x2, y2 = _pixel_box(region.box, w, h)
        text = f"{region.attribute} {region.object} {region.attention:.2f}"
        for tx, ty in (
            (x1 + line, y1 - size - 2 * line),
            (x1 + line, y1 + line),
            (x1 + line, y2 - size - 2 * line),
        ):
            left, top, right, bottom = draw.textbbox((tx, ty), text, font=font)
            rect = (left - line, top - line, right + line, bottom + line)
            if rect[1] >= 0 and not any(_overlap(rect, other) for other in placed):
                placed.append(rect)
                draw.rectangle(rect, fill=(0, 0, 0, 170))
                draw.text((tx, ty), text, fill=(255, 255, 255, 255), font=font)
                break

    lines = [f"Q: {result.question}", "A: " + ", ".join(f"{a.answer} ({a.prob:.2f})" for a in result.answers)]
    lines = [_fit(draw, text, font, w - 2 * size) for text in lines]
    band = len(lines) * (size + size // 2) + size // 2
    draw.rectangle([0, max(0, h - band), w, h], fill=(0, 0, 0, 190))
    for i, text in enumerate(lines):
        draw.text(
            (size // 2, h - band + size // 4 + i * (size + size // 2)), text, fill=(255, 255, 255), font=font
        )

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        img.save(out)
    except (OSError, ValueError, KeyError) as e:
        raise AnswerInputError(f"cannot write the picture {out}: {e} (use a .png or .jpg name)") from None
    return out


def _pixel_box(box: list[float], w: int, h: int) -> tuple[int, int, int, int]:
    x1 = min(max(int(math.floor(box[0])), 0), w)
    y1 = min(max(int(math.floor(box[1])), 0), h)
    x2 = min(max(int(math.ceil(box[2])), x1), w)
    y2 = min(max(int(math.ceil(box[3])), y1), h)
    return x1, y1, x2, y2


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """``text``, cut with "..." to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."
