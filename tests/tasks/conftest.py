"""Fixtures for the tasks tests: a tiny generated feature store and item file (see tests/tasks/toy_task.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # toy_task: a helper module, not a test file

from toy_task import write_tiny_items, write_tiny_store  # noqa: E402


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    """An LMDB feature store of 8 images (img000..img007), 6 regions of 24 floats each."""
    path = tmp_path_factory.mktemp("store") / "tiny.lmdb"
    write_tiny_store(path, n_images=8)
    return path


@pytest.fixture(scope="session")
def tiny_items(tmp_path_factory) -> tuple[Path, Path]:
    """(train JSON: 32 items over img000..img007, valid JSON: 8 items), for tests/tasks/toy_task.ToyTask."""
    root = tmp_path_factory.mktemp("items")
    ids = [f"img{i:03d}" for i in range(8)]
    return write_tiny_items(root / "train.json", ids, per_image=4), write_tiny_items(
        root / "valid.json", ids, per_image=1, seed=1
    )


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test (tiny models on a shared machine: threads only contend)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
