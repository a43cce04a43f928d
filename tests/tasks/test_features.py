"""tasks.data.regions: region features from several stores, missing-image reports, standardisation, metadata."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from region_labels import random_labels

from extract.store import FeatureWriter
from tasks.data.regions import (
    FeatureStats,
    MissingImagesError,
    RegionFeatures,
    Regions,
    collate_regions,
    is_random_weights,
)

DIM = 8


def make_record(seed: int, n: int = 5, dim: int = DIM, img_h: int = 200, img_w: int = 400) -> dict:
    rng = np.random.default_rng(seed)
    x1 = rng.uniform(0, img_w / 2, n)
    y1 = rng.uniform(0, img_h / 2, n)
    return {
        "features": rng.normal(3.0, 2.0, (n, dim)).astype(np.float32),
        "boxes": np.stack([x1, y1, x1 + img_w / 2, y1 + img_h / 2], 1).astype(np.float32),
        **random_labels(rng, n),
        "img_h": img_h,
        "img_w": img_w,
    }


def write_store(path: Path, ids: list[str], extractor: dict | None = None, **kw) -> dict[str, dict]:
    records = {img_id: make_record(i + 100 * len(path.name), **kw) for i, img_id in enumerate(ids)}
    with FeatureWriter(path, extractor=extractor or {"source": "tsv", "file": path.name}) as writer:
        for img_id, rec in records.items():
            writer.put(img_id, rec)
    return records


@pytest.fixture
def two_stores(tmp_path: Path):
    coco = write_store(tmp_path / "coco.lmdb", ["c1", "c2", "c3"])
    vg = write_store(tmp_path / "vg.lmdb", ["v1", "v2"])
    return tmp_path / "coco.lmdb", tmp_path / "vg.lmdb", {**coco, **vg}


def test_lookup_in_each_store_and_normalised_boxes(two_stores):
    coco, vg, records = two_stores
    feats = RegionFeatures([coco, vg])
    assert feats.locate(["c2", "v1", "nope"]) == ["nope"]
    for img_id in ("c1", "v2"):
        reg = feats[img_id]
        rec = records[img_id]
        np.testing.assert_array_equal(reg.features, rec["features"])
        scale = np.array([rec["img_w"], rec["img_h"], rec["img_w"], rec["img_h"]], np.float32)
        np.testing.assert_allclose(reg.boxes, rec["boxes"] / scale, rtol=1e-6)
        assert reg.boxes.min() >= 0 and reg.boxes.max() <= 1
        np.testing.assert_array_equal(reg.obj_ids, rec["obj_ids"])
        np.testing.assert_array_equal(reg.attr_conf, rec["attr_conf"])
    assert feats.feature_dim == DIM
    with pytest.raises(KeyError, match="'zz'.*none of the feature stores"):
        feats["zz"]
    # pickles (DataLoader workers) and reads in the copy
    clone = pickle.loads(pickle.dumps(feats))
    np.testing.assert_array_equal(clone["v1"].features, records["v1"]["features"])


def test_missing_images_error_and_allowed(two_stores, caplog):
    coco, vg, _ = two_stores
    feats = RegionFeatures([coco, vg])
    ids = ["c1", "x9", "v1", "x1", "x2", "x3", "x4", "x5"]
    with pytest.raises(MissingImagesError) as err:
        feats.check(ids, allow_missing=False, what="sentences", source="train.json", counts={"x1": 4})
    msg = str(err.value)
    assert "6 of 8 images of train.json (9 sentences)" in msg
    assert "'x1', 'x2', 'x3', 'x4', 'x5', ..." in msg
    assert str(coco) in msg and str(vg) in msg
    assert "data.allow_missing_images: true" in msg
    with caplog.at_level(logging.WARNING, logger="tasks.data.regions"):
        missing = feats.check(ids, allow_missing=True)
    assert missing == {"x1", "x2", "x3", "x4", "x5", "x9"}
    assert "6 of 8 images" in caplog.text and "dropped" in caplog.text


def test_not_a_store_and_dim_mismatch(tmp_path: Path):
    with pytest.raises(ValueError, match="data.features"):
        RegionFeatures([tmp_path / "absent.lmdb"])
    with pytest.raises(ValueError, match="no feature store"):
        RegionFeatures([])
    write_store(tmp_path / "a.lmdb", ["a"])
    write_store(tmp_path / "b.lmdb", ["b"], dim=DIM + 1)
    with pytest.raises(ValueError, match="disagree on the feature dimension"):
        RegionFeatures([tmp_path / "a.lmdb", tmp_path / "b.lmdb"])


def test_standardisation(two_stores):
    coco, vg, records = two_stores
    feats = RegionFeatures([coco, vg])
    stats = feats.compute_stats(["c1", "c2", "c3", "v1", "v2"])
    all_feats = np.concatenate([r["features"] for r in records.values()]).astype(np.float64)
    np.testing.assert_allclose(stats.mean, all_feats.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats.std, all_feats.std(0), rtol=1e-5)
    assert stats.num_regions == len(all_feats)
    std_feats = RegionFeatures([coco, vg], stats=FeatureStats.from_dict(stats.to_dict()))
    out = np.concatenate([std_feats[i].features for i in ("c1", "c2", "c3", "v1", "v2")])
    np.testing.assert_allclose(out.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(out.std(0), 1, atol=1e-4)
    assert std_feats.describe()["standardize"]["num_regions"] == stats.num_regions
    # a sample of the ids when there are many: evenly spaced, deterministic
    assert feats.compute_stats(["c1", "c2", "c3"], max_images=2).num_regions == 10


def test_whitening_decorrelates_correlated_features(tmp_path: Path):
    """data.whiten_features: the standardised train features come out with (near) identity covariance; the
    statistics survive features.json; a near-constant direction is not blown up (eigenvalue floor)."""
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(DIM, DIM)) * np.linspace(3, 0.1, DIM)[:, None]  # correlated dims, uneven variances
    records = {}
    with FeatureWriter(tmp_path / "s.lmdb", extractor={"source": "tsv", "file": "x"}) as writer:
        for i in range(40):
            rec = make_record(i, n=6)
            rec["features"] = (rng.normal(size=(6, DIM)) @ mix + 5).astype(np.float32)
            rec["features"][:, -1] = 5 + 1e-4 * rng.normal(size=6)  # a dimension of almost no variance
            records[f"i{i}"] = rec
            writer.put(f"i{i}", rec)
    feats = RegionFeatures([tmp_path / "s.lmdb"])
    plain = feats.compute_stats(list(records))
    stats = feats.compute_stats(list(records), whiten=True)
    np.testing.assert_array_equal(stats.mean, plain.mean)
    np.testing.assert_array_equal(stats.std, plain.std)
    white = RegionFeatures([tmp_path / "s.lmdb"], stats=FeatureStats.from_dict(stats.to_dict()))
    out = np.concatenate([white[i].features for i in records]).astype(np.float64)
    standardised = np.concatenate(
        [RegionFeatures([tmp_path / "s.lmdb"], stats=plain)[i].features for i in records]
    )
    assert abs(np.corrcoef(standardised, rowvar=False) - np.eye(DIM)).max() > 0.5  # correlated before
    cov = np.cov(out, rowvar=False, bias=True)
    w = np.linalg.eigvalsh(cov)
    assert abs(w[1:] - 1).max() < 1e-3 and w[0] < 1e-3  # identity but for the floored direction, kept down
    # a dimension of (almost) no variance is not standardised up into noise: a step of 10 of its stds barely moves
    near_constant = records["i0"]["features"].copy()
    near_constant[:, -1] += 1e-3
    assert abs(stats.apply(near_constant) - stats.apply(records["i0"]["features"])).max() < 0.1
    np.testing.assert_allclose(out.mean(0), 0, atol=1e-4)
    assert len(white.describe()["standardize"]["whiten"]) == DIM


def test_whitening_refuses_wide_features(tmp_path: Path):
    write_store(tmp_path / "w.lmdb", ["a"], dim=600)
    with pytest.raises(ValueError, match="whiten_features.*600-d"):
        RegionFeatures([tmp_path / "w.lmdb"]).compute_stats(["a"], whiten=True)


def test_random_weight_metadata(tmp_path: Path):
    extracted = {
        "weights": None,
        "weights_sha256": None,
        "random_weights": True,
        "seed": 0,
        "selection": "caffe",
    }
    write_store(tmp_path / "rand.lmdb", ["r"], extractor=extracted)
    write_store(tmp_path / "tsv.lmdb", ["t"])
    feats = RegionFeatures([tmp_path / "tsv.lmdb", tmp_path / "rand.lmdb"])
    assert feats.random_weight_stores == [str(tmp_path / "rand.lmdb")]
    described = feats.describe()
    assert described["stores"][1]["extractor"]["random_weights"] is True
    assert described["feature_dim"] == DIM
    assert feats.extractor_settings() == [{"source": "tsv", "file": "tsv.lmdb"}, extracted]
    assert is_random_weights({"weights": "random(seed=3)"})
    assert is_random_weights({"weights": None, "selection": "caffe"})
    assert not is_random_weights({"weights": "faster_rcnn_from_caffe_attr.pkl", "random_weights": False})
    assert not is_random_weights({"source": "tsv", "file": "train2014_obj36.tsv"})
    assert not is_random_weights(None)


def test_collate_pads_and_masks():
    def regions(n: int) -> Regions:
        rec = make_record(n, n=n)
        return Regions(
            rec["features"],
            rec["boxes"] / 400,
            rec["obj_ids"],
            rec["obj_conf"],
            rec["attr_ids"],
            rec["attr_conf"],
        )

    out = collate_regions([regions(3), regions(5), regions(0)])
    assert out["visual_feats"].shape == (3, 5, DIM) and out["visual_pos"].shape == (3, 5, 4)
    assert out["visual_attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5, [0] * 5]
    assert torch.all(out["visual_feats"][0, 3:] == 0)
    full = collate_regions([regions(4), regions(4)])
    assert "visual_attention_mask" not in full


def test_stores_with_other_extractor_settings_are_named_in_a_warning(tmp_path: Path, caplog):
    """The stores' own settings check: the key that differs is named; the TSV file, the weights' file name
    and layout are not settings (the sha256 is the weights' identity)."""
    settings = {"weights": "a.pkl", "weights_sha256": "ab" * 32, "weights_layout": "detectron2-pkl"}
    settings |= {"selection": "caffe", "min_boxes": 36, "max_boxes": 36}
    write_store(tmp_path / "coco.lmdb", ["c"], extractor=settings)
    write_store(
        tmp_path / "vg.lmdb", ["v"], extractor={**settings, "weights": "renamed.pkl", "weights_layout": None}
    )
    write_store(tmp_path / "tsv_a.lmdb", ["t"])
    write_store(tmp_path / "tsv_b.lmdb", ["u"])  # {"source": "tsv", "file": its own name}
    with caplog.at_level(logging.WARNING, logger="tasks.data.regions"):
        RegionFeatures([tmp_path / "coco.lmdb", tmp_path / "vg.lmdb"])
        RegionFeatures([tmp_path / "tsv_a.lmdb", tmp_path / "tsv_b.lmdb"])
    assert not caplog.records
    write_store(tmp_path / "k10.lmdb", ["k"], extractor={**settings, "min_boxes": 10, "max_boxes": 100})
    with caplog.at_level(logging.WARNING, logger="tasks.data.regions"):
        RegionFeatures([tmp_path / "coco.lmdb", tmp_path / "vg.lmdb", tmp_path / "k10.lmdb"])
    (record,) = caplog.records
    message = record.getMessage()
    assert f"{tmp_path / 'k10.lmdb'} differs from {tmp_path / 'coco.lmdb'} in max_boxes: 36 vs 100" in message
    assert "min_boxes: 36 vs 10" in message and "vg.lmdb differs" not in message
