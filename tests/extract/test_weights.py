"""Weight loading: the three published layouts, safe reading, and every way a file can fail to fit."""

from __future__ import annotations

import hashlib
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import build_anchor_generator
from PIL import Image
from safetensors.torch import save_file

from common.state_dict import LoadReport, read_pickle
from extract.cli import main as cli_main
from extract.detector import VGDetector, build_vg_detector, get_detector_cfg
from extract.selection import BoxSelection
from extract.store import open_metadata
from extract.weight_layouts import caffe_to_detectron2_anchor_order
from extract.weights import UnsafePickleError, WeightsError, load_detector_weights


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
    assert report.layout == "detectron2-pkl" and report.path == str(path)
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
        read_pickle(evil)


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
    state["roi_heads.box_predictor.extra.weight"] = np.zeros((2, 2), dtype=np.float32)
    report = load_detector_weights(target, _write_pkl(tmp_path / "extra.pkl", state))
    assert report.complete and report.unexpected == ["roi_heads.box_predictor.extra.weight"]
    assert "1 unused: roi_heads.box_predictor.extra.weight" in report.summary()


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
        match=r"wrong\.pkl \(detected layout detectron2-pkl.*roi_heads\.box_predictor\.cls_score\.weight: "
        r"expected \(1601, 128\), found \(1600, 128\)",
    ):
        load_detector_weights(target, path)
    assert torch.equal(target.state_dict()["roi_heads.box_predictor.bbox_pred.weight"], before)


def test_full_weights_do_not_fit_the_tiny_config(target: VGDetector, tmp_path: Path) -> None:
    state = {"backbone.stem.conv1.weight": np.zeros((64, 3, 7, 7), dtype=np.float32)}
    with pytest.raises(WeightsError, match=r"expected \(8, 3, 7, 7\), found \(64, 3, 7, 7\).*wrong --config"):
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
    with pytest.raises(WeightsError, match=r"junk\.safetensors: cannot read as safetensors"):
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


# ----------------------------------------------------------------------------- the published layouts
# Each writer states one public file's layout from that project's conventions, independently of
# extract.weight_layouts: the same random weights, written three ways.
PRED = "roi_heads.box_predictor."
OBJECTNESS = "proposal_generator.rpn_head.objectness_logits."
HF_ID = "unc-nlp/frcnn-vg-finetuned"


def _write_bottom_up_pkl(model: VGDetector, path: Path) -> Path:
    """py-bottom-up-attention's faster_rcnn_from_caffe_attr.pkl: {"model": {Detectron2 name: ndarray}}."""
    return _write_pkl(path, _numpy_state(model), matching_heuristics=False)


