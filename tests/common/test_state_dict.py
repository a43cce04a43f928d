"""common.state_dict (safe readers, one LoadReport) and common.hub (Hub id -> local snapshot)."""

from __future__ import annotations

import hashlib
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from common.hub import hub_snapshot, is_hub_id
from common.state_dict import (
    LoadReport,
    StateDictError,
    UnsafePickleError,
    file_sha256,
    read_pickle,
    read_weights,
    to_tensor,
    unwrap_state_dict,
)


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Evals:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


def test_pickle_that_runs_code_is_refused_before_it_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": np.zeros(2), "x": _RunsShell(marker)}}))
    with pytest.raises(UnsafePickleError, match=r"evil\.pkl.*(posix|os)\.system"):
        read_weights(path)
    assert not marker.exists()
    with open(path, "rb") as f:  # the reference: an ordinary unpickler runs the command
        pickle.load(f)
    assert marker.exists()

    evil = tmp_path / "eval.pkl"
    evil.write_bytes(pickle.dumps({"model": {"x": _Evals()}}))
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        read_pickle(evil)


def test_plain_pickles_read_with_protocol_2_and_ordered_dicts(tmp_path: Path) -> None:
    state = OrderedDict(a=np.arange(6, dtype=np.float32).reshape(2, 3), b=np.int64(3))
    path = tmp_path / "old.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "py2"}, f, protocol=2)
    data = read_weights(path)
    np.testing.assert_array_equal(data["model"]["a"], state["a"])
    assert data["__author__"] == "py2"
    obj = tmp_path / "obj.pkl"
    obj.write_bytes(pickle.dumps({"model": {"a": np.array([1, "x"], dtype=object)}}))
    with pytest.raises(UnsafePickleError, match="object-dtype"):
        read_pickle(obj)


def test_torch_files_are_read_with_weights_only(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    good, evil = tmp_path / "good.bin", tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, good)
    torch.save({"model": {"w": _RunsShell(marker)}}, evil)
    assert torch.equal(unwrap_state_dict(read_weights(good), good)["w"], torch.ones(2))
    with pytest.raises(UnsafePickleError, match=r"evil\.pt: torch\.load\(weights_only=True\) refused"):
        read_weights(evil)
    assert not marker.exists()


def test_unreadable_files_name_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        read_weights(tmp_path / "nope.pkl")
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(pickle.dumps({"model": {"a": np.zeros(100)}})[:60])
    with pytest.raises(StateDictError, match=r"cut\.pkl is not a readable pickle.*download it again"):
        read_weights(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(StateDictError, match=r"junk\.safetensors: cannot read as safetensors.*re-download"):
        read_weights(junk)
    zipless = tmp_path / "junk.pth"
    zipless.write_bytes(b"not a zip")
    with pytest.raises(StateDictError, match=r"junk\.pth: cannot read as a PyTorch checkpoint.*re-download"):
        read_weights(zipless)
    other = tmp_path / "w.npz"
    other.write_bytes(b"x")
    with pytest.raises(StateDictError, match="unknown weight format '.npz'"):
        read_weights(other)
    assert issubclass(StateDictError, ValueError)


def test_safetensors_and_unwrapping(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(3.0)}, str(path))
    assert torch.equal(read_weights(path)["a"], torch.arange(3.0))
    assert list(unwrap_state_dict({"model": {"x": np.zeros(1)}, "epoch": 3}, "f")) == ["x"]
    with pytest.raises(StateDictError, match=r"f\.pth: holds a list.*expected the detector's weights"):
        unwrap_state_dict([1, 2], "f.pth", "the detector's weights")
    with pytest.raises(StateDictError, match="'s' is not numeric"):
        to_tensor(np.array(["a"]), "s", "f.pkl")


def test_file_sha256(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    data = os.urandom(3 << 20)
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_load_report_summary_and_completeness() -> None:
    report = LoadReport(source="w.pkl", layout="detectron2-pkl", sha256="ab" * 32, loaded=5)
    assert report.complete and report.format == "detectron2-pkl"
    assert report.summary() == "w.pkl (detectron2-pkl, sha256 abababababab): loaded 5 tensors"
    report.missing = ["backbone.a", "roi_heads.b", "backbone.c"]
    report.mismatched = [("x", (2,), (3,))]
    report.unexpected = ["y"]
    assert not report.complete
    assert report.missing_by_module() == {
        "backbone": ["backbone.a", "backbone.c"],
        "roi_heads": ["roi_heads.b"],
    }
    text = report.summary()
    assert "3 missing: backbone.a" in text and "1 shape-mismatched: ['x (2,) vs model (3,)']" in text
    assert "1 unused: y" in text


def _fake_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return snapshot


def test_hub_ids_resolve_from_the_cache_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    snapshot = _fake_hub_cache(cache, "unc-nlp/frcnn-vg-finetuned", {"pytorch_model.bin": b"x"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("unc-nlp/frcnn-vg-finetuned") and not is_hub_id("a/b/c") and not is_hub_id("w.pkl")
    folder = hub_snapshot("unc-nlp/frcnn-vg-finetuned", ["pytorch_model.bin"])
    assert folder.resolve() == snapshot.resolve() and (folder / "pytorch_model.bin").read_bytes() == b"x"
    with pytest.raises(
        FileNotFoundError,
        match=r"unc-nlp/missing: .*Hugging Face cache \(HF_HUB_OFFLINE is set\).*local weights file.*hf download unc-nlp/missing",
    ):
        hub_snapshot("unc-nlp/missing", what="weights file")
    (tmp_path / "unc-nlp" / "frcnn-vg-finetuned").mkdir(parents=True)
    assert not is_hub_id("unc-nlp/frcnn-vg-finetuned")  # a local folder of that name wins
