"""The VG Faster R-CNN: structure of the full model (on the meta device), behaviour of the tiny one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.modeling.backbone.resnet import BasicStem
from detectron2.structures import Boxes

from extract.detector import (
    CaffeMaxPoolStem,
    VGDetector,
    build_vg_detector,
    get_detector_cfg,
)
from extract.selection import BoxSelection

RECORD_KEYS = {"features", "boxes", "obj_ids", "obj_conf", "attr_ids", "attr_conf", "img_h", "img_w"}


@pytest.fixture(scope="module")
def full_model() -> VGDetector:
    with torch.device("meta"):
        return VGDetector(get_detector_cfg("vg_r101_c4"))


@pytest.fixture(scope="module")
def tiny() -> VGDetector:
    return build_vg_detector(get_detector_cfg("vg_tiny"), seed=0)


def _image(h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, h, w, generator=g) * 255


# ----------------------------------------------------------------------------------------- structure
def test_full_model_parameter_names_and_shapes(full_model: VGDetector) -> None:
    shapes = {k: tuple(v.shape) for k, v in full_model.state_dict().items()}
    expected = {
        "backbone.stem.conv1.weight": (64, 3, 7, 7),
        "backbone.stem.conv1.norm.weight": (64,),
        "backbone.res2.0.conv1.weight": (64, 64, 1, 1),
        "backbone.res2.0.shortcut.weight": (256, 64, 1, 1),
        "backbone.res3.3.conv3.weight": (512, 128, 1, 1),
        "backbone.res4.22.conv3.weight": (1024, 256, 1, 1),
        "backbone.res4.22.conv3.norm.running_var": (1024,),
        "proposal_generator.rpn_head.conv.weight": (512, 1024, 3, 3),
        "proposal_generator.rpn_head.objectness_logits.weight": (12, 512, 1, 1),
        "proposal_generator.rpn_head.anchor_deltas.weight": (48, 512, 1, 1),
        "roi_heads.res5.0.conv1.weight": (512, 1024, 1, 1),
        "roi_heads.res5.0.shortcut.weight": (2048, 1024, 1, 1),
        "roi_heads.res5.2.conv3.weight": (2048, 512, 1, 1),
        "roi_heads.box_predictor.cls_score.weight": (1601, 2048),
        "roi_heads.box_predictor.bbox_pred.weight": (1601 * 4, 2048),
        "roi_heads.box_predictor.cls_embedding.weight": (1601, 256),
        "roi_heads.box_predictor.fc_attr.weight": (512, 2304),
        "roi_heads.box_predictor.attr_score.weight": (401, 512),
        "roi_heads.box_predictor.attr_score.bias": (401,),
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    assert "backbone.res4.23.conv1.weight" not in shapes
    assert "backbone.res5.0.conv1.weight" not in shapes  # res5 lives in the box head (C4)
    prefixes = {k.split(".")[0] for k in shapes}
    assert prefixes == {"backbone", "proposal_generator", "roi_heads"}
    assert not any("pixel_" in k for k in shapes)
    blocks = {k.split(".")[1] + "." + k.split(".")[2] for k in shapes if k.startswith("backbone.res")}
    assert len(blocks) == 3 + 4 + 23
    # the R-101 C4 VG detector has ~65M tensors' worth of numbers
    assert 60e6 < sum(int(np.prod(s)) for s in shapes.values()) < 70e6


def test_full_model_layer_settings(full_model: VGDetector) -> None:
    m = full_model
    assert isinstance(m.backbone.stem, CaffeMaxPoolStem)
    res5 = m.roi_heads.res5
    for i, block in enumerate(res5):
        assert block.conv2.dilation == (2, 2) and block.conv2.padding == (2, 2), i
        assert block.conv2.stride == (1, 1) and block.conv1.stride == (1, 1), i
    assert res5[0].shortcut.stride == (1, 1)
    # stride in the 1x1 conv of the backbone's downsampling blocks
    assert m.backbone.res3[0].conv1.stride == (2, 2) and m.backbone.res3[0].conv2.stride == (1, 1)
    assert m.backbone.res4[0].conv1.stride == (2, 2)
    assert m.backbone.output_shape()["res4"].stride == 16
    norms = [mod for name, mod in m.named_modules() if name.endswith("norm")]
    assert norms and all(isinstance(n, FrozenBatchNorm2d) for n in norms)
    rpn = m.proposal_generator
    assert rpn.anchor_generator.num_anchors == [12]
    assert rpn.pre_nms_topk[False] == 6000 and rpn.post_nms_topk[False] == 300 and rpn.nms_thresh == 0.7
    anchors = build_anchor_generator(m.cfg, [ShapeSpec(channels=1024, stride=16)])
    (anchors,) = list(anchors.cell_anchors)  # built on the CPU
    wh = torch.stack([anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]], dim=1)
    assert sorted({round(float(s)) for s in (wh[:, 0] * wh[:, 1]).sqrt()}) == [64, 128, 256, 512]
    assert sorted({round(float(r), 2) for r in wh[:, 1] / wh[:, 0]}) == [0.5, 1.0, 2.0]
    pooler = m.roi_heads.pooler.level_poolers[0]
    assert type(pooler).__name__ == "RoIPool"
    assert pooler.output_size == (14, 14) and pooler.spatial_scale == 1 / 16
    assert m.cfg.MODEL.PIXEL_MEAN == [102.9801, 115.9465, 122.7717]
    assert m.cfg.MODEL.PIXEL_STD == [1.0, 1.0, 1.0]
    assert m.feature_dim == 2048


def test_tiny_config_keeps_the_module_names(full_model: VGDetector, tiny: VGDetector) -> None:
    full = set(full_model.state_dict())
    small = tiny.state_dict()
    assert set(small) <= full  # R-50 block counts: every tiny name exists in the full model
    assert small["roi_heads.box_predictor.cls_score.weight"].shape[0] == 1601
    assert small["roi_heads.box_predictor.attr_score.weight"].shape[0] == 401
    assert tiny.roi_heads.res5[0].conv2.dilation == (2, 2)
    assert tiny.feature_dim < 2048


def test_caffe_stem_differs_from_detectron2_stem() -> None:
    torch.manual_seed(0)
    caffe = CaffeMaxPoolStem(3, 8, norm="FrozenBN")
    stock = BasicStem(3, 8, norm="FrozenBN")
    stock.load_state_dict(caffe.state_dict())
    odd = torch.randn(1, 3, 33, 33)  # 7x7/2 conv gives 17x17: ceil -> 8, padded floor -> 9
    assert caffe(odd).shape[-2:] == (8, 8)
    assert stock(odd).shape[-2:] == (9, 9)
    even = torch.randn(1, 3, 36, 36)  # 18x18 after the conv: both pool to 9x9 but different windows
    a, b = caffe(even), stock(even)
    assert a.shape == b.shape
    assert not torch.allclose(a, b)
    expected = F.max_pool2d(F.relu(caffe.conv1(even)), 3, 2, 0, ceil_mode=True)
    assert torch.equal(a, expected)


def test_config_names_paths_and_errors(tmp_path) -> None:
    cfg = get_detector_cfg("vg_tiny", ["MODEL.RPN.POST_NMS_TOPK_TEST", "7"])
    assert cfg.MODEL.RPN.POST_NMS_TOPK_TEST == 7 and cfg.MODEL.RESNETS.DEPTH == 50
    assert cfg.MODEL.RESNETS.STEM_POOL == "caffe" and cfg.MODEL.ROI_ATTRIBUTE_HEAD.NUM_ATTRIBUTES == 400
    custom = tmp_path / "mine.yaml"
    custom.write_text("MODEL:\n  RPN:\n    POST_NMS_TOPK_TEST: 11\n")
    assert get_detector_cfg(str(custom)).MODEL.RPN.POST_NMS_TOPK_TEST == 11
    with pytest.raises(FileNotFoundError, match="vg_r101_c4"):
        get_detector_cfg("vg_r999")


def test_seeded_build_is_deterministic_and_leaves_global_rng_alone(tiny: VGDetector) -> None:
    cfg = get_detector_cfg("vg_tiny")
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    again = build_vg_detector(cfg, seed=0)
    assert torch.equal(torch.rand(1), before)
    other = build_vg_detector(cfg, seed=1)
    for key, value in tiny.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    key = "roi_heads.box_predictor.cls_score.weight"
    assert not torch.equal(tiny.state_dict()[key], other.state_dict()[key])
    assert not again.training and again.weights_source == "random(seed=0)"


# ------------------------------------------------------------------------------------------ extraction
def _check_record(rec: dict, orig: tuple[int, int], n_max: int, dim: int) -> int:
    assert set(rec) == RECORD_KEYS
    n = rec["boxes"].shape[0]
    assert 0 < n <= n_max
    assert rec["features"].shape == (n, dim) and rec["features"].dtype == np.float32
    assert rec["boxes"].shape == (n, 4) and rec["boxes"].dtype == np.float32
    for name, dtype in (
        ("obj_ids", np.int64),
        ("attr_ids", np.int64),
        ("obj_conf", np.float32),
        ("attr_conf", np.float32),
    ):
        assert rec[name].shape == (n,) and rec[name].dtype == dtype, name
    assert (rec["img_h"], rec["img_w"]) == orig
    b = rec["boxes"]
    assert (
        np.all(b[:, 0] >= 0)
        and np.all(b[:, 2] <= orig[1])
        and np.all(b[:, 1] >= 0)
        and np.all(b[:, 3] <= orig[0])
    )
    assert np.all(b[:, 2] >= b[:, 0]) and np.all(b[:, 3] >= b[:, 1])
    assert np.all((rec["obj_ids"] >= 0) & (rec["obj_ids"] < 1600))
    assert np.all((rec["attr_ids"] >= 0) & (rec["attr_ids"] < 400))
    assert np.all((rec["obj_conf"] > 0) & (rec["obj_conf"] <= 1)) and np.all(rec["attr_conf"] <= 1)
    return n


def test_extract_record_matches_a_manual_forward(tiny: VGDetector) -> None:
    img = _image(96, 144, seed=1)
    orig = (192, 288)  # the runner resized the original by 0.5
    (rec,) = tiny.extract([img], [orig], BoxSelection())
    assert _check_record(rec, orig, 36, tiny.feature_dim) == 36

    # recompute the stored regions from the stored boxes: scale back, RoIPool, res5, predictor
    with torch.no_grad():
        x = ((img - tiny.pixel_mean) / tiny.pixel_std)[None]
        feats = tiny.backbone(x)["res4"]
        boxes = torch.from_numpy(rec["boxes"]) * 0.5
        pooled = tiny.roi_heads.pool(feats, [Boxes(boxes)])
        region = tiny.roi_heads.region_features(pooled)
        cls_logits, _, attr_logits = tiny.roi_heads.box_predictor(region)
    np.testing.assert_allclose(rec["features"], region.numpy(), rtol=1e-4, atol=1e-5)
    probs = F.softmax(cls_logits, dim=1)
    assert probs.shape[1] == 1601
    np.testing.assert_array_equal(rec["obj_ids"], probs[:, :1600].argmax(1).numpy())
    np.testing.assert_allclose(rec["obj_conf"], probs[:, :1600].max(1).values.numpy(), rtol=1e-5)
    attr = F.softmax(attr_logits, dim=1)  # softmax over all 401, then "no attribute" (last) dropped
    np.testing.assert_array_equal(rec["attr_ids"], attr[:, :400].argmax(1).numpy())
    np.testing.assert_allclose(rec["attr_conf"], attr[:, :400].max(1).values.numpy(), rtol=1e-5)


def test_boxes_are_scaled_to_the_original_size(tiny: VGDetector) -> None:
    img = _image(80, 120, seed=2)
    (same,) = tiny.extract([img], [(80, 120)], BoxSelection())
    (scaled,) = tiny.extract([img], [(200, 360)], BoxSelection())
    np.testing.assert_array_equal(same["obj_ids"], scaled["obj_ids"])
    np.testing.assert_allclose(scaled["boxes"], same["boxes"] * np.array([3.0, 2.5, 3.0, 2.5]), rtol=1e-5)
    assert (scaled["img_h"], scaled["img_w"]) == (200, 360)


def test_batch_composition_does_not_change_records(tiny: VGDetector) -> None:
    sizes = [(96, 128), (80, 112), (96, 128), (64, 64), (96, 128), (80, 112), (48, 200), (100, 150)]
    images = [_image(h, w, seed=10 + i) for i, (h, w) in enumerate(sizes)]
    origs = [(2 * h, 2 * w) for h, w in sizes]
    sel = BoxSelection()
    batched = tiny.extract(images, origs, sel)
    assert len(batched) == len(images)
    for i, (img, orig) in enumerate(zip(images, origs)):
        (alone,) = tiny.extract([img], [orig], sel)
        _check_record(alone, orig, 36, tiny.feature_dim)
        for key in ("obj_ids", "attr_ids"):
            np.testing.assert_array_equal(batched[i][key], alone[key], err_msg=f"image {i} {key}")
        np.testing.assert_allclose(batched[i]["boxes"], alone["boxes"], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(batched[i]["features"], alone["features"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(batched[i]["obj_conf"], alone["obj_conf"], rtol=1e-4)
    # different images really do give different records
    assert not np.array_equal(batched[0]["boxes"], batched[2]["boxes"])


def test_res5_chunk_choice_and_chunking_does_not_change_features(tiny: VGDetector) -> None:
    topk = int(tiny.cfg.MODEL.RPN.POST_NMS_TOPK_TEST)
    assert int(tiny.cfg.MODEL.ROI_BOX_HEAD.RES5_CHUNK) == 0  # automatic by default
    assert tiny.res5_chunk(torch.device("cpu")) == topk  # one image's proposals per chunk on CPU
    assert tiny.res5_chunk(torch.device("cuda")) == 1024
    g = torch.Generator().manual_seed(3)
    channels, size = tiny.roi_heads.res5[0].in_channels, int(tiny.cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION)
    pooled = torch.rand(11, channels, size, size, generator=g)
    with torch.no_grad():
        whole = tiny.roi_heads.region_features(pooled, chunk=0)
        chunked = tiny.roi_heads.region_features(pooled, chunk=4)  # chunks of 4, 4, 3
    assert chunked.shape == whole.shape == (11, tiny.feature_dim)
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)
    assert whole.abs().max() > 0


def test_tiny_image_with_few_proposals_gives_a_short_valid_record() -> None:
    model = build_vg_detector(get_detector_cfg("vg_tiny", ["MODEL.RPN.POST_NMS_TOPK_TEST", "10"]))
    for rule in ("caffe", "maxnms"):
        (rec,) = model.extract([_image(24, 30, seed=3)], [(48, 60)], BoxSelection(rule=rule))
        n = _check_record(rec, (48, 60), 10, model.feature_dim)
        assert n < 36


def test_no_proposals_gives_an_empty_record() -> None:
    model = build_vg_detector(get_detector_cfg("vg_tiny", ["MODEL.RPN.POST_NMS_TOPK_TEST", "0"]))
    for rule in ("caffe", "maxnms"):
        recs = model.extract(
            [_image(40, 40, 7), _image(50, 40, 8)], [(40, 40), (50, 40)], BoxSelection(rule=rule)
        )
        for rec, size in zip(recs, [(40, 40), (50, 40)]):
            assert rec["features"].shape == (0, model.feature_dim) and rec["boxes"].shape == (0, 4)
            assert rec["obj_ids"].dtype == np.int64 and rec["attr_conf"].shape == (0,)
            assert (rec["img_h"], rec["img_w"]) == size


def test_maxnms_rule_and_box_range(tiny: VGDetector) -> None:
    img = _image(96, 144, seed=4)
    (rec,) = tiny.extract([img], [(96, 144)], BoxSelection(rule="maxnms", min_boxes=10, max_boxes=20))
    n = _check_record(rec, (96, 144), 20, tiny.feature_dim)
    assert n >= 10
    assert np.all(rec["obj_conf"][:-1] >= rec["obj_conf"][1:])  # ranked by the max-class score
    (caffe,) = tiny.extract([img], [(96, 144)], BoxSelection(min_boxes=10, max_boxes=20))
    assert not np.array_equal(
        caffe["boxes"][: min(n, len(caffe["boxes"]))], rec["boxes"][: len(caffe["boxes"])]
    )


def test_bfloat16_autocast_runs_and_returns_float32(tiny: VGDetector) -> None:
    img = _image(64, 96, seed=5)
    (rec,) = tiny.extract([img], [(64, 96)], BoxSelection(), amp_dtype=torch.bfloat16)
    _check_record(rec, (64, 96), 36, tiny.feature_dim)


def test_extract_rejects_bad_inputs(tiny: VGDetector) -> None:
    assert tiny.extract([], [], BoxSelection()) == []
    with pytest.raises(ValueError, match="original sizes"):
        tiny.extract([_image(32, 32, 0)], [], BoxSelection())
    with pytest.raises(ValueError, match="image 0 has shape"):
        tiny.extract([torch.zeros(32, 32)], [(32, 32)], BoxSelection())
    with pytest.raises(ValueError, match="image 1 is 2x40 pixels"):
        tiny.extract([_image(32, 32, 0), _image(2, 40, 0)], [(32, 32), (2, 40)], BoxSelection())
    (rec,) = tiny.extract([_image(3, 3, 0)], [(3, 3)], BoxSelection())  # the smallest input still works
    assert 0 < len(rec["boxes"]) < 36 and rec["features"].shape[0] == len(rec["boxes"])
    with pytest.raises(NotImplementedError, match="extract"):
        tiny.roi_heads(None, {}, [])


def test_random_full_model_stays_informative() -> None:
    """--random-weights on the full config must still give proposals and unsaturated scores (benchmarks)."""
    model = build_vg_detector(get_detector_cfg("vg_r101_c4", ["MODEL.RPN.POST_NMS_TOPK_TEST", "20"]))
    img = _image(96, 128, seed=6)
    with torch.no_grad():
        x = ((img - model.pixel_mean) / model.pixel_std)[None]
        feats, boxes = model._backbone_and_proposals(x)
    assert torch.isfinite(feats).all() and 0.01 < float(feats.abs().mean()) < 100
    assert len(boxes[0]) == 20
    (rec,) = model.extract([img], [(96, 128)], BoxSelection(min_boxes=10, max_boxes=10))
    assert rec["features"].shape == (10, 2048) and np.isfinite(rec["features"]).all()
    assert np.all(rec["obj_conf"] < 0.5)