def _write_hf_frcnn(model: VGDetector, cache: Path) -> Path:
    """unc-nlp/frcnn-vg-finetuned in a Hugging Face cache: pytorch_model.bin (a torch state dict with the same
    names, plus BatchNorm counters and the anchor generator's cell anchors) and config.yaml."""
    state = dict(model.state_dict())
    for key in list(state):
        if key.endswith(".norm.running_var"):
            state[key.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    (cell_anchors,) = list(model.proposal_generator.anchor_generator.cell_anchors)
    state["proposal_generator.anchor_generator.cell_anchors.0"] = cell_anchors.clone()
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    repo = cache / "models--unc-nlp--frcnn-vg-finetuned"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    torch.save(state, snapshot / "pytorch_model.bin")
    (snapshot / "config.yaml").write_text("model: {}\n")
    return snapshot / "pytorch_model.bin"


def _write_bua_caffe(model: VGDetector, path: Path, background_rpn: torch.Tensor | None = None) -> Path:
    """MILVLG's bua-caffe-frcn-r101_with_attributes.pth: Caffe's order under Detectron2 module names.
    Background / "no attribute" FIRST (cls_score, cls_embed, attr_linear2), bbox_pred with 1601*4 rows
    (background's first), the attribute layers named cls_embed / attr_linear1 / attr_linear2, a 2-way
    softmax RPN objectness (A background rows, then A object rows), the RPN's anchors in Caffe's order
    (aspect ratio outer, scale inner), unfrozen res4/res5 BatchNorm counters.
    ``background_rpn``: the background logits' weights (zeros: object logit - background logit is then
    exactly the sigmoid logit)."""
    names = {"cls_embedding": "cls_embed", "fc_attr": "attr_linear1", "attr_score": "attr_linear2"}
    sizes = len(model.cfg.MODEL.ANCHOR_GENERATOR.SIZES[0])
    ratios = len(model.cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS[0])

    def caffe_anchor_order(t: torch.Tensor) -> torch.Tensor:  # rows [size][ratio][k] -> [ratio][size][k]
        return t.reshape(sizes, ratios, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)

    g = torch.Generator().manual_seed(7)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith(PRED) and key.split(".")[2] in ("cls_score", "cls_embedding", "attr_score"):
            value = torch.cat([value[-1:], value[:-1]])
        elif key.startswith(PRED + "bbox_pred"):
            value = torch.cat([torch.randn((4, *value.shape[1:]), generator=g), value])
        elif key.startswith(OBJECTNESS):
            background = torch.zeros_like(value) if background_rpn is None else background_rpn[key]
            value = torch.cat([caffe_anchor_order(background), caffe_anchor_order(value + background)])
        elif key.startswith("proposal_generator.rpn_head.anchor_deltas."):
            value = caffe_anchor_order(value)
        layer = key.split(".")[2] if key.startswith(PRED) else ""
        if layer in names:
            key = key.replace(f"{PRED}{layer}.", f"{PRED}{names[layer]}.")
        out[key] = value.clone()
        if key.startswith(("backbone.res4.", "roi_heads.res5.")) and key.endswith(".norm.running_var"):
            out[key.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    torch.save(out, path)
    return path


@pytest.fixture()
def published(source: VGDetector, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """The source detector's weights in the three published layouts (the HF one in an offline Hub cache)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return {
        "detectron2-pkl": _write_bottom_up_pkl(source, tmp_path / "faster_rcnn_from_caffe_attr.pkl"),
        "hf-frcnn": _write_hf_frcnn(source, tmp_path / "hub"),
        "bua-caffe": _write_bua_caffe(source, tmp_path / "bua-caffe-frcn-r101_with_attributes.pth"),
    }


def test_every_published_layout_loads_the_same_detector(
    source: VGDetector, published: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no local folder named like the Hub id
    for layout, path in published.items():
        target = build_vg_detector(get_detector_cfg("vg_tiny"), seed=1)
        given = HF_ID if layout == "hf-frcnn" else path
        report = load_detector_weights(target, given)
        assert report.layout == layout and report.complete and not report.unexpected, report.summary()
        assert report.path == str(path) and report.source == str(given)
        assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert report.loaded == len(source.state_dict())
        assert f"({layout}, sha256 {report.sha256[:12]})" in report.summary()
        _assert_same_params(source, target)
    target = build_vg_detector(get_detector_cfg("vg_tiny"), seed=1)
    assert load_detector_weights(target, published["hf-frcnn"].parent).layout == "hf-frcnn"  # a folder
    with pytest.raises(WeightsError, match=r"unc-nlp/frcnn-missing: .*Hugging Face cache.*hf download"):
        load_detector_weights(target, "unc-nlp/frcnn-missing")


def test_bua_caffe_rpn_two_way_softmax_becomes_one_logit(source: VGDetector, tmp_path: Path) -> None:
    """MILVLG scores an anchor with softmax over (background, object) logits; the loaded detector's sigmoid
    logit gives the same object probability for any background weights."""
    g = torch.Generator().manual_seed(3)
    sd = source.state_dict()
    background = {
        k: torch.randn(sd[k].shape, generator=g) for k in (OBJECTNESS + "weight", OBJECTNESS + "bias")
    }
    path = _write_bua_caffe(source, tmp_path / "bua.pth", background_rpn=background)
    target = build_vg_detector(get_detector_cfg("vg_tiny"), seed=1)
    assert load_detector_weights(target, path).layout == "bua-caffe"
    caffe = torch.load(path, weights_only=True)
    hidden = torch.randn(1, sd[OBJECTNESS + "weight"].shape[1], 5, 5, generator=g)
    two_way = F.conv2d(hidden, caffe[OBJECTNESS + "weight"], caffe[OBJECTNESS + "bias"])
    anchors = two_way.shape[1] // 2
    caffe_object = two_way.view(1, 2, anchors, 5, 5).softmax(dim=1)[:, 1]
    ours = torch.sigmoid(target.proposal_generator.rpn_head.objectness_logits(hidden))
    order = caffe_to_detectron2_anchor_order(4, 3)  # vg_tiny: 4 sizes x 3 aspect ratios
    torch.testing.assert_close(ours, caffe_object[:, order], rtol=1e-4, atol=1e-6)


def _caffe_generate_anchors(
    scales: list[int], ratios: list[float], base: int = 16
) -> list[tuple[float, float]]:
    """(width, height) of Caffe's generate_anchors (py-faster-rcnn): ratio outer, scale inner, rounded."""
    out = []
    for ratio in ratios:
        w = round(np.sqrt(base * base / ratio))
        h = round(w * ratio)
        out.extend((w * s, h * s) for s in scales)
    return out


def test_caffe_anchor_order_maps_to_detectron2_anchors() -> None:
    """Detectron2's anchor j and the Caffe anchor order[j] have (nearly) the same width and height."""
    generator = build_anchor_generator(get_detector_cfg("vg_r101_c4"), [ShapeSpec(channels=1024, stride=16)])
    (cell,) = list(generator.cell_anchors)
    detectron2 = torch.stack([cell[:, 2] - cell[:, 0], cell[:, 3] - cell[:, 1]], dim=1)
    caffe = torch.tensor(_caffe_generate_anchors([4, 8, 16, 32], [0.5, 1.0, 2.0]), dtype=torch.float32)
    order = caffe_to_detectron2_anchor_order(4, 3)
    assert sorted(order.tolist()) == list(range(12)) and order.tolist() != list(range(12))
    torch.testing.assert_close(caffe[order], detectron2, rtol=0.1, atol=0.0)  # Caffe rounds to pixels


@pytest.mark.parametrize("rule", ["caffe", "maxnms"])
def test_three_layouts_give_byte_identical_store_records(
    rule: str, published: dict[str, Path], tmp_path: Path, read_records
) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    for i, (h, w) in enumerate([(60, 90), (90, 60)]):
        pixels = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"img{i}.png")
    common = ["--config", "vg_tiny", "--min-size", "64", "--max-size", "112", "--no-progress"]
    common += ["--selection", rule, "--boxes", "10-20", "--workers", "0"]
    records, metas = {}, {}
    for layout, path in published.items():
        out = tmp_path / f"{layout}.lmdb"
        given = HF_ID if layout == "hf-frcnn" else str(path)  # the Hub id, from the (offline) cache
        assert cli_main([str(images), str(out), "--weights", given, *common]) == 0, layout
        records[layout], metas[layout] = read_records(out), open_metadata(out)["extractor"]
        assert metas[layout]["weights_layout"] == layout
        assert metas[layout]["weights"] == (HF_ID if layout == "hf-frcnn" else path.name)  # a Hub id whole
        assert metas[layout]["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    reference = records["detectron2-pkl"]
    assert sorted(reference) == ["img0", "img1"]
    assert all(10 <= len(r["boxes"]) <= 20 for r in reference.values())
    for layout in ("hf-frcnn", "bua-caffe"):
        assert sorted(records[layout]) == sorted(reference)
        for img_id, record in reference.items():
            for name, value in record.items():
                other = records[layout][img_id][name]
                assert np.asarray(other).tobytes() == np.asarray(value).tobytes(), (layout, img_id, name)


def test_truncated_downloads_are_refused_with_what_to_do(
    published: dict[str, Path], target: VGDetector, tmp_path: Path
) -> None:
    for layout, path in published.items():
        cut = tmp_path / f"cut-{path.name}"
        cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        with pytest.raises(WeightsError) as err:
            load_detector_weights(target, cut)
        message = str(err.value)
        assert str(cut) in message and "truncated" in message, (layout, message)
        assert "download it again" in message or "re-download" in message, (layout, message)
        assert "no layout can be detected" in message, (layout, message)


def test_files_of_another_model_are_refused_naming_layout_and_tensors(
    source: VGDetector, target: VGDetector, tmp_path: Path
) -> None:
    # a COCO Faster R-CNN in Detectron2's layout: 80 classes + background, no attribute head
    coco = _numpy_state(source)
    dim = coco[PRED + "cls_score.weight"].shape[1]
    coco[PRED + "cls_score.weight"] = np.zeros((81, dim), dtype=np.float32)
    coco[PRED + "cls_score.bias"] = np.zeros(81, dtype=np.float32)
    coco[PRED + "bbox_pred.weight"] = np.zeros((320, dim), dtype=np.float32)
    for key in [
        k for k in coco if k.startswith((PRED + "cls_embedding", PRED + "fc_attr", PRED + "attr_score"))
    ]:
        del coco[key]
    before = target.state_dict()[PRED + "cls_score.weight"].clone()
    with pytest.raises(WeightsError) as err:
        load_detector_weights(target, _write_pkl(tmp_path / "model_final_coco.pkl", coco))
    message = str(err.value)
    assert "model_final_coco.pkl (detected layout detectron2-pkl" in message
    assert f"{PRED}cls_score.weight: expected (1601, {dim}), found (81, {dim})" in message
    assert f"{PRED}bbox_pred.weight: expected (6400, {dim}), found (320, {dim})" in message
    assert "another model" in message and "faster_rcnn_from_caffe_attr.pkl" in message
    assert torch.equal(target.state_dict()[PRED + "cls_score.weight"], before)  # untouched

    # the detector without attributes: the attribute head is named as what is missing
    no_attr = {
        k: v
        for k, v in _numpy_state(source).items()
        if not k.startswith((PRED + "cls_embedding", PRED + "fc_attr", PRED + "attr_score"))
    }
    with pytest.raises(WeightsError) as err:
        load_detector_weights(target, _write_pkl(tmp_path / "faster_rcnn_from_caffe.pkl", no_attr))
    message = str(err.value)
    assert "MISSING 5 [roi_heads: 5]" in message and "no attribute head" in message
    assert f"{PRED}attr_score.weight expected (401, 32)" in message and "found nothing" in message

    # an LXMERT checkpoint given as detector weights: no detector names at all
    lxmert = tmp_path / "model_LXRT.pth"
    torch.save({"bert.embeddings.word_embeddings.weight": torch.zeros(4, 2)}, lxmert)
    with pytest.raises(
        WeightsError,
        match=r"model_LXRT\.pth: refused, detected layout unknown: .*bert\.embeddings.*not the Visual Genome "
        r"detector's weights.*unc-nlp/frcnn-vg-finetuned",
    ):
        load_detector_weights(target, lxmert)
