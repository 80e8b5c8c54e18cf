"""Reading a store: `open_store(path)` gives a CTStore of the cases its slice index lists.

Every slice read is checked (chunk crc32c, shard index, a missing image shard) and damage
raises a UserError naming the case, slice, file and the command that rewrites the case.
Slices come straight from their shard file (tcsmae.store.shard_reader) where the layout
allows, else through zarr-python. Layout, axis order and commit protocol:
docs/store-format.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from tcsmae.errors import UserError
from tcsmae.store.checks import check_store_group, chunks_checksummed
from tcsmae.store.format import INDEX_FILE, read_index
from tcsmae.store.repair import repair_command
from tcsmae.store.shard_reader import DamagedChunk, ShardedSliceReader

# ----------------------------------------------------------------------------- reading


class CTStore:
    """Read access to a committed store. Picklable (zarr handles are reopened lazily).

    Attributes:
        path: the store folder.
        case_ids: list[str]; case index i refers to case_ids[i].
        slice_case: (S,) int32 case index per slice.
        slice_z: (S,) int32 z per slice within its case.
        body_fraction: (S,) float32 fraction of pixels with HU > -500 per slice.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index = read_index(self.path)
        self.case_ids: list[str] = [str(c) for c in index["case_ids"]]
        self.case_sha256: list[str] = [str(c) for c in index["case_sha256"]]
        self.slice_case = index["slice_case"].astype(np.int32)
        self.slice_z = index["slice_z"].astype(np.int32)
        self.body_fraction = index["body_fraction"].astype(np.float32)
        self._root = None
        self._arrays: dict[str, Any] = {}
        self._readers: dict[str, Any] = {}
        self._files_required: dict[str, bool] = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_root"] = None
        state["_arrays"] = {}
        state["_readers"] = {}
        state["_files_required"] = {}
        return state

    @property
    def n_slices(self) -> int:
        return int(self.slice_case.shape[0])

    @property
    def root(self):
        if self._root is None:
            import zarr

            self._root = zarr.open_group(str(self.path), mode="r")
        return self._root

    def _array(self, key: str):
        arr = self._arrays.get(key)
        if arr is None:
            import warnings

            try:
                with warnings.catch_warnings():  # lz4 stores: "numcodecs codec not in the v3 spec"
                    warnings.simplefilter("ignore")
                    arr = self.root[key]
            except Exception as exc:  # unparsable or missing zarr.json of the array or its group
                raise self._metadata_error(key, exc) from exc
            self._arrays[key] = arr
        return arr

    def _metadata_error(self, key: str, exc: Exception) -> UserError:
        """UserError naming the first zarr.json on the way to array `key` that does not parse."""
        import json

        folder = self.path
        for part in [""] + key.split("/"):
            folder = folder / part if part else folder
            meta = folder / "zarr.json"
            try:
                json.loads(meta.read_text())
            except (OSError, ValueError) as why:
                problem = f"{meta} is unreadable ({type(why).__name__}: {why})"
                break
        else:
            problem = f"{self.path / key} cannot be opened ({type(exc).__name__}: {exc})"
        case_id = key.split("/")[-1]
        return UserError(f"store {self.path}: {problem}. Fix: convert case {case_id!r} again with "
                         f"--overwrite: {self.repair_command(case_id)}")

    def repair_command(self, case_id: str) -> str:
        """The `tcsmae convert ... --overwrite` command that rewrites one case from its source."""

        return repair_command(self.path, case_id)

    def _reader(self, key: str):
        """The direct shard reader of array `key`, or None (zarr-python fallback)."""
        if key not in self._readers:
            self._readers[key] = ShardedSliceReader.for_array(
                self.path / key, shards_required=key.startswith("images/"))
        return self._readers[key]

    def _read(self, key: str, z: int) -> np.ndarray:
        """Slice z of array `key` (stored dtype, possibly read-only): straight from the shard
        file (tcsmae.store.shard_reader, ~4x faster) when the array has the store's layout,
        else through zarr-python. Either way damage raises DamagedChunk naming the file: a
        failed checksum, and a missing image shard of an array with chunk checksums."""
        reader = self._reader(key)
        if reader is not None:
            return reader.read(z)
        arr = self._array(key)
        if key not in self._files_required:
            self._files_required[key] = key.startswith("images/") and chunks_checksummed(self.path / key)
        return read_with_zarr(self.path / key, arr, z, self._files_required[key])

    def _check(self, case_id: str) -> None:
        if case_id not in self.case_ids:
            raise UserError(f"{self.path}: no case {case_id!r}; cases are listed by `tcsmae info {self.path}`")

    def image(self, case_id: str):
        """zarr.Array (Z, Y, X) int16 or float32, Hounsfield units. zarr-python checks chunk
        checksums but reads a missing shard file as 0 HU and names no file: read data with
        read_slice or read_volume, which treat that as damage and name the file."""
        self._check(case_id)
        return self._array(f"images/{case_id}")

    def has_labels(self, case_id: str) -> bool:
        self._check(case_id)
        return (self.path / "labels" / case_id / "zarr.json").is_file()

    def label(self, case_id: str):
        """zarr.Array (Z, Y, X) uint8 or int32 label ids, or None when the case has no labels."""
        return self._array(f"labels/{case_id}") if self.has_labels(case_id) else None

    def case_attrs(self, case_id: str) -> dict:
        """The image array's attributes (spacing_mm, origin_mm, direction, ...) as a plain dict."""
        return dict(self.image(case_id).attrs)

    def label_ids(self, case_id: str) -> list[int]:
        """Sorted label ids in a case's label map (0 included when present): its `label_ids`
        attribute, or for a case written before that was recorded, a full checked read.
        UserError when the case has no labels."""
        arr = self.label(case_id)
        ids = arr.attrs.get("label_ids") if arr is not None else None
        if ids is None:
            return np.unique(self.read_volume(case_id, labels=True)).tolist()
        return [int(i) for i in ids]

    def _read_checked(self, kind: str, case_id: str, z: int) -> np.ndarray:
        """Slice z of `kind`/<case_id> ("images" | "labels"); a damaged or missing file becomes a
        UserError that names the case, the slice, the file and the fix."""
        try:
            return self._read(f"{kind}/{case_id}", z)
        except UserError:
            raise
        except Exception as exc:  # damaged chunk or shard, missing file

            what = "slice" if kind == "images" else "label slice"
            problem = str(exc) if isinstance(exc, DamagedChunk) else f"{type(exc).__name__}: {exc}"
            raise UserError(
                f"{self.path}: case {case_id!r} {what} {z} is unreadable ({problem}). Fix: convert "
                f"the case again with --overwrite: {self.repair_command(case_id)} "
                f"(`tcsmae info {self.path} --verify` lists every damaged case)"
            ) from exc

    def read_volume(self, case_id: str, labels: bool = False) -> np.ndarray:
        """A whole case, slice by slice through the checked reader: (Z, Y, X) in the stored
        dtype, int16 | float32 HU (labels=False) or uint8 | int32 label ids (labels=True).
        Unlike `image(case_id)[...]` (zarr-python: a missing shard reads as 0 HU) every kind
        of damage is a UserError naming the case, slice, file and fix."""
        kind = "labels" if labels else "images"
        arr = self.label(case_id) if labels else self.image(case_id)
        if arr is None:
            raise UserError(f"{self.path}: case {case_id!r} has no label map; convert it with --labels")
        out = np.empty(arr.shape, dtype=arr.dtype)
        for z in range(arr.shape[0]):
            out[z] = self._read_checked(kind, case_id, z)
        return out

    def read_slice(self, case_index: int, z: int) -> np.ndarray:
        """One slice as (Y, X) float32 Hounsfield units (int16 cases are widened)."""
        return self.read_stored_slice(case_index, z).astype(np.float32)

    def read_stored_slice(self, case_index: int, z: int) -> np.ndarray:
        """One slice as stored: (Y, X) int16 or float32 Hounsfield units (possibly read-only)."""
        return self._read_checked("images", self.case_ids[case_index], z)

    def image_dtype(self, case_id: str) -> np.dtype:
        """The stored dtype of a case's HU array: int16 or float32."""
        return np.dtype(self.image(case_id).dtype)

    def read_label_slice(self, case_index: int, z: int) -> np.ndarray:
        """One label slice as (Y, X) int64 label ids; UserError when the case has no labels."""
        case_id = self.case_ids[case_index]
        if not self.has_labels(case_id):
            raise UserError(
                f"{self.path}: case {case_id!r} has no label map; convert it with --labels "
                "or choose a store whose cases all have labels"
            )
        return self._read_checked("labels", case_id, z).astype(np.int64)

    def __repr__(self) -> str:
        return f"CTStore({str(self.path)!r}, cases={len(self.case_ids)}, slices={self.n_slices})"


