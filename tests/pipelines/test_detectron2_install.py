"""The environment's Detectron2 works: a stock R-C4 Faster R-CNN builds and runs on CPU."""

from __future__ import annotations

import pytest
import torch


def _tiny_c4_cfg():
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res4"]
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 16
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 8
    cfg.MODEL.RPN.IN_FEATURES = ["res4"]
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 200
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 20
    cfg.MODEL.ROI_HEADS.NAME = "Res5ROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["res4"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 5
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "ROIPool"
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 14
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32, 64, 128]]
    return cfg


def test_detectron2_r_c4_runs_on_cpu() -> None:
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(_tiny_c4_cfg()).eval()
    image = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8).float()
    with torch.no_grad():
        batch = model.preprocess_image([{"image": image}])
        features = model.backbone(batch.tensor)
        proposals, _ = model.proposal_generator(batch, features)
        (out,) = model([{"image": image, "height": 96, "width": 128}])
    # res4 at stride 16 (the C4 layout), RoIPool-based res5 head, proposals inside the image
    assert features["res4"].shape == (1, 1024 // 4, 6, 8)
    assert len(proposals[0]) >= 1
    boxes = proposals[0].proposal_boxes.tensor
    assert torch.all(boxes[:, 0] >= 0) and torch.all(boxes[:, 2] <= 128) and torch.all(boxes[:, 3] <= 96)
    inst = out["instances"]
    assert inst.image_size == (96, 128)
    assert inst.pred_boxes.tensor.shape[1] == 4 and torch.isfinite(inst.scores).all()


def test_pure_python_detectron2_names_missing_ops() -> None:
    """Without the compiled extension, asking for a C++ op names it instead of failing obscurely."""
    import detectron2

    try:
        import detectron2._C as C
    except ImportError:  # pragma: no cover - a from-source build without _C would be broken anyway
        pytest.fail("detectron2._C cannot be imported at all")
    if hasattr(C, "__file__") and not str(C.__file__).endswith("_C.py"):
        pytest.skip(f"a compiled Detectron2 is installed ({detectron2.__file__}); the stand-in is not used")
    with pytest.raises(AttributeError, match="deform_conv_forward"):
        C.deform_conv_forward  # noqa: B018
