"""The VG Faster R-CNN: structure of the full model (on the meta device), behaviour of the tiny one."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.modeling.backbone.resnet import BasicStem
from detectron2.structures import Boxes
from torchvision.ops import box_iou

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
def _published_r101_c4_layout() -> dict[str, tuple[int, ...]]:
    """Every tensor of the published VG detector (faster_rcnn_from_caffe_attr.pkl's names and shapes),
    written out from the architecture's numbers, independently of extract.detector."""
    out: dict[str, tuple[int, ...]] = {}

    def conv(name: str, c_out: int, c_in: int, k: int) -> None:
        out[f"{name}.weight"] = (c_out, c_in, k, k)
        for stat in ("weight", "bias", "running_mean", "running_var"):
            out[f"{name}.norm.{stat}"] = (c_out,)

    conv("backbone.stem.conv1", 64, 3, 7)
    c_in, width = 64, 64
    stages = [("backbone.res2", 3), ("backbone.res3", 4), ("backbone.res4", 23), ("roi_heads.res5", 3)]
    for stage, blocks in stages:
        c_out = 4 * width
        for b in range(blocks):
            block_in = c_in if b == 0 else c_out
            if b == 0:
                conv(f"{stage}.{b}.shortcut", c_out, block_in, 1)
            conv(f"{stage}.{b}.conv1", width, block_in, 1)
            conv(f"{stage}.{b}.conv2", width, width, 3)
            conv(f"{stage}.{b}.conv3", c_out, width, 1)
        c_in, width = c_out, 2 * width
    rpn = "proposal_generator.rpn_head"
    anchors = 4 * 3  # sizes 64..512 x aspect ratios 0.5, 1, 2
    out.update(
        {
            f"{rpn}.conv.weight": (512, 1024, 3, 3),
            f"{rpn}.conv.bias": (512,),
            f"{rpn}.objectness_logits.weight": (anchors, 512, 1, 1),
            f"{rpn}.objectness_logits.bias": (anchors,),
            f"{rpn}.anchor_deltas.weight": (4 * anchors, 512, 1, 1),
            f"{rpn}.anchor_deltas.bias": (4 * anchors,),
        }
    )
    pred = "roi_heads.box_predictor"
    out.update(
        {
            f"{pred}.cls_score.weight": (1601, 2048),  # 1600 objects + background (last)
            f"{pred}.cls_score.bias": (1601,),
            f"{pred}.bbox_pred.weight": (6400, 2048),  # 1600 foreground classes x 4, no background rows
            f"{pred}.bbox_pred.bias": (6400,),
            f"{pred}.cls_embedding.weight": (1601, 256),
            f"{pred}.fc_attr.weight": (512, 2304),
            f"{pred}.fc_attr.bias": (512,),
            f"{pred}.attr_score.weight": (401, 512),  # 400 attributes + "no attribute" (last)
            f"{pred}.attr_score.bias": (401,),
        }
    )
    return out


def test_full_model_matches_the_published_weight_layout(full_model: VGDetector) -> None:
    """Pins the 6400-row box predictor and every other tensor the published weight files hold."""
    shapes = {k: tuple(v.shape) for k, v in full_model.state_dict().items()}
    published = _published_r101_c4_layout()
    assert len(published) == 535
    assert sorted(set(shapes) ^ set(published)) == []
    wrong = {k: (shapes[k], published[k]) for k in published if shapes[k] != published[k]}
    assert wrong == {}
    assert shapes["roi_heads.box_predictor.bbox_pred.weight"] == (6400, 2048)
    assert "backbone.res5.0.conv1.weight" not in shapes  # res5 lives in the box head (C4)
    assert not any("pixel_" in k for k in shapes)
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


def test_maxnms_boxes_use_the_chosen_class_columns(tiny: VGDetector) -> None:
    """maxnms stores each kept proposal's box regressed with bbox_pred columns 4c..4c+3 of its best class c."""
    img = _image(96, 144, seed=4)
    (rec,) = tiny.extract([img], [(96, 144)], BoxSelection(rule="maxnms", min_boxes=10, max_boxes=20))
    with torch.no_grad():
        x = ((img - tiny.pixel_mean) / tiny.pixel_std)[None]
        feats, (proposals,) = tiny._backbone_and_proposals(x)
        region = tiny.roi_heads.region_features(tiny.roi_heads.pool(feats, [proposals]))
        cls_logits, deltas, _ = tiny.roi_heads.box_predictor(region)
    assert deltas.shape[1] == 1600 * 4
    best = F.softmax(cls_logits, dim=1)[:, :1600].argmax(1)
    chosen = torch.stack([deltas[r, 4 * c : 4 * c + 4] for r, c in enumerate(best.tolist())])
    boxes = Boxes(tiny.box2box.apply_deltas(chosen, proposals.tensor))
    boxes.clip((96, 144))
    candidates = boxes.tensor.numpy()
    for box in rec["boxes"]:
        assert np.abs(candidates - box).max(1).min() < 1e-3, box


def test_bfloat16_detector_agrees_with_float32(tiny: VGDetector) -> None:
    """bf16 autocast vs fp32 on the same images: each bf16 region matched to the fp32 region of the same box
    (IoU >= 0.9) must mostly carry the same object id and nearly the same feature."""
    images = [_image(96, 144, seed=s) for s in (5, 6, 7)]
    sizes = [(96, 144)] * 3
    fp32 = tiny.extract(images, sizes, BoxSelection())
    bf16 = tiny.extract(images, sizes, BoxSelection(), amp_dtype=torch.bfloat16)
    matched = same_id = total = 0
    cosines = []
    for a, b in zip(fp32, bf16):
        assert b["features"].dtype == np.float32 and b["boxes"].dtype == np.float32
        iou = box_iou(torch.from_numpy(b["boxes"]), torch.from_numpy(a["boxes"]))
        best_iou, j = iou.max(1)
        total += len(b["boxes"])
        for i in range(len(b["boxes"])):
            if best_iou[i] >= 0.9:
                matched += 1
                same_id += int(b["obj_ids"][i] == a["obj_ids"][j[i]])
                fa, fb = a["features"][j[i]], b["features"][i]
                cosines.append(float(fa @ fb / (np.linalg.norm(fa) * np.linalg.norm(fb))))
    figures = (
        f"{matched}/{total} bf16 regions matched an fp32 box, {same_id}/{matched} with the same object id, "
        f"feature cosine mean {np.mean(cosines):.5f} min {np.min(cosines):.5f}"
    )
    assert matched >= 0.8 * total, figures
    assert same_id >= 0.8 * matched, figures
    assert np.mean(cosines) > 0.995 and np.min(cosines) > 0.97, figures


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


@pytest.mark.slow
def test_torch_fx_tracing_notice_is_silenced_at_its_source_only() -> None:
    """Detectron2's ROIPooler asks torch.fx's is_fx_tracing(), which logs a notice into every progress bar;
    importing extract drops that one record of that one logger (the reference run without it shows it)."""
    code = (
        "import logging, sys\n"
        "if sys.argv[1] == 'extract': import extract\n"
        "from detectron2.utils.tracing import is_fx_tracing\n"
        "is_fx_tracing()\n"
        "logging.getLogger('torch.fx._symbolic_trace').warning('another notice')\n"
    )
    runs = {
        which: subprocess.run(
            [sys.executable, "-c", code, which], capture_output=True, text=True, timeout=120, check=True
        ).stderr
        for which in ("plain", "extract")
    }
    assert "is_fx_tracing will return true" in runs["plain"]
    assert "is_fx_tracing will return true" not in runs["extract"]
    assert "another notice" in runs["extract"]
