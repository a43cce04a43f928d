"""The run's feature store: refused early when it cannot take this run's records, then opened on every rank.

:func:`precheck_store` runs before the (slow) detector is built: an existing ``OUT`` that is not a store, or holds
features made with other settings, is refused. :func:`open_writer` then creates or resumes the store, rank 0
first so the ranks agree on one validated store; a full disk is raised as
:class:`common.diskspace.DiskFullError`, anything else as :class:`extract.image_list.SetupError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from common.diskspace import DiskFullError
from common.distributed import DistContext
from extract.config import ExtractConfig
from extract.image_list import SetupError
from extract.store import FeatureWriter, StoreError, StoreSettingsMismatch, check_compatible, open_metadata

__all__ = ["open_writer", "precheck_store"]

_STORE_FIX = "use the same settings to resume, or write to a new store"


def precheck_store(config: ExtractConfig, settings: dict, ignore: Sequence[str] = ()) -> None:
    """Refuse an existing ``config.out`` that is not a store or holds features made with other settings
    (``ignore``: settings not known yet; the writer checks them when it opens the store)."""
    out = Path(config.out)
    if not out.exists():
        return
    if out.is_dir() and not (out / "data.mdb").exists():
        if any(out.iterdir()):
            raise SetupError(
                f"{out} exists and is not a feature store (no data.mdb); give a new or empty folder"
            )
        return
    try:
        meta = open_metadata(out)
    except StoreError as e:
        raise SetupError(f"{out} is not a usable feature store: {e}") from None
    try:
        check_compatible(
            meta,
            extractor=settings,
            features_dtype=config.features_dtype,
            where=str(out),
            fix=_STORE_FIX,
            ignore=ignore,
        )
    except StoreSettingsMismatch as e:
        raise SetupError(str(e)) from None


def open_writer(config: ExtractConfig, settings: dict, dist_ctx: DistContext) -> FeatureWriter:
    """Open (create or resume) the store; rank 0 first, so the ranks agree on one validated store."""
    writer = None
    error = None

    def attempt() -> None:
        nonlocal writer, error
        try:
            writer = FeatureWriter(
                config.out,
                extractor=settings,
                features_dtype=config.features_dtype,
                overwrite=config.overwrite,
            )
        except StoreSettingsMismatch as e:
            error = str(e)
        except DiskFullError as e:
            error = e
        except StoreError as e:
            error = f"cannot write to {config.out}: {e}"
        except OSError as e:
            error = f"cannot open the store {config.out}: {e}"

    if dist_ctx.is_main:
        attempt()
    errors = dist_ctx.all_gather(error)
    if errors[0] is None and not dist_ctx.is_main:
        attempt()
    errors = [e for e in dist_ctx.all_gather(error) if e is not None]
    if errors:
        if writer is not None:
            writer.close()
        if isinstance(errors[0], DiskFullError):
            raise errors[0]
        raise SetupError(errors[0])
    return writer
