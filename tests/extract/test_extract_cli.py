"""The ``extract-features`` CLI: refusals, --list, --id-from, --strict, real COCO photos, kill -9 and resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common import cpu as runtime
from extract import cli
from extract.cli import build_parser, config_from_args, main
from extract.config import AMP_DTYPES, ExtractConfig, default_workers
from extract.image_list import ID_MODES
from extract.outcome import ExtractSummary
from extract.runner import ExtractionInterrupted
from extract.selection import RULES
from extract.store import FEATURES_DTYPES, FIELDS, open_metadata, verify_store

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--random-weights", "--config", "vg_tiny", "--min-size", "64", "--max-size", "112", "--no-progress"]


def _images(root: Path, n: int, start: int = 0) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + n):
        h, w = (48, 64) if i % 3 else (64, 48)
        rng = np.random.default_rng(i)
        path = root / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        out.append(path)
    return out


def _assert_same_store(read_records, a: Path, b: Path) -> None:
    ra, rb = read_records(a), read_records(b)
    assert sorted(ra) == sorted(rb)
    for img_id in ra:
        for f in FIELDS:
            assert ra[img_id][f].dtype == rb[img_id][f].dtype
            np.testing.assert_array_equal(ra[img_id][f], rb[img_id][f], err_msg=f"{img_id}.{f}")
        assert (ra[img_id]["img_h"], ra[img_id]["img_w"]) == (rb[img_id]["img_h"], rb[img_id]["img_w"])


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


# ------------------------------------------------------------------------------------------------ refusals
def test_duplicate_ids_refused_before_any_work(tmp_path: Path, capsys, read_records) -> None:
    _images(tmp_path / "imgs" / "a", 2)
    _images(tmp_path / "imgs" / "b", 1)  # b/img000.png collides with a/img000.png
    out = tmp_path / "out.lmdb"
    assert main([str(tmp_path / "imgs"), str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert "'img000'" in err and str(tmp_path / "imgs" / "a" / "img000.png") in err
    assert str(tmp_path / "imgs" / "b" / "img000.png") in err
    assert not out.exists()
    # keyed by relative path there is no collision
    assert main([str(tmp_path / "imgs"), str(out), *FAST, "--id-from", "relpath", "--workers", "0"]) == 0
    assert sorted(read_records(out)) == ["a/img000", "a/img001", "b/img000"]


def test_weights_and_output_refusals(tmp_path: Path, capsys) -> None:
    _images(tmp_path / "imgs", 2)
    imgs, out = str(tmp_path / "imgs"), tmp_path / "out.lmdb"
    tiny = ["--config", "vg_tiny", "--min-size", "64", "--max-size", "112", "--no-progress"]

    assert main([imgs, str(out), *tiny]) == 2  # no weights at all
    assert "--weights" in capsys.readouterr().err
    assert main([imgs, str(out), "--weights", str(tmp_path / "missing.pkl"), *tiny]) == 2
    assert "missing.pkl does not exist" in capsys.readouterr().err
    bad = tmp_path / "corrupt.pkl"
    bad.write_bytes(b"\x80\x04 definitely not a pickle")
    assert main([imgs, str(out), "--weights", str(bad), *tiny]) == 2
    err = capsys.readouterr().err
    assert (
        f"extract-features: refused: {bad} is not a readable pickle" in err and err.count("refused") == 1
    ), err
    assert not out.exists()  # refused before the store was created

    afile = tmp_path / "file.lmdb"
    afile.write_text("not a store")
    assert main([imgs, str(afile), *FAST]) == 2
    assert "not a feature store directory" in capsys.readouterr().err


def test_mismatched_settings_refused(tmp_path: Path, capsys) -> None:
    _images(tmp_path / "imgs", 2)
    imgs, out = str(tmp_path / "imgs"), str(tmp_path / "out.lmdb")
    assert main([imgs, out, *FAST, "--workers", "0"]) == 0
    before = open_metadata(out)
    capsys.readouterr()
    for extra, key in [
        (["--boxes", "10-100"], "min_boxes"),
        (["--selection", "maxnms"], "selection"),
        (["--conf-thresh", "0.3"], "conf_thresh"),
        (["--amp", "bf16"], "amp"),
        (["--features-dtype", "float16"], "float16"),
    ]:
        assert main([imgs, out, *FAST, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert "refused" in err and key in err, err
    argv = [imgs, out, *FAST[:-5], "--min-size", "80", "--max-size", "112", "--no-progress"]
    assert main(argv) == 2
    assert "min_size: stored 64, now 80" in capsys.readouterr().err
    assert open_metadata(out)["updated"] == before["updated"]  # nothing was written
    # the same settings resume (nothing to do) and --overwrite redoes everything
    assert main([imgs, out, *FAST, "--workers", "0"]) == 0
    assert "0 done, 2 skipped as already present, 0 failed" in capsys.readouterr().out
    assert main([imgs, out, *FAST, "--workers", "0", "--overwrite"]) == 0
    assert "2 done, 0 skipped as already present" in capsys.readouterr().out


def test_bad_arguments_exit_2(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path), *FAST]) == 2  # no OUT
    assert main(["--list", "x.txt", "a", "b", "c", *FAST]) == 2
    assert main([str(tmp_path), str(tmp_path / "o.lmdb"), *FAST, "--boxes", "abc"]) == 2
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path), str(tmp_path / "o.lmdb"), "--amp", "fp8"])
    assert info.value.code == 2


def test_flags_come_from_the_config_dataclass() -> None:
    """Choices and defaults are ExtractConfig's: parsing no option gives ExtractConfig's own defaults."""
    actions = {a.dest: a for a in build_parser()._actions}
    assert tuple(actions["amp"].choices) == tuple(AMP_DTYPES)
    assert tuple(actions["features_dtype"].choices) == FEATURES_DTYPES
    assert tuple(actions["id_from"].choices) == ID_MODES
    assert tuple(actions["selection"].choices) == RULES == ("caffe", "maxnms")
    weights_help = actions["weights"].help
    assert all(s in weights_help for s in (".pkl", ".pth", ".bin", "unc-nlp/frcnn-vg-finetuned")), (
        weights_help
    )
    assert actions["workers"].default == default_workers()
    args = build_parser().parse_args(["imgs", "out.lmdb", "--random-weights", "--device", "cpu"])
    config, images_dir = config_from_args(args)
    assert images_dir == "imgs"
    assert config == ExtractConfig(out="out.lmdb", random_weights=True, device="cpu")


def test_interrupted_run_prints_its_summary(tmp_path: Path, capsys, monkeypatch) -> None:
    _images(tmp_path / "imgs", 1)
    out = str(tmp_path / "out.lmdb")

    def interrupted(config, items):
        raise ExtractionInterrupted(ExtractSummary(total=3, done=1, interrupted=True, out=config.out))

    monkeypatch.setattr(cli, "run_extraction", interrupted)
    assert main([str(tmp_path / "imgs"), out, *FAST]) == 130
    captured = capsys.readouterr()
    assert "extract-features: INTERRUPTED: 3 images: 1 done" in captured.out
    assert "run the same command again to resume" in captured.err


def test_default_batch_size_follows_the_device() -> None:
    def batch(*extra: str) -> int:
        args = build_parser().parse_args(["imgs", "out.lmdb", "--random-weights", *extra])
        return config_from_args(args)[0].batch_size

    assert batch("--device", "cpu") == 1
    assert batch("--device", "cuda") == 4
    assert batch("--device", "cuda:1") == 4
    assert batch("--device", "cpu", "--batch-size", "8") == 8


# ------------------------------------------------------------------------------------------------ inputs
def test_list_file_relative_to_images_dir_or_list(tmp_path: Path, capsys, read_records) -> None:
    _images(tmp_path / "data" / "train", 3)
    _images(tmp_path / "data" / "val", 1, start=10)
    listing = tmp_path / "data" / "todo.txt"
    listing.write_text("train/img000.png\ntrain/img002.png\n# skip me\nval/img010.png\nval/missing.png\n")
    out = tmp_path / "list.lmdb"
    assert main(["--list", str(listing), str(out), *FAST, "--workers", "0"]) == 0
    assert sorted(read_records(out)) == ["img000", "img002", "img010"]
    fails = [json.loads(x) for x in Path(str(out) + ".failures.jsonl").read_text().splitlines()]
    assert [(f["id"], "not found" in f["reason"]) for f in fails] == [("missing", True)]
    assert "3 done, 0 skipped as already present, 1 failed" in capsys.readouterr().out

    other = tmp_path / "elsewhere.txt"
    other.write_text("train/img001.png\n")
    out2 = tmp_path / "rel.lmdb"
    argv = ["--list", str(other), str(tmp_path / "data"), str(out2), *FAST, "--id-from", "relpath"]
    assert main([*argv, "--workers", "0"]) == 0
    assert sorted(read_records(out2)) == ["train/img001"]


def test_strict_exit_code_and_random_weights_banner(tmp_path: Path, capsys) -> None:
    _images(tmp_path / "imgs", 2)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage")
    imgs, out = str(tmp_path / "imgs"), str(tmp_path / "out.lmdb")
    assert main([imgs, out, *FAST, "--workers", "0"]) == 0
    text = capsys.readouterr().out
    assert "2 done, 0 skipped as already present, 1 failed" in text
    assert "\033[1mRANDOM WEIGHTS" in text
    assert open_metadata(out)["extractor"]["random_weights"] is True
    assert (
        main([imgs, out, *FAST, "--workers", "0", "--strict"]) == 1
    )  # the failed image is retried, fails again
    assert "0 done, 2 skipped as already present, 1 failed" in capsys.readouterr().out


def test_amp_without_native_support_on_cpu_is_flagged(tmp_path: Path, capsys, monkeypatch) -> None:
    _images(tmp_path / "imgs", 1)
    imgs = str(tmp_path / "imgs")
    monkeypatch.setattr(runtime, "cpu_autocast_is_fast", lambda dtype: dtype == torch.float32)
    argv = [*FAST, "--workers", "0", "--device", "cpu"]
    assert main([imgs, str(tmp_path / "a.lmdb"), *argv, "--amp", "bf16"]) == 0
    err = capsys.readouterr().err
    assert "warning: --amp bf16" in err and "float32" in err
    assert main([imgs, str(tmp_path / "b.lmdb"), *argv]) == 0
    assert "warning" not in capsys.readouterr().err


def test_real_coco_photos_keep_original_sizes(
    tmp_path: Path, coco_images: Path, coco_tsv: Path, read_records
) -> None:
    csv.field_size_limit(1 << 30)
    with open(coco_tsv, newline="") as f:
        expected = {row[0]: (int(row[1]), int(row[2])) for row in csv.reader(f, delimiter="\t")}
    out = tmp_path / "coco.lmdb"
    assert main([str(coco_images), str(out), *FAST, "--workers", "2", "--batch-size", "4"]) == 0
    recs = read_records(out)
    assert sorted(recs) == sorted(expected)
    for img_id, (h, w) in expected.items():
        rec = recs[img_id]
        assert (rec["img_h"], rec["img_w"]) == (h, w), img_id
        assert rec["boxes"].shape == (36, 4)
        assert np.all(rec["boxes"][:, [0, 2]] <= w + 1e-3) and np.all(rec["boxes"][:, [1, 3]] <= h + 1e-3)


# ------------------------------------------------------------------------------------------------ kill -9
def _count(path: Path) -> int:
    try:
        return int(open_metadata(path).get("count") or 0)
    except Exception:
        return 0


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted_run(tmp_path: Path, read_records) -> None:
    n = 60
    _images(tmp_path / "imgs", n)
    imgs, out, ref = tmp_path / "imgs", tmp_path / "killed.lmdb", tmp_path / "ref.lmdb"
    argv = [str(imgs), str(out), *FAST, "--batch-size", "1", "--workers", "1"]
    cmd = [sys.executable, "-m", "extract.cli", *argv]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while _count(out) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, (
            "the run finished before it could be killed: " + proc.stdout.read().decode()
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    committed = len(read_records(out))
    assert 3 <= committed < n, committed

    rerun = subprocess.run(cmd, cwd=ROOT, env=_cli_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{n - committed} done, {committed} skipped as already present, 0 failed" in rerun.stdout
    report = verify_store(out)
    assert report.checked == n and not report.bad, report.bad

    assert main([str(imgs), str(ref), *FAST, "--batch-size", "1", "--workers", "0"]) == 0
    _assert_same_store(read_records, out, ref)
