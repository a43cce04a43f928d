"""Weight loading: safe pickles, safetensors, torch.save, and every way a file can fail to fit."""

from __future__ import annotations

import hashlib
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from extract.detector import VGDetector, build_vg_detector, get_detector_cfg
from extract.selection import BoxSelection
from extract.weights import (
    LoadReport,
    UnsafePickleError,
    WeightsError,
    file_sha256,
    load_detector_weights,
    safe_load_pickle,
)


@pytest.fixture(scope="module")
def source() -> VGDetector:
    return build_vg_detector(get_detector_cfg("vg_tiny"), seed=0)


@pytest.fixture()
def target() -> VGDetector:
    return build_vg_detector(get_detector_cfg("vg_tiny"), seed=1)


def _numpy_state(model: VGDetector) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def _write_pkl(path: Path, state: dict, **extra: object) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "test", **extra}, f)
    return path


def _assert_same_params(a: VGDetector, b: VGDetector) -> None:
    sb = b.state_dict()
    for key, value in a.state_dict().items():
        assert torch.equal(value, sb[key]), key


def _assert_same_outputs(a: VGDetector, b: VGDetector) -> None:
    img = torch.rand(3, 80, 112, generator=torch.Generator().manual_seed(0)) * 255
    (ra,), (rb,) = (
        a.extract([img], [(80, 112)], BoxSelection()),
        b.extract([img], [(80, 112)], BoxSelection()),
    )
    for key in ("features", "boxes", "obj_ids", "obj_conf", "attr_ids", "attr_conf"):
        np.testing.assert_array_equal(ra[key], rb[key], err_msg=key)


def test_detectron2_pickle_round_trip(source: VGDetector, target: VGDetector, tmp_path: Path) -> None:
    path = _write_pkl(tmp_path / "vg.pkl", _numpy_state(source))
    report = load_detector_weights(target, path)
    assert isinstance(report, LoadReport) and report.complete
    assert report.loaded == len(source.state_dict()) and not report.missing and not report.unexpected
    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "vg.pkl" in report.summary() and f"loaded {report.loaded}" in report.summary()
    assert target.weights_source == f"vg.pkl sha256:{report.sha256}"
    _assert_same_params(source, target)
    _assert_same_outputs(source, target)


def test_pickle_protocol_2_and_ordered_dict(source: VGDetector, target: VGDetector, tmp_path: Path) -> None:
    path = tmp_path / "old.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": OrderedDict(_numpy_state(source)), "__author__": "py2"}, f, protocol=2)
    assert load_detector_weights(target, path).complete
    _assert_same_params(source, target)


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Evals:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


def test_pickle_that_runs_code_is_refused(source: VGDetector, target: VGDetector, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    state = _numpy_state(source)
    state["backbone.stem.conv1.weight"] = _RunsShell(marker)
    path = _write_pkl(tmp_path / "evil.pkl", state)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(UnsafePickleError, match=r"evil\.pkl.*(posix|os)\.system"):
        load_detector_weights(target, path)
    assert not marker.exists()
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key])
    # the reference: an ordinary unpickler would have run the command
    with open(path, "rb") as f:
        pickle.load(f)
    assert marker.exists()

    evil = tmp_path / "eval.pkl"
    evil.write_bytes(pickle.dumps({"model": {"x": _Evals()}}))
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        safe_load_pickle(evil)


def test_object_arrays_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "obj.pkl"
    path.write_bytes(pickle.dumps({"model": {"a": np.array([1, "x"], dtype=object)}}))
    with pytest.raises(UnsafePickleError, match="object-dtype"):
        safe_load_pickle(path)


def test_safetensors_round_trip(source: VGDetector, target: VGDetector, tmp_path: Path) -> None:
    path = tmp_path / "vg.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    assert load_detector_weights(target, path).complete
    _assert_same_params(source, target)
    _assert_same_outputs(source, target)


def test_torch_save_round_trip(source: VGDetector, target: VGDetector, tmp_path: Path) -> None:
    path = tmp_path / "vg.pth"
    torch.save({"model": source.state_dict()}, path)
    assert load_detector_weights(target, path).complete
    _assert_same_params(source, target)


def test_torch_save_with_code_is_refused(target: VGDetector, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"x": _RunsShell(marker)}}, path)
    with pytest.raises(UnsafePickleError, match="evil.pt"):
        load_detector_weights(target, path)
    assert not marker.exists()


def test_missing_keys_are_refused_or_reported(source: VGDetector, target: VGDetector, tmp_path: Path) -> None:
    state = _numpy_state(source)
    del state["roi_heads.box_predictor.attr_score.weight"]
    del state["backbone.res4.5.conv2.weight"]
    state["roi_heads.box_predictor.extra.weight"] = np.zeros(3, dtype=np.float32)
    path = _write_pkl(tmp_path / "partial.pkl", state)
    before = target.state_dict()["backbone.stem.conv1.weight"].clone()
    with pytest.raises(WeightsError, match=r"partial\.pkl.*MISSING 2.*roi_heads.*--random-weights") as err:
        load_detector_weights(target, path)
    assert "backbone: 1" in str(err.value)
    assert torch.equal(target.state_dict()["backbone.stem.conv1.weight"], before)

    report = load_detector_weights(target, path, strict=False)
    assert not report.complete
    assert sorted(report.missing) == [
        "backbone.res4.5.conv2.weight",
        "roi_heads.box_predictor.attr_score.weight",
    ]
    assert report.unexpected == ["roi_heads.box_predictor.extra.weight"]
    assert report.loaded == len(source.state_dict()) - 2
    assert target.weights_source == "incomplete"
    with pytest.raises(RuntimeError, match="partly loaded"):
        target.extract([torch.zeros(3, 32, 32)], [(32, 32)], BoxSelection())


