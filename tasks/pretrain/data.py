"""LXMERT pretraining items: their masks and negatives, and batches (the corpus is :mod:`tasks.pretrain.corpus`).

Every random draw of an item (:meth:`PretrainDataset.__getitem__`) comes from a generator seeded by
``(seed, epoch, index)`` only (validation: ``(seed, index)``, the same every evaluation), so results depend
neither on the number of workers nor of processes, and a resumed run draws what an uninterrupted one draws:

- matching: with p = 0.5 the sentence is replaced by the sentence of a uniformly drawn item of ANOTHER image
  (``matched_label`` 0; the QA target is then dropped);
- masked LM: WordPiece, truncated to ``max_seq_length - 2`` pieces BEFORE masking; each piece with
  p = ``word_mask_rate``: 80% ``[MASK]``, 10% a token uniform over the whole vocabulary (special and unused
  entries included, as the original), 10% kept; the label is the original id (-100 elsewhere); ``[CLS]`` /
  ``[SEP]`` are added after masking, so never masked;
- masked objects: each region with p = ``obj_mask_rate``: 80% zeroed, 10% replaced by a random region of a
  uniformly drawn item's image (any item, as the original), 10% kept; ``feat_mask`` 1 on all of them;
- QA: for a matched item with a label, the target answer is drawn with probability proportional to its score
  (the single answer when there is one); -100 otherwise.

Words and regions are masked whatever losses are on, as the original (``pretrain.mask_inputs: always``): an
ablation without the masked-LM or the visual losses still trains the other objectives on corrupted inputs.
``mask_inputs: with_loss`` masks words only with ``pretrain.mlm`` and regions only with a visual loss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from model import LxmertTokenizer
from tasks.config import TrainConfig
from tasks.data.regions import RegionFeatures, collate_regions
from tasks.pretrain.corpus import PretrainCorpus, PretrainDataError

log = logging.getLogger(__name__)

IGNORE = (
    -100
)  # label of a token / region / item that is not predicted (the model's convention; the original: -1)


# ------------------------------------------------------------------------------------------------ draws
@dataclass
class MaskingOptions:
    """What an item draws. Built by :meth:`from_config` from :class:`tasks.config.PretrainConfig` and
    ``data.max_seq_length``, where the defaults live (none are restated here)."""

    max_seq_length: int
    mlm: bool  # mask words (the original: always, whether the MLM loss is on or not)
    word_mask_rate: float
    visual: bool  # mask regions (the original: always, whatever the obj / attr / feat losses)
    obj_mask_rate: float
    matched: bool  # draw negatives
    qa: bool

    @classmethod
    def from_config(cls, config: TrainConfig) -> MaskingOptions:
        pre = config.pretrain
        always = pre.mask_inputs == "always"
        return cls(
            max_seq_length=config.data.max_seq_length,
            mlm=always or pre.mlm,
            word_mask_rate=pre.word_mask_rate,
            visual=always or bool(pre.visual_losses),
            obj_mask_rate=pre.obj_mask_rate,
            matched=pre.matched,
            qa=pre.qa,
        )


def item_generator(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one item's draws: a function of ``(seed, epoch, index)`` only."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, index])))


def mask_tokens(
    ids: np.ndarray, rng: np.random.Generator, rate: float, mask_id: int, vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of word-piece ids ``(n,)`` (no special tokens): ``(input ids (n,), labels (n,))``.

    Each piece with p = ``rate``: 80% ``mask_id``, 10% a random id in ``[0, vocab_size)``, 10% kept; label = the
    original id there, :data:`IGNORE` elsewhere. Draws exactly ``2 n`` numbers from ``rng``.
    """
    u = rng.random(len(ids))
    random_ids = rng.integers(0, vocab_size, len(ids))
    chosen = u < rate
    v = u / rate
    out = ids.copy()
    out[chosen & (v < 0.8)] = mask_id
    swap = chosen & (v >= 0.8) & (v < 0.9)
    out[swap] = random_ids[swap]
    labels = np.where(chosen, ids, IGNORE)
    return out, labels


