"""The one-shot pipeline runs end to end (reduced detector config to stay fast) and resumes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_full_run_on_demo_images(tmp_path: Path) -> None:
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip("tests are not running from the clone's .venv")
    from extract.store import FeatureStore

    images = sorted(p.stem for p in (ROOT / "demo" / "images").iterdir())
    assert len(images) >= 4
    env = dict(os.environ, CONFIG="vg_tiny", DEVICE="cpu", BATCH_SIZE="3", WORKERS="1")
    env.pop("WEIGHTS", None)
    cmd = ["bash", str(ROOT / "pipelines" / "full_run.sh"), str(ROOT / "demo" / "images"), str(tmp_path)]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "RANDOM detector weights" in first.stdout

    store = FeatureStore(tmp_path / "features.lmdb")
    assert sorted(store) == images
    meta = store.metadata
    assert meta["extractor"]["random_weights"] is True
    for img_id in images:
        rec = store[img_id]
        assert rec["features"].shape[0] == rec["boxes"].shape[0] == rec["num_boxes"] > 0
    store.close()

    # a second run finds everything done and redoes nothing
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert FeatureStore(tmp_path / "features.lmdb").metadata["count"] == len(images)
