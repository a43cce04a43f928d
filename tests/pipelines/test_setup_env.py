"""The environment set-up: one lock file, idempotent script, loud failures, console scripts installed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "pipelines" / "setup_env.sh"


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)==([^\s;]+)", line)
        assert m, f"requirements.lock: '{line}' is not pinned as name==version"
        pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_lock_pins_registry_torch_and_detectron2_needs() -> None:
    pins = _lock()
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    major, minor = (int(x) for x in pins["setuptools"].split(".")[:2])
    assert major < 81, "Detectron2 needs pkg_resources: setuptools<81"
    iopath = tuple(int(x) for x in pins["iopath"].split(".")[:3])
    assert iopath < (0, 1, 10)
    for name in (
        "fvcore",
        "pycocotools",
        "omegaconf",
        "hydra-core",
        "yacs",
        "lmdb",
        "safetensors",
        "transformers",
    ):
        assert name in pins, f"{name} missing from requirements.lock"


def test_installed_versions_match_the_lock() -> None:
    pins = _lock()
    for name in ("torch", "lmdb", "safetensors", "transformers", "numpy"):
        installed = metadata.version(name).split("+")[0]
        assert installed == pins[name], f"{name}: installed {installed}, lock {pins[name]}"


def test_environment_yml_uses_the_same_lock() -> None:
    text = (ROOT / "environment.yml").read_text()
    assert "python=3.11" in text
    assert "-r requirements.lock" in text


def test_console_scripts_are_installed() -> None:
    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")}
    assert scripts.get("extract-features") == "extract.cli:main"
    assert scripts.get("lxmert-features") == "extract.store_cli:main"
    assert scripts.get("lxmert-train") == "tasks.cli:main"
    for name in ("extract-features", "lxmert-features", "lxmert-train"):
        assert (Path(sys.executable).parent / name).exists()


def test_pure_python_detectron2_wheel_is_cached_and_retagged() -> None:
    import detectron2

    if not (Path(detectron2.__file__).parent / "_C.py").exists():
        pytest.skip("a compiled Detectron2 is in use; the rebuilt wheel is not needed")
    wheels = list((Path(sys.prefix) / ".detectron2-wheel").glob("sal_detectron2-0.7.2-py3-none-any.whl"))
    assert wheels, f"no cached pure-Python Detectron2 wheel under {sys.prefix}/.detectron2-wheel"
    dist = metadata.distribution("sal-detectron2")
    wheel_meta = dist.read_text("WHEEL") or ""
    assert "Tag: py3-none-any" in wheel_meta and "Root-Is-Purelib: true" in wheel_meta
    assert not list(Path(detectron2.__file__).parent.glob("_C.cpython-*.so"))


@pytest.mark.slow
def test_second_run_on_ready_venv_is_a_no_op() -> None:
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip("tests are not running from the clone's .venv")
    out = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "nothing to do" in out.stdout


@pytest.mark.slow
def test_failure_names_the_step(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=str(tmp_path / "no-such-python"), LXMERT_VENV=str(tmp_path / "venv"))
    out = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode != 0
    assert "FAILED at step: python version check" in out.stderr
    assert not (tmp_path / "venv").exists()
