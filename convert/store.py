"""The tcsmae CT store: a Zarr v3 group of HU volumes plus a slice index.

Layout of ``NAME.zarr`` (docs/store-format.md has the full description):

    zarr.json                  group attrs: format="tcsmae-ct", format_version=1
    images/<case_id>           HU, (Z, Y, X) int16 or float32, chunks (1, Y, X), shards (64, Y, X)
    labels/<case_id>           integer label map, same shape and grid (optional)
    slice_index.npz            the list of committed cases and their slices (see below)
    .writer.lock               held by the one process allowed to write

Every chunk ends with a crc32c of its compressed bytes, and every image shard file is written
(even one of all-0 slices), so a reader detects a flipped bit or a missing image shard on each
read and raises a UserError naming the case, slice, file and the repair command
(convert/repair.py). A label shard of all background may legitimately have no file, and so
may an all-0 image shard of an array written before chunk checksums (no crc32c in its chain).

Axis order of every stored array is that of an axial DICOM: Z = slices ascending along the
slice normal, Y = rows (anterior -> posterior), X = columns (patient right -> left).

Commit protocol: a case's arrays are written completely first; then ``slice_index.npz`` is
rewritten to a temporary file and atomically renamed over the old one. A case exists for
readers only once the index lists it, so readers never see half a case, and a crash leaves
only unlisted arrays, which the next writer deletes. A store without an index is refused.

Slice index arrays (all 1-D, saved with ``np.savez``, no pickles):

    case_ids       (C,) str      case ids in commit order; "case index" i means case_ids[i]
    case_sha256    (C,) str      source digest of each case (to skip unchanged sources)
    slice_case     (S,) int32    case index of each slice
    slice_z        (S,) int32    z of each slice within its case
    body_fraction  (S,) float32  fraction of the slice's pixels with HU > -500 (inside the body)
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tcsmae.atomic_files import readable_by_all
from tcsmae.errors import UserError

FORMAT = "tcsmae-ct"
FORMAT_VERSION = 1
INDEX_FILE = "slice_index.npz"
LOCK_FILE = ".writer.lock"
BODY_HU = -500.0
SHARD_SLICES = 64
CODECS = ("zstd", "lz4", "none")
_CASE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def check_case_id(case_id: str) -> str:
    """Return ``case_id`` if it is a safe array name, else raise UserError with the fix."""
    if not isinstance(case_id, str) or not _CASE_ID_RE.match(case_id):
        raise UserError(
            f"case id {case_id!r} is not usable as a store name: use letters, digits, '.', '_' "
            "and '-' only (at most 200 characters, starting with a letter or digit); "
            "pass --case-id to choose one"
        )
    return case_id


def body_voxels(hu: np.ndarray) -> np.ndarray:
    """Number of pixels inside the body (HU > -500) per slice, counted slice by slice (a few
    KiB of temporaries, not a boolean copy of the volume).

    hu: (Z, Y, X) int16 or float32, Hounsfield units. Returns (Z,) int64.
    """
    return np.array([np.count_nonzero(plane > BODY_HU) for plane in np.asarray(hu)], dtype=np.int64)


def body_fraction(hu: np.ndarray, inside: np.ndarray | None = None) -> np.ndarray:
    """Fraction of pixels inside the body per slice.

    hu: (Z, Y, X) int16 or float32, Hounsfield units; inside: body_voxels(hu) when known.
    Returns (Z,) float32 in [0, 1]: mean of (HU > -500) over each slice.
    """
    hu = np.asarray(hu)
    inside = body_voxels(hu) if inside is None else inside
    return (inside / (hu.shape[1] * hu.shape[2])).astype(np.float32)


def no_air_warning(hu: np.ndarray, inside: np.ndarray, source: str) -> str | None:
    """A warning when a CT volume holds (almost) no air: fewer than 1% of its voxels at or
    below -500 HU. The values are then most likely not HU (a missing rescale intercept leaves
    air at about 0 and tissue at about 1000). None for a plausible volume.

    hu: (Z, Y, X) any real dtype, supposedly Hounsfield units; inside: body_voxels(hu), (Z,)
    int64 (write_case_arrays counts them once for the slice index and this check);
    source: the file, for the message.
    """
    hu = np.asarray(hu)
    if hu.size == 0:
        return None
    air = hu.size - int(np.sum(inside))
    if air >= 0.01 * hu.size:
        return None
    return (f"no air found in {source}: are these HU? (missing rescale intercept?) only "
            f"{100 * air / hu.size:.2f}% of voxels are at or below {BODY_HU:g} HU, "
            f"lowest value {float(np.min(hu)):g}")


def storage_dtype(hu: np.ndarray) -> np.dtype:
    """int16 when every value is an exact integer that fits in int16, else float32."""
    hu = np.asarray(hu)
    if np.issubdtype(hu.dtype, np.integer):
        if hu.size == 0 or (hu.min() >= -32768 and hu.max() <= 32767):
            return np.dtype(np.int16)
        return np.dtype(np.float32)
    if not np.all(np.isfinite(hu)):
        return np.dtype(np.float32)
    if hu.size and hu.min() >= -32768 and hu.max() <= 32767 and np.array_equal(hu, np.round(hu)):
        return np.dtype(np.int16)
    return np.dtype(np.float32)


def content_sha256(array: np.ndarray) -> str:
    """SHA-256 of an array's C-order bytes (as stored), for `tcsmae info --verify`."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


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