class PretrainDataset(Dataset):
    """Map-style dataset over a :class:`PretrainCorpus`: item ``i`` -> a dict of numpy arrays (see
    :func:`collate_pretrain` for the batch). ``fixed=True`` (validation): the draws ignore the epoch.
    """

    def __init__(
        self,
        corpus: PretrainCorpus,
        features: RegionFeatures,
        tokenizer: LxmertTokenizer,
        options: MaskingOptions,
        seed: int,
        *,
        fixed: bool = False,
    ) -> None:
        if len(corpus) == 0:
            raise PretrainDataError("the pretraining data set is empty")
        if options.matched and corpus.num_images < 2:
            raise PretrainDataError(
                f"cross-modality matching needs sentences of at least 2 images, the data has {corpus.num_images}; "
                "add data or set pretrain.matched: false"
            )
        self.corpus = corpus
        self.features = features
        self.tokenizer = tokenizer
        self.options = options
        self.seed = seed
        self.fixed = fixed
        self.epoch = 0
        self.vocab_size = tokenizer.vocab_size
        self.cls_id, self.sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
        self.mask_id, self.pad_id = tokenizer.mask_token_id, tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.corpus)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def generator(self, index: int) -> np.random.Generator:
        if self.fixed:
            return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, index])))
        return item_generator(self.seed, self.epoch, index)

    def _other_image_item(self, index: int, rng: np.random.Generator) -> int:
        """A uniformly drawn item whose image differs from item ``index``'s (items are grouped by image)."""
        corpus = self.corpus
        g = int(corpus.item_image[index])
        lo, hi = int(corpus.image_start[g]), int(corpus.image_start[g + 1])
        r = int(rng.integers(0, len(corpus) - (hi - lo)))
        return r if r < lo else r + (hi - lo)

    def __getitem__(self, index: int) -> dict[str, Any]:
        corpus, opts = self.corpus, self.options
        rng = self.generator(index)
        sentence_item, matched = index, 1
        if opts.matched and rng.random() < 0.5:
            sentence_item, matched = self._other_image_item(index, rng), 0

        # Language: word pieces truncated before masking, then [CLS] ... [SEP], padded to max_seq_length.
        pieces = self.tokenizer.tokenize(corpus.sentence(sentence_item))[: opts.max_seq_length - 2]
        ids = np.asarray(self.tokenizer.convert_tokens_to_ids(pieces), dtype=np.int64)
        labels = np.full(len(ids), IGNORE, dtype=np.int64)
        if opts.mlm:
            ids, labels = mask_tokens(ids, rng, opts.word_mask_rate, self.mask_id, self.vocab_size)
        length = opts.max_seq_length
        input_ids = np.full(length, self.pad_id, dtype=np.int64)
        input_ids[: len(ids) + 2] = [self.cls_id, *ids, self.sep_id]
        mlm_labels = np.full(length, IGNORE, dtype=np.int64)
        mlm_labels[1 : len(ids) + 1] = labels
        attention_mask = np.zeros(length, dtype=np.int64)
        attention_mask[: len(ids) + 2] = 1

        # Vision: masked regions (zeroed / a random region of a random item's image / kept).
        regions = self.features[corpus.img_id(index)]
        n = regions.num_boxes
        feats = regions.features
        feat_mask = np.zeros(n, dtype=np.float32)
        if opts.visual and n:
            u = rng.random(n)
            chosen = u < opts.obj_mask_rate
            v = u / opts.obj_mask_rate
            feats = feats.copy()
            feats[chosen & (v < 0.8)] = 0.0
            for r in np.flatnonzero(chosen & (v >= 0.8) & (v < 0.9)):
                other = self.features[corpus.img_id(int(rng.integers(0, len(corpus))))]
                if other.num_boxes:
                    feats[r] = other.features[int(rng.integers(0, other.num_boxes))]
            feat_mask[chosen] = 1.0

        # QA: matched pairs with a label; the target drawn in proportion to the scores.
        answers, scores = corpus.label(index)
        qa_target = IGNORE
        if opts.qa and matched and len(answers):
            weights = scores.astype(np.float64)
            if len(answers) == 1:
                qa_target = int(answers[0])
            elif weights.sum() > 0:
                qa_target = int(answers[rng.choice(len(answers), p=weights / weights.sum())])
        return {
            "uid": corpus.uid(index),
            "sentence_uid": corpus.uid(sentence_item),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mlm_labels": mlm_labels,
            "regions": regions,
            "masked_feats": feats,
            "feat_mask": feat_mask,
            "matched_label": matched,
            "qa_target": qa_target,
            "qa_answers": answers if matched else answers[:0],
            "qa_scores": scores if matched else scores[:0],
        }


