"""LXMERT's pretraining JSON, flattened: one item per (image, source, sentence) in a few numpy arrays.

Input: LXMERT's pretraining JSON files, each a list of
``{"img_id": str, "sentf": {source: [sentence, ...]}, "labelf": {source: [{answer: score}, ...]}}``
(``labelf[source][i]`` labels ``sentf[source][i]``; captions have no labels). As the original, they are flattened
to one item per (image, source, sentence), uid ``"<img_id>_<source>_<i:03d>"``; QA labels go through
:func:`tasks.data.answer_table.normalize_answer` and answers outside the table are dropped (when two raw answers
normalise to one, the later one's score is kept, as the original).

The items live in a few numpy arrays (:class:`PretrainCorpus`: sentences as one UTF-8 buffer, labels as CSR
arrays), grouped by image, so millions of sentences cost a few hundred MB and DataLoader workers share them.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.data.answer_table import normalize_answer
from tasks.data.jsonio import DataFormatError, read_json

__all__ = ["PretrainCorpus", "PretrainDataError", "build_corpus", "read_pretrain_json"]

_FORMAT_HINT = (
    'expected LXMERT\'s pretraining format [{"img_id": str, "sentf": {source: [sentence, ...]}, '
    '"labelf": {source: [{answer: score}, ...]}}, ...]'
)


class PretrainDataError(DataFormatError):
    """A pretraining JSON file is unreadable or malformed, or the data set is empty."""


# ------------------------------------------------------------------------------------------------ corpus
@dataclass
class PretrainCorpus:
    """Flattened sentence items, grouped by image (the items of image ``g`` are ``image_start[g]:image_start[g+1]``).

    - ``img_ids``: the images, in first-appearance order; ``sources``: the source names (``mscoco``, ``vqa`` ...).
    - ``item_image`` ``(N,)`` int32 image index; ``item_source`` ``(N,)`` int16 source index; ``item_pos``
      ``(N,)`` int32 position of the sentence in ``sentf[source]`` (for the uid).
    - ``text`` ``(T,)`` uint8 UTF-8 of all sentences, ``text_start`` ``(N + 1,)`` int64 offsets.
    - ``label_start`` ``(N + 1,)`` int64 offsets into ``label_answer`` (int32 answer-table index) and
      ``label_score`` (float32); an item without a (kept) label has none.
    """

    img_ids: list[str]
    sources: list[str]
    image_start: np.ndarray
    item_image: np.ndarray
    item_source: np.ndarray
    item_pos: np.ndarray
    text: np.ndarray
    text_start: np.ndarray
    label_start: np.ndarray
    label_answer: np.ndarray
    label_score: np.ndarray

    def __len__(self) -> int:
        return len(self.item_image)

    @property
    def num_images(self) -> int:
        return len(self.img_ids)

    def sentence(self, index: int) -> str:
        return bytes(self.text[self.text_start[index] : self.text_start[index + 1]]).decode("utf-8")

    def img_id(self, index: int) -> str:
        return self.img_ids[int(self.item_image[index])]

    def uid(self, index: int) -> str:
        """The original's uid: ``"<img_id>_<source>_<i:03d>"``."""
        return f"{self.img_id(index)}_{self.sources[int(self.item_source[index])]}_{int(self.item_pos[index]):03d}"

    def label(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(answers (K,) int32, scores (K,) float32)`` of the item's QA label (K = 0 without one)."""
        lo, hi = self.label_start[index], self.label_start[index + 1]
        return self.label_answer[lo:hi], self.label_score[lo:hi]

    def items_per_image(self) -> dict[str, int]:
        counts = np.diff(self.image_start)
        return {img_id: int(c) for img_id, c in zip(self.img_ids, counts)}

    def without_images(self, drop: set[str]) -> PretrainCorpus:
        """A corpus without the items of the images in ``drop``."""
        if not drop:
            return self
        keep_img = np.array([i not in drop for i in self.img_ids], dtype=bool)
        keep = keep_img[self.item_image]
        return self.subset(np.flatnonzero(keep))

    def subset(self, items: np.ndarray) -> PretrainCorpus:
        """The items ``items``, in that order, which must keep each image's items together (sorted indices, or
        a stable sort by image)."""
        items = np.asarray(items, dtype=np.int64)
        old_images = np.unique(self.item_image[items])
        remap = np.full(self.num_images, -1, dtype=np.int32)
        remap[old_images] = np.arange(len(old_images), dtype=np.int32)
        item_image = remap[self.item_image[items]]
        t_lo, t_hi = self.text_start[items], self.text_start[items + 1]
        l_lo, l_hi = self.label_start[items], self.label_start[items + 1]
        text_idx = _ranges(t_lo, t_hi)
        label_idx = _ranges(l_lo, l_hi)
        return PretrainCorpus(
            img_ids=[self.img_ids[g] for g in old_images],
            sources=self.sources,
            image_start=np.concatenate([[0], np.cumsum(np.bincount(item_image, minlength=len(old_images)))]),
            item_image=item_image,
            item_source=self.item_source[items],
            item_pos=self.item_pos[items],
            text=self.text[text_idx],
            text_start=np.concatenate([[0], np.cumsum(t_hi - t_lo)]).astype(np.int64),
            label_start=np.concatenate([[0], np.cumsum(l_hi - l_lo)]).astype(np.int64),
            label_answer=self.label_answer[label_idx],
            label_score=self.label_score[label_idx],
        )


def _ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(lo[i], hi[i])`` for all i."""
    lengths = hi - lo
    if lengths.sum() == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.repeat(lo - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return np.arange(lengths.sum(), dtype=np.int64) + starts


def _bad(path: Path, index: int, entry: Any, what: str) -> PretrainDataError:
    img = f" (img_id {entry.get('img_id')!r})" if isinstance(entry, dict) and "img_id" in entry else ""
    return PretrainDataError(f"{path}: entry {index}{img}: {what}; {_FORMAT_HINT}")


def read_pretrain_json(path: str | Path) -> list[dict]:
    """Read and check one pretraining JSON file; raises :class:`PretrainDataError` naming the path and the first
    bad entry (its index and img_id)."""
    path = Path(path)
    try:
        data = read_json(path, "pretraining JSON file (data.train / data.valid)")
    except DataFormatError as err:  # missing, unreadable or not JSON: the message names the file (and line)
        raise PretrainDataError(str(err)) from err
    if not isinstance(data, list):
        raise PretrainDataError(
            f"{path}: the top level is a {type(data).__name__}, not a list; {_FORMAT_HINT}"
        )
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise _bad(path, i, entry, f"is a {type(entry).__name__}, not an object")
        img_id = entry.get("img_id")
        if not isinstance(img_id, str) or not img_id:
            raise _bad(path, i, entry, "'img_id' is missing or not a non-empty string")
        sentf = entry.get("sentf")
        if not isinstance(sentf, dict):
            raise _bad(path, i, entry, "'sentf' is missing or not an object {source: [sentence, ...]}")
        for source, sents in sentf.items():
            if not isinstance(sents, list) or not all(isinstance(s, str) for s in sents):
                raise _bad(path, i, entry, f"sentf[{source!r}] is not a list of strings")
        labelf = entry.get("labelf", {})
        if not isinstance(labelf, dict):
            raise _bad(path, i, entry, "'labelf' is not an object {source: [{answer: score}, ...]}")
        for source, labels in labelf.items():
            if source not in sentf:
                raise _bad(path, i, entry, f"labelf has source {source!r} that sentf lacks")
            if not isinstance(labels, list) or len(labels) != len(sentf[source]):
                raise _bad(
                    path,
                    i,
                    entry,
                    f"labelf[{source!r}] must be a list with one label per sentence of sentf[{source!r}]",
                )
            for label in labels:
                if not isinstance(label, dict) or not all(
                    isinstance(a, str) and isinstance(s, (int, float)) and not isinstance(s, bool)
                    for a, s in label.items()
                ):
                    raise _bad(
                        path, i, entry, f"labelf[{source!r}] holds {label!r}, not an {{answer: score}} object"
                    )
                if not all(math.isfinite(s) for s in label.values()):
                    raise _bad(path, i, entry, f"labelf[{source!r}] holds {label!r}: scores must be finite")
    return data


def build_corpus(paths: Sequence[str | Path], answers: Sequence[str], limit: int = 0) -> PretrainCorpus:
    """Flatten the JSON files into a :class:`PretrainCorpus` (one item per (image, source, sentence)).

    ``answers``: the QA answer table (index = label); labels are normalised and pruned to it. ``limit`` > 0
    keeps the first ``limit`` images (JSON entries in file order). Items of one image are kept together
    (in the order they appear). One file's JSON is held at a time; the items go straight into flat arrays.
    Raises :class:`PretrainDataError` for a bad file or when no sentence is found.
    """
    if not paths:
        raise PretrainDataError("no pretraining JSON file given (data.train)")
    ans2label = {a: i for i, a in enumerate(answers)}
    images: dict[str, int] = {}
    sources: dict[str, int] = {}
    item_image, item_source, item_pos = array("i"), array("h"), array("i")
    text, text_start = bytearray(), array("q", [0])
    label_answer, label_score, label_start = array("i"), array("f"), array("q", [0])
    for path in paths:
        for entry in read_pretrain_json(path):
            img_id = entry["img_id"]
            g = images.get(img_id)
            if g is None:
                if limit and len(images) >= limit:
                    continue
                g = images[img_id] = len(images)
            labelf = entry.get("labelf", {})
            for source, sents in entry["sentf"].items():
                src = sources.setdefault(source, len(sources))
                labels = labelf.get(source)
                for pos, sent in enumerate(sents):
                    item_image.append(g)
                    item_source.append(src)
                    item_pos.append(pos)
                    text += sent.encode("utf-8")
                    text_start.append(len(text))
                    if labels is not None:
                        label: dict[int, float] = {}
                        for raw, score in labels[pos].items():
                            ans = ans2label.get(normalize_answer(raw))
                            if ans is not None:
                                label[ans] = float(score)  # a later raw answer with the same form overwrites
                        label_answer.extend(label.keys())
                        label_score.extend(label.values())
                    label_start.append(len(label_answer))
    if not item_image:
        names = ", ".join(str(p) for p in paths)
        raise PretrainDataError(f"no sentences in {names}: the pretraining data set is empty")
    image_index = np.array(item_image, dtype=np.int32)
    corpus = PretrainCorpus(
        img_ids=list(images),
        sources=list(sources),
        image_start=np.concatenate([[0], np.cumsum(np.bincount(image_index, minlength=len(images)))]),
        item_image=image_index,
        item_source=np.array(item_source, dtype=np.int16),
        item_pos=np.array(item_pos, dtype=np.int32),
        text=np.frombuffer(bytes(text), dtype=np.uint8).copy(),
        text_start=np.array(text_start, dtype=np.int64),
        label_start=np.array(label_start, dtype=np.int64),
        label_answer=np.array(label_answer, dtype=np.int32),
        label_score=np.array(label_score, dtype=np.float32),
    )
    if np.any(np.diff(image_index) < 0):  # an image seen again later (e.g. in another file): group its items
        corpus = corpus.subset(np.argsort(image_index, kind="stable"))
    return corpus
