"""Fixtures shared by the extraction tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from extract.store import FeatureStore


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread, as the CLI subprocesses get (OMP_NUM_THREADS=1): tiny convs on a shared 2-core box
    run far slower with two threads fighting over it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def read_records() -> Callable[[Path], dict[str, dict]]:
    """``read_records(store_path)`` -> {img_id: record} for a (small) store, closing the reader afterwards."""

    def read(path: Path) -> dict[str, dict]:
        store = FeatureStore(path)
        try:
            return {k: store[k] for k in store}
        finally:
            store.close()

    return read
