"""Tiny generated fine-tuning data for the VQA / GQA / NLVR2 tests: stores, LXMERT JSON files, configs.

Each image has one "colour" (one of :data:`COLOURS`) written into its region features (dimension
``colour index`` raised on every region, plus noise), so the answer to "what colour is it?" depends on the image
only; colours are drawn unevenly so the majority answer is a clear baseline. NLVR2 sentences say "both are
<colour>": true iff both images have that colour.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from region_labels import random_labels

from extract.store import FeatureWriter
from tasks.config import TrainConfig

DIM = 8
COLOURS = ["red", "blue", "green", "yellow"]
WEIGHTS = [0.4, 0.3, 0.2, 0.1]  # the majority answer ("red") is right 40% of the time
EXTRACTOR = {"weights": "tiny.pkl", "weights_sha256": "ab" * 32, "selection": "top36", "min_size": 600}
TINY_MODEL = dict(
    hidden_size=32,
    num_attention_heads=4,
    intermediate_size=64,
    l_layers=1,
    r_layers=1,
    x_layers=1,
    visual_feat_dim=DIM,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def image_colours(n: int, seed: int = 0) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    return {f"img{i:04d}": int(rng.choice(len(COLOURS), p=WEIGHTS)) for i in range(n)}


def write_store(
    path: Path, colours: dict[str, int], n_boxes: int = 4, seed: int = 1, uneven: bool = False
) -> Path:
    """A store whose images carry their colour in feature dimension ``colour`` (``uneven``: some images have
    fewer regions)."""
    rng = np.random.default_rng(seed)
    with FeatureWriter(path, extractor=EXTRACTOR) as writer:
        for k, (img_id, colour) in enumerate(colours.items()):
            n = n_boxes - (k % 2) if uneven else n_boxes
            feats = rng.normal(0, 0.3, (n, DIM)).astype(np.float32)
            feats[:, colour] += 2.0
            x1 = rng.uniform(0, 50, n)
            writer.put(
                img_id,
                {
                    "features": feats,
                    "boxes": np.stack([x1, x1, x1 + 40, x1 + 30], 1).astype(np.float32),
                    **random_labels(rng, n),
                    "img_h": 100,
                    "img_w": 120,
                },
            )
    return path


def qa_items(
    colours: dict[str, int], first_qid: int = 1, gqa: bool = False, extra: bool = True
) -> list[dict]:
    """One question per image: ``label`` = the colour 1.0 (VQA: plus a 0.3 runner-up and, on every fifth
    question, an answer outside the table, "purple")."""
    items = []
    for k, (img_id, colour) in enumerate(colours.items()):
        label = {COLOURS[colour]: 1.0}
        if extra and not gqa:
            label[COLOURS[(colour + 1) % len(COLOURS)]] = 0.3
            if k % 5 == 0:
                label["purple"] = 0.3
        qid = str(first_qid + k) if gqa else first_qid + k
        items.append({"img_id": img_id, "label": label, "question_id": qid, "sent": "What colour is it?"})
    return items


def nlvr2_items(colours: dict[str, int], split: str = "train", seed: int = 2) -> list[dict]:
    """One pair per image, the second image drawn at random; "Both pictures are warm." is true iff both images
    are red or blue (about half of the pairs)."""
    rng = np.random.default_rng(seed)
    ids = list(colours)
    items = []
    for k, a in enumerate(ids):
        b = ids[int(rng.integers(len(ids)))]
        items.append(
            {
                "identifier": f"{split}-{k}-0-0",
                "img0": a,
                "img1": b,
                "label": int(colours[a] < 2 and colours[b] < 2),
                "sent": "Both pictures are warm.",
                "uid": f"nlvr2_{split}_{k}",
            }
        )
    return items


def write_json(path: Path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def qa_setup(tmp_path: Path, task: str = "vqa", n_train: int = 160, n_valid: int = 40, **data) -> TrainConfig:
    """Store + train / valid files + answer table for ``task`` (vqa or gqa); returns the tiny config."""
    colours = image_colours(n_train + n_valid)
    store = write_store(tmp_path / "feats.lmdb", colours)
    ids = list(colours)
    train = {i: colours[i] for i in ids[:n_train]}
    valid = {i: colours[i] for i in ids[n_train:]}
    gqa = task == "gqa"
    cfg = TrainConfig(task=task)
    cfg.data.train = [write_json(tmp_path / "train.json", qa_items(train, gqa=gqa))]
    cfg.data.valid = write_json(tmp_path / "valid.json", qa_items(valid, first_qid=10_000, gqa=gqa))
    cfg.data.answers = write_json(tmp_path / "label2ans.json", COLOURS)
    cfg.data.features = [str(store)]
    return tiny(cfg, **data)


def nlvr2_setup(tmp_path: Path, n_images: int = 60, **data) -> TrainConfig:
    colours = image_colours(n_images, seed=3)
    store = write_store(tmp_path / "feats.lmdb", colours)
    cfg = TrainConfig(task="nlvr2")
    cfg.data.train = [write_json(tmp_path / "train.json", nlvr2_items(colours, "train"))]
    cfg.data.valid = write_json(tmp_path / "valid.json", nlvr2_items(colours, "dev", seed=5)[:40])
    cfg.data.features = [str(store)]
    return tiny(cfg, **data)


def tiny(cfg: TrainConfig, **data) -> TrainConfig:
    for k, v in TINY_MODEL.items():
        setattr(cfg.model, k, v)
    cfg.data.batch_size = 16
    cfg.data.eval_batch_size = 32
    cfg.data.workers = 0
    cfg.data.max_seq_length = 12
    for k, v in data.items():
        setattr(cfg.data, k, v)
    cfg.train.device = "cpu"
    cfg.train.amp = "none"
    cfg.optim.lr = 1e-3
    cfg.optim.warmup = 0.1
    cfg.optim.clip_grad_norm = 5.0
    return cfg