def collate_pretrain(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack items into a batch (regions padded to the batch's largest ``n``: padded regions weigh 0).

    - ``input_ids``, ``attention_mask``, ``token_type_ids``, ``mlm_labels`` ``(B, L)`` int64 (-100 = no MLM label);
    - ``visual_feats`` ``(B, V, D)`` (masked), ``visual_pos`` ``(B, V, 4)`` in [0, 1], ``visual_attention_mask``
      ``(B, V)`` only when some image has fewer than ``V`` regions;
    - ``obj_ids`` / ``attr_ids`` ``(B, V)`` int64 (-100 on padding), ``obj_conf`` / ``attr_conf`` ``(B, V)`` float32
      detector confidences (0 on padding); ``feat_target`` ``(B, V, D)`` the unmasked features, ``feat_mask``
      ``(B, V)`` 1 = masked region;
    - ``matched_label`` ``(B,)``, ``qa_target`` ``(B,)`` (-100 = none), ``qa_answers`` ``(B, K)`` int64 (-1 pad) and
      ``qa_scores`` ``(B, K)`` float32: the soft label of matched items (for QA accuracy); ``uid``: list of str.
    """
    batch_size = len(items)
    regions = [it["regions"] for it in items]
    visual = collate_regions(regions)
    num = visual["visual_feats"].shape[1]
    masked = collate_regions([replace(r, features=it["masked_feats"]) for r, it in zip(regions, items)])
    obj_ids = np.full((batch_size, num), IGNORE, dtype=np.int64)
    attr_ids = np.full((batch_size, num), IGNORE, dtype=np.int64)
    obj_conf = np.zeros((batch_size, num), dtype=np.float32)
    attr_conf = np.zeros((batch_size, num), dtype=np.float32)
    feat_mask = np.zeros((batch_size, num), dtype=np.float32)
    width = max(1, max(len(it["qa_answers"]) for it in items))
    qa_answers = np.full((batch_size, width), -1, dtype=np.int64)
    qa_scores = np.zeros((batch_size, width), dtype=np.float32)
    for i, (r, it) in enumerate(zip(regions, items)):
        n = r.num_boxes
        obj_ids[i, :n], obj_conf[i, :n] = r.obj_ids, r.obj_conf
        attr_ids[i, :n], attr_conf[i, :n] = r.attr_ids, r.attr_conf
        feat_mask[i, :n] = it["feat_mask"]
        k = len(it["qa_answers"])
        qa_answers[i, :k], qa_scores[i, :k] = it["qa_answers"], it["qa_scores"]
    input_ids = torch.from_numpy(np.stack([it["input_ids"] for it in items]))
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": torch.from_numpy(np.stack([it["attention_mask"] for it in items])),
        "token_type_ids": torch.zeros_like(input_ids),
        "mlm_labels": torch.from_numpy(np.stack([it["mlm_labels"] for it in items])),
        "visual_feats": masked["visual_feats"],
        "visual_pos": visual["visual_pos"],
        "obj_ids": torch.from_numpy(obj_ids),
        "obj_conf": torch.from_numpy(obj_conf),
        "attr_ids": torch.from_numpy(attr_ids),
        "attr_conf": torch.from_numpy(attr_conf),
        "feat_target": visual["visual_feats"],
        "feat_mask": torch.from_numpy(feat_mask),
        "matched_label": torch.tensor([it["matched_label"] for it in items], dtype=torch.int64),
        "qa_target": torch.tensor([it["qa_target"] for it in items], dtype=torch.int64),
        "qa_answers": torch.from_numpy(qa_answers),
        "qa_scores": torch.from_numpy(qa_scores),
        "uid": [it["uid"] for it in items],
    }
    if "visual_attention_mask" in visual:
        batch["visual_attention_mask"] = visual["visual_attention_mask"]
    return batch
