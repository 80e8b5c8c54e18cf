"""The DICOM converter as a command: exit codes, re-runs, --overwrite, crashes, the lock,
adding series to a store, manifests, the script form and parallel workers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tcsmae.cli import main
from tcsmae.store.reader import open_store
from tcsmae.store.writer import StoreWriter

from dicom_factory import ct_series, dicom_affine, write_nifti_labels, write_series

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def convert(capsys):
    def run(*args, workers: int = 1):
        code = main(["convert", *map(str, args), "--workers", str(workers)])
        out = capsys.readouterr()
        return code, out.out + out.err

    return run


@pytest.fixture(scope="module")
def two_series(tmp_path_factory):
    """Folders a/ and b/ with one clean series each; returns (root, series_a, series_b)."""
    root = tmp_path_factory.mktemp("two")
    a, b = ct_series(n=5, seed=1), ct_series(n=6, seed=2)
    write_series(a.datasets, root / "a")
    write_series(b.datasets, root / "b")
    return root, a, b


def uid(series) -> str:
    return series.datasets[0].SeriesInstanceUID


def test_exit_0_converted_then_up_to_date_on_rerun(tmp_path, convert, two_series):
    root, a, b = two_series
    out_zarr = tmp_path / "s.zarr"
    code, out = convert(root, "-o", out_zarr)
    assert code == 0, out
    store = open_store(out_zarr)
    assert sorted(store.case_ids) == sorted([uid(a), uid(b)])
    np.testing.assert_array_equal(store.image(uid(a))[:], a.hu)
    index_mtime = (out_zarr / "slice_index.npz").stat().st_mtime_ns
    shard = next((out_zarr / "images" / uid(a)).rglob("c/*"))
    shard_mtime = shard.stat().st_mtime_ns

    code, out = convert(root, "-o", out_zarr)
    assert code == 0, out
    assert out.count("up to date") >= 2 and "0 converted" in out
    assert (out_zarr / "slice_index.npz").stat().st_mtime_ns == index_mtime
    assert shard.stat().st_mtime_ns == shard_mtime  # nothing rewritten

    code, out = convert(root, "-o", out_zarr, "--overwrite")
    assert code == 0 and "2 converted" in out, out
    assert shard.stat().st_mtime_ns != shard_mtime
    assert sorted(open_store(out_zarr).case_ids) == sorted([uid(a), uid(b)])


def test_changed_source_is_refused_without_overwrite(tmp_path, convert):
    s = ct_series(n=4)
    paths = write_series(s.datasets, tmp_path / "s")
    assert convert(tmp_path / "s", "-o", tmp_path / "o.zarr")[0] == 0
    ds = s.datasets[0]
    ds.RescaleIntercept = -1000
    ds.save_as(paths[0], enforce_file_format=True)
    code, out = convert(tmp_path / "s", "-o", tmp_path / "o.zarr")
    assert code == 1 and "--overwrite" in out, out
    assert "from different DICOM files" in out and "label map" not in out
    code, out = convert(tmp_path / "s", "-o", tmp_path / "o.zarr", "--overwrite")
    assert code == 0, out
    store = open_store(tmp_path / "o.zarr")
    k = s.order.index(0)
    np.testing.assert_array_equal(store.image(uid(s))[k], s.hu[k] + 24)


def test_exit_codes_3_partial_and_1_nothing(tmp_path, convert, two_series):
    root, a, _ = two_series
    bad = ct_series(n=2, seed=9)
    write_series(bad.datasets, tmp_path / "bad")
    code, out = convert(root / "a", tmp_path / "bad", "-o", tmp_path / "p.zarr")
    assert code == 3, out
    code, out = convert(tmp_path / "bad", "-o", tmp_path / "n.zarr")
    assert code == 1, out
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("hello")
    code, out = convert(tmp_path / "junk", "-o", tmp_path / "j.zarr")
    assert code == 1 and "1 file(s): not a DICOM file" in out


def test_nothing_converted_leaves_no_new_store_but_keeps_existing_ones(tmp_path, convert, two_series):
    root, a, _ = two_series
    bad = ct_series(n=2, seed=9)  # too few slices: refused
    write_series(bad.datasets, tmp_path / "bad")
    code, out = convert(tmp_path / "bad", "-o", tmp_path / "new.zarr")
    assert code == 1 and "new.zarr not created: nothing converted" in out, out
    assert not (tmp_path / "new.zarr").exists()
    (tmp_path / "empty.zarr").mkdir()  # a folder the user made: never deleted
    assert convert(tmp_path / "bad", "-o", tmp_path / "empty.zarr")[0] == 1
    assert (tmp_path / "empty.zarr").is_dir()
    assert convert(root / "a", "-o", tmp_path / "kept.zarr")[0] == 0
    assert convert(tmp_path / "bad", "-o", tmp_path / "kept.zarr")[0] == 1
    assert open_store(tmp_path / "kept.zarr").case_ids == [uid(a)]


def test_exit_2_usage_errors(tmp_path, convert, two_series, capsys):
    root, _, _ = two_series
    code, out = convert(tmp_path / "missing", "-o", tmp_path / "u.zarr")
    assert code == 2 and "does not exist" in out
    code, out = convert(root, "-o", tmp_path / "u.zarr", "--case-id", "x")
    assert code == 2 and "exactly one image series" in out and "found 2" in out
    code, out = convert(root / "a", "-o", tmp_path / "u.zarr", "--case-id", "bad/id")
    assert code == 2 and "not usable" in out
    code, out = convert(root / "a", "-o", tmp_path / "u.zarr", "--labels", tmp_path / "nope.nii.gz")
    assert code == 2 and "does not exist" in out
    code, out = convert(root / "a", "-o", tmp_path / "u.zarr", workers=0)
    assert code == 2 and "--workers" in out
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(root)])  # no -o
    assert exc.value.code == 2
    (tmp_path / "not_a_store").mkdir()
    (tmp_path / "not_a_store" / "file.txt").write_text("x")
    code, out = convert(root / "a", "-o", tmp_path / "not_a_store")
    assert code == 2 and "not a Zarr store" in out
    assert "choose a new or empty folder" in out and "create one with" not in out
    code, out = convert(root / "a", "-o", tmp_path / "not_a_store" / "file.txt" / "s.zarr")
    assert code == 1 and "cannot write the store" in out and "Traceback" not in out


def test_case_id_override(tmp_path, convert, two_series):
    root, a, _ = two_series
    code, out = convert(root / "a", "-o", tmp_path / "c.zarr", "--case-id", "patient7_ct")
    assert code == 0, out
    store = open_store(tmp_path / "c.zarr")
    assert store.case_ids == ["patient7_ct"]
    assert store.case_attrs("patient7_ct")["series_uid"] == uid(a)


def test_patient_id_for_every_series_in_src(tmp_path, convert, two_series):
    root, a, b = two_series
    code, out = convert(root, "-o", tmp_path / "p.zarr", "--patient-id", "P-3")
    assert code == 0, out
    store = open_store(tmp_path / "p.zarr")
    assert [store.case_attrs(c)["patient_id"] for c in store.case_ids] == ["P-3", "P-3"]  # the DICOM says PAT-1
    code, out = convert(root / "a", "-o", tmp_path / "p.zarr", "--patient-id", "P-4")
    assert code == 1 and "same DICOM files, but its patient id changed from 'P-3' to 'P-4'" in out, out
    assert convert(root / "a", "-o", tmp_path / "p.zarr", "--patient-id", "P-4", "--overwrite")[0] == 0
    assert open_store(tmp_path / "p.zarr").case_attrs(uid(a))["patient_id"] == "P-4"

    manifest = tmp_path / "m.csv"
    manifest.write_text(f"source,patient_id\n{root / 'b'},P-5\n")
    code, out = convert("--manifest", manifest, "-o", tmp_path / "u.zarr", "--patient-id", "P-6")
    assert code == 2 and "patient_id column" in out, out
    code, out = convert(root / "a", "--manifest", manifest, "-o", tmp_path / "u.zarr", "--patient-id", "P-6")
    assert code == 2 and "patient_id column" in out, out
    code, out = convert(root / "a", "-o", tmp_path / "u.zarr", "--patient-id", " ")
    assert code == 2 and "--patient-id is blank" in out, out
    assert not (tmp_path / "u.zarr").exists()


def test_nifti_sources_point_to_convert_nifti(tmp_path, convert, two_series):
    root, a, _ = two_series
    volume = tmp_path / "ct-small.nii.gz"
    write_nifti_labels(np.zeros((4, 4, 3), np.uint8), np.eye(4), volume)  # any NIfTI file
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"source,labels\n{root / 'a'},\n{volume},{volume}\n")
    code, out = convert("--manifest", manifest, "-o", tmp_path / "n.zarr")
    assert code == 2 and f"{volume} ({manifest} line 3) is a NIfTI file" in out, out
    assert "tcsmae convert-nifti --manifest" in out and "exactly one image series" not in out
    code, out = convert(volume, "-o", tmp_path / "n.zarr")
    assert code == 2 and "tcsmae convert-nifti FILE.nii.gz" in out, out
    assert not (tmp_path / "n.zarr").exists()


@pytest.mark.parametrize("stored, stored_digest, plan, says", [
    ({"dicom_sha256": "d1"}, "x", dict(dicom_sha256="d2"), "from different DICOM files"),
    ({"dicom_sha256": "d1", "patient_id": "PAT-1"}, "x", dict(labels="seg.nii.gz"),
     "but a label map was added (seg.nii.gz)"),
    ({"dicom_sha256": "d1", "patient_id": "PAT-1", "labels_source": "seg.nii.gz"}, "x", dict(),
     "but its label map (seg.nii.gz) is not given in this run"),
    ({"dicom_sha256": "d1", "patient_id": "PAT-1", "labels_source": "a.nii.gz"}, "x", dict(labels="b.nii.gz"),
     "but its label map changed from a.nii.gz to b.nii.gz"),
    ({"dicom_sha256": "d1", "patient_id": "PAT-1", "labels_source": "a.nii.gz"}, "x", dict(labels="a.nii.gz"),
     "but the label map a.nii.gz changed since"),
    ({"patient_id": "PAT-1"}, "d1", dict(labels="seg.nii.gz"), "but a label map was added"),  # before dicom_sha256
    ({"patient_id": "PAT-1"}, "x", dict(labels="seg.nii.gz"), "from other inputs (DICOM files, label map or patient id)"),
])
def test_refusal_of_a_changed_case_names_what_changed(stored, stored_digest, plan, says):
    from types import SimpleNamespace

    from tcsmae.convert.dicom_to_zarr import _why_changed

    plan = SimpleNamespace(**{"dicom_sha256": "d1", "labels": None, "patient_id": None,
                              "slices": [SimpleNamespace(patient_id="PAT-1")], **plan})
    reason = _why_changed(stored, stored_digest, plan)
    assert says in reason and "--overwrite" in reason, reason


def test_case_id_without_series_uid_is_a_stable_digest(tmp_path, convert):
    s = ct_series(n=4, series_uid=None)
    write_series(s.datasets, tmp_path / "s")
    convert(tmp_path / "s", "-o", tmp_path / "1.zarr")
    (tmp_path / "moved").mkdir()
    os.rename(tmp_path / "s", tmp_path / "moved" / "elsewhere")
    convert(tmp_path / "moved", "-o", tmp_path / "2.zarr")
    ids1, ids2 = open_store(tmp_path / "1.zarr").case_ids, open_store(tmp_path / "2.zarr").case_ids
    assert ids1 == ids2 and ids1[0].startswith("dcm-")
    other = ct_series(n=4, series_uid=None, seed=5)
    write_series(other.datasets, tmp_path / "o")
    convert(tmp_path / "o", "-o", tmp_path / "3.zarr")
    assert open_store(tmp_path / "3.zarr").case_ids != ids1


def test_crash_mid_conversion_leaves_no_half_case(tmp_path, convert, two_series, monkeypatch):
    root, a, b = two_series
    out_zarr = tmp_path / "c.zarr"
    assert convert(root / "a", "-o", out_zarr)[0] == 0

    def crash(self, case_id, body_frac, source_sha256):
        raise RuntimeError("simulated crash after the arrays were written")

    monkeypatch.setattr(StoreWriter, "commit_case", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["convert", str(root / "b"), "-o", str(out_zarr), "--workers", "1"])
    monkeypatch.undo()
    assert (out_zarr / "images" / uid(b)).is_dir()  # the arrays were written ...
    store = open_store(out_zarr)
    assert store.case_ids == [uid(a)]  # ... but the case is not visible
    assert store.n_slices == 5
    np.testing.assert_array_equal(store.image(uid(a))[:], a.hu)

    code, out = convert(root / "b", "-o", out_zarr)
    assert code == 0, out
    assert f"removed leftovers of unfinished cases: images/{uid(b)}" in out
    store = open_store(out_zarr)
    assert sorted(store.case_ids) == sorted([uid(a), uid(b)])
    np.testing.assert_array_equal(store.image(uid(b))[:], b.hu)


def test_second_writer_fails_clearly(tmp_path, convert, two_series):
    root, _, _ = two_series
    with StoreWriter(tmp_path / "l.zarr"):
        code, out = convert(root / "a", "-o", tmp_path / "l.zarr")
    assert code != 0
    assert "being written by another process" in out
    assert "Traceback" not in out


def test_adding_series_keeps_the_store_readable(tmp_path, convert, two_series):
    root, a, b = two_series
    out_zarr = tmp_path / "grow.zarr"
    assert convert(root / "a", "-o", out_zarr)[0] == 0
    reader = open_store(out_zarr)  # a reader opened before the addition
    assert convert(root / "b", "-o", out_zarr)[0] == 0
    np.testing.assert_array_equal(reader.image(uid(a))[:], a.hu)
    assert reader.case_ids == [uid(a)]
    store = open_store(out_zarr)
    assert store.case_ids == [uid(a), uid(b)]
    assert store.n_slices == 11
    np.testing.assert_array_equal(store.slice_case, [0] * 5 + [1] * 6)
    np.testing.assert_array_equal(store.read_slice(1, 2), b.hu[2].astype(np.float32))


def test_manifest_rows_with_overrides_and_labels(tmp_path, convert, two_series):
    root, a, b = two_series
    labels = (a.hu > 500).astype(np.uint8)  # the spine
    write_nifti_labels(labels, dicom_affine(a), tmp_path / "a_seg.nii.gz")
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "source,labels,case_id,patient_id\n"
        f"{root / 'a'},a_seg.nii.gz,caseA,P-7\n"
        f"{root / 'b'},,,\n"
    )
    code, out = convert("--manifest", manifest, "-o", tmp_path / "m.zarr")
    assert code == 0, out
    store = open_store(tmp_path / "m.zarr")
    assert sorted(store.case_ids) == sorted(["caseA", uid(b)])
    assert store.case_attrs("caseA")["patient_id"] == "P-7"
    assert store.case_attrs(uid(b))["patient_id"] == "PAT-1"
    np.testing.assert_array_equal(store.label("caseA")[:], labels)
    assert not store.has_labels(uid(b))
    assert store.repair_command("caseA") == (f"`tcsmae convert {root / 'a'} --labels {tmp_path / 'a_seg.nii.gz'} "
                                             f"--case-id caseA --patient-id P-7 --codec zstd -o {store.path} --overwrite`")
    assert store.repair_command(uid(b)) == f"`tcsmae convert {root / 'b'} --codec zstd -o {store.path} --overwrite`"


def test_manifest_mistakes_are_usage_errors(tmp_path, convert):
    from tcsmae.convert.manifest import read_manifest
    from tcsmae.errors import UserError

    m = tmp_path / "m.csv"
    m.write_text("path,labels\nx,\n")
    with pytest.raises(UserError, match="no 'source' column"):
        read_manifest(m)
    m.write_text(f"source,case_id\n{tmp_path},a\n{tmp_path},a\n")
    with pytest.raises(UserError, match="line 3.*already used on line 2"):
        read_manifest(m)
    m.write_text("source\nnot_there\n")
    with pytest.raises(UserError, match="line 2: source .*not_there does not exist"):
        read_manifest(m)
    m.write_text(f"source,labels,notes\n{tmp_path},,anything\n\n")
    rows = read_manifest(m)
    assert len(rows) == 1 and rows[0].labels is None and rows[0].case_id is None and rows[0].source == tmp_path
    code, out = convert("--manifest", tmp_path / "none.csv", "-o", tmp_path / "x.zarr")
    assert code == 2 and "does not exist" in out
    m.write_text(f"source,case_id\n{tmp_path},bad/id\n")
    code, out = convert("--manifest", m, "-o", tmp_path / "x.zarr")
    assert code == 2 and "'bad/id' is not usable" in out


def test_script_form_with_two_workers(tmp_path, two_series):
    """`python convert/dicom_to_zarr.py` goes through argparse and a real process pool."""
    root, a, b = two_series
    proc = subprocess.run(
        [sys.executable, str(REPO / "convert" / "dicom_to_zarr.py"), str(root), "-o", str(tmp_path / "w.zarr"),
         "--workers", "2", "--codec", "lz4"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 converted (11 slices" in proc.stdout
    store = open_store(tmp_path / "w.zarr")
    np.testing.assert_array_equal(store.image(uid(a))[:], a.hu)
    np.testing.assert_array_equal(store.image(uid(b))[:], b.hu)
    assert store.case_attrs(uid(b))["codec"] == "lz4"
    proc = subprocess.run([sys.executable, str(REPO / "convert" / "dicom_to_zarr.py"), str(root)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "-o" in proc.stderr
    proc = subprocess.run([sys.executable, str(REPO / "convert" / "dicom_to_zarr.py"), str(tmp_path / "nope"), "-o", str(tmp_path / "x.zarr")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_parallel_workers_report_failures_like_one_worker(tmp_path, convert, two_series):
    root, a, b = two_series
    bad = ct_series(n=4, seed=11)
    paths = write_series(bad.datasets, tmp_path / "bad")
    paths[1].write_bytes(paths[1].read_bytes()[:-100])  # truncated pixel data
    code, out = convert(root, tmp_path / "bad", "-o", tmp_path / "par.zarr", workers=2)
    assert code == 3, out
    assert str(paths[1]) in out and "cannot decode pixel data" in out
    store = open_store(tmp_path / "par.zarr")
    assert sorted(store.case_ids) == sorted([uid(a), uid(b)])
    np.testing.assert_array_equal(store.image(uid(b))[:], b.hu)
    assert not (tmp_path / "par.zarr" / "images" / uid(bad)).exists()  # failed case's arrays removed


def test_worker_process_killed_after_writing_arrays(tmp_path, convert, two_series, monkeypatch):
    """A worker dies (as if killed for memory) after writing its case: no half case, clear message."""
    import tcsmae.convert.dicom_to_zarr as d2z

    root, a, b = two_series
    original = d2z.write_case_arrays

    def write_then_die(path, case_id, *args, **kwargs):
        result = original(path, case_id, *args, **kwargs)
        if case_id == uid(b):
            os._exit(9)
        return result

    monkeypatch.setattr(d2z, "write_case_arrays", write_then_die)  # forked workers inherit it
    # threads left by earlier tests in this process (torch, DALI) would make the converter use a
    # forkserver, whose workers would not inherit the patch: fork regardless, as on a clean start

    monkeypatch.setattr(d2z, "_fork_safe", lambda: True)
    (tmp_path / "k.zarr").mkdir()  # an existing folder: kept even when nothing gets committed
    code, out = convert(root, "-o", tmp_path / "k.zarr", workers=2)
    monkeypatch.undo()
    assert code in (1, 3), out  # 3 when the other worker's case was committed before the death
    assert "worker process died" in out and "fewer --workers" in out and "Traceback" not in out
    assert uid(b) not in open_store(tmp_path / "k.zarr").case_ids

    assert (tmp_path / "k.zarr" / "images" / uid(b)).is_dir()  # written, never committed
    code, out = convert(root, "-o", tmp_path / "k.zarr", workers=2)
    assert code == 0, out
    # the other worker's case may or may not have been committed before the pool broke
    leftovers = next(line for line in out.splitlines() if "removed leftovers of unfinished cases" in line)
    assert f"images/{uid(b)}" in leftovers
    store = open_store(tmp_path / "k.zarr")
    assert sorted(store.case_ids) == sorted([uid(a), uid(b)])
    np.testing.assert_array_equal(store.image(uid(b))[:], b.hu)


def test_no_fork_while_a_foreign_thread_runs(monkeypatch):
    import threading

    from tcsmae.convert.dicom_to_zarr import _fork_safe

    before = _fork_safe()  # earlier tests in this process may have left threads (torch, DALI)
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, name="someone-elses-thread", daemon=True)
    t.start()
    try:
        assert not _fork_safe()
    finally:
        stop.set()
        t.join()
    assert _fork_safe() == before
    monkeypatch.setattr(threading, "enumerate", lambda: [threading.main_thread()])
    assert _fork_safe()  # only the main thread: forking is safe


def test_nifti_given_to_the_dicom_converter_points_to_convert_nifti(tmp_path):
    from tcsmae.convert.dicom_scan import scan_file

    (tmp_path / "ct.nii.gz").write_bytes(b"\x1f\x8b" + bytes(400))
    result = scan_file(tmp_path / "ct.nii.gz")
    assert result.kind == "junk" and "convert-nifti" in result.reason


def test_rerun_reports_a_damaged_case_and_overwrite_rebuilds_it(tmp_path, convert, two_series):
    """After `rm STORE/images/<case>/c/0/0/0` a re-run said "up to date"; then it deleted and
    rebuilt the case by itself (with that run's options, under readers' feet)."""
    root, a, b = two_series
    out_zarr = tmp_path / "s.zarr"
    assert convert(root, "-o", out_zarr)[0] == 0
    shard = out_zarr / "images" / uid(a) / "c" / "0" / "0" / "0"
    shard.unlink()
    code, out = convert(root, "-o", out_zarr, "--codec", "lz4")
    assert code == 3 and ": 0 converted (" in out and ", 1 up to date" in out and ", 1 failed" in out, out
    assert f"{shard}" in out and "missing" in out and "left as it is" in out, out
    assert f"`tcsmae convert {root} --codec zstd -o {out_zarr} --overwrite`" in out, out
    assert not shard.exists() and uid(a) in open_store(out_zarr).case_ids  # untouched
    code, out = convert(root, "-o", out_zarr, "--overwrite")
    assert code == 0 and ": 2 converted (" in out, out
    store = open_store(out_zarr)
    np.testing.assert_array_equal(store.read_volume(uid(a)), a.hu)


def test_failed_rebuild_with_overwrite_keeps_the_old_case(tmp_path, convert, two_series, monkeypatch):
    """--overwrite deleted the case before decoding its source: a failed rebuild lost it."""
    import tcsmae.convert.dicom_scan as dicom_scan
    import tcsmae.convert.dicom_to_zarr as d2z

    root, a, b = two_series
    out_zarr = tmp_path / "s.zarr"
    assert convert(root / "a", "-o", out_zarr)[0] == 0
    store = open_store(out_zarr)
    reader = store.read_slice(0, 2)  # a reader of the store, open during the rebuild

    def broken(plan, strict=False):
        raise dicom_scan.SeriesError("simulated undecodable pixel data", plan.first_file)

    monkeypatch.setattr(d2z, "read_series", broken)
    code, out = convert(root / "a", "-o", out_zarr, "--overwrite")
    monkeypatch.undo()
    assert code == 1 and "simulated undecodable" in out, out
    again = open_store(out_zarr)
    assert again.case_ids == [uid(a)]
    np.testing.assert_array_equal(again.read_volume(uid(a)), a.hu)
    np.testing.assert_array_equal(store.read_slice(0, 2), reader)
    assert sorted(p.name for p in (out_zarr / "images").iterdir() if p.is_dir()) == [uid(a)]  # no staging left


def test_values_without_intercept_warn_no_air(tmp_path, convert):
    """Stored values taken as HU (intercept 0 instead of -1024): air at 0, tissue near 1000."""
    s = ct_series(n=4)
    for ds in s.datasets:
        ds.RescaleIntercept = 0
    write_series(s.datasets, tmp_path / "raw")
    assert convert(tmp_path / "raw", "-o", tmp_path / "s.zarr")[0] == 0
    warnings = open_store(tmp_path / "s.zarr").case_attrs(uid(s))["warnings"]
    assert any(w.startswith("no air found in the series of ") and "are these HU? (missing rescale intercept?)" in w
               for w in warnings), warnings
