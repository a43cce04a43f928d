"""Import of LXMERT's original obj36 TSV into the feature store: bit-exact arrays, malformed lines, resume."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from extract.store import FeatureStore, open_metadata, verify_store
from extract.tsv import TSV_FIELDS, TsvFormatError, import_tsv, iter_tsv, parse_tsv_line


def reference_parse(path) -> dict[str, dict]:
    """Independent parse of the TSV (plain split + base64 + numpy), as the LXMERT format describes it."""
    out = {}
    with open(path) as fh:
        for line in fh:
            f = dict(zip(TSV_FIELDS, line.rstrip("\n").split("\t")))
            n = int(f["num_boxes"])

            def dec(name, dtype, shape, f=f):
                return np.frombuffer(base64.b64decode(f[name]), dtype=dtype).reshape(shape)

            out[f["img_id"]] = {
                "img_h": int(f["img_h"]),
                "img_w": int(f["img_w"]),
                "num_boxes": n,
                "obj_ids": dec("objects_id", np.int64, (n,)),
                "obj_conf": dec("objects_conf", np.float32, (n,)),
                "attr_ids": dec("attrs_id", np.int64, (n,)),
                "attr_conf": dec("attrs_conf", np.float32, (n,)),
                "boxes": dec("boxes", np.float32, (n, 4)),
                "features": dec("features", np.float32, (n, 2048)),
            }
    return out


def test_import_coco_tsv_bit_exact(coco_tsv, tmp_path):
    ref = reference_parse(coco_tsv)
    assert len(ref) == 10
    report = import_tsv(coco_tsv, tmp_path / "coco.lmdb")
    assert (report.lines, report.imported, report.skipped_existing, report.bad) == (10, 10, 0, [])
    assert report.total_in_store == 10
    with FeatureStore(tmp_path / "coco.lmdb") as store:
        assert sorted(store) == sorted(ref)
        for img_id, want in ref.items():
            got = store[img_id]
            assert (got["img_h"], got["img_w"], got["num_boxes"]) == (want["img_h"], want["img_w"], 36)
            for name in ("features", "boxes", "obj_ids", "obj_conf", "attr_ids", "attr_conf"):
                assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
                assert got[name].tobytes() == want[name].tobytes(), (img_id, name)  # bit for bit
    meta = open_metadata(tmp_path / "coco.lmdb")
    assert meta["extractor"] == {"source": "tsv", "file": "train2014_obj36.tsv"}
    assert meta["count"] == 10 and meta["feature_dim"] == 2048
    assert verify_store(tmp_path / "coco.lmdb").ok

    again = import_tsv(coco_tsv, tmp_path / "coco.lmdb")  # resume: nothing new
    assert (again.imported, again.skipped_existing, again.total_in_store) == (0, 10, 10)


def test_import_float16(coco_tsv, tmp_path):
    import_tsv(coco_tsv, tmp_path / "h.lmdb", features_dtype="float16")
    ref = reference_parse(coco_tsv)
    with FeatureStore(tmp_path / "h.lmdb") as store:
        img_id = next(iter(ref))
        np.testing.assert_array_equal(store[img_id]["features"], ref[img_id]["features"].astype(np.float16))
        assert store[img_id]["boxes"].tobytes() == ref[img_id]["boxes"].tobytes()


@pytest.fixture()
def broken_tsv(coco_tsv, tmp_path):
    """The COCO TSV with line 3 truncated, line 5 garbled base64, line 7 wrong num_boxes, line 8 blank."""
    lines = coco_tsv.read_text().splitlines(keepends=True)
    lines[2] = lines[2][: len(lines[2]) // 2] + "\n"
    fields = lines[4].split("\t")
    fields[9] = "!!not*base64" + fields[9][12:]
    lines[4] = "\t".join(fields)
    fields = lines[6].split("\t")
    fields[7] = "35"
    lines[6] = "\t".join(fields)
    lines.insert(7, "\n")
    path = tmp_path / "broken.tsv"
    path.write_text("".join(lines))
    return path


def test_malformed_lines_reported_and_skipped(broken_tsv, tmp_path):
    errors = []
    report = import_tsv(broken_tsv, tmp_path / "s", on_error=lambda n, why: errors.append((n, why)))
    assert [n for n, _ in report.bad] == [3, 5, 7] and errors == report.bad
    assert "field 'features' is not valid base64" in report.bad[0][1]
    assert "not valid base64" in report.bad[1][1]
    assert "num_boxes=35" in report.bad[2][1]
    assert (report.imported, report.lines, report.total_in_store) == (7, 11, 7)
    assert verify_store(tmp_path / "s").ok


def test_strict_stops_with_line_number(broken_tsv, tmp_path):
    with pytest.raises(TsvFormatError) as err:
        import_tsv(broken_tsv, tmp_path / "s", strict=True)
    assert err.value.line_no == 3 and f"{broken_tsv}:3:" in str(err.value)
    assert len(FeatureStore(tmp_path / "s")) == 2  # lines before the bad one were kept
    with pytest.raises(TsvFormatError, match=":3:"):
        list(iter_tsv(broken_tsv, strict=True))


def test_iter_tsv_streams_with_line_numbers(broken_tsv):
    seen_errors = []
    items = list(iter_tsv(broken_tsv, on_error=lambda n, why: seen_errors.append(n)))
    assert [n for n, _, _ in items] == [1, 2, 4, 6, 9, 10, 11]
    assert seen_errors == [3, 5, 7]


def test_parse_line_edge_cases():
    def b64(arr):
        return base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode()

    n, dim = 2, 5
    feats = np.arange(n * dim, dtype=np.float32).reshape(n, dim)
    fields = ["img", "10", "20", b64(np.array([1, 2])), b64(np.ones(2, np.float32)), b64(np.array([3, 4])),
              b64(np.ones(2, np.float32)), "2", b64(np.zeros((2, 4), np.float32)), b64(feats)]  # fmt: skip
    img_id, rec = parse_tsv_line("\t".join(fields) + "\r\n", feature_dim=None)
    assert img_id == "img" and rec["features"].shape == (2, 5) and (rec["img_h"], rec["img_w"]) == (10, 20)
    np.testing.assert_array_equal(rec["features"], feats)
    empty = ["e", "10", "20", "", "", "", "", "0", "", ""]
    assert parse_tsv_line("\t".join(empty))[1]["features"].shape == (0, 2048)
    with pytest.raises(ValueError, match="not an integer"):
        parse_tsv_line("\t".join(["x", "ten"] + fields[2:]))
    with pytest.raises(ValueError, match="not a multiple"):
        parse_tsv_line("\t".join(fields[:9] + [b64(np.zeros(7, np.float32))]), feature_dim=None)
    # a line cut on a base64 quantum still decodes, but to too few bytes for 2048-d features
    with pytest.raises(ValueError, match="field 'features' decodes to 40 bytes, expected 16384"):
        parse_tsv_line("\t".join(fields))
    with pytest.raises(ValueError, match="field 'boxes' decodes to 16 bytes, expected 32"):
        parse_tsv_line("\t".join(fields[:8] + [b64(np.zeros(4, np.float32)), fields[9]]), feature_dim=None)


def test_truncated_on_base64_boundary(coco_tsv):
    line = coco_tsv.read_text().splitlines()[0]
    cut = line[: len(line) - 4 * 1000]  # still valid base64, 3000 bytes short
    with pytest.raises(ValueError, match="field 'features' decodes to 291912 bytes, expected 294912"):
        parse_tsv_line(cut)
