"""The LMDB feature store: extraction's output contract, read by every task.

Layout
------
One LMDB environment per store (a directory holding ``data.mdb`` and ``lock.mdb``). One record per image:
key = the image id (UTF-8), value = a safetensors blob holding the arrays of :mod:`extract.records`
(``features`` ``(n, D)``, ``boxes`` ``(n, 4)`` x1,y1,x2,y2 in ORIGINAL image pixels, ``obj_ids``,
``obj_conf``, ``attr_ids``, ``attr_conf`` ``(n,)``) and, in its header, ``img_h`` / ``img_w`` and a CRC32
(checked by :func:`verify_store`). ``n`` is usually 36 but may be smaller, even 0.

A sub-database named :data:`IDS_DB_NAME` indexes the ids (id -> empty value, written in the same transaction
as the record), so listing or testing ids never reads the records. A reserved key (:data:`METADATA_KEY`, never
listed as an image) holds the store metadata as JSON: schema version, features dtype, feature dimension,
record count, created/updated timestamps and the extractor's settings, so that features produced by different
extractors are never mixed silently.

Readers (:class:`FeatureStore`) open the environment lazily in each process, read-only, without the lock
file and without readahead, so they are safe in DataLoader workers (fork or spawn) and their memory does not
grow with the number of records read. Writers (:class:`FeatureWriter`) batch records into transactions,
grow the map when it is full, resume an existing store, and may run in several processes at once on one
store (LMDB's own writer lock serialises the transactions).

Modules (one job each; everything public is re-exported here, so ``from extract.store import ...`` is the
import to use):

- :mod:`extract.records`: the record schema (:class:`Record`, :data:`SCHEMA`) and its codec;
- :mod:`extract.store.env`: one shared LMDB environment per store and process, the ids index;
- :mod:`extract.store.meta`: the metadata and :func:`check_compatible`, the one settings check;
- :mod:`extract.store.reader`: :class:`FeatureStore`, :func:`open_metadata`;
- :mod:`extract.store.writer`: :class:`FeatureWriter`;
- :mod:`extract.store.ops`: :func:`verify_store`, :func:`merge_stores`, :func:`export_h5`.
"""

from extract.records import (
    FEATURES_DTYPES,
    FIELDS,
    SCHEMA,
    SCHEMA_VERSION,
    FeaturesDtype,
    Record,
    StoreDamaged,
    StoreError,
    StoreSettingsMismatch,
    decode_record,
    encode_record,
    normalize_boxes,
    verify_advice,
)
from extract.store.env import IDS_DB_NAME, METADATA_KEY
from extract.store.meta import check_compatible, settings_diff
from extract.store.ops import VerifyReport, export_h5, merge_stores, store_size_bytes, verify_store
from extract.store.reader import FeatureStore, open_metadata
from extract.store.writer import FeatureWriter

__all__ = [
    "SCHEMA_VERSION",
    "SCHEMA",
    "FIELDS",
    "FEATURES_DTYPES",
    "FeaturesDtype",
    "Record",
    "METADATA_KEY",
    "IDS_DB_NAME",
    "StoreDamaged",
    "StoreError",
    "StoreSettingsMismatch",
    "verify_advice",
    "check_compatible",
    "settings_diff",
    "encode_record",
    "decode_record",
    "normalize_boxes",
    "FeatureStore",
    "FeatureWriter",
    "VerifyReport",
    "open_metadata",
    "verify_store",
    "merge_stores",
    "export_h5",
    "store_size_bytes",
]