def test_unexpected_keys_are_reported_but_load(
    source: VGDetector, target: VGDetector, tmp_path: Path
) -> None:
    state = _numpy_state(source)
    state["roi_heads.box_predictor.cls_embed.weight"] = np.zeros((2, 2), dtype=np.float32)
    report = load_detector_weights(target, _write_pkl(tmp_path / "extra.pkl", state))
    assert report.complete and report.unexpected == ["roi_heads.box_predictor.cls_embed.weight"]
    assert "1 unexpected" in report.summary()


def test_frozen_bn_statistics_may_be_absent(source: VGDetector, target: VGDetector, tmp_path: Path) -> None:
    state = {k: v for k, v in _numpy_state(source).items() if not k.endswith(("running_mean", "running_var"))}
    report = load_detector_weights(target, _write_pkl(tmp_path / "affine.pkl", state))
    assert report.complete and report.defaulted
    assert all(k.endswith(("running_mean", "running_var")) for k in report.defaulted)


def test_shape_mismatch_names_the_key_and_both_shapes(
    source: VGDetector, target: VGDetector, tmp_path: Path
) -> None:
    state = _numpy_state(source)
    state["roi_heads.box_predictor.cls_score.weight"] = np.zeros((1600, 128), dtype=np.float32)
    path = _write_pkl(tmp_path / "wrong.pkl", state)
    before = target.state_dict()["roi_heads.box_predictor.bbox_pred.weight"].clone()
    with pytest.raises(
        WeightsError,
        match=r"wrong\.pkl.*roi_heads\.box_predictor\.cls_score\.weight: file \(1600, 128\) vs model \(1601, 128\)",
    ):
        load_detector_weights(target, path)
    assert torch.equal(target.state_dict()["roi_heads.box_predictor.bbox_pred.weight"], before)


def test_full_weights_do_not_fit_the_tiny_config(target: VGDetector, tmp_path: Path) -> None:
    state = {"backbone.stem.conv1.weight": np.zeros((64, 3, 7, 7), dtype=np.float32)}
    with pytest.raises(WeightsError, match=r"wrong --config.*file \(64, 3, 7, 7\) vs model \(8, 3, 7, 7\)"):
        load_detector_weights(target, _write_pkl(tmp_path / "r101.pkl", state))


def test_unreadable_files_name_the_file(target: VGDetector, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"nope\.pkl does not exist.*--random-weights"):
        load_detector_weights(target, tmp_path / "nope.pkl")
    truncated = tmp_path / "cut.pkl"
    truncated.write_bytes(pickle.dumps({"model": {"a": np.zeros(100)}})[:60])
    with pytest.raises(WeightsError, match=r"cut\.pkl is not a readable pickle"):
        load_detector_weights(target, truncated)
    garbage = tmp_path / "junk.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match=r"junk\.safetensors is not a readable safetensors"):
        load_detector_weights(target, garbage)
    bad_pth = tmp_path / "junk.pth"
    bad_pth.write_bytes(b"not a zip")
    with pytest.raises(WeightsError, match=r"junk\.pth"):
        load_detector_weights(target, bad_pth)
    other = tmp_path / "w.npz"
    other.write_bytes(b"x")
    with pytest.raises(WeightsError, match="unknown weight format"):
        load_detector_weights(target, other)
    listed = tmp_path / "list.pkl"
    listed.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(WeightsError, match="expected a dict"):
        load_detector_weights(target, listed)


def test_caffe2_names_are_converted_by_detectron2(
    source: VGDetector, target: VGDetector, tmp_path: Path
) -> None:
    """A Detectron1/Caffe2-named pickle goes through Detectron2's own renaming (names it knows)."""
    sd = source.state_dict()
    c2 = {
        "conv1_w": sd["backbone.stem.conv1.weight"].numpy(),
        "res_conv1_bn_s": sd["backbone.stem.conv1.norm.weight"].numpy(),
        "res_conv1_bn_b": sd["backbone.stem.conv1.norm.bias"].numpy(),
        "res2_0_branch2a_w": sd["backbone.res2.0.conv1.weight"].numpy(),
        "res2_0_branch2a_w_momentum": np.zeros(1),
    }
    path = tmp_path / "c2.pkl"
    path.write_bytes(pickle.dumps({"blobs": c2}))
    report = load_detector_weights(target, path, strict=False)
    assert report.loaded == 4 and not report.unexpected
    assert torch.equal(
        target.state_dict()["backbone.res2.0.conv1.weight"], sd["backbone.res2.0.conv1.weight"]
    )
    assert torch.equal(target.state_dict()["backbone.stem.conv1.weight"], sd["backbone.stem.conv1.weight"])


def test_file_sha256(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    data = os.urandom(3 << 20)
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
