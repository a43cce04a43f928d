"""transformers' own LXMERT model tests (``../shared/transformers_lxmert_tests``, transformers 5.23) run against
our classes: the suite runs twice in subprocesses, once with stock ``transformers`` and once with our
``LxmertModel`` / ``LxmertForPreTraining`` / ``LxmertForQuestionAnswering`` substituted
(``transformers_substitute.py``, checked to have taken effect), from a copy of the folder outside the project.

Every test that passes or skips with stock must pass or skip with ours, except :data:`KNOWN_DIFFERENCES`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import transformers

ROOT = Path(__file__).resolve().parents[2]
SUITE = Path(
    os.environ.get("LXMERT_TRANSFORMERS_TESTS", ROOT.parent / "shared" / "transformers_lxmert_tests")
)
OUR_CLASSES = {
    "LxmertModel": "model.modeling.LxmertModel",
    "LxmertForPreTraining": "model.modeling.LxmertForPreTraining",
    "LxmertForQuestionAnswering": "model.modeling.LxmertForQuestionAnswering",
}
#: Tests that pass or skip with stock and may fail with ours: none. (The three gradient-checkpointing tests, which
#: stock passes without running a class (none supports checkpointing), run and pass with ours: under checkpointing
#: every parameter gets a gradient.)
KNOWN_DIFFERENCES: set[str] = set()


def _run(mode: str, copy: Path, out: Path) -> tuple[dict[str, str], dict]:
    """Run the suite in ``mode`` (``ours`` / ``stock``); returns {test name: outcome} and the substitution record."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "LXMERT_SUBSTITUTE": mode,
        "LXMERT_SUBSTITUTE_REPORT": str(out / f"{mode}.json"),
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(Path(__file__).parent)]),
    }
    xml = out / f"{mode}.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "transformers_substitute", "-p", "no:cacheprovider"]
    cmd += ["tests/models/lxmert", f"--junitxml={xml}"]
    proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=1800)
    assert xml.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    outcomes: dict[str, str] = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = case.get("name", "").split("[")[0]
        tags = {child.tag for child in case}
        outcome = "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed"
        if outcomes.get(name) != "failed":  # subtests: one failure fails the test
            outcomes[name] = outcome
    return outcomes, json.loads((out / f"{mode}.json").read_text())


@pytest.mark.slow
def test_transformers_lxmert_suite_passes_with_our_classes(tmp_path):
    if not (SUITE / "tests" / "models" / "lxmert" / "test_modeling_lxmert.py").is_file():
        pytest.skip(f"{SUITE}: transformers' LXMERT tests not found (set LXMERT_TRANSFORMERS_TESTS)")
    pytest.importorskip("parameterized")
    copy = tmp_path / "suite"
    shutil.copytree(SUITE, copy)
    (copy / "src").mkdir(exist_ok=True)
    (copy / "src" / "transformers").symlink_to(Path(transformers.__file__).parent)

    ours, record = _run("ours", copy, tmp_path)
    assert record == {"mode": "ours", "seen": OUR_CLASSES}  # the test module really used our classes
    stock, stock_record = _run("stock", copy, tmp_path)
    assert stock_record["seen"]["LxmertModel"] == "transformers.models.lxmert.modeling_lxmert.LxmertModel"

    ok_with_stock = {name for name, outcome in stock.items() if outcome in ("passed", "skipped")}
    regressions = sorted(n for n in ok_with_stock if ours.get(n) == "failed" and n not in KNOWN_DIFFERENCES)
    assert regressions == [], regressions
    known_passing_with_stock = sum(stock.get(n) == "passed" for n in KNOWN_DIFFERENCES)
    assert sum(o == "passed" for o in ours.values()) >= (
        sum(o == "passed" for o in stock.values()) - known_passing_with_stock
    )
    # checkpointing: stock passes these without running a class (none supports it); ours runs and passes them
    for name in (
        "test_training_gradient_checkpointing",
        "test_training_gradient_checkpointing_use_reentrant_false",
    ):
        assert ours.get(name) == "passed", (name, ours.get(name))