def _jsonable(value: Any) -> Any:
    """Attributes as plain JSON types (NumPy scalars and arrays become Python lists/numbers)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def staging_name(case_id: str) -> str:
    """Where a case that replaces a committed one is written first (never a valid case id, so
    a crash leaves it as a leftover that the next writer removes); see StoreWriter.commit_staged."""
    return f"_new.{check_case_id(case_id)}"


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
    z, y, x = data.shape
    root = zarr.open_group(str(path), mode="a")
    compressors = _compressors(codec)
    inside = body_voxels(data)  # (Z,)
    no_air = no_air_warning(data, inside, source or f"case {case_id}")
    if no_air:
        attrs["warnings"] = [*attrs.get("warnings", []), no_air]
    full_attrs = _jsonable(dict(attrs))
    full_attrs["codec"] = codec
    full_attrs["content_sha256"] = content_sha256(data)
    arr = root.create_array(  # every shard and chunk written: a missing shard file is damage
        f"images/{name}", shape=data.shape, dtype=data.dtype, chunks=(1, y, x),
        shards=(SHARD_SLICES, y, x), compressors=compressors, fill_value=0, overwrite=True,
        attributes=full_attrs, config={"write_empty_chunks": True},
    )
    arr[...] = data
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != data.shape:
            raise UserError(
                f"case {case_id}: label map shape {labels.shape} differs from image shape "
                f"{data.shape}; labels must be on the image grid"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            if not np.array_equal(labels, np.round(labels)):
                raise UserError(f"case {case_id}: label map holds non-integer values")
        lmax = int(labels.max()) if labels.size else 0
        ldtype = np.uint8 if 0 <= int(labels.min() if labels.size else 0) and lmax < 256 else np.int32
        stored_labels = labels.astype(ldtype)
        larr = root.create_array(
            f"labels/{name}", shape=labels.shape, dtype=ldtype, chunks=(1, y, x),
            shards=(SHARD_SLICES, y, x), compressors=compressors, fill_value=0, overwrite=True,
            attributes={"codec": codec, "content_sha256": content_sha256(stored_labels),
                        "label_ids": _label_ids(stored_labels)},
        )
        larr[...] = stored_labels
    elif f"labels/{name}" in root:
        del root[f"labels/{name}"]
    return body_fraction(data, inside)


def _label_ids(labels: np.ndarray) -> list[int]:
    """Sorted ids present in a label map (0 included when present), the `label_ids` attribute.

    labels: (Z, Y, X) uint8 (counted, no sorted copy) or int32 label ids."""
    if labels.dtype == np.uint8:
        return np.flatnonzero(np.bincount(labels.ravel(), minlength=256)).tolist()
    return np.unique(labels).tolist()


# ----------------------------------------------------------------------------- index


def _empty_index() -> dict[str, np.ndarray]:
    return {
        "case_ids": np.zeros(0, dtype="<U1"),
        "case_sha256": np.zeros(0, dtype="<U1"),
        "slice_case": np.zeros(0, dtype=np.int32),
        "slice_z": np.zeros(0, dtype=np.int32),
        "body_fraction": np.zeros(0, dtype=np.float32),
    }


def _read_index(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path / INDEX_FILE, allow_pickle=False) as f:
            return {k: f[k] for k in _empty_index()}
    except Exception as exc:  # truncated, overwritten, or from another program
        raise UserError(
            f"{path / INDEX_FILE} is unreadable ({type(exc).__name__}: {exc}). The slice index is "
            f"rebuilt by conversion: delete {path / INDEX_FILE} and run the converter again with "
            f"-o {path} (cases are re-added; their arrays are rewritten)"
        ) from exc



def _write_index(path: Path, index: dict[str, np.ndarray]) -> None:
    """Rewrite the index atomically: temp file in the same folder, fsync, rename."""
    fd, tmp = tempfile.mkstemp(prefix=".slice_index.", suffix=".npz.tmp", dir=path)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **index)
            f.flush()
            os.fsync(f.fileno())
        readable_by_all(tmp)
        os.replace(tmp, path / INDEX_FILE)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
        index = _read_index(self.path)
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
        from .repair import repair_command

        return repair_command(self.path, case_id)

    def _reader(self, key: str):
        """The direct shard reader of array `key`, or None (zarr-python fallback)."""
        if key not in self._readers:
            from .shard_reader import ShardedSliceReader

            self._readers[key] = ShardedSliceReader.for_array(
                self.path / key, shards_required=key.startswith("images/"))
        return self._readers[key]

    def _read(self, key: str, z: int) -> np.ndarray:
        """Slice z of array `key` (stored dtype, possibly read-only): straight from the shard
        file (convert/shard_reader.py, ~4x faster) when the array has the store's layout,
        else through zarr-python. Either way damage raises DamagedChunk naming the file: a
        failed checksum, and a missing image shard of an array with chunk checksums."""
        reader = self._reader(key)
        if reader is not None:
            return reader.read(z)
        arr = self._array(key)
        if key not in self._files_required:
            self._files_required[key] = key.startswith("images/") and _chunks_checksummed(self.path / key)
        return _read_with_zarr(self.path / key, arr, z, self._files_required[key])

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
            from .shard_reader import DamagedChunk

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
        return self._read_checked("images", self.case_ids[case_index], z).astype(np.float32)

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


def _chunks_checksummed(folder: Path) -> bool:
    """Whether the array in `folder` has the checksummed format's chunk chain (ending in crc32c),
    in which a missing image chunk or shard file is damage (shard_reader.missing_shard_is_damage)."""
    import json

    from .shard_reader import missing_shard_is_damage

    try:
        return missing_shard_is_damage(json.loads((folder / "zarr.json").read_text()))
    except (OSError, ValueError):
        return False


def _read_with_zarr(folder: Path, arr, z: int, files_required: bool) -> np.ndarray:
    """Slice z of an array of a layout other than the store's, through zarr-python.

    zarr reads a missing chunk (or shard) file as fill values, and reports a failed checksum
    without naming the file: both become DamagedChunk naming the file holding slice z (a
    missing one only when files_required: image arrays with chunk checksums)."""
    from .shard_reader import DamagedChunk

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


def _check_group(path: Path, output: bool = False) -> None:
    """Refuse a folder that is not a tcsmae store. output: the folder is a conversion's -o (the
    fix is then another folder, not `tcsmae convert`)."""
    import json

    meta = path / "zarr.json"
    other = "; choose a new or empty folder for -o" if output else ""
    if not meta.is_file():
        raise UserError(f"{path} is not a Zarr store (no zarr.json)"
                        + (other or "; create one with `tcsmae convert ... -o STORE`"))
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (ValueError, AttributeError) as exc:
        raise UserError(f"{meta} is not valid JSON ({exc}); the store is damaged"
                        + (other or "; convert into a new store")) from exc
    if attrs.get("format") != FORMAT:
        raise UserError(f"{path} is a Zarr group but not a tcsmae CT store "
                        f"(format={attrs.get('format')!r}){other}")
    if int(attrs.get("format_version", 0)) > FORMAT_VERSION:
        raise UserError(
            f"{path} has format_version {attrs.get('format_version')}, newer than this tcsmae "
            f"reads ({FORMAT_VERSION}); upgrade tcsmae"
        )


GROUP_FILE = '{"zarr_format": 3, "node_type": "group", "attributes": {}}'
"""The whole content of the group files images/zarr.json and labels/zarr.json."""


def broken_group_files(path: Path) -> list[str]:
    """One message per damaged group file of a store (images/zarr.json, labels/zarr.json:
    missing while its folder exists, not JSON, or not a group), naming the file and the fix.
    Opening an array does not read them, but zarr does when a writer adds a case."""
    import json

    problems = []
    for name in ("images", "labels"):
        meta = path / name / "zarr.json"
        if not meta.parent.is_dir():
            continue
        try:
            node = json.loads(meta.read_text())
            why = None if isinstance(node, dict) and node.get("node_type") == "group" else "not a Zarr group"
        except (OSError, ValueError) as exc:
            why = f"{type(exc).__name__}: {exc}"
        if why is not None:
            problems.append(f"{meta} is unreadable ({why}). It is the group file of the store's {name} and "
                            f"holds no data: fix it by writing {GROUP_FILE} into it (the arrays under "
                            f"{meta.parent} are not affected)")
    return problems


def open_store(path: str | os.PathLike) -> CTStore:
    """Open a committed store for reading; UserError if missing, foreign or incomplete."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"store {path} does not exist; create it with `tcsmae convert ... -o {path}`")
    _check_group(path)
    if not (path / INDEX_FILE).is_file():
        raise UserError(
            f"store {path} is incomplete: it has no {INDEX_FILE} (no conversion into it has "
            "finished). Run the converter again on the same output to complete it."
        )
    return CTStore(path)


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
            _check_group(self.path, output=True)
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
                self._index = _read_index(self.path)
            else:
                self._index = _empty_index()
                _write_index(self.path, self._index)
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
        from .repair import repair_command

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

        from .shard_reader import ShardedSliceReader

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
        _write_index(self.path, self._index)

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
        _write_index(self.path, self._index)

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
