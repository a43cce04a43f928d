"""The training config: one dataclass tree for every task (pretrain, vqa, gqa, nlvr2), read from YAML.

``lxmert-train TASK --config FILE.yaml [KEY=VALUE ...]`` fills :class:`TrainConfig` through
:func:`common.config.load_config`; every default lives here and nowhere else. ``RUN_DIR/config.yaml`` is
the resolved config of a run. Each section's ``RANGES`` gives the interval of its numeric keys (checked by the
loader, which also refuses NaN: see :mod:`common.config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from common.config import field_default
from model.config import LxmertConfig

TaskName = Literal["pretrain", "vqa", "gqa", "nlvr2"]
AmpName = Literal["auto", "none", "bf16", "fp16"]


@dataclass
class DataConfig:
    """Inputs. Paths are as given (relative to the working directory)."""

    train: list[str] = field(default_factory=list)  # LXMERT JSON files (pretraining or task items)
    valid: str = ""  # one JSON file, or empty for no validation
    features: list[str] = field(default_factory=list)  # feature stores; an image id is looked up in each
    answers: str = ""  # answer table: all_ans.json (pretraining) or trainval_label2ans.json (VQA / GQA)
    qa_sets: list[str] = field(default_factory=list)  # pretraining: keep only answers of these datasets
    batch_size: int = 32  # the GLOBAL batch (over all processes and accumulation steps)
    eval_batch_size: int = 256
    max_seq_length: int = 20
    workers: int = 2
    allow_missing_images: bool = False  # drop (and count) items whose image is in no store instead of failing
    zero_visual: bool = False  # every region feature and box zeroed: the question-only baseline
    standardize_features: bool = False  # subtract the train store's per-dimension mean, divide by its std
    # standardise and also decorrelate (ZCA whitening over the train regions; features of <= 512 dims): the
    # demo's random-detector features, whose dimensions are strongly correlated
    whiten_features: bool = False
    # Pretraining / demo: a subset for quick runs (0 = all)
    limit: int = 0

    RANGES: ClassVar[dict[str, str]] = {
        "batch_size": "[1, inf)",
        "eval_batch_size": "[1, inf)",
        "max_seq_length": "[3, inf)",  # [CLS], one word piece, [SEP]
        "workers": "[0, inf)",
        "limit": "[0, inf)",
    }


@dataclass
class ModelConfig:
    """The network when training from scratch (``--load`` takes its config from the checkpoint instead);
    the defaults are :class:`model.LxmertConfig`'s (the released 9/5/5 base model)."""

    hidden_size: int = field_default(LxmertConfig, "hidden_size")
    num_attention_heads: int = field_default(LxmertConfig, "num_attention_heads")
    intermediate_size: int = field_default(LxmertConfig, "intermediate_size")
    l_layers: int = field_default(LxmertConfig, "l_layers")
    r_layers: int = field_default(LxmertConfig, "r_layers")
    x_layers: int = field_default(LxmertConfig, "x_layers")
    visual_feat_dim: int = field_default(LxmertConfig, "visual_feat_dim")
    visual_pos_dim: int = field_default(LxmertConfig, "visual_pos_dim")
    hidden_dropout_prob: float = field_default(LxmertConfig, "hidden_dropout_prob")
    attention_probs_dropout_prob: float = field_default(LxmertConfig, "attention_probs_dropout_prob")

    RANGES: ClassVar[dict[str, str]] = {
        "hidden_size": "[1, inf)",
        "num_attention_heads": "[1, inf)",
        "intermediate_size": "[1, inf)",
        "l_layers": "[0, inf)",
        "r_layers": "[0, inf)",
        "x_layers": "[0, inf)",
        "visual_feat_dim": "[1, inf)",
        "visual_pos_dim": "[1, inf)",
        "hidden_dropout_prob": "[0, 1)",
        "attention_probs_dropout_prob": "[0, 1)",
    }


