"""NIfTI converter: real small volume + label map, TotalSegmentator folders, scaling, manifests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tcsmae.cli import main as cli
from tcsmae.convert.nifti_to_zarr import (
    combine_totalseg_masks,
    convert_sources,
    make_source,
    read_image,
    totalsegmentator_ids,
)
from tcsmae.errors import UserError
from tcsmae.store.reader import open_store

REPO = Path(__file__).resolve().parents[2]
LUNGS = (10, 11, 12, 13, 14)
LIVER = (5,)
VERTEBRAE = tuple(range(25, 51))


def _ras_to_store(data: np.ndarray) -> np.ndarray:
    """Independent expectation for a RAS+ (positive diagonal) NIfTI array (i, j, k):
    store (Z, Y, X) with Y running anterior->posterior and X right->left."""
    return np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1])


@pytest.fixture(scope="module")
def real_store(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "small.zarr"
    rc = cli(["convert-nifti", str(shared_data / "totalseg-ct-small.nii.gz"), "--labels",
              str(shared_data / "totalseg-ct-small-seg.nii.gz"), "-o", str(out), "--no-progress"])
    assert rc == 0
    return open_store(out)


def test_real_volume_raises_no_warning(real_store):
    assert real_store.case_attrs("totalseg-ct-small")["warnings"] == []


def test_values_without_intercept_warn_no_air(tmp_path):
    """A volume missing its intercept (values 0..2231) converted with 0 warnings."""
    raw = np.random.default_rng(0).integers(0, 2232, (20, 16, 6)).astype(np.int16)
    _write(tmp_path / "raw.nii.gz", raw, np.eye(4))
    out = tmp_path / "r.zarr"
    assert cli(["convert-nifti", str(tmp_path / "raw.nii.gz"), "-o", str(out), "--no-progress"]) == 0
    warnings = open_store(out).case_attrs("raw")["warnings"]
    assert any(w.startswith(f"no air found in {tmp_path / 'raw.nii.gz'}: are these HU? (missing rescale intercept?)")
               for w in warnings), warnings


def test_rerun_reports_a_damaged_case_and_overwrite_rebuilds_it(shared_data, tmp_path, capsys):
    """A plain re-run deleted and rebuilt a damaged case by itself, with its own --codec."""
    out = tmp_path / "s.zarr"
    src = str(shared_data / "totalseg-ct-small.nii.gz")
    assert cli(["convert-nifti", src, "-o", str(out), "--no-progress", "--codec", "lz4"]) == 0
    shard = out / "images" / "totalseg-ct-small" / "c" / "0" / "0" / "0"
    shard.unlink()
    capsys.readouterr()
    assert cli(["convert-nifti", src, "-o", str(out), "--no-progress"]) == 1
    printed = capsys.readouterr().out
    assert "FAILED" in printed and str(shard) in printed and "missing" in printed
    assert f"`tcsmae convert-nifti {src} --codec lz4 -o {out} --overwrite`" in printed, printed
    assert not shard.exists()
    assert cli(["convert-nifti", src, "-o", str(out), "--no-progress", "--codec", "lz4", "--overwrite"]) == 0
    assert shard.is_file() and cli(["info", str(out), "--verify"]) == 0


def test_failed_rebuild_with_overwrite_keeps_the_old_case(tmp_path):
    from dicom_factory import phantom_hu

    hu = phantom_hu(6, 24, 20).transpose(2, 1, 0).astype(np.int16)  # (x, y, z) for NIfTI
    nib.save(nib.Nifti1Image(hu, np.diag([0.8, 0.8, 2.5, 1.0])), tmp_path / "vol.nii.gz")
    out = tmp_path / "s.zarr"
    assert convert_sources([make_source(tmp_path / "vol.nii.gz")], out, progress=False)["converted"] == ["vol"]
    before = open_store(out).read_volume("vol")
    (tmp_path / "vol.nii.gz").write_bytes((tmp_path / "vol.nii.gz").read_bytes()[:200])  # truncated
    r = convert_sources([make_source(tmp_path / "vol.nii.gz")], out, overwrite=True, progress=False)
    assert r["failed"] and not r["converted"], r
    store = open_store(out)
    assert store.case_ids == ["vol"]
    np.testing.assert_array_equal(store.read_volume("vol"), before)


def test_real_volume_hu_equal_nibabel_after_reorientation(real_store, shared_data):
    img = nib.load(shared_data / "totalseg-ct-small.nii.gz")
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")  # premise of _ras_to_store
    expected = _ras_to_store(img.get_fdata())
    stored = real_store.image("totalseg-ct-small")[...]
    assert stored.dtype == np.int16
    np.testing.assert_array_equal(stored, expected)
    seg = nib.load(shared_data / "totalseg-ct-small-seg.nii.gz")
    np.testing.assert_array_equal(real_store.label("totalseg-ct-small")[...], _ras_to_store(np.asarray(seg.dataobj)))
    attrs = real_store.case_attrs("totalseg-ct-small")
    assert attrs["spacing_mm"] == [3.0, 3.0, 3.0]
    np.testing.assert_allclose(attrs["source_affine"], img.affine)
    assert attrs["source_shape"] == list(img.shape)
    # voxel [0, 0, 0] is the right-anterior-inferior corner: RAS x max, y max, z min
    corner_ras = nib.affines.apply_affine(img.affine, [img.shape[0] - 1, img.shape[1] - 1, 0])
    np.testing.assert_allclose(attrs["origin_mm"], corner_ras * [-1, -1, 1], atol=1e-4)


def _tissue_stats(hu: np.ndarray, lab: np.ndarray, ids) -> tuple[float, float, float]:
    """(median HU, fraction of voxels in soft-tissue range -100..200, fraction > 150 HU)."""
    v = hu[np.isin(lab, ids)].astype(np.float64)
    assert v.size > 500, f"too few voxels ({v.size}) for ids {ids}"
    return float(np.median(v)), float(((v > -100) & (v < 200)).mean()), float((v > 150).mean())


def _labels_sit_on_their_tissue(hu, lab) -> list[str]:
    """Problems found (empty when every checked label sits on its tissue)."""
    problems = []
    med, _, _ = _tissue_stats(hu, lab, LUNGS)
    if not med < -500:
        problems.append(f"lungs median {med:.0f} HU, not air-like")
    med, soft, _ = _tissue_stats(hu, lab, LIVER)
    if not (20 < med < 80 and soft > 0.97):
        problems.append(f"liver median {med:.0f} HU, soft-tissue fraction {soft:.2f}")
    med, _, bone = _tissue_stats(hu, lab, VERTEBRAE)
    if not (med > 120 and bone > 0.4):
        problems.append(f"vertebrae median {med:.0f} HU, fraction > 150 HU {bone:.2f}")
    return problems


def test_real_labels_sit_on_their_tissue(real_store):
    hu = real_store.image("totalseg-ct-small")[...]
    lab = real_store.label("totalseg-ct-small")[...]
    assert _labels_sit_on_their_tissue(hu, lab) == []


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_flipped_label_map_would_be_caught(real_store, axis):
    hu = real_store.image("totalseg-ct-small")[...]
    lab = np.flip(real_store.label("totalseg-ct-small")[...], axis=axis)
    assert len(_labels_sit_on_their_tissue(hu, lab)) >= 2


def test_rerun_skips_then_overwrite_rebuilds(shared_data, tmp_path):
    out = tmp_path / "s.zarr"
    src = str(shared_data / "totalseg-ct-small.nii.gz")
    assert cli(["convert-nifti", src, "-o", str(out), "--no-progress", "--codec", "lz4"]) == 0
    r = convert_sources([make_source(Path(src))], out, progress=False)
    assert r["skipped"] and not r["converted"]
    r = convert_sources([make_source(Path(src))], out, overwrite=True, progress=False)
    assert r["converted"] == ["totalseg-ct-small"]
    assert open_store(out).case_attrs("totalseg-ct-small")["codec"] == "zstd"
    # same case id from another source: refused without --overwrite
    r = convert_sources([make_source(shared_data / "totalseg-ct-small-seg.nii.gz", case_id="totalseg-ct-small")],
                        out, progress=False)
    assert r["failed"] and "another source" in r["failed"][0][1]


def test_label_map_on_another_grid_fails(shared_data, tmp_path):
    seg = nib.load(shared_data / "totalseg-ct-small-seg.nii.gz")
    moved = seg.affine.copy()
    moved[2, 3] += 3.0  # one slice up: same shape, other grid
    bad = tmp_path / "bad-seg.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(seg.dataobj), moved), bad)
    src = make_source(shared_data / "totalseg-ct-small.nii.gz", labels=bad)
    out = tmp_path / "s.zarr"
    r = convert_sources([src], out, progress=False)
    assert not r["converted"] and "not on its image's grid" in r["failed"][0][1]
    assert "bad-seg.nii.gz" in r["failed"][0][1]
    rc = cli(["convert-nifti", str(shared_data / "totalseg-ct-small.nii.gz"), "--labels", str(bad), "-o", str(out),
              "--no-progress"])
    assert rc == 1
    assert not out.exists()  # nothing converted: no new empty store


def _write(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)


def test_totalsegmentator_folder_is_combined(tmp_path, shared_data):
    rng = np.random.default_rng(3)
    shape = (8, 9, 10)
    ras = np.diag([1.5, 1.5, 2.0, 1.0])
    ras[:3, 3] = (-6.0, 4.0, 30.0)
    case = tmp_path / "s0042"
    ct = rng.integers(-1000, 1000, shape).astype(np.int16)
    _write(case / "ct.nii.gz", ct, ras)
    liver = np.zeros(shape, np.uint8)
    liver[1:5, 2:6, 3:7] = 1
    spleen = np.zeros(shape, np.uint8)
    spleen[4:7, 5:8, 1:4] = 1  # overlaps the liver at [4, 5, 3]
    lung = np.zeros(shape, np.uint8)
    lung[0, 0, 0] = 1
    _write(case / "segmentations" / "liver.nii.gz", liver, ras)
    _write(case / "segmentations" / "spleen.nii.gz", spleen, ras)
    # a mask stored in another axis layout (LPS) but on the same grid must still align
    lps_aff = ras.copy()
    lps_aff[0, 0], lps_aff[1, 1] = -1.5, -1.5
    lps_aff[0, 3] = ras[0, 3] + 1.5 * (shape[0] - 1)
    lps_aff[1, 3] = ras[1, 3] + 1.5 * (shape[1] - 1)
    _write(case / "segmentations" / "lung_upper_lobe_left.nii.gz", lung[::-1, ::-1, :].copy(), lps_aff)
    _write(case / "segmentations" / "not_a_structure.nii.gz", lung, ras)

    table = shared_data / "totalsegmentator-labels.json"  # TotalSegmentator's id -> name table
    ids = totalsegmentator_ids(table)
    assert (ids["liver"], ids["spleen"], ids["lung_upper_lobe_left"]) == (5, 1, 10)
    expected = np.zeros(shape, np.uint8)
    expected[spleen > 0] = 1
    expected[liver > 0] = 5  # higher id wins the overlap
    expected[lung > 0] = 10

    out = tmp_path / "ts.zarr"
    assert cli(["convert-nifti", str(case), "-o", str(out), "--no-progress", "--structure-ids", str(table)]) == 0
    store = open_store(out)
    assert store.case_ids == ["s0042"]
    np.testing.assert_array_equal(store.label("s0042")[...], _ras_to_store(expected))
    np.testing.assert_array_equal(store.image("s0042")[...], _ras_to_store(ct))
    warnings = store.case_attrs("s0042")["warnings"]
    assert any("not_a_structure" in w for w in warnings)
    assert any("1 voxels lie in more than one mask" in w for w in warnings)


def test_structure_ids_come_from_the_totalsegmentator_package_or_the_flag(tmp_path, shared_data, monkeypatch,
                                                                         capsys):
    import sys
    import types

    totalseg_ids = {int(k): v for k, v in json.loads((shared_data / "totalsegmentator-labels.json").read_text()).items()}
    case = tmp_path / "c"
    _write(case / "ct.nii.gz", np.full((2, 3, 4), -1000, np.int16), np.eye(4))
    _write(case / "segmentations" / "liver.nii.gz", np.ones((2, 3, 4), np.uint8), np.eye(4))
    totalsegmentator_ids.cache_clear()
    monkeypatch.setitem(sys.modules, "totalsegmentator", None)  # not installed
    assert cli(["convert-nifti", str(case), "-o", str(tmp_path / "a.zarr"), "--no-progress"]) == 2
    assert "--structure-ids FILE.json" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('["liver"]')
    assert cli(["convert-nifti", str(case), "-o", str(tmp_path / "a.zarr"), "--structure-ids", str(bad)]) == 2
    assert "not a JSON object of label id -> structure name" in capsys.readouterr().err
    # installed: its own table (totalsegmentator.map_to_binary.class_map['total'])
    package = types.ModuleType("totalsegmentator")
    mapping = types.ModuleType("totalsegmentator.map_to_binary")
    mapping.class_map = {"total": totalseg_ids}
    monkeypatch.setitem(sys.modules, "totalsegmentator", package)
    monkeypatch.setitem(sys.modules, "totalsegmentator.map_to_binary", mapping)
    totalsegmentator_ids.cache_clear()
    assert cli(["convert-nifti", str(case), "-o", str(tmp_path / "b.zarr"), "--no-progress"]) == 0
    assert np.all(open_store(tmp_path / "b.zarr").read_volume("c", labels=True) == 5)  # liver
    totalsegmentator_ids.cache_clear()


def test_totalsegmentator_mask_on_another_grid_is_refused(tmp_path, shared_data):
    shape = (4, 5, 6)
    _write(tmp_path / "c" / "ct.nii.gz", np.zeros(shape, np.int16), np.eye(4))
    _write(tmp_path / "c" / "segmentations" / "liver.nii.gz", np.ones((4, 5, 7), np.uint8), np.eye(4))
    hu, geom = read_image(tmp_path / "c" / "ct.nii.gz")
    with pytest.raises(UserError, match="liver.nii.gz"):
        combine_totalseg_masks(tmp_path / "c" / "segmentations", hu.shape, geom,
                               shared_data / "totalsegmentator-labels.json")


def test_scl_slope_and_inter_give_hu(tmp_path):
    raw = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4) * 10
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, tmp_path / "int.nii.gz")
    img2 = nib.Nifti1Image(raw, np.eye(4))
    img2.header.set_slope_inter(0.25, -1000.0)
    nib.save(img2, tmp_path / "frac.nii.gz")
    hu, _ = read_image(tmp_path / "int.nii.gz")
    assert hu.dtype == np.int16
    assert hu.min() == -1024 and hu.max() == 230 - 1024
    hu2, _ = read_image(tmp_path / "frac.nii.gz")
    assert hu2.dtype == np.float32
    np.testing.assert_allclose(np.sort(hu2.ravel()), np.sort(raw.ravel() * 0.25 - 1000.0))


def test_manifest_converts_each_row_with_its_patient(tmp_path):
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    for name in ("a", "b"):
        _write(tmp_path / "in" / f"{name}.nii.gz", np.full((4, 4, 3), -500, np.int16), aff)
    _write(tmp_path / "in" / "a-seg.nii.gz", np.ones((4, 4, 3), np.uint8), aff)
    manifest = tmp_path / "in" / "cases.csv"
    manifest.write_text("source,labels,case_id,patient_id\na.nii.gz,a-seg.nii.gz,case-a,P1\nb.nii.gz,,,P2\n")
    out = tmp_path / "m.zarr"
    assert cli(["convert-nifti", "--manifest", str(manifest), "-o", str(out), "--no-progress"]) == 0
    store = open_store(out)
    assert store.case_ids == ["case-a", "b"]
    assert store.has_labels("case-a") and not store.has_labels("b")
    assert [store.case_attrs(c)["patient_id"] for c in store.case_ids] == ["P1", "P2"]


def test_progress_bar_on_a_terminal_only_and_no_empty_store(tmp_path, capsys, monkeypatch):
    import io

    _write(tmp_path / "vol.nii.gz", np.zeros((4, 4, 3), np.int16), np.eye(4))
    assert cli(["convert-nifti", str(tmp_path / "vol.nii.gz"), "-o", str(tmp_path / "a.zarr")]) == 0
    assert "convert-nifti:" not in capsys.readouterr().err  # stderr is not a TTY here: no bar in the log

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert cli(["convert-nifti", str(tmp_path / "vol.nii.gz"), "-o", str(tmp_path / "b.zarr")]) == 0
    assert "convert-nifti:" in terminal.getvalue()
    monkeypatch.undo()

    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti")
    assert cli(["convert-nifti", str(tmp_path / "junk.nii.gz"), "-o", str(tmp_path / "c.zarr")]) == 1
    assert "not created: nothing converted" in capsys.readouterr().out
    assert not (tmp_path / "c.zarr").exists()


def test_usage_errors(tmp_path):
    assert cli(["convert-nifti", "-o", str(tmp_path / "x.zarr")]) == 2  # nothing to convert
    assert cli(["convert-nifti", str(tmp_path / "missing.nii.gz"), "-o", str(tmp_path / "x.zarr")]) == 2
    (tmp_path / "a.nii.gz").write_bytes(b"not a nifti")
    (tmp_path / "b.nii.gz").write_bytes(b"not a nifti")
    assert cli(["convert-nifti", str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz"), "--case-id", "x",
                "-o", str(tmp_path / "x.zarr")]) == 2  # --case-id with two sources
    # a junk file is a failed case, named, not a traceback
    r = convert_sources([make_source(tmp_path / "a.nii.gz")], tmp_path / "x.zarr", progress=False)
    assert "a.nii.gz" in r["failed"][0][1] and "not a readable NIfTI" in r["failed"][0][1]


def test_runs_as_a_script(tmp_path):
    _write(tmp_path / "vol.nii.gz", np.zeros((4, 4, 3), np.int16), np.eye(4))
    out = tmp_path / "script.zarr"
    proc = subprocess.run([sys.executable, str(REPO / "convert" / "nifti_to_zarr.py"), str(tmp_path / "vol.nii.gz"),
                           "-o", str(out), "--no-progress"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert open_store(out).case_ids == ["vol"]


def test_non_finite_voxels_become_air_with_a_warning(tmp_path):
    data = np.full((4, 4, 3), 12.5, np.float32)
    data[1, 2, 0] = np.nan
    data[0, 0, 1] = np.inf
    _write(tmp_path / "nan.nii", data, np.eye(4))  # uncompressed: nibabel may memory-map it
    out = tmp_path / "n.zarr"
    assert cli(["convert-nifti", str(tmp_path / "nan.nii"), "-o", str(out), "--no-progress"]) == 0
    store = open_store(out)
    hu = store.image("nan")[...]
    assert hu.dtype == np.float32 and np.isfinite(hu).all()
    assert np.count_nonzero(hu == -1024.0) == 2 and np.count_nonzero(hu == 12.5) == hu.size - 2
    assert any("2 non-finite voxels" in w for w in store.case_attrs("nan")["warnings"])
