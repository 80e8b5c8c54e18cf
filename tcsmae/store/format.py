"""The store format's names and small rules, shared by its writer, readers and checks.

Format name and version, file names, shard size, codecs, valid case ids, the body
fraction (HU > -500) and no-air check, the stored dtype, content digests and the slice
index file (read, written atomically). The format itself: docs/store-format.md.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from tcsmae.atomic_files import readable_by_all
from tcsmae.errors import UserError

FORMAT = "tcsmae-ct"
FORMAT_VERSION = 1
INDEX_FILE = "slice_index.npz"
LOCK_FILE = ".writer.lock"
BODY_HU = -500.0
"""A voxel above this HU lies inside the body (body_fraction, no_air_warning)."""
SHARD_SLICES = 64
"""Slices per shard file (one chunk = one slice)."""
CODECS = ("zstd", "lz4", "none")
GROUP_FILE = '{"zarr_format": 3, "node_type": "group", "attributes": {}}'
"""The whole content of the group files images/zarr.json and labels/zarr.json."""
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


def staging_name(case_id: str) -> str:
    """Where a case that replaces a committed one is written first (never a valid case id, so
    a crash leaves it as a leftover that the next writer removes); see StoreWriter.commit_staged."""
    return f"_new.{check_case_id(case_id)}"


# ----------------------------------------------------------------------------- index


def empty_index() -> dict[str, np.ndarray]:
    """The slice index of a store without cases (the five arrays, each of length 0)."""
    return {
        "case_ids": np.zeros(0, dtype="<U1"),
        "case_sha256": np.zeros(0, dtype="<U1"),
        "slice_case": np.zeros(0, dtype=np.int32),
        "slice_z": np.zeros(0, dtype=np.int32),
        "body_fraction": np.zeros(0, dtype=np.float32),
    }


def read_index(path: Path) -> dict[str, np.ndarray]:
    """The slice index of the store at `path`; UserError naming the fix when unreadable."""
    try:
        with np.load(path / INDEX_FILE, allow_pickle=False) as f:
            return {k: f[k] for k in empty_index()}
    except Exception as exc:  # truncated, overwritten, or from another program
        raise UserError(
            f"{path / INDEX_FILE} is unreadable ({type(exc).__name__}: {exc}). The slice index is "
            f"rebuilt by conversion: delete {path / INDEX_FILE} and run the converter again with "
            f"-o {path} (cases are re-added; their arrays are rewritten)"
        ) from exc


def write_index(path: Path, index: dict[str, np.ndarray]) -> None:
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
