"""A tiny model folder for the lxmert-answer / lxmert-serve tests: the VG detector ``vg_tiny`` with random weights
saved to a file, one image, its store (extracted with those weights) and a QA model folder trained 'on' that store
(model.safetensors + config.json, label2ans.json, extractor.json from the store's metadata)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from extract.detector import build_vg_detector, get_detector_cfg
from extract.runner import ExtractConfig, ImageItem, run_extraction
from extract.store import FeatureStore
from model import LxmertConfig, LxmertForQuestionAnswering
from tasks.data.model_folder import feature_extras
from tasks.data.regions import RegionFeatures
from tasks.engine.checkpointing import save_model_dir

SMALL = {"min_size": 64, "max_size": 112}  # tiny resized images keep the detector fast
ANSWERS = ["yes", "no", "2", "red", "frisbee", "dog", "table"]


def make_image(path: Path, h: int, w: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[h // 4 : h // 2, w // 3 : 2 * w // 3] = (220, 30, 30)  # something for the detector to look at
    Image.fromarray(img).save(path)
    return path


def save_tiny_qa_model(
    folder: Path, store: Path, dim: int, answers: list[str], x_layers: int = 1
) -> LxmertForQuestionAnswering:
    """A tiny random (seed 0) VQA model for ``dim``-d features, saved to ``folder`` as fine-tuning saves
    ``RUN_DIR/best`` (weights, config, answer table, the records of ``store``'s features); returned in eval mode."""
    torch.manual_seed(0)
    config = LxmertConfig(
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        l_layers=1,
        r_layers=1,
        x_layers=x_layers,
        visual_feat_dim=dim,
        num_qa_labels=len(answers),
        initializer_range=0.3,  # large weights: the answers depend clearly on the regions
    )
    model = LxmertForQuestionAnswering(config).eval()
    save_model_dir(folder, model, {"label2ans.json": answers, **feature_extras(RegionFeatures([store]))})
    return model


def build_answer_model(root: Path) -> dict:
    """Detector weights file, one image, its store, the model folder (see the module doc)."""
    detector = build_vg_detector(get_detector_cfg("vg_tiny"), "cpu", seed=3)
    weights = root / "vg_tiny_random.safetensors"
    save_file({k: v.contiguous() for k, v in detector.state_dict().items()}, str(weights))
    image = make_image(root / "photo.png", 60, 90, seed=0)
    store = root / "features.lmdb"
    config = ExtractConfig(
        out=str(store),
        weights=str(weights),
        config="vg_tiny",
        workers=0,
        batch_size=1,
        progress=False,
        **SMALL,
    )
    summary = run_extraction(config, [ImageItem("photo", str(image))])
    assert summary.done == 1, summary.format()
    with FeatureStore(store) as fs:
        extractor = fs.metadata["extractor"]

    folder = root / "best"
    model = save_tiny_qa_model(folder, store, detector.feature_dim, ANSWERS, x_layers=2)
    assert json.loads((folder / "extractor.json").read_text()) == [extractor]
    return {
        "root": root,
        "weights": weights,
        "image": image,
        "store": store,
        "model_dir": folder,
        "model": model,
        "extractor": extractor,
    }