@dataclass
class OptimConfig:
    name: Literal["bert_adam", "adamw"] = "bert_adam"
    lr: float = 1e-4
    warmup: float = 0.05  # share of all optimizer steps
    weight_decay: float = 0.01
    exempt_bias_and_norm: bool = False  # the original decays every parameter
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-6
    clip_grad_norm: float = 1.0  # <= 0: no clipping
    # torch's fused kernel (CPU / CUDA) for bert_adam and adamw; false: bert_adam as multi-tensor foreach ops
    fused: bool = True

    RANGES: ClassVar[dict[str, str]] = {
        "lr": "[0, inf)",
        "warmup": "[0, 1]",
        "weight_decay": "[0, inf)",
        "beta1": "[0, 1)",
        "beta2": "[0, 1)",
        "eps": "(0, inf)",
        "clip_grad_norm": "(-inf, inf)",  # <= 0: no clipping
    }


@dataclass
class TrainLoopConfig:
    epochs: int = 20
    seed: int = 9595
    device: str = ""  # "" = CUDA when available, else CPU
    amp: AmpName = "auto"  # auto: bf16 on CUDA / CPUs with native bf16, else none (the recipes: none)
    tf32: bool = False  # CUDA: TensorFloat-32 for float32 matmuls / convolutions; false = IEEE float32
    grad_accumulation: int = 0  # 0 = as needed so that the global batch fits the per-process micro batch
    micro_batch_size: int = 0  # per process per forward; 0 = global batch / world size
    save_every: int = 0  # optimizer steps between checkpoints (0 = only at epoch ends)
    keep: int = 2  # step checkpoints kept (latest included)
    log_every: int = 10
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    eval_every_epoch: bool = True
    # DDP: parameters without a gradient in some steps (heads of absent labels, pruned last layers) are
    # allowed; false is a little faster when every parameter gets a gradient in every step
    find_unused_parameters: bool = True

    RANGES: ClassVar[dict[str, str]] = {
        "epochs": "[1, inf)",
        "seed": "[0, inf)",
        "grad_accumulation": "[0, inf)",
        "micro_batch_size": "[0, inf)",
        "save_every": "[0, inf)",
        "keep": "[1, inf)",
        "log_every": "[1, inf)",
        "max_bad_steps": "[1, inf)",
    }


@dataclass
class PretrainConfig:
    """The four pretraining objectives, each switchable (the original's semantics)."""

    mlm: bool = True
    matched: bool = True
    qa: bool = True
    visual_losses: list[str] = field(default_factory=lambda: ["obj", "attr", "feat"])
    word_mask_rate: float = 0.15
    obj_mask_rate: float = 0.15
    # always: words and regions are masked whatever losses are on (the original: an ablation changes the
    # losses, not the inputs); with_loss: words only with mlm, regions only with a visual loss
    mask_inputs: Literal["always", "with_loss"] = "always"
    visual_losses_masked_only: bool = False  # the original weights obj/attr CE over ALL regions
    qa_start_epoch: int = 0  # the paper: 10 (no QA in the first 10 epochs); the released code: 0
    qa_weight: float = 1.0  # the paper: 2.0 in the QA stage

    RANGES: ClassVar[dict[str, str]] = {
        "word_mask_rate": "(0, 1]",
        "obj_mask_rate": "(0, 1]",
        "qa_start_epoch": "[0, inf)",
        "qa_weight": "[0, inf)",
    }


@dataclass
class FinetuneConfig:
    """VQA / GQA / NLVR2 fine-tuning."""

    loss: Literal["bce", "ce"] = "bce"  # VQA / GQA: BCE on soft scores x num_answers; GQA may use CE
    # raw official file of the valid split (VQA annotations, GQA questions, NLVR2 jsonl): official metric too
    annotations: str = ""
    # the answer table of the --load checkpoint's QA head (all_ans.json for the 9500-answer pretraining head);
    # empty = the label2ans.json beside the checkpoint
    pretrain_answers: str = ""


@dataclass
class TrainConfig:
    task: TaskName = "pretrain"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