def read_with_zarr(folder: Path, arr, z: int, files_required: bool) -> np.ndarray:
    """Slice z of an array of a layout other than the store's, through zarr-python.

    zarr reads a missing chunk (or shard) file as fill values, and reports a failed checksum
    without naming the file: both become DamagedChunk naming the file holding slice z (a
    missing one only when files_required: image arrays with chunk checksums)."""

    cz, cy, cx = arr.metadata.chunk_grid.chunk_shape
    _, y, x = arr.shape
    files = [folder / arr.metadata.encode_chunk_key((z // cz, j, i))
             for j in range(-(-y // cy)) for i in range(-(-x // cx))]
    if files_required:
        for path in files:
            if not path.is_file():
                raise DamagedChunk(path, "file is missing (deleted or never written)")
    try:
        return np.asarray(arr[z])
    except Exception as exc:  # zarr: "Stored and computed checksum do not match", a bad frame
        where = files[0] if len(files) == 1 else folder
        what = ("fails its crc32c checksum (damaged file)" if "checksum" in str(exc).lower()
                else "cannot be read")
        raise DamagedChunk(where, f"slice {z} {what} (zarr: {type(exc).__name__}: {exc})") from exc


def open_store(path: str | os.PathLike) -> CTStore:
    """Open a committed store for reading; UserError if missing, foreign or incomplete."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"store {path} does not exist; create it with `tcsmae convert ... -o {path}`")
    check_store_group(path)
    if not (path / INDEX_FILE).is_file():
        raise UserError(
            f"store {path} is incomplete: it has no {INDEX_FILE} (no conversion into it has "
            "finished). Run the converter again on the same output to complete it."
        )
    return CTStore(path)
