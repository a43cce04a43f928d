"""The pipeline's config (``pipelines/configs/*.yaml``; without one, the demo): one dataclass tree.

Closed sets (``mode``, a fine-tuning ``task``) are ``Literal``s: a typo is refused naming the key and the choices.
The demo's environment knobs map onto keys (:data:`ENVIRONMENT`): ``WEIGHTS`` -> ``demo.weights``, ``CONFIG`` ->
``demo.detector_config``, ``DEVICE`` -> ``demo.device``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

__all__ = [
    "ENVIRONMENT",
    "DemoConfig",
    "FinetuneSpec",
    "ImageSet",
    "LaunchConfig",
    "PipelineConfig",
    "RealConfig",
    "VqaDataSpec",
]

#: Environment variable -> the config key it sets (the command line's KEY=VALUE overrides come after).
ENVIRONMENT = {"WEIGHTS": "demo.weights", "CONFIG": "demo.detector_config", "DEVICE": "demo.device"}


@dataclass
class DemoConfig:
    """The bundled demo (easy-VQA, 64x64 images of one coloured shape; random-weight detector unless
    ``WEIGHTS`` is set)."""

    train_images: int = 800
    test_images: int = 200
    valid_images: int = (
        100  # train images held out (after the first train_images) for the fine-tuning's valid split
    )
    weights: str = ""  # detector weights (env WEIGHTS); empty: a detector with random weights
    detector_config: str = ""  # env CONFIG; empty: vg_tiny with random weights, vg_r101_c4 with weights
    device: str = ""  # env DEVICE: cpu | cuda; empty: CUDA when available
    min_size: int = 224
    max_size: int = 224
    extract_batch_size: int = 8
    pretrain_config: str = "tasks/configs/pretrain_demo.yaml"
    vqa_config: str = "tasks/configs/vqa_demo.yaml"
    pretrain_overrides: list[str] = field(default_factory=list)
    vqa_overrides: list[str] = field(default_factory=list)
    check_margin: float = (
        15.0  # overall: points above the better baseline the model must reach (<0: no check)
    )
    probe_gap: float = 5.0  # colour / shape: points the model may be below the linear probe (<0: no check)
    draw_examples: int = 6

    RANGES: ClassVar[dict[str, str]] = {
        "train_images": "[1, inf)",
        "test_images": "[1, inf)",
        "valid_images": "[0, inf)",
        "min_size": "[1, inf)",
        "max_size": "[1, inf)",
        "extract_batch_size": "[1, inf)",
        "check_margin": "(-inf, inf)",
        "probe_gap": "(-inf, inf)",
        "draw_examples": "[0, inf)",
    }


@dataclass
class ImageSet:
    """One image folder -> one feature store ``RUN/features/<name>.lmdb``."""

    name: str = ""
    images: str = ""
    list_file: str = ""  # optional: only these images (paths relative to ``images``)
    id_from: str = "stem"


@dataclass
class FinetuneSpec:
    """One fine-tuning task of the real recipe."""

    task: Literal["vqa", "gqa", "nlvr2"] = "vqa"
    config: str = ""  # default: tasks/configs/<task>.yaml
    train: list[str] = field(default_factory=list)
    valid: str = ""
    answers: str = ""
    features: list[str] = field(default_factory=list)  # image-set names
    valid_annotations: str = ""  # raw official file of the valid split: the official metric
    test: dict[str, str] = field(default_factory=dict)  # split name -> LXMERT JSON (submission files)
    overrides: list[str] = field(default_factory=list)


@dataclass
class VqaDataSpec:
    """``lxmert-data vqa`` from the official VQA v2 files: one stage per split, writing ``out_dir/<split>.json``
    (train, minival, nominival, test). A split whose questions file is empty is not converted (its JSON exists)."""

    out_dir: str = "data/vqa"
    answers: str = ""  # LXMERT's trainval_ans2label.json (3129 answers)
    # LXMERT's minival images: its data/vqa/minival.json or data/lxmert/mscoco_minival.json (required for val2014)
    minival_images: str = ""
    train_questions: str = ""
    train_annotations: str = ""
    val_questions: str = ""  # -> minival.json + nominival.json
    val_annotations: str = ""
    test_questions: str = ""  # test2015: items without labels


@dataclass
class RealConfig:
    """The real datasets (``pipelines/configs/lxmert.yaml``)."""

    weights: str = ""  # detector weights (any of the three published layouts, or a Hub id)
    detector_config: str = "vg_r101_c4"
    extract_batch_size: int = 0  # 0: extract-features' default
    RANGES: ClassVar[dict[str, str]] = {"extract_batch_size": "[0, inf)"}
    image_sets: list[ImageSet] = field(default_factory=list)
    pretrain: bool = True
    pretrain_config: str = "tasks/configs/pretrain_lxmert.yaml"
    pretrain_train: list[str] = field(default_factory=list)
    pretrain_valid: str = ""
    pretrain_answers: str = ""
    pretrain_features: list[str] = field(default_factory=list)  # image-set names
    pretrain_overrides: list[str] = field(default_factory=list)
    load: str = ""  # start fine-tuning from this checkpoint instead of our pretraining
    vqa_data: VqaDataSpec = field(default_factory=VqaDataSpec)
    finetune: list[FinetuneSpec] = field(default_factory=list)


@dataclass
class LaunchConfig:
    """How commands are launched: processes per node and the torchrun rendezvous for several machines."""

    gpus_per_node: int = 0  # 0: all visible GPUs (1 process on CPU)
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29533

    RANGES: ClassVar[dict[str, str]] = {
        "gpus_per_node": "[0, inf)",
        "nnodes": "[1, inf)",
        "node_rank": "[0, inf)",
        "master_port": "[1, 65535]",
    }


@dataclass
class PipelineConfig:
    run_dir: str = "runs/demo"
    mode: Literal["demo", "real"] = "demo"
    demo: DemoConfig = field(default_factory=DemoConfig)
    real: RealConfig = field(default_factory=RealConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
