"""extract.runner with the real ``vg_tiny`` detector (random weights): ids, batching, bad files, resume."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from extract import runner as runner_module
from extract import weights as weights_module
from extract.detector import build_vg_detector, get_detector_cfg
from extract.runner import (
    AspectRatioGrouper,
    DuplicateIdError,
    ExtractConfig,
    Failure,
    ImageItem,
    SetupError,
    assign_ids,
    collect_images,
    extractor_settings,
    failures_path,
    find_images,
    read_image_list,
    run_extraction,
    write_failures,
)
from extract.selection import BoxSelection
from extract.store import FIELDS, FeatureStore, FeatureWriter, open_metadata

SMALL = {"min_size": 64, "max_size": 112}  # tiny resized images keep the detector fast


@pytest.fixture(scope="module")
def detector():
    return build_vg_detector(get_detector_cfg("vg_tiny"), "cpu", seed=0)


def _config(out: Path, **kw) -> ExtractConfig:
    base = dict(out=str(out), random_weights=True, config="vg_tiny", workers=0, batch_size=1, progress=False)
    base.update(SMALL)
    base.update(kw)
    return ExtractConfig(**base)


def _save(path: Path, h: int, w: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------------------------------ image lists
def test_find_images_recursive_any_case(tmp_path: Path) -> None:
    for rel in ("a.jpg", "b.JPEG", "sub/c.png", "sub/deeper/d.Bmp", "e.webp"):
        _save(tmp_path / rel, 8, 8, 0) if not rel.endswith("webp") else Image.new("RGB", (4, 4)).save(
            tmp_path / rel
        )
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "anim.gif").write_bytes(b"GIF89a")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["a.jpg", "b.JPEG", "e.webp", "sub/c.png", "sub/deeper/d.Bmp"]
    with pytest.raises(SetupError, match="does not exist"):
        find_images(tmp_path / "missing")


def test_ids_stem_and_relpath(tmp_path: Path) -> None:
    paths = [tmp_path / "COCO_train2014_000000458752.jpg", tmp_path / "nlvr" / "train-10171-0-img0.png"]
    paths.append(tmp_path / "vg" / "2375429.jpg")
    items = assign_ids(paths, tmp_path, "stem")
    assert [i.img_id for i in items] == ["2375429", "COCO_train2014_000000458752", "train-10171-0-img0"]
    rel = assign_ids(paths, tmp_path, "relpath")
    assert sorted(i.img_id for i in rel) == [
        "COCO_train2014_000000458752",
        "nlvr/train-10171-0-img0",
        "vg/2375429",
    ]
    with pytest.raises(SetupError, match="outside"):
        assign_ids([tmp_path.parent / "x.jpg"], tmp_path, "relpath")


def test_duplicate_ids_name_both_files(tmp_path: Path, detector) -> None:
    paths = [tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.png", tmp_path / "y.jpg"]
    with pytest.raises(DuplicateIdError) as info:
        assign_ids(paths, tmp_path, "stem")
    msg = str(info.value)
    assert "'x'" in msg and str(paths[0]) in msg and str(paths[1]) in msg and "--id-from relpath" in msg
    assert len(assign_ids(paths, tmp_path, "relpath")) == 3
    with pytest.raises(DuplicateIdError):  # same relative path, two extensions
        assign_ids([tmp_path / "a" / "x.jpg", tmp_path / "a" / "x.png"], tmp_path, "relpath")
    items = [ImageItem("x", "/one/x.jpg"), ImageItem("x", "/two/x.jpg")]
    with pytest.raises(DuplicateIdError, match="'x': /one/x.jpg, /two/x.jpg"):
        run_extraction(_config(tmp_path / "dup.lmdb"), items, detector=detector)
    assert not (tmp_path / "dup.lmdb").exists()


def test_read_image_list(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    listing = tmp_path / "list.txt"
    listing.write_text(f"# comment\nimgs/a.jpg\n\n  imgs/b.png  \n{tmp_path / 'abs.jpg'}\n")
    paths = read_image_list(listing)
    assert paths == [tmp_path / "imgs/a.jpg", tmp_path / "imgs/b.png", tmp_path / "abs.jpg"]
    assert read_image_list(listing, base_dir="/data")[0] == Path("/data/imgs/a.jpg")
    items = collect_images(None, listing, "relpath")
    assert [i.img_id for i in items] == ["abs", "imgs/a", "imgs/b"]
    with pytest.raises(SetupError, match="cannot read the image list"):
        read_image_list(tmp_path / "nope.txt")


# ------------------------------------------------------------------------------------------------ grouping
def test_aspect_ratio_grouper() -> None:
    g = AspectRatioGrouper(batch_size=2, max_buffer=4)
    out = []
    shapes = [(60, 80), (80, 60), (60, 80), (64, 80), (80, 64), (80, 60), (64, 80), (60, 90)]
    for i, s in enumerate(shapes):
        out += g.add((i, s), s)
    out += list(g.flush())
    flat = sorted(i for batch in out for i, _ in batch)
    assert flat == list(range(len(shapes)))  # every sample exactly once
    assert all(1 <= len(b) <= 2 for b in out)
    assert [i for i, _ in out[0]] == [0, 2]  # first full same-size bucket
    for batch in out:  # never mixes orientations
        assert len({s[0] <= s[1] for _, s in batch}) == 1
    g1 = AspectRatioGrouper(batch_size=1)
    assert g1.add("a", (5, 5)) == [["a"]] and list(g1.flush()) == []


# ------------------------------------------------------------------------------------------------ extraction
def _mixed_images(root: Path) -> list[Path]:
    sizes = [(60, 90), (90, 60), (60, 90), (75, 75), (60, 90), (48, 100), (90, 60), (33, 47), (60, 90)]
    return [_save(root / f"im{i:02d}.png", h, w, seed=i) for i, (h, w) in enumerate(sizes)]


def test_batch_one_equals_batch_n(tmp_path: Path, detector, read_records) -> None:
    _mixed_images(tmp_path / "imgs")
    items = collect_images(tmp_path / "imgs")
    s1 = run_extraction(_config(tmp_path / "b1.lmdb", batch_size=1), items, detector=detector)
    s4 = run_extraction(_config(tmp_path / "b4.lmdb", batch_size=4, workers=2), items, detector=detector)
    assert s1.done == s4.done == len(items) and s1.failed == s4.failed == 0
    r1, r4 = read_records(tmp_path / "b1.lmdb"), read_records(tmp_path / "b4.lmdb")
    assert sorted(r1) == sorted(r4) == [i.img_id for i in items]
    for img_id in r1:
        a, b = r1[img_id], r4[img_id]
        assert (a["img_h"], a["img_w"]) == (b["img_h"], b["img_w"])
        np.testing.assert_array_equal(a["obj_ids"], b["obj_ids"])
        np.testing.assert_array_equal(a["attr_ids"], b["attr_ids"])
        np.testing.assert_allclose(a["boxes"], b["boxes"], rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(a["features"], b["features"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(a["obj_conf"], b["obj_conf"], rtol=1e-4, atol=1e-6)
    rec = r1["im07"]
    assert (rec["img_h"], rec["img_w"]) == (33, 47)
    assert rec["features"].shape == (36, detector.feature_dim) and rec["boxes"].shape == (36, 4)
    assert np.all(rec["boxes"][:, 2] <= 47 + 1e-3) and np.all(rec["boxes"][:, 3] <= 33 + 1e-3)
    meta = FeatureStore(tmp_path / "b1.lmdb").metadata
    assert meta["extractor"]["random_weights"] is True and meta["extractor"]["selection"] == "caffe"
    assert meta["count"] == len(items)


def _zoo(root: Path) -> tuple[set[str], set[str]]:
    """Bad and awkward files. Returns (ids that must be extracted, ids that must fail)."""
    root.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(5).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "good.jpg")
    Image.fromarray(rgb).save(root / "UPPER.JPG")
    Image.fromarray(rgb).convert("L").save(root / "gray.png")
    Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 200).save(root / "gray16.png")
    Image.fromarray(rgb).convert("P").save(root / "palette.png")
    Image.fromarray(rgb).convert("RGBA").save(root / "alpha.png")
    Image.fromarray(rgb).convert("LA").save(root / "la.png")
    Image.fromarray(rgb).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(rgb).save(root / "bitmap.bmp")
    Image.fromarray(rgb).save(root / "web.webp")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(root / "dot.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(root / "rotated.jpg", exif=exif.tobytes())
    (root / "zero.jpg").write_bytes(b"")
    jpeg = (root / "good.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (root / "text.png").write_text("hello, I am not a picture\n")
    (root / "header.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\xff" * 64)
    (root / "dangling.jpg").symlink_to(root / "does-not-exist.jpg")
    big = root / "huge.png"
    Image.new("RGB", (1, 1)).save(big)
    data = bytearray(big.read_bytes())  # claim 30000 x 30000 in the header (decompression bomb)
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", 30000, 30000)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF)
    big.write_bytes(bytes(data))
    good = {
        "good",
        "UPPER",
        "gray",
        "gray16",
        "palette",
        "alpha",
        "la",
        "cmyk",
        "bitmap",
        "web",
        "dot",
        "rotated",
    }
    bad = {"zero", "truncated", "text", "header", "dangling", "huge"}
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        Image.fromarray(rgb).save(root / "secret.png")
        (root / "secret.png").chmod(0)
        bad.add("secret")
    return good, bad


def test_bad_file_zoo_nothing_lost_nothing_crashes(tmp_path: Path, detector, read_records) -> None:
    good, bad = _zoo(tmp_path / "zoo")
    items = collect_images(tmp_path / "zoo")
    assert {i.img_id for i in items} == good | bad
    out = tmp_path / "zoo.lmdb"
    summary = run_extraction(_config(out, batch_size=3, workers=2), items, detector=detector)
    assert summary.done == len(good) and summary.failed == len(bad) and summary.skipped == 0
    recs = read_records(out)
    assert set(recs) == good
    assert (recs["rotated"]["img_h"], recs["rotated"]["img_w"]) == (56, 40)  # after EXIF orientation
    assert (recs["dot"]["img_h"], recs["dot"]["img_w"]) == (1, 1)
    assert (recs["gray16"]["img_h"], recs["gray16"]["img_w"]) == (40, 56)
    for rec in recs.values():
        assert all(np.isfinite(rec[f]).all() for f in FIELDS)
    lines = [json.loads(x) for x in failures_path(out).read_text().splitlines()]
    assert {x["id"] for x in lines} == bad
    by_id = {x["id"]: x for x in lines}
    assert by_id["zero"]["reason"].startswith("empty file")
    assert "truncated" in by_id["truncated"]["reason"]
    assert "too large" in by_id["huge"]["reason"]
    assert "not found" in by_id["dangling"]["reason"]
    assert by_id["text"]["path"] == str(tmp_path / "zoo" / "text.png")
    text = summary.format(bold=False)
    assert f"{len(good)} done" in text and f"{len(bad)} failed" in text and "zero" in text


class _FlakyDetector:
    """Delegates to the real detector but fails on images of one original size (or interrupts)."""

    def __init__(self, real, bad_size=None, interrupt_after=None):
        self.real, self.bad_size, self.interrupt_after, self.calls = real, bad_size, interrupt_after, 0

    @property
    def device(self):
        return self.real.device

    def extract(self, images, sizes, selection, amp_dtype=None):
        self.calls += 1
        if self.interrupt_after is not None and self.calls > self.interrupt_after:
            raise KeyboardInterrupt
        if self.bad_size is not None and tuple(self.bad_size) in [tuple(s) for s in sizes]:
            raise RuntimeError("simulated CUDA error in the res5 head")
        return self.real.extract(images, sizes, selection, amp_dtype=amp_dtype)


def test_detector_failure_is_isolated_then_retried_on_resume(tmp_path: Path, detector, read_records) -> None:
    _mixed_images(tmp_path / "imgs")
    items = collect_images(tmp_path / "imgs")
    out = tmp_path / "s.lmdb"
    flaky = _FlakyDetector(detector, bad_size=(33, 47))
    first = run_extraction(_config(out, batch_size=4), items, detector=flaky)
    assert first.done == len(items) - 1 and [f.img_id for f in first.failures] == ["im07"]
    assert "simulated CUDA error" in first.failures[0].reason
    (line,) = failures_path(out).read_text().splitlines()
    assert json.loads(line)["id"] == "im07"
    assert set(read_records(out)) == {i.img_id for i in items} - {"im07"}

    second = run_extraction(_config(out, batch_size=4), items, detector=detector)
    assert (second.done, second.skipped, second.failed) == (1, len(items) - 1, 0)
    assert failures_path(out).read_text() == ""  # the latest run's failures: none
    ref = tmp_path / "ref.lmdb"
    run_extraction(_config(ref, batch_size=4), items, detector=detector)
    got, want = read_records(out), read_records(ref)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k]["features"], want[k]["features"], rtol=1e-4, atol=1e-5)


def test_interrupt_keeps_committed_records_and_resumes(tmp_path: Path, detector, read_records) -> None:
    _mixed_images(tmp_path / "imgs")
    items = collect_images(tmp_path / "imgs")
    out = tmp_path / "s.lmdb"
    with pytest.raises(KeyboardInterrupt):
        run_extraction(
            _config(out, batch_size=1), items, detector=_FlakyDetector(detector, interrupt_after=4)
        )
    assert len(read_records(out)) == 4
    assert not failures_path(out).exists()  # an interrupted run leaves no (partial) failures file
    resumed = run_extraction(_config(out, batch_size=1), items, detector=detector)
    assert (resumed.done, resumed.skipped) == (len(items) - 4, 4)
    assert len(read_records(out)) == len(items)

    again = run_extraction(_config(out, batch_size=2, overwrite=True), items, detector=detector)
    assert (again.done, again.skipped) == (len(items), 0)


def test_mismatched_settings_refused_before_work(tmp_path: Path, detector) -> None:
    _mixed_images(tmp_path / "imgs")
    items = collect_images(tmp_path / "imgs")[:2]
    out = tmp_path / "s.lmdb"
    run_extraction(_config(out), items, detector=detector)
    for change, key in [
        ({"min_size": 80}, "min_size"),
        ({"selection": BoxSelection(rule="maxnms")}, "selection"),
        ({"selection": BoxSelection(min_boxes=10, max_boxes=100)}, "min_boxes"),
        ({"features_dtype": "float16"}, "float16"),
    ]:
        with pytest.raises(SetupError, match=key):
            run_extraction(
                _config(out, **change), items, detector=_FlakyDetector(detector, interrupt_after=0)
            )
    (tmp_path / "notastore").mkdir()
    (tmp_path / "notastore" / "file.txt").write_text("x")
    with pytest.raises(SetupError, match="not a feature store"):
        run_extraction(_config(tmp_path / "notastore"), items, detector=detector)


def test_write_failures_is_atomic_and_sorted(tmp_path: Path) -> None:
    path = tmp_path / "x.lmdb.failures.jsonl"
    write_failures(path, [Failure("/b.jpg", "b", "bad"), Failure("/a.jpg", "a", "worse \u00e9")])
    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    assert lines == [
        {"path": "/a.jpg", "id": "a", "reason": "worse \u00e9"},
        {"path": "/b.jpg", "id": "b", "reason": "bad"},
    ]
    write_failures(path, [])
    assert path.read_text() == "" and [p.name for p in tmp_path.iterdir()] == [path.name]
    assert failures_path(str(tmp_path / "out.lmdb") + "/") == tmp_path / "out.lmdb.failures.jsonl"


# ------------------------------------------------------------------------------------------------ weights
def test_weights_hashed_once_recorded_and_checked(
    tmp_path: Path, detector, monkeypatch, caplog, capsys
) -> None:
    """A run with a weights file hashes it once (while loading it), records sha256 and layout in the store,
    names them in the summary, and refuses to resume the store with another file."""
    weights = tmp_path / "tiny.pth"
    torch.save(detector.state_dict(), weights)
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    hashed: list[str] = []
    real_sha256 = weights_module.file_sha256

    def counting_sha256(path):
        hashed.append(str(path))
        return real_sha256(path)

    monkeypatch.setattr(weights_module, "file_sha256", counting_sha256)
    monkeypatch.setattr(runner_module, "file_sha256", counting_sha256)
    _mixed_images(tmp_path / "imgs")
    items = collect_images(tmp_path / "imgs")[:2]
    out = tmp_path / "w.lmdb"
    config = _config(out, random_weights=False, weights=str(weights), device="cpu")

    with caplog.at_level(logging.INFO, logger="extract"):
        summary = run_extraction(config, items)  # detector built from the config: weights loaded here
    assert hashed == [str(weights)]
    assert capsys.readouterr() == ("", "")  # the library logs; only the CLI prints
    assert any("2 images -> " in r.getMessage() for r in caplog.records)
    stored = open_metadata(out)["extractor"]
    assert (stored["weights"], stored["weights_sha256"]) == ("tiny.pth", sha)
    assert stored["weights_layout"] == summary.weights_layout == "detectron2"
    assert f"weights tiny.pth (sha256 {sha[:12]}, layout detectron2)" in summary.format()

    hashed.clear()  # a detector built by the caller: the file is hashed here instead, still once
    again = run_extraction(config, items, detector=detector)
    assert hashed == [str(weights)] and (again.done, again.skipped) == (0, 2)

    renamed = tmp_path / "copy" / "renamed.pth"  # the same bytes under another name: the sha256 decides
    renamed.parent.mkdir()
    renamed.write_bytes(weights.read_bytes())
    config_renamed = _config(out, random_weights=False, weights=str(renamed), device="cpu")
    again = run_extraction(config_renamed, items, detector=detector)
    assert (again.done, again.skipped) == (0, 2)
    assert open_metadata(out)["extractor"] == stored  # the store keeps the name it was made with

    other = tmp_path / "v2" / "tiny.pth"  # same name, other tensors
    other.parent.mkdir()
    state = detector.state_dict()
    key = next(k for k, v in state.items() if v.is_floating_point())
    torch.save({**state, key: state[key] + 1}, other)
    with pytest.raises(SetupError, match="weights_sha256: stored '" + sha):
        run_extraction(_config(out, random_weights=False, weights=str(other), device="cpu"), items)
    assert open_metadata(out)["extractor"] == stored


def test_old_store_without_weights_layout_resumes(tmp_path: Path, detector) -> None:
    """Stores written before ``weights_layout`` was recorded resume: it follows from the sha256."""
    _mixed_images(tmp_path / "imgs")
    items = collect_images(tmp_path / "imgs")[:2]
    out = tmp_path / "old.lmdb"
    config = _config(out)
    old = {k: v for k, v in extractor_settings(config, None).items() if k != "weights_layout"}
    with FeatureWriter(out, old) as writer:
        writer.put(
            items[0].img_id, detector.extract([torch.zeros(3, 64, 64)], [(64, 64)], config.selection)[0]
        )
    summary = run_extraction(config, items, detector=detector)
    assert (summary.done, summary.skipped) == (1, 1)


def test_config_choices_are_checked() -> None:
    with pytest.raises(
        ValueError, match=r"ExtractConfig\.amp must be one of 'none', 'fp16', 'bf16', got 'fp8'"
    ):
        _config(Path("x.lmdb"), amp="fp8")
    with pytest.raises(ValueError, match=r"ExtractConfig\.features_dtype must be one of"):
        _config(Path("x.lmdb"), features_dtype="float64")
    assert _config(Path("x.lmdb"), batch_size=None, device="cpu").batch_size == 1
