"""``lxmert-features``: manage LMDB feature stores (import LXMERT TSVs, export HDF5, inspect, verify, merge).

    lxmert-features import-tsv FILE.tsv OUT.lmdb [--strict] [--float16] [--overwrite]
    lxmert-features export-h5 STORE OUT.h5
    lxmert-features info STORE [--json]
    lxmert-features verify STORE [--show N]
    lxmert-features merge OUT IN [IN ...] [--overwrite] [--force]

Exit status: 0 on success, 1 when ``verify`` finds bad records, 2 on any error (bad path, mismatched
settings, malformed TSV line with ``--strict``, a full disk: one line; the same command resumes once there is
room).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from common.diskspace import as_disk_full
from extract.store import (
    FeatureStore,
    StoreError,
    export_h5,
    merge_stores,
    open_metadata,
    store_size_bytes,
    verify_store,
)
from extract.tsv import import_tsv

__all__ = ["main", "build_parser"]


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def _cmd_import_tsv(args: argparse.Namespace) -> int:
    def report_bad(line_no: int, reason: str) -> None:
        print(f"warning: {args.tsv}:{line_no}: skipped malformed line: {reason}", file=sys.stderr)

    report = import_tsv(
        args.tsv,
        args.out,
        strict=args.strict,
        features_dtype="float16" if args.float16 else "float32",
        overwrite=args.overwrite,
        progress=not args.quiet,
        on_error=report_bad,
    )
    print(report.summary())
    return 0


def _cmd_export_h5(args: argparse.Namespace) -> int:
    count = export_h5(args.store, args.out, progress=not args.quiet)
    print(f"exported {count} images from {args.store} to {args.out}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    meta = open_metadata(args.store)
    with FeatureStore(args.store) as store:
        records = len(store)
    size = store_size_bytes(args.store)
    if args.json:
        print(
            json.dumps(
                {"path": args.store, "records": records, "size_bytes": size, "metadata": meta}, indent=2
            )
        )
        return 0
    print(f"store:          {args.store}")
    print(f"records:        {records} (metadata count {meta.get('count')})")
    print(f"features:       {meta.get('features_dtype')} x {meta.get('feature_dim')}")
    print(f"schema version: {meta.get('schema_version')}")
    print(f"size on disk:   {_human(size)}")
    print(f"created:        {meta.get('created')}   updated: {meta.get('updated')}")
    extractor = meta.get("extractor") or {}
    print("extractor:" + ("" if extractor else "      (not recorded)"))
    for key in sorted(extractor):
        print(f"  {key}: {extractor[key]}")
    for key in sorted(set(meta) - {"schema_version", "features_dtype", "feature_dim", "count", "extractor"}):
        if key not in ("created", "updated"):
            print(f"{key}: {json.dumps(meta[key])}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    report = verify_store(args.store, progress=not args.quiet)
    for img_id, reason in report.bad[: args.show]:
        print(f"BAD {img_id}: {reason}")
    if len(report.bad) > args.show:
        print(f"... and {len(report.bad) - args.show} more")
    status = "OK" if report.ok else "FAILED"
    print(f"{status}: {args.store}: checked {report.checked} records, {len(report.bad)} bad")
    return 0 if report.ok else 1


def _cmd_merge(args: argparse.Namespace) -> int:
    written = merge_stores(
        args.out, args.inputs, overwrite=args.overwrite, force=args.force, progress=not args.quiet
    )
    with FeatureStore(args.out) as store:
        total = len(store)
    print(f"merged {len(args.inputs)} stores into {args.out}: wrote {written} records, it now holds {total}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lxmert-features", description="Manage LMDB region-feature stores (one record per image)."
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import-tsv", help="stream an LXMERT obj36 TSV into a store (constant memory)")
    p.add_argument("tsv", help="LXMERT feature TSV (e.g. train2014_obj36.tsv)")
    p.add_argument("out", help="store directory (created, or resumed: ids already present are skipped)")
    p.add_argument(
        "--strict", action="store_true", help="stop at the first malformed line instead of skipping"
    )
    p.add_argument("--float16", action="store_true", help="store features as float16 (half the size)")
    p.add_argument("--overwrite", action="store_true", help="replace ids already present")
    p.set_defaults(func=_cmd_import_tsv)

    p = sub.add_parser("export-h5", help="write a store to HDF5 (one group per image)")
    p.add_argument("store")
    p.add_argument("out", help="output .h5 file (overwritten)")
    p.set_defaults(func=_cmd_export_h5)

    p = sub.add_parser("info", help="print count, dtype, extractor settings and size of a store")
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("verify", help="decode and check every record; exit 1 when any is bad")
    p.add_argument("store")
    p.add_argument("--show", type=int, default=50, help="list at most this many bad ids (default 50)")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("merge", help="copy the records of several stores into one")
    p.add_argument("out", help="output store (created or resumed)")
    p.add_argument("inputs", nargs="+", help="input stores")
    p.add_argument("--overwrite", action="store_true", help="later inputs replace ids already present")
    p.add_argument(
        "--force", action="store_true", help="merge stores with different extractor settings/dtypes"
    )
    p.set_defaults(func=_cmd_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lxmert-features``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (StoreError, OSError) as exc:
        full = as_disk_full(exc, getattr(args, "out", None) or ".") if isinstance(exc, OSError) else None
        if full is not None:
            skipped = " (records already in the store are skipped)" if args.command != "export-h5" else ""
            print(
                f"error: {full}; what was written before is kept: free some space and run the same command "
                f"again{skipped}",
                file=sys.stderr,
            )
            return 2
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _console(argv: Sequence[str] | None = None) -> None:  # pragma: no cover - python -m entry
    sys.exit(main(list(argv) if argv is not None else None))


if __name__ == "__main__":  # pragma: no cover
    _console()
