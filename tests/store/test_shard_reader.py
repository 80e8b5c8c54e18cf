"""The direct shard reader equals zarr-python on every codec, dtype and empty chunk; it
falls back to zarr for foreign layouts and turns damage (a flipped bit, a missing image
shard) into the store's UserError; stores written before chunk checksums stay readable."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from tcsmae.errors import UserError
from tcsmae.store.reader import open_store
from tcsmae.store.shard_reader import ShardedSliceReader
from tcsmae.store.writer import StoreWriter


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
    damaged_chunk[5:40] = b"\0" * 35  # inside slice 0's zstd frame
    shard.write_bytes(bytes(damaged_chunk))
    with pytest.raises(UserError, match=r"case 'a' slice 0 is unreadable"):
        open_store(path).read_slice(0, 0)


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


def _shard(path, case_id: str, group: str = "images", shard: int = 0):
    return path / group / case_id / "c" / str(shard) / "0" / "0"


def _chunk_span(shard_file, z: int) -> tuple[int, int]:
    """(offset, nbytes) of slice z's chunk in a shard file, from its index (64 x 2 uint64 + crc)."""
    raw = shard_file.read_bytes()
    index = np.frombuffer(raw[-(64 * 16 + 4):-4], "<u8").reshape(64, 2)
    return int(index[z % 64, 0]), int(index[z % 64, 1])


def test_missing_image_shard_is_damage_but_a_missing_label_shard_is_background(tmp_path):
    """rm images/<case>/c/0/0/0 read as 0 HU and training went on; a label shard that is all
    background is legitimately not written and reads as zeros."""
    path = tmp_path / "s.zarr"
    hu = _volume(70, "int16", 8)
    labels = np.zeros(hu.shape, np.uint8)
    labels[66] = 3
    with StoreWriter(path) as w:
        w.write_case("a", hu, {"source_sha256": "1"}, labels)
    assert not _shard(path, "a", "labels").exists()
    store = open_store(path)
    np.testing.assert_array_equal(store.read_label_slice(0, 5), 0)
    shard = _shard(path, "a")
    shard.unlink()
    with pytest.raises(UserError) as exc:
        open_store(path).read_slice(0, 5)
    message = str(exc.value)
    assert "case 'a' slice 5 is unreadable" in message and str(shard) in message and "missing" in message
    assert "tcsmae convert" in message and "--overwrite" in message
    np.testing.assert_array_equal(open_store(path).read_slice(0, 66), hu[66])  # the other shard
    with pytest.raises(UserError, match=r"case 'a' slice 0 is unreadable.*missing"):
        open_store(path).read_volume("a")
    np.testing.assert_array_equal(open_store(path).read_volume("a", labels=True), labels)


def _foreign_image(path, hu, checksummed: bool) -> None:
    """Replace images/a by the same data unsharded (read through zarr-python), with or without
    a crc32c after zstd."""
    import zarr
    from zarr.codecs import Crc32cCodec, ZstdCodec

    root = zarr.open_group(str(path), mode="a")
    chain = [ZstdCodec(level=3), Crc32cCodec()] if checksummed else [ZstdCodec(level=3)]
    root.create_array("images/a", shape=hu.shape, dtype=np.int16, chunks=(2, 16, 12), compressors=chain,
                      overwrite=True)[...] = hu.astype(np.int16)


def _foreign_store(tmp_path, checksummed: bool):
    """A one-case store whose image array is then rewritten in a foreign layout; (path, hu)."""
    path = tmp_path / "s.zarr"
    hu = _volume(4, "int16", 9)
    with StoreWriter(path) as w:
        w.write_case("a", hu, {"source_sha256": "1"})
    _foreign_image(path, hu, checksummed)
    return path, hu


def test_missing_chunk_file_of_a_foreign_image_layout_is_damage(tmp_path):
    path, hu = _foreign_store(tmp_path, checksummed=True)
    chunk = path / "images" / "a" / "c" / "1" / "0" / "0"
    chunk.unlink()
    store = open_store(path)
    np.testing.assert_array_equal(store.read_slice(0, 1), hu[1])
    with pytest.raises(UserError, match=r"case 'a' slice 3 is unreadable.*c/1/0/0.*missing.*--overwrite"):
        store.read_slice(0, 3)


def test_missing_chunk_file_of_a_foreign_layout_without_checksums_reads_as_fill(tmp_path):
    """As zarr reads it: only the checksummed format writes every image chunk."""
    path, hu = _foreign_store(tmp_path, checksummed=False)
    (path / "images" / "a" / "c" / "1" / "0" / "0").unlink()
    np.testing.assert_array_equal(open_store(path).read_slice(0, 3), 0)


def test_checksum_failure_on_the_zarr_path_names_case_slice_file_and_fix(tmp_path):
    """zarr-python's bare "Stored and computed checksum do not match" named no file."""
    path, hu = _foreign_store(tmp_path, checksummed=True)
    chunk = path / "images" / "a" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    with pytest.raises(UserError) as exc:
        open_store(path).read_slice(0, 2)
    message = str(exc.value)
    assert "case 'a' slice 2 is unreadable" in message and str(chunk) in message, message
    assert "crc32c checksum" in message and "tcsmae convert" in message and "--overwrite" in message


