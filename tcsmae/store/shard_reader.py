"""Read one slice of a store array straight from its shard file, without zarr-python.

A training sample is one slice, one chunk, and zarr-python's per-call machinery costs several
times the decode itself. This reader reads a shard's index once (checked against its crc32c,
cached per file version), `pread`s the chunk, checks its crc32c and decompresses it; damage
raises DamagedChunk naming the file and slice. Arrays of another layout get no reader
(`ShardedSliceReader.for_array` returns None) and are read through zarr-python; the result
always equals `zarr.Array[z]`. Byte layout and missing-shard rules: docs/store-format.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

_EMPTY = np.uint64(2**64 - 1)
_DTYPES = {"int16": "<i2", "float32": "<f4", "uint8": "u1", "int32": "<i4"}


class DamagedChunk(ValueError):
    """A slice cannot be read as written: its shard file is missing, short or fails a checksum.

    path: the shard file; reason: what is wrong, in words (readers name the slice)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"shard file {path}: {reason}")
        self.path = path
        self.reason = reason


def _decompressor(codecs: list[dict]):
    """bytes -> bytes for the inner codec chain [bytes(little), zstd | numcodecs.lz4 | nothing];
    None when the chain is something else."""
    if not codecs or codecs[0].get("name") != "bytes":
        return None
    if codecs[0].get("configuration", {}).get("endian", "little") != "little":
        return None
    rest = codecs[1:]
    if not rest:
        return lambda raw: raw
    if len(rest) != 1:
        return None
    name = rest[0].get("name")
    if name == "zstd":
        import numcodecs

        return numcodecs.Zstd().decode
    if name == "numcodecs.lz4":
        import numcodecs

        return numcodecs.LZ4().decode
    return None


def _has_crc32c(codecs: list[dict]) -> bool:
    """Whether the inner chain ends with a crc32c of the compressed chunk bytes."""
    return bool(codecs) and codecs[-1].get("name") == "crc32c"


def chunk_codecs(meta: dict) -> list[dict]:
    """The codec chain applied to each chunk of a Zarr v3 array, from its zarr.json `meta`:
    the sharding codec's inner chain for a sharded array, else the array's chain."""
    codecs = meta.get("codecs") or []
    if len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed":
        return list(codecs[0].get("configuration", {}).get("codecs") or [])
    return list(codecs)


def missing_shard_is_damage(meta: dict) -> bool:
    """Whether a missing shard (or chunk) file of an image array with zarr.json `meta` is damage.

    Both changes came with the checksummed store format: chunk chains ending in crc32c, and
    every image shard written (even 64 slices of 0). Arrays written before have no crc32c and
    no file for an all-0 shard (a zero-padded partial last shard), which reads as the fill value.
    """
    try:
        return _has_crc32c(chunk_codecs(meta))
    except AttributeError:  # not a zarr.json of the usual shape
        return False


def _payload_codecs(codecs: list[dict]) -> list[dict]:
    """The chain without its trailing crc32c (checked by the reader itself)."""
    return codecs[:-1] if _has_crc32c(codecs) else codecs


