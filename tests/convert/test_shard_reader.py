"""The direct shard reader equals zarr-python on every codec, dtype and empty chunk; it
falls back to zarr for foreign layouts and turns damage into the store's UserError."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from tcsmae.convert.shard_reader import ShardedSliceReader
from tcsmae.convert.store import StoreWriter, open_store
from tcsmae.errors import UserError


def _volume(z, dtype, seed):
    """(z, 16, 12) HU with all-zero slices at 0 and 66 (Zarr writes no chunk for them)."""
    hu = np.random.default_rng(seed).integers(-1024, 1500, (z, 16, 12)).astype(np.float64)
    if dtype == "float32":
        hu += 0.25
    hu[0] = 0
    if z > 66:
        hu[66] = 0
    return hu


@pytest.mark.parametrize("codec", ["zstd", "lz4", "none"])
def test_direct_reads_equal_zarr_for_every_slice(tmp_path, codec):
    path = tmp_path / "s.zarr"
    hu_int = _volume(70, "int16", 0)  # two shards, the second partial
    hu_float = _volume(5, "float32", 1)
    labels_small = np.random.default_rng(2).integers(0, 256, hu_int.shape).astype(np.uint8)
    labels_big = np.random.default_rng(3).integers(0, 1000, hu_float.shape)
    labels_small[1] = 0
    with StoreWriter(path, codec=codec) as w:
        w.write_case("a", hu_int, {"source_sha256": "1"}, labels_small)
        w.write_case("b", hu_float, {"source_sha256": "2"}, labels_big)
    store = open_store(path)
    for case, (hu, labels) in enumerate([(hu_int, labels_small), (hu_float, labels_big)]):
        case_id = store.case_ids[case]
        image_reader = ShardedSliceReader.for_array(path / "images" / case_id)
        label_reader = ShardedSliceReader.for_array(path / "labels" / case_id)
        assert image_reader is not None and label_reader is not None  # not the zarr fallback
        for z in range(hu.shape[0]):
            direct = image_reader.read(z)
            via_zarr = store.image(case_id)[z]
            assert direct.dtype == via_zarr.dtype
            np.testing.assert_array_equal(direct, via_zarr)
            np.testing.assert_array_equal(store.read_slice(case, z), hu[z].astype(np.float32))
            np.testing.assert_array_equal(label_reader.read(z), store.label(case_id)[z])
            np.testing.assert_array_equal(store.read_label_slice(case, z), labels[z])
        assert store.read_slice(case, 0).flags.writeable
    assert image_reader.read(0).dtype == np.float32 and label_reader.read(0).dtype == np.int32
    again = pickle.loads(pickle.dumps(image_reader))
    np.testing.assert_array_equal(again.read(3), image_reader.read(3))
    with pytest.raises(IndexError, match="out of range"):
        image_reader.read(5)


def test_foreign_layout_falls_back_to_zarr(tmp_path):
    import zarr

    path = tmp_path / "s.zarr"
    hu = _volume(4, "int16", 4)
    with StoreWriter(path) as w:
        w.write_case("a", hu, {"source_sha256": "1"})
    root = zarr.open_group(str(path), mode="a")  # the same data, unsharded (another writer)
    root.create_array("images/a", shape=hu.shape, dtype=np.int16, chunks=(2, 16, 12),
                      overwrite=True)[...] = hu.astype(np.int16)
    assert ShardedSliceReader.for_array(path / "images" / "a") is None
    store = open_store(path)
    for z in range(4):
        np.testing.assert_array_equal(store.read_slice(0, z), hu[z])


def test_damaged_index_or_chunk_is_a_user_error(tmp_path):
    path = tmp_path / "s.zarr"
    with StoreWriter(path) as w:
        w.write_case("a", _volume(4, "int16", 5), {"source_sha256": "1"})
    shard = path / "images" / "a" / "c" / "0" / "0" / "0"
    good = shard.read_bytes()
    damaged_index = bytearray(good)
    damaged_index[-10] ^= 0xFF
    shard.write_bytes(bytes(damaged_index))
    with pytest.raises(UserError, match=r"case 'a' slice 2 is unreadable.*checksum.*--overwrite"):
        open_store(path).read_slice(0, 2)
    damaged_chunk = bytearray(good)
    damaged_chunk[5:40] = b"\0" * 35  # inside slice 1's zstd frame (slice 0 is empty)
    shard.write_bytes(bytes(damaged_chunk))
    with pytest.raises(UserError, match=r"case 'a' slice 1 is unreadable"):
        open_store(path).read_slice(0, 1)


def test_rewritten_case_is_read_anew(tmp_path):
    """The cached shard index follows the file: a case converted again with --overwrite while a
    reader is open reads the new slices, not the old offsets."""
    path = tmp_path / "s.zarr"
    first, second = _volume(4, "int16", 6), _volume(4, "int16", 7)
    with StoreWriter(path) as w:
        w.write_case("a", first, {"source_sha256": "1"})
    store = open_store(path)
    np.testing.assert_array_equal(store.read_slice(0, 1), first[1])
    with StoreWriter(path) as w:
        w.write_case("a", second, {"source_sha256": "2"})
    np.testing.assert_array_equal(store.read_slice(0, 1), second[1])
