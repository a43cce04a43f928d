"""The LXMERT network: config, model classes (Hugging Face-compatible names and outputs), checkpoints, tokeniser.

>>> from model import LxmertConfig, LxmertForPreTraining
>>> model = LxmertForPreTraining(LxmertConfig(l_layers=1, r_layers=1, x_layers=1))
"""

from common.cpu import cpu_autocast_is_fast, tune_cpu_allocator

from .answers import AnswerHeadTransfer, qa_model_from_pretraining, transfer_answer_head
from .checkpoint import LoadReport, read_checkpoint, to_hf_state_dict, to_original_state_dict
from .config import LxmertConfig
from .modeling import (
    LxmertForNLVR2,
    LxmertForNLVR2Output,
    LxmertForPreTraining,
    LxmertForPreTrainingOutput,
    LxmertForQuestionAnswering,
    LxmertForQuestionAnsweringOutput,
    LxmertModel,
    LxmertModelOutput,
    LxmertPreTrainedModel,
)
from .tokenizer import LxmertTokenizer

__all__ = [
    "AnswerHeadTransfer",
    "LoadReport",
    "LxmertConfig",
    "LxmertForNLVR2",
    "LxmertForNLVR2Output",
    "LxmertForPreTraining",
    "LxmertForPreTrainingOutput",
    "LxmertForQuestionAnswering",
    "LxmertForQuestionAnsweringOutput",
    "LxmertModel",
    "LxmertModelOutput",
    "LxmertPreTrainedModel",
    "LxmertTokenizer",
    "cpu_autocast_is_fast",
    "qa_model_from_pretraining",
    "read_checkpoint",
    "to_hf_state_dict",
    "to_original_state_dict",
    "transfer_answer_head",
    "tune_cpu_allocator",
]
