"""LXMERT configuration: one dataclass whose fields and JSON layout match Hugging Face's ``LxmertConfig``.

``config.json`` written by :meth:`LxmertConfig.save` loads in ``transformers`` (``model_type: "lxmert"``,
``architectures``), and a Hugging Face ``config.json`` loads here; keys that only Hugging Face uses
(``_name_or_path``, ``transformers_version``, ``id2label`` ...) are ignored.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class LxmertConfig:
    """Sizes and switches of the LXMERT network (defaults: the released 9/5/5 base model).

    Field names and meanings follow ``transformers.LxmertConfig``:

    - ``vocab_size``, ``hidden_size``, ``num_attention_heads``, ``intermediate_size``, ``hidden_act``,
      ``hidden_dropout_prob``, ``attention_probs_dropout_prob``, ``max_position_embeddings``,
      ``type_vocab_size``, ``initializer_range``: BERT-style transformer sizes.
    - ``l_layers`` / ``r_layers`` / ``x_layers``: language, object-relationship (vision) and
      cross-modality layer counts.
    - ``visual_feat_dim``: region feature size (2048); ``visual_pos_dim``: box size (4, x1,y1,x2,y2 in
      [0, 1] of the image width / height).
    - ``num_qa_labels`` / ``num_object_labels`` / ``num_attr_labels``: QA answers (9500 in pretraining),
      Visual Genome objects (1600) and attributes (400).
    - ``visual_loss_normalizer``: factor on each visual loss (1 / 0.15 in the original code: 6.67).
    - ``task_*`` / ``visual_*_loss``: which pretraining heads and losses exist.
    - ``layer_norm_eps``: 1e-12 as in BERT / LXMERT (Hugging Face hard-codes it; kept here as a field
      for clarity, and written to ``config.json`` where Hugging Face ignores it).
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_attention_heads: int = 12
    num_qa_labels: int = 9500
    num_object_labels: int = 1600
    num_attr_labels: int = 400
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    l_layers: int = 9
    x_layers: int = 5
    r_layers: int = 5
    visual_feat_dim: int = 2048
    visual_pos_dim: int = 4
    visual_loss_normalizer: float = 6.67
    task_matched: bool = True
    task_mask_lm: bool = True
    task_obj_predict: bool = True
    task_qa: bool = True
    visual_obj_loss: bool = True
    visual_attr_loss: bool = True
    visual_feat_loss: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    architectures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"LxmertConfig: hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}; choose sizes that divide"
            )
        if self.hidden_act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
            raise ValueError(
                f"LxmertConfig: hidden_act {self.hidden_act!r} is not supported; use 'gelu' (LXMERT's), "
                "'gelu_new', 'gelu_pytorch_tanh' or 'relu'"
            )

    @property
    def head_dim(self) -> int:
        """Size of one attention head (``hidden_size // num_attention_heads``)."""
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict[str, Any]:
        """The config as Hugging Face writes it: our fields plus ``model_type`` and ``num_hidden_layers``."""
        out = dataclasses.asdict(self)
        out["model_type"] = "lxmert"
        out["num_hidden_layers"] = {
            "vision": self.r_layers,
            "cross_encoder": self.x_layers,
            "language": self.l_layers,
        }
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> LxmertConfig:
        """Build from a (Hugging Face or our) ``config.json`` dict; unknown keys are ignored.

        Raises ``ValueError`` naming ``source`` when ``model_type`` is present and not ``"lxmert"``.
        """
        model_type = data.get("model_type", "lxmert")
        if model_type != "lxmert":
            raise ValueError(
                f"{source}: model_type is {model_type!r}, not 'lxmert'; this is not an LXMERT config"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        if kwargs.get("pad_token_id") is None:
            kwargs.pop("pad_token_id", None)
        if kwargs.get("architectures") is None:
            kwargs.pop("architectures", None)
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        """Write ``config.json`` (Hugging Face layout) to ``path`` (a file path)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LxmertConfig:
        """Read a ``config.json`` written by us or by Hugging Face."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}: not valid JSON ({err}); re-download or re-save the checkpoint"
            ) from err
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object with LXMERT config fields")
        return cls.from_dict(data, source=str(path))
