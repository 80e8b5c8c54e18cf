"""The store's commit protocol: index last and atomic, leftovers cleaned, one writer."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from tcsmae.cli import main as cli
from tcsmae.errors import UserError
from tcsmae.store.format import INDEX_FILE, body_fraction, content_sha256, storage_dtype
from tcsmae.store.reader import open_store
from tcsmae.store.writer import StoreWriter, write_case_arrays


def _hu(z=5, seed=0):
    return np.random.default_rng(seed).integers(-1024, 1500, (z, 16, 12)).astype(np.float64)


def test_round_trip_dtype_attrs_and_index(tmp_path):
    path = tmp_path / "s.zarr"
    hu_int = _hu(70)  # more than one shard of 64 slices
    hu_float = _hu(4, seed=1) + 0.25
    labels = (hu_int > 0).astype(np.uint8)
    with StoreWriter(path) as w:
        w.write_case("a", hu_int, {"spacing_mm": [2.0, 1.0, 1.0], "source_sha256": "s1"}, labels)
        w.write_case("b", hu_float, {"source_sha256": "s2"})
    store = open_store(path)
    assert store.case_ids == ["a", "b"]
    assert store.image("a").dtype == np.int16 and store.image("b").dtype == np.float32
    assert store.image("a").chunks == (1, 16, 12)
    np.testing.assert_array_equal(store.image("a")[:], hu_int)
    np.testing.assert_array_equal(store.read_slice(1, 3), hu_float[3].astype(np.float32))
    np.testing.assert_array_equal(store.read_label_slice(0, 69), labels[69])
    np.testing.assert_array_equal(store.read_volume("a"), hu_int)
    assert store.read_volume("a").dtype == np.int16 and store.read_volume("a", labels=True).dtype == np.uint8
    assert store.read_slice(0, 0).dtype == np.float32
    assert store.n_slices == 74
    np.testing.assert_array_equal(store.slice_z[:3], [0, 1, 2])
    np.testing.assert_allclose(store.body_fraction[:70], body_fraction(hu_int))
    attrs = store.case_attrs("a")
    assert attrs["spacing_mm"] == [2.0, 1.0, 1.0] and attrs["codec"] == "zstd"
    assert attrs["content_sha256"] == content_sha256(hu_int.astype(np.int16))
    assert not store.has_labels("b")
    with pytest.raises(UserError, match="no label map"):
        store.read_label_slice(1, 0)
    # picklable for parallel readers
    again = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(again.read_slice(0, 5), hu_int[5])


def test_storage_dtype_rules():
    assert storage_dtype(np.array([1.0, -1024.0])) == np.int16
    assert storage_dtype(np.array([1.5])) == np.float32
    assert storage_dtype(np.array([40000.0])) == np.float32
    assert storage_dtype(np.array([1, 2], dtype=np.int32)) == np.int16


def test_missing_index_refused_and_foreign_folder(tmp_path):
    path = tmp_path / "s.zarr"
    with StoreWriter(path) as w:
        w.write_case("a", _hu(), {"source_sha256": "x"})
    (path / INDEX_FILE).unlink()
    with pytest.raises(UserError, match="incomplete"):
        open_store(path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("x")
    with pytest.raises(UserError, match="not a Zarr store"):
        open_store(tmp_path / "other")
    with pytest.raises(UserError, match="not a Zarr store") as exc:
        StoreWriter(tmp_path / "other").__enter__()
    # the output of a conversion: `tcsmae convert` is the command just run, not the fix
    assert "choose a new or empty folder" in str(exc.value) and "create one" not in str(exc.value)


def test_uncommitted_case_invisible_then_cleaned(tmp_path):
    path = tmp_path / "s.zarr"
    with StoreWriter(path) as w:
        w.write_case("a", _hu(), {"source_sha256": "x"})
    # a crash after the arrays, before the commit:
    write_case_arrays(path, "half", _hu(3), {"source_sha256": "y"}, labels=np.zeros((3, 16, 12), np.uint8))
    assert open_store(path).case_ids == ["a"]
    with StoreWriter(path) as w:
        assert sorted(w.cleaned) == ["images/half", "labels/half"]
    assert not (path / "images" / "half").exists()
    assert open_store(path).case_ids == ["a"]


def test_discard_if_empty_removes_only_a_new_store_without_cases(tmp_path):
    with StoreWriter(tmp_path / "new.zarr", discard_if_empty=True):
        pass
    assert not (tmp_path / "new.zarr").exists()
    with StoreWriter(tmp_path / "plain.zarr"):  # default: an empty store is kept
        pass
    assert open_store(tmp_path / "plain.zarr").case_ids == []
    with StoreWriter(tmp_path / "plain.zarr", discard_if_empty=True):  # existed before
        pass
    assert (tmp_path / "plain.zarr").is_dir()
    with StoreWriter(tmp_path / "used.zarr", discard_if_empty=True) as w:
        w.write_case("a", _hu(), {"source_sha256": "x"})
    assert open_store(tmp_path / "used.zarr").case_ids == ["a"]


def test_second_writer_refused(tmp_path):
    path = tmp_path / "s.zarr"
    with StoreWriter(path):
        with pytest.raises(UserError, match="another process"):
            with StoreWriter(path):
                pass
    with StoreWriter(path):  # released again
        pass


def test_replace_and_remove_keep_index_consistent(tmp_path):
    path = tmp_path / "s.zarr"
    with StoreWriter(path, codec="lz4") as w:
        w.write_case("a", _hu(3), {"source_sha256": "1"})
        w.write_case("b", _hu(4, 1), {"source_sha256": "2"})
        w.write_case("c", _hu(2, 2), {"source_sha256": "3"})
        w.remove_case("a")
        w.write_case("b", _hu(6, 3), {"source_sha256": "4"})
        assert w.source_sha256("b") == "4" and w.source_sha256("a") is None
    store = open_store(path)
    assert store.case_ids == ["c", "b"]
    assert list(store.slice_case) == [0, 0, 1, 1, 1, 1, 1, 1]
    np.testing.assert_array_equal(store.read_slice(1, 5), _hu(6, 3)[5])
    assert store.case_attrs("b")["codec"] == "lz4"


def test_bad_case_id_and_codec(tmp_path):
    with pytest.raises(UserError, match="case id"):
        write_case_arrays(tmp_path / "s.zarr", "a/b", _hu(), {})
    with pytest.raises(UserError, match="codec"):
        StoreWriter(tmp_path / "s.zarr", codec="gzip9")


def test_damaged_index_or_chunk_is_a_user_error_naming_the_fix(tmp_path):
    path = tmp_path / "s.zarr"
    with StoreWriter(path) as w:
        w.write_case("a", _hu(), {"source_sha256": "x"})
    assert (path / INDEX_FILE).stat().st_mode & 0o044  # readable by others (not mkstemp's 0600)
    store = open_store(path)
    shard = next(p for p in (path / "images" / "a").rglob("*") if p.is_file() and p.name != "zarr.json")
    shard.write_bytes(shard.read_bytes()[:20])  # a truncated shard
    with pytest.raises(UserError, match=r"case 'a' slice 1 is unreadable.*--verify"):
        open_store(path).read_slice(0, 1)
    del store
    (path / INDEX_FILE).write_text("not an index")
    with pytest.raises(UserError, match="unreadable.*delete"):
        open_store(path)


@pytest.mark.parametrize("group", ["images", "labels"])
def test_broken_array_metadata_is_a_user_error_naming_the_file(tmp_path, capsys, group):
    """A broken array zarr.json gave a JSONDecodeError traceback in `info` and `pretrain`."""
    path = tmp_path / "s.zarr"
    with StoreWriter(path) as w:
        w.write_case("a", _hu(), {"source_sha256": "x"}, labels=np.zeros((5, 16, 12), np.uint8))
    meta = path / group / "a" / "zarr.json"
    meta.write_text(meta.read_text()[:40])
    store = open_store(path)
    with pytest.raises(UserError) as exc:
        store.image("a") if group == "images" else store.label("a")
    assert str(meta) in str(exc.value) and "--overwrite" in str(exc.value)
    with pytest.raises(UserError, match="zarr.json"):
        store.read_slice(0, 1) if group == "images" else store.read_label_slice(0, 1)
    assert cli(["info", str(path), "--verify"]) in (1, 2)
    printed = capsys.readouterr()
    assert str(meta) in printed.out + printed.err and "Traceback" not in printed.err
    with StoreWriter(path) as w:  # a re-run of the converter reports the case as damaged
        assert "unreadable" in w.damage("a")


def test_no_air_warning_for_values_that_are_not_hu():
    """A NIfTI volume without its intercept (values 0..2231) converted with no warning."""
    from tcsmae.store.format import body_voxels, no_air_warning

    rng = np.random.default_rng(0)
    not_hu = rng.integers(0, 2232, (4, 32, 32))
    warning = no_air_warning(not_hu, body_voxels(not_hu), "vol.nii.gz")
    assert warning is not None and warning.startswith("no air found in vol.nii.gz: are these HU? "
                                                      "(missing rescale intercept?)")
    ct = not_hu - 1024
    assert no_air_warning(ct, body_voxels(ct), "vol.nii.gz") is None
    empty = np.zeros((0, 4, 4))
    assert no_air_warning(empty, body_voxels(empty), "empty") is None


def test_no_air_warning_needs_no_copy_of_the_volume():
    """When it fired, the warning took np.percentile of the whole volume: a float64 copy,
    1.3 s and 200 MiB for 400x512x512."""
    import tracemalloc

    from tcsmae.store.format import body_voxels, no_air_warning

    not_hu = np.random.default_rng(1).integers(0, 2232, (64, 256, 256)).astype(np.int16)  # 8 MiB
    tracemalloc.start()
    try:
        warning = no_air_warning(not_hu, body_voxels(not_hu), "vol.nii.gz")  # as write_case_arrays counts
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert warning is not None and "0.00% of voxels" in warning and "lowest value 0" in warning
    assert peak < not_hu.nbytes / 8, peak


@pytest.mark.parametrize("group", ["images", "labels"])
def test_broken_group_file_is_reported_by_verify_and_refused_by_the_writer(tmp_path, capsys, group):
    """A broken images/zarr.json passed `info --verify`, and `convert --overwrite` then died
    with a JSONDecodeError traceback."""
    from tcsmae.store.format import GROUP_FILE

    path = tmp_path / "s.zarr"
    with StoreWriter(path) as w:
        w.write_case("a", _hu(), {"source_sha256": "x"})
    meta = path / group / "zarr.json"
    meta.write_text('{"zarr_fo')
    assert cli(["info", str(path), "--verify"]) == 1
    out = capsys.readouterr().out
    assert f"store: {meta} is unreadable" in out.split("verification FAILED:")[1] and GROUP_FILE in out
    with pytest.raises(UserError) as exc:
        with StoreWriter(path):
            pass
    assert str(meta) in str(exc.value) and GROUP_FILE in str(exc.value)
    meta.write_text(GROUP_FILE)  # the fix it names
    assert cli(["info", str(path), "--verify"]) == 0
    with StoreWriter(path) as w:
        w.write_case("b", _hu(), {"source_sha256": "y"})


def test_a_failed_replacement_keeps_the_committed_case(tmp_path):
    """write_case removed the committed case before writing the new one: a write that failed
    (here a label map on another grid, found after the image was written) lost the case."""
    path = tmp_path / "s.zarr"
    with StoreWriter(path) as w:
        w.write_case("a", _hu(seed=1), {"source_sha256": "x"})
        with pytest.raises(UserError, match="label map shape"):
            w.write_case("a", _hu(seed=2), {"source_sha256": "y"}, labels=np.zeros((2, 2, 2), np.uint8))
        assert w.source_sha256("a") == "x"
    store = open_store(path)
    np.testing.assert_array_equal(store.read_volume("a"), _hu(seed=1))
    assert sorted(p.name for p in (path / "images").iterdir() if p.is_dir()) == ["a"]
    with StoreWriter(path) as w:
        w.write_case("a", _hu(seed=2), {"source_sha256": "y"})
    np.testing.assert_array_equal(open_store(path).read_volume("a"), _hu(seed=2))


def test_label_ids_recorded_and_read_without_the_attribute(tmp_path):
    """finetune learns which ids a store holds from `label_ids`; older stores are scanned."""
    import json

    path = tmp_path / "s.zarr"
    small = np.zeros((3, 16, 12), np.uint8)
    small[1, 2:5, 3:7], small[2, 0, 0] = 7, 2
    large = small.astype(np.int32) * 100  # ids above 255: stored as int32
    with StoreWriter(path) as w:
        w.write_case("small", _hu(3), {"source_sha256": "a"}, labels=small)
        w.write_case("large", _hu(3), {"source_sha256": "b"}, labels=large)
        w.write_case("none", _hu(3), {"source_sha256": "c"})
    store = open_store(path)
    assert store.label("small").attrs["label_ids"] == [0, 2, 7]
    assert store.label_ids("small") == [0, 2, 7] and store.label_ids("large") == [0, 200, 700]
    with pytest.raises(UserError, match="has no label map"):
        store.label_ids("none")
    for case in ("small", "large"):  # as written before label_ids existed
        meta = path / "labels" / case / "zarr.json"
        node = json.loads(meta.read_text())
        del node["attributes"]["label_ids"]
        meta.write_text(json.dumps(node))
    older = open_store(path)
    assert "label_ids" not in older.label("small").attrs
    assert older.label_ids("small") == [0, 2, 7] and older.label_ids("large") == [0, 200, 700]
