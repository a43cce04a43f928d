"""Features of another extractor (issue 24, case 5): refused on --resume (the run's record in its checkpoint),
warned on --load (the model's extractor.json), and the saved extractor.json keeps both: the model's history."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from finetune_data import EXTRACTOR, qa_setup

from common.config import ConfigError, save_config
from extract.store import FeatureStore, FeatureWriter
from tasks.answer.results import compare_extractor
from tasks.cli import main as cli_main
from tasks.engine import train
from tasks.finetune import vqa

pytestmark = pytest.mark.usefixtures("one_thread")

OTHER = {**EXTRACTOR, "weights_sha256": "cd" * 32, "min_size": 800}


def _copy_store(src: Path, dst: Path, extractor: dict) -> str:
    """The same records under another extractor's settings (as re-extracting with other weights would give)."""
    with FeatureStore(src) as reader, FeatureWriter(dst, extractor) as writer:
        for img_id in reader:
            writer.put(img_id, reader[img_id])
    return str(dst)


@pytest.fixture(scope="module")
def first_model(tmp_path_factory) -> tuple[Path, object]:
    """A tiny VQA model fine-tuned on features of EXTRACTOR, and its config."""
    root = tmp_path_factory.mktemp("first")
    cfg = qa_setup(root, n_train=32, n_valid=8)
    cfg.train.epochs = 1
    train(cfg, vqa.build(cfg), root / "run")
    return root / "run" / "final", cfg


def test_load_warns_and_extractor_json_keeps_both(first_model, tmp_path, caplog):
    model, cfg = first_model
    other = _copy_store(Path(cfg.data.features[0]), tmp_path / "other.lmdb", OTHER)
    cfg2 = qa_setup(tmp_path / "data", n_train=32, n_valid=8)
    cfg2.data.features, cfg2.train.epochs = [other], 1
    with caplog.at_level(logging.WARNING):
        train(cfg2, vqa.build(cfg2, str(model)), tmp_path / "run", load=str(model))
    warned = [r.getMessage() for r in caplog.records if "another extractor" in r.getMessage()]
    assert len(warned) == 1 and str(model) in warned[0] and other in warned[0], warned
    assert (
        f"weights_sha256: {'ab' * 32!r} -> {'cd' * 32!r}" in warned[0] and "min_size: 600 -> 800" in warned[0]
    )
    record = json.loads((tmp_path / "run" / "final" / "extractor.json").read_text())
    assert record == [OTHER, {**EXTRACTOR, "from_load": str(model)}]
    # lxmert-answer checks the features the model was last trained on, not its history
    assert compare_extractor(record, OTHER).ok
    assert not compare_extractor(record, EXTRACTOR).ok


def test_resume_with_another_extractor_is_refused(first_model, tmp_path, capsys):
    _, cfg = first_model
    cfg = qa_setup(tmp_path / "data", n_train=32, n_valid=8)
    cfg.train.epochs = 2
    run = tmp_path / "run"
    train(cfg, vqa.build(cfg), run, max_steps=2)  # stopped after epoch 1
    other = _copy_store(Path(cfg.data.features[0]), tmp_path / "other.lmdb", OTHER)
    cfg.data.features = [other]
    with pytest.raises(ConfigError) as info:
        train(cfg, vqa.build(cfg), run, resume=True)
    msg = str(info.value)
    assert "extractor.json: the run was trained on features of another extractor than" in msg and other in msg
    assert "weights_sha256" in msg and "--resume" in msg, msg
    config = str(save_config(cfg, tmp_path / "vqa.yaml"))
    assert cli_main(["vqa", "--config", config, "--output", str(run), "--resume"]) == 2
    assert "another extractor" in capsys.readouterr().err
    cfg.data.features = [str(tmp_path / "data" / "feats.lmdb")]  # the run's own stores: it resumes
    assert train(cfg, vqa.build(cfg), run, resume=True)["completed"]
