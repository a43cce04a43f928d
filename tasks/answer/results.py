"""What ``lxmert-answer`` returns and refuses: the answers, the regions, the errors, and the comparison of the
model's recorded extractor with the one answering."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tasks.data.model_folder import EXTRACTOR_FILE, FROM_LOAD

__all__ = [
    "Answer",
    "AnswerError",
    "AnswerInputError",
    "AnswerResult",
    "AnswerSetupError",
    "ExtractorCheck",
    "Region",
    "WEIGHTS_KEYS",
    "compare_extractor",
]

#: Settings known only once the weights are loaded.
WEIGHTS_KEYS = ("weights_sha256",)

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
    # entries marked from_load are the model's history (the features of the model it was fine-tuned from): the
    # model expects the features it was last trained on
    records = [r for r in records if not (isinstance(r, dict) and FROM_LOAD in r)]
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
