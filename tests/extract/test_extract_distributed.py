"""``torchrun --nproc_per_node 2 extract-features`` (gloo on CPU) gives the same store as one process."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract.cli import main
from extract.store import FIELDS, open_metadata

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = ROOT / ".venv" / "bin" / "torchrun"
FAST = ["--random-weights", "--config", "vg_tiny", "--min-size", "64", "--max-size", "112", "--no-progress"]


def _make_images(root: Path) -> None:
    root.mkdir(parents=True)
    sizes = [(48, 64), (64, 48), (48, 64), (40, 40), (48, 64), (30, 90), (64, 48), (21, 33), (48, 64)]
    for i, (h, w) in enumerate(sizes):
        rng = np.random.default_rng(100 + i)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"d{i:02d}.jpg")
    (root / "bad.jpg").write_bytes(b"")


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason=f"{TORCHRUN} not installed")
def test_torchrun_two_ranks_equal_one_process(tmp_path: Path, capsys, read_records) -> None:
    _make_images(tmp_path / "imgs")
    one, two = tmp_path / "one.lmdb", tmp_path / "two.lmdb"
    assert main([str(tmp_path / "imgs"), str(one), *FAST, "--workers", "0", "--batch-size", "1"]) == 0
    capsys.readouterr()

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    cmd = [
        str(TORCHRUN),
        "--standalone",
        "--nproc_per_node",
        "2",
        "--no-python",
        str(ROOT / ".venv" / "bin" / "extract-features"),
        str(tmp_path / "imgs"),
        str(two),
        *FAST,
        "--workers",
        "1",
        "--batch-size",
        "1",
    ]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    # rank 0 alone prints the summary, aggregated over both ranks
    assert run.stdout.count("extract-features: finished") == 1, run.stdout
    assert "10 images: 9 done, 0 skipped as already present, 1 failed" in run.stdout
    assert "2 process(es)" in run.stdout

    # batch size 1 on both sides: every record is computed alone, so the values are bit for bit equal
    a, b = read_records(one), read_records(two)
    assert sorted(a) == sorted(b) and len(a) == 9
    for img_id in a:
        for f in FIELDS:
            np.testing.assert_array_equal(a[img_id][f], b[img_id][f], err_msg=f"{img_id}.{f}")
        assert (a[img_id]["img_h"], a[img_id]["img_w"]) == (b[img_id]["img_h"], b[img_id]["img_w"])
    assert open_metadata(two)["count"] == 9
    assert open_metadata(two)["extractor"] == open_metadata(one)["extractor"]
    fails = [json.loads(x) for x in Path(str(two) + ".failures.jsonl").read_text().splitlines()]
    assert [f["id"] for f in fails] == ["bad"]

    # resuming under torchrun: nothing left to do, everything counted as already present
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 done, 9 skipped as already present, 1 failed" in run.stdout

    # --overwrite with batches of 3 on each rank: same ids, values equal up to float reassociation
    cmd[cmd.index("--batch-size") + 1] = "3"
    run = subprocess.run(
        [*cmd, "--overwrite"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "9 done, 0 skipped as already present, 1 failed" in run.stdout
    c = read_records(two)
    assert sorted(c) == sorted(a)
    for img_id in a:
        np.testing.assert_array_equal(a[img_id]["obj_ids"], c[img_id]["obj_ids"])
        np.testing.assert_allclose(a[img_id]["boxes"], c[img_id]["boxes"], rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(a[img_id]["features"], c[img_id]["features"], rtol=1e-4, atol=1e-5)
