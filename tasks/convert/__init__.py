"""Converters from the official downloads (VQA v2, GQA, NLVR2) and the easy-VQA demo data to LXMERT's JSON
files; ``lxmert-data`` (:mod:`tasks.convert.cli`) is their command line."""

from tasks.convert.easy_vqa import convert_easy_vqa
from tasks.convert.gqa import convert_gqa
from tasks.convert.nlvr2 import convert_nlvr2
from tasks.convert.vqa import build_answer_table, convert_vqa, soft_score
from tasks.data.jsonio import DataFormatError

__all__ = [
    "DataFormatError",
    "build_answer_table",
    "convert_easy_vqa",
    "convert_gqa",
    "convert_nlvr2",
    "convert_vqa",
    "soft_score",
]
