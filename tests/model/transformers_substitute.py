"""A pytest plugin (``-p transformers_substitute``, this folder on ``PYTHONPATH``) that puts our LXMERT classes
in place of ``transformers.LxmertModel`` / ``LxmertForPreTraining`` / ``LxmertForQuestionAnswering`` before
each test module is imported, and records, after collection, which classes the LXMERT test module really sees.

``LXMERT_SUBSTITUTE=stock`` leaves ``transformers`` alone (the reference run). The record goes to the JSON file
named by ``LXMERT_SUBSTITUTE_REPORT``: ``{"mode": ..., "seen": {name: "module.qualname"}}``.
"""

from __future__ import annotations

import json
import os
import sys

NAMES = ("LxmertModel", "LxmertForPreTraining", "LxmertForQuestionAnswering")
MODE = os.environ.get("LXMERT_SUBSTITUTE", "ours")


def _substitute() -> None:
    """Set our classes wherever ``transformers`` resolves these names: the top-level lazy module (what
    ``from transformers import X`` reads), ``transformers.models.lxmert`` and its ``modeling_lxmert`` (where the
    lazy module and the auto mappings such as ``MODEL_FOR_PRETRAINING_MAPPING`` look them up again). Runs at start
    and again before each test module's import, in case lazy loading has put the originals back."""
    if MODE != "ours":
        return
    import transformers
    import transformers.models.lxmert as package
    import transformers.models.lxmert.modeling_lxmert as modeling

    import model

    targets = (transformers, sys.modules["transformers"], package, modeling)
    for module in {id(m): m for m in targets}.values():
        for name in NAMES:
            setattr(module, name, getattr(model, name))


def pytest_configure(config) -> None:  # noqa: ARG001 (pytest hook signature)
    _substitute()


def pytest_pycollect_makemodule(module_path, parent) -> None:  # noqa: ARG001 (pytest hook signature)
    _substitute()  # returns None: pytest builds the module as usual, after this


def pytest_collection_finish(session) -> None:  # noqa: ARG001 (pytest hook signature)
    seen = {}
    for module_name, module in list(sys.modules.items()):
        if module_name.endswith("test_modeling_lxmert"):
            for name in NAMES:
                cls = getattr(module, name, None)
                if cls is not None:
                    seen[name] = f"{cls.__module__}.{cls.__qualname__}"
    report = os.environ.get("LXMERT_SUBSTITUTE_REPORT")
    if report:
        with open(report, "w") as f:
            json.dump({"mode": MODE, "seen": seen}, f)
