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


class StoreDamage:
    """Damage done to a feature store's ``data.mdb`` in place, as a failing disk or a bad copy does it (the store must
    not be open in this process)."""

    PAGE = 4096  # LMDB's page size here

    @staticmethod
    def _data(store: Path) -> bytearray:
        """The file's bytes after a compacting copy: no stale page copies left by earlier transactions, so each
        record is found once, in its live page."""
        import shutil

        import lmdb

        copy = store.with_name(store.name + ".compact")
        shutil.rmtree(copy, ignore_errors=True)
        copy.mkdir()
        env = lmdb.open(str(store), readonly=True, lock=False, max_dbs=2)
        try:
            env.copy(str(copy), compact=True)
        finally:
            env.close()
        data = bytearray((copy / "data.mdb").read_bytes())
        shutil.rmtree(copy)
        return data

    @staticmethod
    def _record_offset(data: bytearray, store: Path, img_id: str) -> int:
        from extract.store import FeatureStore

        with FeatureStore(store) as reader:
            blob = reader.get_raw(img_id)
        offset = data.find(blob)
        assert offset > 0 and data.find(blob, offset + 1) < 0, "the record is not stored once, inline"
        return offset

    def break_page_of(self, store: Path, img_id: str) -> None:
        """The leaf page holding ``img_id``'s record gets a page type LMDB does not know (its flags zeroed): reading
        it fails with MDB_CORRUPTED; the ids index (other pages) still lists the id."""
        data = self._data(store)
        page = self._record_offset(data, store, img_id) // self.PAGE
        data[page * self.PAGE + 10 : page * self.PAGE + 12] = (
            b"\x00\x00"  # mp_flags, after pgno (8) and pad (2)
        )
        (store / "data.mdb").write_bytes(bytes(data))

    def flip_feature_bit(self, store: Path, img_id: str) -> None:
        """One low mantissa bit of the first feature of ``img_id`` flipped: still a finite number, so only the
        record's CRC32 tells."""
        data = self._data(store)
        offset = self._record_offset(data, store, img_id)
        header = int.from_bytes(data[offset : offset + 8], "little")
        data[offset + 8 + header] ^= 0x01  # "features" is the first array after the header
        (store / "data.mdb").write_bytes(bytes(data))

    def garble_metadata_key(self, store: Path) -> None:
        """The key of the store's metadata record overwritten in its page (its value is then nowhere to be found),
        as damage to that page does."""
        from extract.store import METADATA_KEY

        data = self._data(store)
        key = METADATA_KEY.encode() + b"{"  # the key directly followed by its JSON value: the main DB's leaf
        offset = data.find(key)
        assert offset > 0
        data[offset + 2 : offset + 8] = b"XXXXXX"
        (store / "data.mdb").write_bytes(bytes(data))


@pytest.fixture
def store_damage() -> StoreDamage:
    return StoreDamage()
