"""Writing a store: `write_case_arrays` (one case's arrays, from any process) and
`StoreWriter`, the one locked writer that commits cases to the slice index atomically.

A case exists for readers only once the index lists it, so a crash never leaves half a case
visible; the commit protocol and the array layout are in docs/store-format.md.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from tcsmae.errors import UserError
from tcsmae.plain import to_plain
from tcsmae.store.checks import broken_group_files, check_store_group
from tcsmae.store.format import (
    CODECS,
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    LOCK_FILE,
    SHARD_SLICES,
    body_fraction,
    body_voxels,
    check_case_id,
    content_sha256,
    empty_index,
    no_air_warning,
    read_index,
    staging_name,
    storage_dtype,
    write_index,
)
from tcsmae.store.repair import repair_command
from tcsmae.store.shard_reader import ShardedSliceReader


def _compressors(codec: str) -> list:
    """The bytes-to-bytes codecs of each chunk: the compressor, then a crc32c of its output,
    so that every read (shard_reader and zarr-python alike) detects a damaged chunk."""
    if codec not in CODECS:
        raise UserError(f"unknown codec {codec!r}: choose one of {', '.join(CODECS)}")
    from zarr.codecs import Crc32cCodec

    if codec == "none":
        return [Crc32cCodec()]
    if codec == "lz4":
        import warnings

        try:
            from zarr.codecs.numcodecs import LZ4
        except ImportError:  # zarr < 3.1
            from numcodecs.zarr3 import LZ4

        with warnings.catch_warnings():  # "not in the Zarr v3 spec": known, recorded in attrs
            warnings.simplefilter("ignore")
            return [LZ4(acceleration=1), Crc32cCodec()]
    from zarr.codecs import ZstdCodec

    return [ZstdCodec(level=3), Crc32cCodec()]


def write_case_arrays(
    path: str | os.PathLike,
    case_id: str,
    hu: np.ndarray,
    attrs: dict,
    labels: np.ndarray | None = None,
    codec: str = "zstd",
    staged: bool = False,
    source: str | None = None,
) -> np.ndarray:
    """Write one case's arrays (not yet visible to readers; commit with StoreWriter.commit_case,
    or StoreWriter.commit_staged when staged).

    Safe to call from a worker process while the parent holds the writer lock, as long as no
    two calls write the same case. Existing arrays of that case are replaced, unless staged:
    then they are written under staging_name(case_id) and the committed case stays as it is.

    hu: (Z, Y, X) any real dtype, Hounsfield units; stored as int16 when exact, else float32.
    attrs: per-array attributes (spacing_mm, origin_mm, direction, z_positions_mm, patient_id,
        study_uid, series_uid, source_sha256, warnings, ...); `codec` and `content_sha256`
        are added here.
    labels: (Z, Y, X) integer label map on the same grid, or None.
    source: the input named by a no-air warning (no_air_warning; default "case <case_id>"),
        which is appended to attrs["warnings"] (the given dict too, so callers can report it).
    Returns body_fraction(hu): (Z,) float32.
    """
    import zarr

    name = staging_name(case_id) if staged else check_case_id(case_id)
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise UserError(f"case {case_id}: HU volume must be 3-D (Z, Y, X), got shape {hu.shape}")
    dtype = storage_dtype(hu)
    data = hu.astype(dtype) if hu.dtype != dtype else hu
    _, y, x = data.shape
    root = zarr.open_group(str(path), mode="a")
    compressors = _compressors(codec)
    inside = body_voxels(data)  # (Z,)
    no_air = no_air_warning(data, inside, source or f"case {case_id}")
    if no_air:
        attrs["warnings"] = [*attrs.get("warnings", []), no_air]
    full_attrs = to_plain(dict(attrs))  # NumPy scalars and arrays become Python numbers and lists
    full_attrs["codec"] = codec
    full_attrs["content_sha256"] = content_sha256(data)
    arr = root.create_array(  # every shard and chunk written: a missing shard file is damage
        f"images/{name}", shape=data.shape, dtype=data.dtype, chunks=(1, y, x),
        shards=(SHARD_SLICES, y, x), compressors=compressors, fill_value=0, overwrite=True,
        attributes=full_attrs, config={"write_empty_chunks": True},
    )
    arr[...] = data
    if labels is not None:
        _write_labels(root, name, case_id, np.asarray(labels), data.shape, compressors, codec)
    elif f"labels/{name}" in root:
        del root[f"labels/{name}"]
    return body_fraction(data, inside)


def _write_labels(root, name: str, case_id: str, labels: np.ndarray, shape: tuple[int, int, int],
                  compressors: list, codec: str) -> None:
    """Write labels/<name>: (Z, Y, X) integer ids on the image grid `shape`, stored as uint8
    when all ids are 0..255, else int32 (UserError for another shape or non-integer values)."""
    if labels.shape != shape:
        raise UserError(
            f"case {case_id}: label map shape {labels.shape} differs from image shape "
            f"{shape}; labels must be on the image grid"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.array_equal(labels, np.round(labels)):
            raise UserError(f"case {case_id}: label map holds non-integer values")
    lmax = int(labels.max()) if labels.size else 0
    ldtype = np.uint8 if 0 <= int(labels.min() if labels.size else 0) and lmax < 256 else np.int32
    stored_labels = labels.astype(ldtype)
    _, y, x = shape
    larr = root.create_array(
        f"labels/{name}", shape=labels.shape, dtype=ldtype, chunks=(1, y, x),
        shards=(SHARD_SLICES, y, x), compressors=compressors, fill_value=0, overwrite=True,
        attributes={"codec": codec, "content_sha256": content_sha256(stored_labels),
                    "label_ids": _label_ids(stored_labels)},
    )
    larr[...] = stored_labels


def _label_ids(labels: np.ndarray) -> list[int]:
    """Sorted ids present in a label map (0 included when present), the `label_ids` attribute.

    labels: (Z, Y, X) uint8 (counted, no sorted copy) or int32 label ids."""
    if labels.dtype == np.uint8:
        return np.flatnonzero(np.bincount(labels.ravel(), minlength=256)).tolist()
    return np.unique(labels).tolist()


# ----------------------------------------------------------------------------- writing


class StoreWriter:
    """The one writer of a store; a context manager holding an exclusive lock.

    Opening creates the store if needed, refuses a second concurrent writer, and deletes the
    arrays of cases that a crashed run left unlisted in the index.

    discard_if_empty: on closing, delete the store again when this writer created it and no
    case was committed (a conversion that converted nothing leaves no empty store behind);
    a folder that existed before is never deleted.
    """

    def __init__(self, path: str | os.PathLike, codec: str = "zstd", discard_if_empty: bool = False):
        self.path = Path(path)
        self.codec = codec
        self.discard_if_empty = discard_if_empty
        _compressors(codec)  # validate early
        self._lock = None
        self._created = False
        self.cleaned: list[str] = []

    def __enter__(self) -> "StoreWriter":
        import zarr
        from filelock import FileLock, Timeout

        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"output {self.path} exists and is not a folder; choose another -o")
        if self.path.exists() and any(self.path.iterdir()):
            check_store_group(self.path, output=True)
            broken = broken_group_files(self.path)
            if broken:
                raise UserError(f"store {self.path} is damaged: {'; '.join(broken)}")
        self._created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path / LOCK_FILE))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise UserError(
                f"store {self.path} is being written by another process (lock {self.path / LOCK_FILE}); "
                "wait for it to finish, or write to another store"
            ) from None
        self._lock = lock
        try:
            root = zarr.open_group(str(self.path), mode="a")
            if root.attrs.get("format") is None:
                root.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION})
            for name in ("images", "labels"):
                if name not in root:
                    root.create_group(name)
            if (self.path / INDEX_FILE).is_file():
                self._index = read_index(self.path)
            else:
                self._index = empty_index()
                write_index(self.path, self._index)
            self._clean_leftovers()
        except BaseException:
            self._close(committed=False)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._close(committed=bool(self.case_ids))

    def _close(self, committed: bool) -> None:
        if self.discard_if_empty and self._created and not committed:
            # removed while the lock is held, so no other writer sees it half gone
            shutil.rmtree(self.path, ignore_errors=True)
        self._lock.release()
        self._lock = None

    # -- queries
    @property
    def case_ids(self) -> list[str]:
        return [str(c) for c in self._index["case_ids"]]

    def source_sha256(self, case_id: str) -> str | None:
        ids = self.case_ids
        return str(self._index["case_sha256"][ids.index(case_id)]) if case_id in ids else None

    def damage_report(self, case_id: str) -> str | None:
        """`damage(case_id)` as the reason a converter re-run gives for not touching the case
        (readers may be using the store), with the commands that repair it; None when intact."""

        damage = self.damage(case_id)
        if damage is None:
            return None
        return (f"damaged in {self.path}: {damage}; left as it is (a re-run rebuilds nothing without "
                f"--overwrite): rebuild it with {repair_command(self.path, case_id)}, or run this "
                "command again with --overwrite")

    def damage(self, case_id: str) -> str | None:
        """What is visibly broken in a committed case's files, or None: an unparsable zarr.json
        or a missing image shard file (in arrays with chunk checksums). Cheap (a few stats), so
        that a re-run of the converter reports such a case as damaged instead of calling it up
        to date; damage inside a file is found by reads and by `tcsmae info --verify`."""
        import json

        for group in ("images", "labels"):
            meta = self.path / group / case_id / "zarr.json"
            if group == "labels" and not meta.parent.exists():
                continue
            try:
                json.loads(meta.read_text())
            except (OSError, ValueError) as exc:
                return f"{meta} is unreadable ({type(exc).__name__})"
        reader = ShardedSliceReader.for_array(self.path / "images" / case_id, shards_required=True)
        missing = reader.missing_shards() if reader is not None else []
        if missing:
            return f"{len(missing)} image shard file(s) missing, first {missing[0]}"
        return None

    # -- changes
    def _clean_leftovers(self) -> None:
        committed = set(self.case_ids)
        for group in ("images", "labels"):
            folder = self.path / group
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                if entry.is_dir() and entry.name not in committed:
                    shutil.rmtree(entry)
                    self.cleaned.append(f"{group}/{entry.name}")

    def commit_staged(self, case_id: str, body_frac: np.ndarray, source_sha256: str) -> None:
        """Replace a case by the arrays written under staging_name(case_id), and commit it:
        unlist the old case (atomic), delete its arrays, move the staged ones into place, list
        the new case. Until then readers and a failed rebuild keep the old case."""
        staged = staging_name(case_id)
        if case_id in self.case_ids:
            self._unlist(case_id)
        for group in ("images", "labels"):
            shutil.rmtree(self.path / group / case_id, ignore_errors=True)
            if (self.path / group / staged).is_dir():
                os.replace(self.path / group / staged, self.path / group / case_id)
        self.commit_case(case_id, body_frac, source_sha256)

    def discard_staged(self, case_id: str) -> None:
        """Delete the arrays of a failed rebuild of `case_id` (its committed case stays)."""
        for group in ("images", "labels"):
            shutil.rmtree(self.path / group / staging_name(case_id), ignore_errors=True)

    def remove_case(self, case_id: str) -> None:
        """Drop a case from the index (atomically), then delete its arrays."""
        if case_id in self.case_ids:
            self._unlist(case_id)
        for group in ("images", "labels"):
            shutil.rmtree(self.path / group / case_id, ignore_errors=True)

    def commit_case(self, case_id: str, body_frac: np.ndarray, source_sha256: str) -> None:
        """List a case whose arrays are complete in the index (atomic rewrite)."""
        check_case_id(case_id)
        if case_id in self.case_ids:
            self._unlist(case_id)
        idx = self._index
        ci = len(idx["case_ids"])
        n = int(np.asarray(body_frac).shape[0])
        self._index = {
            "case_ids": np.append(idx["case_ids"], case_id),
            "case_sha256": np.append(idx["case_sha256"], str(source_sha256)),
            "slice_case": np.concatenate([idx["slice_case"], np.full(n, ci, np.int32)]),
            "slice_z": np.concatenate([idx["slice_z"], np.arange(n, dtype=np.int32)]),
            "body_fraction": np.concatenate([idx["body_fraction"], np.asarray(body_frac, np.float32)]),
        }
        write_index(self.path, self._index)

    def _unlist(self, case_id: str) -> None:
        """Remove a case from the index only (atomic rewrite); its arrays stay."""
        ci = self.case_ids.index(case_id)
        idx = self._index
        keep = idx["slice_case"] != ci
        new_case = idx["slice_case"][keep]
        self._index = {
            "case_ids": np.delete(idx["case_ids"], ci),
            "case_sha256": np.delete(idx["case_sha256"], ci),
            "slice_case": np.where(new_case > ci, new_case - 1, new_case).astype(np.int32),
            "slice_z": idx["slice_z"][keep],
            "body_fraction": idx["body_fraction"][keep],
        }
        write_index(self.path, self._index)

    def write_case(self, case_id: str, hu: np.ndarray, attrs: dict, labels: np.ndarray | None = None,
                   source: str | None = None) -> None:
        """Write a case's arrays, then commit it. Replaces an existing case of that id only once
        the new arrays are written (a failed write leaves it as it was). source: as in
        write_case_arrays."""
        staged = case_id in self.case_ids
        try:
            bf = write_case_arrays(self.path, case_id, hu, attrs, labels, codec=self.codec, staged=staged,
                                   source=source)
        except BaseException:
            if staged:
                self.discard_staged(case_id)
            else:
                self.remove_case(case_id)
            raise
        if staged:
            self.commit_staged(case_id, bf, str(attrs.get("source_sha256", "")))
        else:
            self.commit_case(case_id, bf, str(attrs.get("source_sha256", "")))
