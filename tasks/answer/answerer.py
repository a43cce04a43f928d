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

from common.distributed import DeviceError, resolve_device
from extract.images import ImageError, load_image
from extract.runner import ExtractConfig, SetupError, extractor_settings, load_detector
from extract.store import normalize_boxes
from extract.vg_vocab import load_vg_vocab
from model import LxmertForQuestionAnswering, LxmertTokenizer
from tasks.answer.loading import (
    check_model_path,
    check_table,
    load_qa_model,
    read_extractor,
    read_stats,
    read_table,
    refuse_if,
)
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
        check_table(self.answers, model)

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

        check_model_path(model_path, folder)
        table = read_table(model_path, folder, answers)
        recorded = read_extractor(folder)
        stats = read_stats(folder)

        # Settings known before loading are checked first (a --strict refusal costs nothing), the weights' sha256
        # once they are loaded (hashed while reading them).
        early = compare_extractor(
            recorded, extractor_settings(extract_config, None), str(model_path), ignore=WEIGHTS_KEYS
        )
        refuse_if(strict, model_path, early)

        start = time.perf_counter()
        model = load_qa_model(model_path, dev)
        load_s["model"] = time.perf_counter() - start
        check_table(table, model)

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
        refuse_if(strict, model_path, check)
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
        found = self.regions_many([image])[str(image)]
        if isinstance(found, AnswerInputError):
            raise found
        return found

    def regions_many(
        self, images: list[str | os.PathLike]
    ) -> dict[str, tuple[dict[str, Any], float] | AnswerInputError]:
        """:meth:`regions` of several images, the ones not cached in ONE detector call (as ``extract-features``
        batches images; a batch's records equal one-at-a-time records). Keyed by ``str(image)``; an image that
        cannot be used gets its :class:`AnswerInputError` (a failing batch is retried image by image, so one bad
        image does not fail the others). The seconds of a batch are shared equally by its images."""
        out: dict[str, tuple[dict[str, Any], float] | AnswerInputError] = {}
        todo: list[tuple[str, tuple | None, Any]] = []
        cfg = self.extract_config
        for image in dict.fromkeys(map(str, images)):
            try:
                st = os.stat(image)
                key = (os.path.abspath(image), st.st_size, st.st_mtime_ns)
            except OSError:
                key = None  # load_image names the problem
            if key is not None and key in self._cache:
                self._cache.move_to_end(key)
                out[image] = (self._cache[key], 0.0)
                continue
            try:
                todo.append((image, key, load_image(image, cfg.min_size, cfg.max_size, cfg.max_pixels)))
            except ImageError as e:
                out[image] = AnswerInputError(f"image {e.path}: {e.reason}")
        if not todo:
            return out
        start = time.perf_counter()
        try:
            records = self._detect([loaded for _, _, loaded in todo])
        except Exception:  # noqa: BLE001 - find the image that fails, answer the others
            records = []
            for image, _, loaded in todo:
                try:
                    records.extend(self._detect([loaded]))
                except Exception as e:  # noqa: BLE001
                    h, w = loaded.size
                    records.append(
                        AnswerInputError(
                            f"image {image}: the detector failed on the {w}x{h} resized image ({type(e).__name__}: {e})"
                        )
                    )
        seconds = (time.perf_counter() - start) / len(todo)
        for (image, key, loaded), record in zip(todo, records):
            if isinstance(record, AnswerInputError):
                out[image] = record
                continue
            record["img_h"], record["img_w"] = (int(v) for v in loaded.orig_size)
            out[image] = (record, seconds)
            if key is not None and self.cache_size > 0:
                self._cache[key] = record
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return out

    def _detect(self, loaded: list[Any]) -> list[dict[str, Any]]:
        cfg = self.extract_config
        images = [item.image.to(self.device) for item in loaded]
        return self.detector.extract(
            images, [item.orig_size for item in loaded], cfg.selection, amp_dtype=cfg.amp_dtype
        )

    # -- answering -----------------------------------------------------------------------------------
    def answer(self, image: str | os.PathLike, question: str, top_k: int = 5) -> AnswerResult:
        """Answer ``question`` about the image file ``image``.

        Returns the ``top_k`` answers by probability (softmax over all answer logits) and every region with its
        VG object / attribute names and the attention the [CLS] token of the last cross-modality layer pays it
        (mean over heads).

        Raises:
            AnswerInputError: empty question, unreadable image, no region found.
        """
        result = self.answer_batch([(image, question)], top_k)[0]
        if isinstance(result, AnswerInputError):
            raise result
        return result

    @torch.inference_mode()
    def answer_batch(
        self, questions: list[tuple[str | os.PathLike, str]], top_k: int = 5
    ) -> list[AnswerResult | AnswerInputError]:
        """Answer several ``(image file, question)`` pairs with one model forward (what a server's micro batch
        needs): each image's regions once (the detector runs one image at a time), the batch padded to the most
        regions with a visual attention mask. One result per pair, in order; a pair that cannot be answered gets
        its :class:`AnswerInputError` in its place instead of failing the others."""
        results: list[AnswerResult | AnswerInputError | None] = [None] * len(questions)
        asked = [str(image) for image, q in questions if isinstance(q, str) and q.strip()]
        found = self.regions_many(asked) if asked else {}
        seen: set[str] = set()
        ready: list[tuple[int, dict[str, Any], float]] = []
        for k, (image, question) in enumerate(questions):
            if not isinstance(question, str) or not question.strip():
                results[k] = AnswerInputError(f"empty question about {image}; give the question as text")
                continue
            regions = found[str(image)]
            if isinstance(regions, AnswerInputError):
                results[k] = regions
                continue
            record, extract_s = regions
            extract_s = 0.0 if str(image) in seen else extract_s  # the same image earlier in this batch
            seen.add(str(image))
            if int(record["features"].shape[0]) == 0:
                results[k] = AnswerInputError(f"image {image}: the detector found no region to answer from")
                continue
            ready.append((k, record, extract_s))
        if ready:
            start = time.perf_counter()
            probs, attention = self._forward([questions[k][1] for k, _, _ in ready], [r for _, r, _ in ready])
            model_s = (time.perf_counter() - start) / len(ready)
            for row, (k, record, extract_s) in enumerate(ready):
                image, question = questions[k]
                n = int(record["features"].shape[0])
                top = torch.topk(probs[row], k=max(1, min(int(top_k), probs.shape[1])))
                regions = [
                    Region(
                        box=[float(v) for v in record["boxes"][i]],
                        object=self.vocab.object_name(record["obj_ids"][i]),
                        attribute=self.vocab.attribute_name(record["attr_ids"][i]),
                        attention=float(attention[row, i]),
                    )
                    for i in range(n)
                ]
                answers = [
                    Answer(self.answers[int(i)], float(p))
                    for p, i in zip(top.values.tolist(), top.indices.tolist())
                ]
                results[k] = AnswerResult(
                    str(image), question, answers, regions, extract_s=extract_s, model_s=model_s
                )
        return results  # type: ignore[return-value]

    def _forward(
        self, questions: list[str], records: list[dict[str, Any]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over ``len(questions)`` (question, region record) rows: answer probabilities ``(B, A)`` and
        the [CLS]->region attention of the last cross-modality layer, mean over heads ``(B, V)`` (0 on padding)."""
        counts = [int(r["features"].shape[0]) for r in records]
        v = max(counts)
        dim = int(records[0]["features"].shape[1])
        feats = np.zeros((len(records), v, dim), np.float32)
        pos = np.zeros((len(records), v, 4), np.float32)
        for row, record in enumerate(records):
            f = np.asarray(record["features"], dtype=np.float32)
            if self.feature_stats is not None:  # as the training data was read (tasks.data.regions)
                f = self.feature_stats.apply(f)
            feats[row, : counts[row]] = f
            pos[row, : counts[row]] = normalize_boxes(record["boxes"], record["img_h"], record["img_w"])
        mask = None
        if min(counts) < v:  # uneven region counts: mask the padding (as training batches do)
            mask = torch.tensor([[1.0] * c + [0.0] * (v - c) for c in counts], device=self.device)
        enc = {k: t.to(self.device) for k, t in self.tokenizer(questions).items()}
        dtype = self.extract_config.amp_dtype
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = self.model(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                token_type_ids=enc["token_type_ids"],
                visual_feats=torch.from_numpy(feats).to(self.device),
                visual_pos=torch.from_numpy(pos).to(self.device),
                visual_attention_mask=mask,
                output_attentions=True,
            )
        probs = F.softmax(out.question_answering_score.float(), dim=-1)
        cross = out.cross_encoder_attentions
        attention = cross[-1][:, :, 0, :].float().mean(1) if cross else torch.zeros(len(records), v)
        return probs.cpu(), attention.cpu()
