"""The Visual Genome Faster R-CNN (ResNet-101 C4 with attributes) assembled from Detectron2 parts.

Detectron2 is extended the way it is meant to be, with no fork and no patching:

- ``build_vg_resnet_backbone`` (in ``BACKBONE_REGISTRY``): Detectron2's ``ResNet`` / ``BottleneckBlock``
  stages with the Caffe max-pool stem (:class:`CaffeMaxPoolStem`: kernel 3, stride 2, padding 0,
  ``ceil_mode=True``), stride in the 1x1 conv, frozen BN, output ``res4`` at stride 16.
- Detectron2's own ``RPN`` / ``StandardRPNHead`` (512 hidden channels, 12 anchors per position).
- ``VGRes5ROIHeads`` (in ``ROI_HEADS_REGISTRY``): Detectron2's ``Res5ROIHeads`` with RoIPool 14x14 at
  scale 1/16, res5 at stride 1 with dilation ``MODEL.RESNETS.RES5_DILATION`` (2) in its 3x3 convs, and
  :class:`VGAttributePredictor` (1601-way classifier with background LAST, class-specific boxes for the
  1600 foreground classes (6400 rows, as in Detectron2 and every published conversion), attribute head).

Module names and tensor layouts follow Detectron2's, so py-bottom-up-attention's weight pickle loads without
renaming (``backbone.res4.22.conv3.weight``, ``roi_heads.box_predictor.attr_score.bias`` ...); the other
published conversions are mapped onto them by :mod:`extract.weight_layouts`.

Input convention: images are (3, H, W) float32 **BGR** in 0..255, already resized by the caller; the model
subtracts ``MODEL.PIXEL_MEAN`` (Caffe means, std 1). Boxes are x1, y1, x2, y2 in pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, ROI_HEADS_REGISTRY
from detectron2.modeling.backbone import build_backbone
from detectron2.modeling.backbone.resnet import BasicStem, BottleneckBlock, ResNet
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator import build_proposal_generator
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.modeling.roi_heads.roi_heads import Res5ROIHeads, ROIHeads
from detectron2.structures import Boxes, ImageList
from torch import nn

from extract.selection import (
    BoxSelection,
    Selected,
    caffe_max_scores_batched,
    class_deltas,
    select_caffe,
    select_maxnms,
)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

MIN_INPUT_SIDE = 3  # smaller inputs leave the Caffe stem's 3x3 max-pool (no padding) nothing to pool

_RES_BLOCKS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}


# ----------------------------------------------------------------------------------------------- config
def add_vg_config(cfg: CfgNode) -> CfgNode:
    """Declare the keys this detector adds to Detectron2's config, with their defaults.

    - ``MODEL.RESNETS.STEM_POOL``: ``"caffe"`` (max-pool k3 s2 p0 ceil_mode, the VG detector's) or
      ``"detectron2"`` (stock k3 s2 p1 floor).
    - ``MODEL.ROI_ATTRIBUTE_HEAD.{NUM_ATTRIBUTES, EMBED_DIM, HIDDEN_DIM}``: 400 real attributes (+1 "no
      attribute" output, LAST), class embedding 256, hidden 512.
    - ``MODEL.ROI_BOX_HEAD.RES5_CHUNK``: regions per res5 forward in :meth:`VGDetector.extract` (memory cap);
      0 = automatic: 1024 on a GPU, on CPU one image's proposals (``RPN.POST_NMS_TOPK_TEST``, 300), so
      every chunk allocates alike whatever the batch (the CPU allocator then reuses its memory).
    """
    cfg.MODEL.RESNETS.STEM_POOL = "caffe"
    cfg.MODEL.ROI_ATTRIBUTE_HEAD = CfgNode()
    cfg.MODEL.ROI_ATTRIBUTE_HEAD.NUM_ATTRIBUTES = 400
    cfg.MODEL.ROI_ATTRIBUTE_HEAD.EMBED_DIM = 256
    cfg.MODEL.ROI_ATTRIBUTE_HEAD.HIDDEN_DIM = 512
    cfg.MODEL.ROI_BOX_HEAD.RES5_CHUNK = 0
    return cfg


def available_configs() -> list[str]:
    """Names of the YAML configs shipped in ``extract/configs/``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def get_detector_cfg(config: str = "vg_r101_c4", opts: list[str] | None = None) -> CfgNode:
    """Detectron2 config for the VG detector.

    Args:
        config: name of a YAML shipped in ``extract/configs/`` (``"vg_r101_c4"``: the full model;
            ``"vg_tiny"``: a reduced model for tests/CI with the same module names) or a path to a YAML.
        opts: Detectron2 ``KEY VALUE`` overrides, e.g. ``["MODEL.RPN.POST_NMS_TOPK_TEST", "100"]``.
    """
    path = Path(config)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = CONFIG_DIR / f"{config}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"detector config {config!r} not found: give one of {available_configs()} or a path to a YAML file"
        )
    cfg = add_vg_config(get_cfg())
    cfg.merge_from_file(str(path))
    if opts:
        cfg.merge_from_list(list(opts))
    return cfg


# --------------------------------------------------------------------------------------------- backbone
class CaffeMaxPoolStem(BasicStem):
    """Detectron2's ``BasicStem`` (7x7/2 conv + ReLU) with Caffe's max-pool: k3, s2, padding 0, ceil_mode.

    Stock Detectron2 pools with padding 1 and floor, which shifts every later activation and, for some
    input sizes, changes the output size: (N, C, H, W) -> (N, C_out, H', W') where after the conv
    (size s) Caffe gives ceil((s - 3) / 2) + 1 and Detectron2 floor((s - 1) / 2) + 1.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu_(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)


@BACKBONE_REGISTRY.register()
def build_vg_resnet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> ResNet:
    """ResNet C4 trunk (stem, res2..res4) from Detectron2 blocks; res5 lives in the ROI head.

    Reads ``MODEL.RESNETS.{DEPTH, STEM_OUT_CHANNELS, RES2_OUT_CHANNELS, WIDTH_PER_GROUP, NUM_GROUPS,
    STRIDE_IN_1X1, NORM, OUT_FEATURES, STEM_POOL}`` and ``MODEL.BACKBONE.FREEZE_AT``.
    Output ``res4``: (N, 4 * RES2_OUT_CHANNELS, ~H/16, ~W/16) (1024 channels for R-101).
    """
    r = cfg.MODEL.RESNETS
    if r.DEPTH not in _RES_BLOCKS:
        raise ValueError(f"MODEL.RESNETS.DEPTH={r.DEPTH} unsupported by the VG backbone; use 50, 101 or 152")
    stem_cls = {"caffe": CaffeMaxPoolStem, "detectron2": BasicStem}.get(r.STEM_POOL)
    if stem_cls is None:
        raise ValueError(f"MODEL.RESNETS.STEM_POOL={r.STEM_POOL!r}; use 'caffe' or 'detectron2'")
    stem = stem_cls(in_channels=input_shape.channels, out_channels=r.STEM_OUT_CHANNELS, norm=r.NORM)
    in_ch, out_ch = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    bottleneck = r.NUM_GROUPS * r.WIDTH_PER_GROUP
    stages = []
    for idx, num_blocks in enumerate(_RES_BLOCKS[r.DEPTH][:3]):  # res2, res3, res4
        first_stride = 1 if idx == 0 else 2
        stages.append(
            ResNet.make_stage(
                BottleneckBlock,
                num_blocks,
                stride_per_block=[first_stride] + [1] * (num_blocks - 1),
                in_channels=in_ch,
                out_channels=out_ch,
                bottleneck_channels=bottleneck,
                num_groups=r.NUM_GROUPS,
                norm=r.NORM,
                stride_in_1x1=r.STRIDE_IN_1X1,
            )
        )
        in_ch, out_ch, bottleneck = out_ch, out_ch * 2, bottleneck * 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


# ---------------------------------------------------------------------------------------------- heads
class VGAttributePredictor(nn.Module):
    """Box classifier, class-specific box regressor and attribute head over pooled region features.

    Layers (names as in py-bottom-up-attention): ``cls_score`` D -> K+1 (background LAST),
    ``bbox_pred`` D -> K*4 (deltas of foreground class c in columns 4c..4c+3; none for background, as in
    Detectron2), ``cls_embedding`` Embedding(K+1, E), ``fc_attr`` (D+E) -> H, ``attr_score`` H -> A+1
    ("no attribute" LAST). The class fed to the embedding is the argmax over all K+1 logits (background
    included), as in that port.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int = 1600,
        num_attributes: int = 400,
        embed_dim: int = 256,
        hidden_dim: int = 512,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_attributes = num_attributes
        self.cls_score = nn.Linear(in_dim, num_classes + 1)
        self.bbox_pred = nn.Linear(in_dim, num_classes * 4)
        self.cls_embedding = nn.Embedding(num_classes + 1, embed_dim)
        self.fc_attr = nn.Linear(in_dim + embed_dim, hidden_dim)
        self.attr_score = nn.Linear(hidden_dim, num_attributes + 1)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        for layer in (self.cls_score, self.bbox_pred):
            nn.init.constant_(layer.bias, 0.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (R, D) mean-pooled region features -> class logits (R, K+1), box deltas (R, K*4),
        attribute logits (R, A+1)."""
        cls_logits = self.cls_score(x)
        deltas = self.bbox_pred(x)
        emb = self.cls_embedding(cls_logits.argmax(dim=1))
        attr = F.relu(self.fc_attr(torch.cat([x, emb.to(x.dtype)], dim=1)))
        return cls_logits, deltas, self.attr_score(attr)


@ROI_HEADS_REGISTRY.register()
class VGRes5ROIHeads(Res5ROIHeads):
    """Detectron2's C4 ``Res5ROIHeads`` for the VG detector (inference only).

    res5's first block has stride 1 (conv1 and shortcut) when ``MODEL.RESNETS.RES5_DILATION`` > 1 and all
    its 3x3 convs use that dilation (padding = dilation), so 14x14 RoIs stay 14x14; the box predictor is
    :class:`VGAttributePredictor`.
    """

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: dict[str, ShapeSpec]) -> dict:
        ret = ROIHeads.from_config(cfg)
        in_features = ret["in_features"] = list(cfg.MODEL.ROI_HEADS.IN_FEATURES)
        if len(in_features) != 1:
            raise ValueError(
                f"VGRes5ROIHeads reads one feature map, got MODEL.ROI_HEADS.IN_FEATURES={in_features}"
            )
        ret["pooler"] = ROIPooler(
            output_size=cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION,
            scales=(1.0 / input_shape[in_features[0]].stride,),
            sampling_ratio=cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
            pooler_type=cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE,
        )
        ret["res5"], out_channels = cls._build_res5_block(cfg)
        a = cfg.MODEL.ROI_ATTRIBUTE_HEAD
        ret["box_predictor"] = VGAttributePredictor(
            out_channels,
            num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            num_attributes=a.NUM_ATTRIBUTES,
            embed_dim=a.EMBED_DIM,
            hidden_dim=a.HIDDEN_DIM,
        )
        return ret

    @classmethod
    def _build_res5_block(cls, cfg: CfgNode) -> tuple[nn.Sequential, int]:
        r = cfg.MODEL.RESNETS
        dilation = r.RES5_DILATION
        first_stride = 1 if dilation > 1 else 2
        out_channels = r.RES2_OUT_CHANNELS * 8
        blocks = ResNet.make_stage(
            BottleneckBlock,
            3,
            stride_per_block=[first_stride, 1, 1],
            in_channels=out_channels // 2,
            out_channels=out_channels,
            bottleneck_channels=r.NUM_GROUPS * r.WIDTH_PER_GROUP * 8,
            num_groups=r.NUM_GROUPS,
            norm=r.NORM,
            stride_in_1x1=r.STRIDE_IN_1X1,
            dilation=dilation,
        )
        return nn.Sequential(*blocks), out_channels

    def pool(self, features: torch.Tensor, boxes: list[Boxes]) -> torch.Tensor:
        """RoIPool: features (N, C, H, W), boxes per image in input pixels -> (sum R_i, C, P, P)."""
        # RoIPool runs in float32 (torchvision has no CPU autocast rule for it)
        return self.pooler([features.float()], boxes)

    def region_features(self, pooled: torch.Tensor, chunk: int = 0) -> torch.Tensor:
        """res5 over pooled RoIs (R, C, P, P), then mean over the grid -> (R, D). ``chunk`` > 0 caps the
        regions per forward (memory); chunking does not change the result beyond float rounding."""
        if pooled.shape[0] == 0:
            return pooled.new_zeros((0, self.box_predictor.cls_score.in_features))
        step = chunk if chunk > 0 else pooled.shape[0]
        return torch.cat(
            [self.res5(pooled[i : i + step]).mean(dim=(2, 3)) for i in range(0, len(pooled), step)]
        )

    def forward(self, *args, **kwargs):  # noqa: D102 - training/standard inference are not supported
        raise NotImplementedError("VGRes5ROIHeads is inference-only: call VGDetector.extract(...)")


# ------------------------------------------------------------------------------------------- detector
class VGDetector(nn.Module):
    """The VG Faster R-CNN: ``backbone`` (C4 trunk), ``proposal_generator`` (RPN), ``roi_heads`` (res5 +
    predictor), each built through Detectron2's registries from ``cfg``.

    ``weights_source`` says what the parameters are: ``"random(seed=S)"`` after :func:`build_vg_detector`,
    the file and its sha256 after :func:`extract.weights.load_detector_weights`.
    """

    def __init__(self, cfg: CfgNode) -> None:
        super().__init__()
        self.cfg = cfg.clone()
        self.backbone = build_backbone(self.cfg)
        shapes = self.backbone.output_shape()
        self.proposal_generator = build_proposal_generator(self.cfg, shapes)
        self.roi_heads = build_roi_heads(self.cfg, shapes)
        self.in_feature = self.cfg.MODEL.ROI_HEADS.IN_FEATURES[0]
        mean = torch.tensor(self.cfg.MODEL.PIXEL_MEAN, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.cfg.MODEL.PIXEL_STD, dtype=torch.float32).view(-1, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        self.box2box = Box2BoxTransform(weights=self.cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS)
        self.weights_source = "uninitialised"

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def feature_dim(self) -> int:
        """D, the region feature size (2048 for the full model)."""
        return self.roi_heads.box_predictor.cls_score.in_features

    def describe(self, selection: BoxSelection | None = None) -> dict:
        """What produced a store's features (for its metadata): config, sizes, weights, selection."""
        out = {
            "detector": "vg_faster_rcnn_c4_attr",
            "depth": int(self.cfg.MODEL.RESNETS.DEPTH),
            "feature_dim": self.feature_dim,
            "num_classes": int(self.cfg.MODEL.ROI_HEADS.NUM_CLASSES),
            "num_attributes": int(self.cfg.MODEL.ROI_ATTRIBUTE_HEAD.NUM_ATTRIBUTES),
            "post_nms_topk": int(self.cfg.MODEL.RPN.POST_NMS_TOPK_TEST),
            "stem_pool": str(self.cfg.MODEL.RESNETS.STEM_POOL),
            "pixel_mean": [float(v) for v in self.cfg.MODEL.PIXEL_MEAN],
            "weights": self.weights_source,
        }
        if selection is not None:
            out["selection"] = selection.to_dict()
        return out

    def _backbone_and_proposals(self, batch: torch.Tensor) -> tuple[torch.Tensor, list[Boxes]]:
        """batch: (N, 3, H, W) normalised, all the same size -> res4 (N, C, H/16, W/16), proposals."""
        feats = self.backbone(batch)[self.in_feature]
        images = ImageList(batch, [tuple(batch.shape[-2:])] * batch.shape[0])
        proposals, _ = self.proposal_generator(images, {self.in_feature: feats})
        return feats, [p.proposal_boxes for p in proposals]

    def res5_chunk(self, device: torch.device) -> int:
        """Regions per res5 forward: ``MODEL.ROI_BOX_HEAD.RES5_CHUNK``, or for 0 the automatic choice."""
        chunk = int(self.cfg.MODEL.ROI_BOX_HEAD.RES5_CHUNK)
        if chunk > 0:
            return chunk
        return 1024 if device.type == "cuda" else int(self.cfg.MODEL.RPN.POST_NMS_TOPK_TEST)

    @torch.no_grad()
    def extract(
        self,
        images: list[torch.Tensor],
        original_sizes: list[tuple[int, int]],
        selection: BoxSelection,
        amp_dtype: torch.dtype | None = None,
    ) -> list[dict]:
        """Region records for a batch of images.

        Args:
            images: (3, H_i, W_i) float32 BGR in 0..255, NOT mean-subtracted, already resized.
            original_sizes: (orig_h, orig_w) per image, the size the stored boxes refer to.
            selection: which regions to keep (:class:`extract.selection.BoxSelection`).
            amp_dtype: ``torch.float16`` / ``torch.bfloat16`` to run the network under autocast; the
                selection and the outputs are float32 either way.

        Returns:
            One store record per image (numpy, CPU): ``features`` (n, D) float32, ``boxes`` (n, 4) float32
            x1,y1,x2,y2 in ORIGINAL image pixels, ``obj_ids`` / ``attr_ids`` (n,) int64, ``obj_conf`` /
            ``attr_conf`` (n,) float32, ``img_h``, ``img_w`` (original size). n <= max_boxes, and n <
            min_boxes only when the RPN gave fewer proposals.

        The backbone and RPN run over groups of same-size images only (no padding), the res5 head over
        all regions of the batch at once, so a record does not depend on the batch it came in.
        """
        if self.weights_source == "incomplete":
            raise RuntimeError(
                "refusing to extract: the detector's weights were only partly loaded (see the LoadReport); "
                "load a complete weight file or rebuild with random weights"
            )
        if len(images) != len(original_sizes):
            raise ValueError(f"{len(images)} images but {len(original_sizes)} original sizes")
        if not images:
            return []
        device = self.device
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"image {i} has shape {tuple(img.shape)}; expected (3, H, W) BGR")
            if min(img.shape[1:]) < MIN_INPUT_SIDE:
                raise ValueError(
                    f"image {i} is {img.shape[1]}x{img.shape[2]} pixels; the detector needs at least "
                    f"{MIN_INPUT_SIDE} per side (resize it up, e.g. to a shortest side of 600)"
                )
            groups.setdefault((int(img.shape[1]), int(img.shape[2])), []).append(i)

        proposals: list[Boxes | None] = [None] * len(images)
        pooled: list[torch.Tensor | None] = [None] * len(images)
        autocast = torch.autocast(
            device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        )
        with autocast:
            for idxs in groups.values():
                batch = torch.stack([images[i] for i in idxs]).to(device=device, dtype=torch.float32)
                batch = (batch - self.pixel_mean) / self.pixel_std
                feats, boxes = self._backbone_and_proposals(batch)
                pooled_group = self.roi_heads.pool(feats, boxes)
                counts = [len(b) for b in boxes]
                for i, b, p in zip(idxs, boxes, pooled_group.split(counts)):
                    proposals[i], pooled[i] = b, p
            region = self.roi_heads.region_features(torch.cat(pooled), chunk=self.res5_chunk(device))
            cls_logits, deltas, attr_logits = self.roi_heads.box_predictor(region)
        region, cls_logits, deltas, attr_logits = (
            t.float() for t in (region, cls_logits, deltas, attr_logits)
        )

        counts = [len(p) for p in proposals]
        num_fg = self.roi_heads.box_predictor.num_classes  # background is the last logit
        fg_scores = [F.softmax(c, dim=1)[:, :num_fg] for c in cls_logits.split(counts)]
        max_conf: list[torch.Tensor | None] = [None] * len(images)
        if selection.rule == "caffe":  # per-class NMS for all images at once (exact per image)
            max_conf = caffe_max_scores_batched(
                [p.tensor.float() for p in proposals], fg_scores, selection.nms_thresh
            )
        records = []
        for i, (feat, fg, dl, attr, props) in enumerate(
            zip(
                region.split(counts),
                fg_scores,
                deltas.split(counts),
                attr_logits.split(counts),
                proposals,
            )
        ):
            size = (int(images[i].shape[1]), int(images[i].shape[2]))
            records.append(
                self._postprocess(
                    feat,
                    fg,
                    dl,
                    attr,
                    props.tensor.float(),
                    size,
                    original_sizes[i],
                    selection,
                    max_conf[i],
                )
            )
        return records

    def _postprocess(
        self,
        feat: torch.Tensor,
        fg: torch.Tensor,
        deltas: torch.Tensor,
        attr_logits: torch.Tensor,
        proposal_boxes: torch.Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
        selection: BoxSelection,
        max_conf: torch.Tensor | None = None,
    ) -> dict:
        """One image: selection, label/attribute argmax, boxes back to original pixels -> store record.

        ``fg`` (R, K): softmax over all K+1 class logits with the background column (last) dropped;
        ``deltas`` (R, K*4), foreground class c in columns 4c..4c+3; ``attr_logits`` (R, A+1);
        ``proposal_boxes`` (R, 4) in input pixels.
        """
        num_attr = self.roi_heads.box_predictor.num_attributes
        if selection.rule == "caffe":
            chosen: Selected = select_caffe(proposal_boxes, fg, selection, max_conf=max_conf)
        else:
            max_scores, max_cls = (
                fg.max(dim=1) if len(fg) else (fg.new_zeros(0), fg.new_zeros(0, dtype=torch.long))
            )
            class_boxes = self.box2box.apply_deltas(class_deltas(deltas, max_cls), proposal_boxes)
            class_boxes = Boxes(class_boxes)
            class_boxes.clip(input_size)
            chosen = select_maxnms(class_boxes.tensor, max_scores, selection)
        keep = chosen.keep
        obj_conf, obj_ids = fg[keep].max(dim=1) if len(keep) else (fg.new_zeros(0), keep.new_zeros(0))
        attr_probs = F.softmax(attr_logits[keep], dim=1)[:, :num_attr]
        attr_conf, attr_ids = attr_probs.max(dim=1) if len(keep) else (fg.new_zeros(0), keep.new_zeros(0))

        (in_h, in_w), (orig_h, orig_w) = input_size, original_size
        scale = torch.tensor([orig_w / in_w, orig_h / in_h, orig_w / in_w, orig_h / in_h], device=keep.device)
        boxes = chosen.boxes * scale
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, orig_w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, orig_h)
        return {
            "features": np.ascontiguousarray(feat[keep].cpu().numpy(), dtype=np.float32),
            "boxes": np.ascontiguousarray(boxes.cpu().numpy(), dtype=np.float32),
            "obj_ids": obj_ids.cpu().numpy().astype(np.int64),
            "obj_conf": obj_conf.cpu().numpy().astype(np.float32),
            "attr_ids": attr_ids.cpu().numpy().astype(np.int64),
            "attr_conf": attr_conf.cpu().numpy().astype(np.float32),
            "img_h": int(orig_h),
            "img_w": int(orig_w),
        }


def build_vg_detector(cfg: CfgNode, device: str | torch.device = "cpu", seed: int = 0) -> VGDetector:
    """Build the detector in eval mode on ``device``, with random weights (load real ones with
    :func:`extract.weights.load_detector_weights`).

    The random initialisation is drawn on the CPU from ``seed`` (global RNG state untouched), so every
    process (e.g. torchrun ranks with ``--random-weights``) gets identical parameters on any device.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VGDetector(cfg)
    # Detectron2's initialisers assume unit-scale inputs and trained BN; with Caffe input (0..255 minus the
    # mean) and identity frozen BN, activations of a random model grow through the 30+ residual blocks
    # until proposals degenerate and every softmax saturates. Scale the stem's and each residual branch's
    # frozen-BN gamma so random outputs stay informative (loaded weights overwrite all of these).
    with torch.no_grad():
        model.backbone.stem.conv1.norm.weight.fill_(1.0 / 16.0)
        for block in [*model.backbone.modules(), *model.roi_heads.res5.modules()]:
            if isinstance(block, BottleneckBlock):
                block.conv3.norm.weight.fill_(0.2)
    model.weights_source = f"random(seed={seed})"
    return model.to(device).eval()
