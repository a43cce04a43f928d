"""File names that are not UTF-8 (issue 24, case 1): extracted under a documented id (each undecodable byte
written as ``\\xNN``), listed in failures.jsonl when the image itself is bad, and a rerun goes past them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract.detector import build_vg_detector, get_detector_cfg
from extract.image_list import collect_images, display_path, read_image_list
from extract.outcome import failures_path
from extract.runner import ExtractConfig, run_extraction
from extract.store import FeatureStore, FeatureWriter, StoreError

pytestmark = pytest.mark.skipif(os.name != "posix", reason="byte file names")


@pytest.fixture(scope="module")
def detector():
    return build_vg_detector(get_detector_cfg("vg_tiny"), "cpu", seed=0)


def _config(out: Path) -> ExtractConfig:
    return ExtractConfig(
        out=str(out), random_weights=True, config="vg_tiny", workers=0, batch_size=1, progress=False,
        min_size=64, max_size=112,
    )  # fmt: skip


def _save(folder: bytes, name: bytes, seed: int) -> None:
    os.makedirs(folder, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(os.path.join(folder, name), format="PNG")


def test_non_utf8_names_are_extracted_and_a_rerun_goes_past_them(tmp_path: Path, detector) -> None:
    root = os.fsencode(tmp_path / "imgs")
    _save(root, b"a.png", 0)
    _save(root, b"caf\xe9.png", 1)  # Latin-1 e-acute: not UTF-8
    _save(root + b"/d\xffir", b"x.png", 2)
    with open(os.path.join(root, b"bad\xfe.png"), "wb") as f:
        f.write(b"not an image")
    items = collect_images(tmp_path / "imgs", id_from="relpath")
    assert [it.img_id for it in items] == ["a", "bad\\xfe", "caf\\xe9", "d\\xffir/x"]
    out = tmp_path / "out.lmdb"
    summary = run_extraction(_config(out), items, detector=detector)
    assert (summary.done, summary.failed) == (3, 1)
    with FeatureStore(out) as store:
        assert sorted(store) == ["a", "caf\\xe9", "d\\xffir/x"]
        assert store["caf\\xe9"]["features"].shape[0] > 0
    failures = [json.loads(line) for line in failures_path(out).read_text(encoding="utf-8").splitlines()]
    assert [(f["id"], f["path"]) for f in failures] == [("bad\\xfe", str(tmp_path / "imgs" / "bad\\xfe.png"))]
    summary.format().encode("utf-8")  # printable as it is (no lone surrogates)
    again = run_extraction(
        _config(out), collect_images(tmp_path / "imgs", id_from="relpath"), detector=detector
    )
    assert (again.done, again.skipped, again.failed) == (0, 3, 1)


def test_list_files_with_non_utf8_paths(tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"imgs/caf\xe9.png\nimgs/ok.png\n")
    paths = read_image_list(listing)
    assert os.fsencode(paths[0]) == os.fsencode(tmp_path) + b"/imgs/caf\xe9.png"  # the real file name
    assert display_path(paths[0]) == str(tmp_path / "imgs" / "caf\\xe9.png")


def test_the_store_refuses_an_id_that_is_not_text(tmp_path: Path) -> None:
    with FeatureWriter(tmp_path / "s.lmdb", {"source": "test"}) as writer:
        with pytest.raises(StoreError, match="not valid text"):
            writer.put(os.fsdecode(b"caf\xe9"), {})
