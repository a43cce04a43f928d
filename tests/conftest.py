"""Shared test fixtures: the third-party reference data beside the project (../shared/data)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real COCO photos, the original LXMERT TSV, answer tables); skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"reference data not found at {SHARED_DATA} (clone the project beside ../shared to run this)"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def coco_tsv(shared_data: Path) -> Path:
    path = shared_data / "coco_sample" / "train2014_obj36.tsv"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="session")
def coco_images(shared_data: Path) -> Path:
    path = shared_data / "coco_sample" / "images"
    if not path.is_dir():
        pytest.skip(f"{path} is missing")
    return path