class ShardedSliceReader:
    """Slice reads from one sharded (Z, Y, X) array of a tcsmae store.

    read(z) -> (Y, X) array of the stored dtype (int16 | float32 HU, uint8 | int32 label ids).
    shards_required: a missing shard file is damage, not all-fill slices (image arrays of the
    checksummed format; `for_array` clears it for arrays written before, see the module doc).
    Picklable: it holds only the folder, the layout and a cache of shard indexes.
    """

    def __init__(self, folder: Path, shape: tuple[int, int, int], dtype: str,
                 shard_slices: int, codecs: list[dict], fill_value, separator: str,
                 shards_required: bool = False):
        self.folder = folder
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self.shard_slices = shard_slices
        self.codecs = codecs
        self.fill_value = fill_value
        self.separator = separator
        self.shards_required = shards_required
        self.checksummed = _has_crc32c(codecs)
        self._decode = _decompressor(_payload_codecs(codecs))
        self._index_cache: dict[int, tuple[tuple[int, int, int], np.ndarray]] = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_decode"] = None
        state["_index_cache"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._decode = _decompressor(_payload_codecs(self.codecs))

    @classmethod
    def for_array(cls, folder: str | os.PathLike,
                  shards_required: bool = False) -> "ShardedSliceReader | None":
        """A reader for the array in `folder` (its zarr.json), or None when its layout is not
        the store format's: (Z, Y, X), shards of (S, Y, X) holding chunks of (1, Y, X), index
        at the end protected by crc32c, a little-endian bytes codec plus zstd, lz4 or nothing,
        optionally followed by crc32c.

        shards_required: the caller's wish (image arrays); kept only when the chunk chain ends
        in crc32c (`missing_shard_is_damage`)."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / "zarr.json").read_text())
        except (OSError, ValueError):
            return None
        try:
            shape = tuple(int(s) for s in meta["shape"])
            dtype = _DTYPES.get(meta["data_type"])
            grid = meta["chunk_grid"]
            key = meta["chunk_key_encoding"]
            (shard,) = meta["codecs"]
            conf = shard["configuration"]
            shard_shape = tuple(int(s) for s in grid["configuration"]["chunk_shape"])
            chunk_shape = tuple(int(s) for s in conf["chunk_shape"])
            index_codecs = [c["name"] for c in conf["index_codecs"]]
            index_endian = conf["index_codecs"][0].get("configuration", {}).get("endian", "little")
            separator = key.get("configuration", {}).get("separator", "/")
            fill_value = meta["fill_value"]
            codecs = list(conf["codecs"])
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        if (dtype is None or len(shape) != 3 or grid.get("name") != "regular"
                or key.get("name") != "default" or shard.get("name") != "sharding_indexed"
                or len(shard_shape) != 3 or shard_shape[1:] != shape[1:]
                or chunk_shape != (1, *shape[1:]) or conf.get("index_location", "end") != "end"
                or index_codecs != ["bytes", "crc32c"] or index_endian != "little"
                or not isinstance(fill_value, (int, float)) or isinstance(fill_value, bool)
                or _decompressor(_payload_codecs(codecs)) is None):
            return None
        return cls(folder, shape, dtype, shard_shape[0], codecs, fill_value, separator,
                   shards_required and _has_crc32c(codecs))

    def shard_path(self, z: int) -> Path:
        """The shard file holding slice z (Zarr writes no file for an all-fill label shard)."""
        sep = self.separator
        return self.folder / f"c{sep}{z // self.shard_slices}{sep}0{sep}0"

    def missing_shards(self) -> list[Path]:
        """The shard files of a shards_required array that do not exist (cheap: one stat each)."""
        if not self.shards_required:
            return []
        paths = [self.shard_path(z) for z in range(0, self.shape[0], self.shard_slices)]
        return [p for p in paths if not p.is_file()]

    def _index(self, fd: int, z: int, path: Path) -> np.ndarray:
        """(S, 2) uint64 (offset, nbytes) of the shard's chunks, checked against its crc32c."""
        stat = os.fstat(fd)
        version = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        shard = z // self.shard_slices
        cached = self._index_cache.get(shard)
        if cached is not None and cached[0] == version:
            return cached[1]
        import google_crc32c

        n = self.shard_slices
        size = n * 16 + 4
        if stat.st_size < size:
            raise DamagedChunk(path, f"{stat.st_size} bytes, shorter than its {size}-byte index "
                                        "(truncated file)")
        raw = os.pread(fd, size, stat.st_size - size)
        if len(raw) != size:
            raise DamagedChunk(path, "short read of its index")
        crc = int(np.frombuffer(raw[-4:], "<u4")[0])
        if google_crc32c.value(raw[:-4]) != crc:
            raise DamagedChunk(path, "index checksum mismatch (damaged file)")
        index = np.frombuffer(raw[:-4], "<u8").reshape(n, 2)
        if len(self._index_cache) > 256:
            self._index_cache.clear()
        self._index_cache[shard] = (version, index)
        return index

    def read(self, z: int) -> np.ndarray:
        """Slice z as a (Y, X) array of the stored dtype; read-only (a view of the decoded bytes)
        unless it is the fill value. Callers that write to it convert or copy it first.
        Raises DamagedChunk when the slice cannot be read as written."""
        if not 0 <= z < self.shape[0]:
            raise IndexError(f"slice {z} out of range for {self.shape[0]} slices in {self.folder}")
        _, h, w = self.shape
        path = self.shard_path(z)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            if self.shards_required:
                raise DamagedChunk(path, "file is missing (deleted or never written)") from None
            return np.full((h, w), self.fill_value, dtype=self.dtype)  # all-fill label shard
        try:
            offset, nbytes = self._index(fd, z, path)[z % self.shard_slices]
            if offset == _EMPTY and nbytes == _EMPTY:
                return np.full((h, w), self.fill_value, dtype=self.dtype)
            offset, nbytes = int(offset), int(nbytes)
            # the trailing crc32c read on its own: slicing it off would copy the chunk
            crc_bytes = 4 if self.checksummed and nbytes >= 4 else 0
            raw = os.pread(fd, nbytes - crc_bytes, offset)
            stored_crc = os.pread(fd, crc_bytes, offset + nbytes - crc_bytes) if crc_bytes else b""
        finally:
            os.close(fd)
        if len(raw) + len(stored_crc) != nbytes:
            raise DamagedChunk(path, f"chunk of slice {z} runs past the end of the file")
        if self.checksummed:
            import google_crc32c

            if not crc_bytes or google_crc32c.value(raw) != int.from_bytes(stored_crc, "little"):
                raise DamagedChunk(path, f"chunk of slice {z} fails its crc32c checksum (damaged file)")
        try:
            data = self._decode(raw)
        except Exception as exc:  # a damaged chunk of a store written before chunk checksums
            raise DamagedChunk(path, f"chunk of slice {z} does not decode "
                                        f"({type(exc).__name__}: {exc})") from exc
        expected = h * w * self.dtype.itemsize
        if len(data) != expected:
            raise DamagedChunk(path, f"slice {z} decodes to {len(data)} bytes, expected {expected}")
        return np.frombuffer(data, dtype=self.dtype).reshape(h, w)