def test_all_zero_image_shard_is_still_written(tmp_path):
    """So that a missing image shard file is never legitimate."""
    path = tmp_path / "s.zarr"
    hu = _volume(70, "int16", 10)
    hu[:64] = 0
    with StoreWriter(path) as w:
        w.write_case("a", hu, {"source_sha256": "1"})
    assert _shard(path, "a").is_file()
    np.testing.assert_array_equal(open_store(path).read_slice(0, 3), 0)


@pytest.mark.parametrize("codec", ["zstd", "lz4", "none"])
def test_flipped_bit_in_a_chunk_fails_its_checksum_on_every_read(tmp_path, codec):
    """One flipped bit in a zstd chunk changed a slice by 32776 HU and pretraining ran on."""
    import warnings

    import zarr

    path = tmp_path / "s.zarr"
    hu = _volume(4, "int16", 11)
    with StoreWriter(path, codec=codec) as w:
        w.write_case("a", hu, {"source_sha256": "1"})
    shard = _shard(path, "a")
    offset, nbytes = _chunk_span(shard, 2)
    data = bytearray(shard.read_bytes())
    data[offset + nbytes // 2] ^= 0x04
    shard.write_bytes(bytes(data))
    store = open_store(path)
    with pytest.raises(UserError) as exc:
        store.read_slice(0, 2)
    message = str(exc.value)
    assert "case 'a' slice 2 is unreadable" in message and "crc32c" in message and str(shard) in message
    assert "--overwrite" in message
    np.testing.assert_array_equal(store.read_slice(0, 1), hu[1])  # its neighbours are intact
    with pytest.raises(ValueError, match="checksum"), warnings.catch_warnings():  # zarr checks it too
        warnings.simplefilter("ignore")  # lz4: "not in the Zarr v3 spec"
        zarr.open_array(str(path / "images" / "a"), mode="r")[2]


@pytest.mark.parametrize("codec", ["zstd", "lz4", "none"])
def test_stores_written_before_chunk_checksums_stay_readable(tmp_path, codec):
    """The previous writer: no crc32c after the compressor, all-fill shards not written."""
    import warnings

    import zarr
    from zarr.codecs import ZstdCodec

    from tcsmae.store import writer as store_writer

    path = tmp_path / "s.zarr"
    hu = _volume(70, "int16", 12).astype(np.int16)
    labels = np.zeros(hu.shape, np.uint8)
    with StoreWriter(path, codec=codec) as w:
        w.write_case("a", hu, {"source_sha256": "1"}, labels)
    old_chain = {"zstd": ZstdCodec(level=3), "none": None}.get(codec)
    if codec == "lz4":
        old_chain = store_writer._compressors("lz4")[0]
    root = zarr.open_group(str(path), mode="a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for group, data in (("images", hu), ("labels", labels)):
            root.create_array(f"{group}/a", shape=data.shape, dtype=data.dtype, chunks=(1, 16, 12),
                              shards=(64, 16, 12), compressors=old_chain, fill_value=0,
                              overwrite=True)[...] = data
    reader = ShardedSliceReader.for_array(path / "images" / "a", shards_required=True)
    assert reader is not None and not reader.checksummed
    store = open_store(path)
    for z in (0, 1, 65, 69):
        np.testing.assert_array_equal(store.read_slice(0, z), hu[z])
        np.testing.assert_array_equal(store.read_label_slice(0, z), 0)


def test_missing_all_zero_shard_of_a_store_written_before_checksums_is_no_damage(tmp_path):
    """The previous writer skipped image shards whose slices were all 0 (a zero-padded partial
    last shard): reads, the converter's damage check and --verify called that damage."""
    import warnings

    import zarr
    from zarr.codecs import ZstdCodec

    from tcsmae.cli import main as cli
    from tcsmae.store.format import content_sha256

    path = tmp_path / "s.zarr"
    hu = _volume(70, "int16", 13).astype(np.int16)
    hu[64:] = 0  # the padded partial last shard
    with StoreWriter(path) as w:
        w.write_case("a", hu, {"source_sha256": "1"})
    attrs = dict(open_store(path).case_attrs("a"))
    root = zarr.open_group(str(path), mode="a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root.create_array("images/a", shape=hu.shape, dtype=hu.dtype, chunks=(1, 16, 12), shards=(64, 16, 12),
                          compressors=ZstdCodec(level=3), fill_value=0, overwrite=True,
                          attributes=attrs)[...] = hu  # the old writer: no write_empty_chunks
    assert not _shard(path, "a", shard=1).exists() and attrs["content_sha256"] == content_sha256(hu)
    store = open_store(path)
    np.testing.assert_array_equal(store.read_slice(0, 66), 0)
    np.testing.assert_array_equal(store.read_volume("a"), hu)
    with StoreWriter(path) as w:
        assert w.damage("a") is None
    assert cli(["info", str(path), "--verify"]) == 0
