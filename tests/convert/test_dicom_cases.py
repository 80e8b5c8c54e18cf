"""The real-world input cases of issue 2 (numbered as there), on altered synthetic series."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from tcsmae.cli import main
from tcsmae.store.reader import open_store

from dicom_factory import (
    copy_dataset,
    ct_series,
    encode_jpeg_lossless_sv1,
    enhanced_ct,
    localizer,
    presentation_state,
    secondary_capture,
    set_stored,
    sr_document,
    stored_of,
    write_series,
)


@pytest.fixture
def convert(capsys):
    """convert(*args) -> (exit code, stdout + stderr) through `tcsmae convert`, one worker."""

    def run(*args):
        code = main(["convert", *map(str, args), "--workers", "1"])
        out = capsys.readouterr()
        return code, out.out + out.err

    return run


def cases(store_path) -> dict[str, tuple[np.ndarray, dict]]:
    store = open_store(store_path)
    return {c: (store.image(c)[:], store.case_attrs(c)) for c in store.case_ids}


def only_case(store_path) -> tuple[np.ndarray, dict]:
    found = cases(store_path)
    assert len(found) == 1, list(found)
    return next(iter(found.values()))


# 1 ------------------------------------------------------------------------------------
def test_1_several_series_in_one_folder_are_split(tmp_path, convert):
    a = ct_series(n=5, seed=1)
    b = ct_series(n=6, seed=2)
    # no SeriesInstanceUID: told apart by FrameOfReferenceUID + SeriesNumber + AcquisitionNumber
    c = ct_series(n=5, seed=3, series_uid=None)
    d = ct_series(n=4, seed=4, series_uid=None)
    for ds in d.datasets:
        ds.FrameOfReferenceUID = c.datasets[0].FrameOfReferenceUID
        ds.SeriesNumber = 4
    # one SeriesInstanceUID holding two stacks of different size: split by size
    e1 = ct_series(n=4, seed=5)
    e2 = ct_series(n=3, rows=24, cols=20, seed=6)
    for ds in e2.datasets:
        ds.SeriesInstanceUID = e1.datasets[0].SeriesInstanceUID
    folder = tmp_path / "mixed"
    for s in (a, b, c, d, e1, e2):
        write_series(s.datasets, folder)
    code, out = convert(folder, "-o", tmp_path / "out.zarr")
    assert code == 0, out
    found = cases(tmp_path / "out.zarr")
    assert len(found) == 6, out
    expected = {s.datasets[0].SeriesInstanceUID: s for s in (a, b)}
    for uid, s in expected.items():
        np.testing.assert_array_equal(found[uid][0], s.hu)
    no_uid = [v for v in found.values() if v[1]["series_uid"] == ""]
    assert sorted(v[0].shape[0] for v in no_uid) == [4, 5]
    for s in (c, d):
        match = [v for v in no_uid if v[0].shape == s.hu.shape]
        np.testing.assert_array_equal(match[0][0], s.hu)
    uid_e = e1.datasets[0].SeriesInstanceUID
    split = {k: v for k, v in found.items() if k.startswith(uid_e + "_")}
    assert len(split) == 2
    assert sorted(v[0].shape for v in split.values()) == [(3, 24, 20), (4, 32, 32)]
    for v in split.values():
        ref = e1 if v[0].shape[1] == 32 else e2
        np.testing.assert_array_equal(v[0], ref.hu)
        assert any("split" in w for w in v[1]["warnings"])


# 2 ------------------------------------------------------------------------------------
def test_2_localizer_secondary_capture_and_non_image_objects_are_skipped(tmp_path, convert):
    s = ct_series(n=5)
    for ds in s.datasets:
        ds.SOPClassUID = ""  # anonymised: classification must rely on the file meta
    extra = [localizer(s.datasets[0]), secondary_capture(s.datasets[1]), sr_document(), presentation_state()]
    seg = copy_dataset(s.datasets[2])  # a SEG object has pixel data but is no CT image
    seg.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    seg.SOPClassUID = ""
    extra.append(seg)
    folder = tmp_path / "study"
    write_series(s.datasets, folder / "ct")
    write_series(extra, folder / "other")
    dicomdir = Dataset()
    dicomdir.file_meta = pydicom.dataset.FileMetaDataset()
    dicomdir.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    dicomdir.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dicomdir.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    dicomdir.FileSetID = "TEST"
    dicomdir.save_as(folder / "DICOMDIR", enforce_file_format=True)

    code, out = convert(folder, "-o", tmp_path / "out.zarr")
    assert code == 0, out
    hu, _ = only_case(tmp_path / "out.zarr")
    np.testing.assert_array_equal(hu, s.hu)  # the localizer of the same series was left out
    assert "1 file(s): localizer/scout image" in out
    assert "1 file(s): secondary capture" in out
    assert "1 file(s): DICOMDIR" in out
    assert "no pixel data (Enhanced SR Storage)" in out
    assert "no pixel data (Grayscale Softcopy Presentation State Storage)" in out
    assert "not a CT image (Segmentation Storage)" in out


# 3 ------------------------------------------------------------------------------------
def test_3_junk_is_skipped_and_a_truncated_slice_fails_only_its_series(tmp_path, convert):
    good = ct_series(n=5, seed=1)
    bad = ct_series(n=5, seed=2)
    folder = tmp_path / "in"
    write_series(good.datasets, folder / "good")
    bad_paths = write_series(bad.datasets, folder / "bad")
    victim = bad_paths[2]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 300])  # cut inside the pixel data
    (folder / "notes.txt").write_text("not a dicom file\n")
    (folder / "empty.dcm").write_bytes(b"")
    (folder / "random.bin").write_bytes(np.random.default_rng(0).bytes(2000))
    header_cut = copy_dataset(good.datasets[0])
    write_series([header_cut], folder / "cut")
    cut_path = next((folder / "cut").iterdir())
    cut_path.write_bytes(cut_path.read_bytes()[:300])  # cut inside the header

    code, out = convert(folder, "-o", tmp_path / "out.zarr")
    assert code == 3, out
    found = cases(tmp_path / "out.zarr")
    assert list(found) == [good.datasets[0].SeriesInstanceUID]
    np.testing.assert_array_equal(found[good.datasets[0].SeriesInstanceUID][0], good.hu)
    assert "3 file(s): not a DICOM file" in out
    failed = [line for line in out.splitlines() if line.startswith("failed")]
    assert len(failed) == 2, out
    assert any(str(victim) in line for line in failed)
    assert any(str(cut_path) in line for line in failed)


# 4 ------------------------------------------------------------------------------------
def test_4_gap_is_kept_with_true_positions_and_a_warning(tmp_path, convert):
    s = ct_series(n=7, step=2.0)
    gone = s.order[3]
    kept = [ds for i, ds in enumerate(s.datasets) if i != gone]
    write_series(kept, tmp_path / "gap")
    code, out = convert(tmp_path / "gap", "-o", tmp_path / "out.zarr")
    assert code == 0, out
    hu, attrs = only_case(tmp_path / "out.zarr")
    np.testing.assert_array_equal(hu, np.delete(s.hu, 3, axis=0))
    z0 = -40.0
    assert attrs["z_positions_mm"] == pytest.approx([z0 + 2.0 * k for k in (0, 1, 2, 4, 5, 6)])
    assert attrs["spacing_mm"][0] == pytest.approx(2.0)
    assert any("uneven slice spacing" in w and "missing slice" in w for w in attrs["warnings"])

    code, out = convert(tmp_path / "gap", "-o", tmp_path / "strict.zarr", "--strict")
    assert code == 1, out
    assert "--strict" in out and "uneven" in out


def test_4_uneven_spacing_warns_and_strict_fails(tmp_path, convert):
    s = ct_series(n=6, step=2.0)
    moved = s.datasets[s.order[2]]
    moved.ImagePositionPatient = [moved.ImagePositionPatient[0], moved.ImagePositionPatient[1], moved.ImagePositionPatient[2] + 0.7]
    write_series(s.datasets, tmp_path / "uneven")
    code, out = convert(tmp_path / "uneven", "-o", tmp_path / "out.zarr")
    assert code == 0
    _, attrs = only_case(tmp_path / "out.zarr")
    assert attrs["z_positions_mm"][2] == pytest.approx(-40 + 4.0 + 0.7)
    assert any("uneven slice spacing" in w for w in attrs["warnings"])
    code, out = convert(tmp_path / "uneven", "-o", tmp_path / "strict.zarr", "--strict")
    assert code == 1 and "uneven" in out


# 5 ------------------------------------------------------------------------------------
def test_5_identical_duplicates_are_dropped_differing_ones_fail(tmp_path, convert):
    s = ct_series(n=5)
    paths = write_series(s.datasets, tmp_path / "dup")
    copy_path = tmp_path / "dup" / "copy_of_slice.dcm"
    copy_path.write_bytes(paths[0].read_bytes())  # a byte-identical copy under another name
    code, out = convert(tmp_path / "dup", "-o", tmp_path / "out.zarr")
    assert code == 0, out
    hu, attrs = only_case(tmp_path / "out.zarr")
    np.testing.assert_array_equal(hu, s.hu)
    assert any("duplicate" in w for w in attrs["warnings"])

    clash = copy_dataset(s.datasets[1])
    stored = stored_of(clash)
    stored[5, 5] += 7
    set_stored(clash, stored)
    write_series([clash], tmp_path / "dup", prefix="clash_")
    code, out = convert(tmp_path / "dup", "-o", tmp_path / "out2.zarr")
    assert code == 1, out
    assert "differ in pixels" in out
    assert "clash_" in out and str(paths[1]) in out


# 6 ------------------------------------------------------------------------------------
def test_6_gantry_tilt_is_recorded_and_strict_fails(tmp_path, convert):
    s = ct_series(n=5, step=2.0)
    tilt = 15.0
    for k, i in enumerate(s.order):
        ds = s.datasets[i]
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + k * 2.0 * np.tan(np.radians(tilt)), z]
    write_series(s.datasets, tmp_path / "tilt")
    code, out = convert(tmp_path / "tilt", "-o", tmp_path / "out.zarr")
    assert code == 0, out
    hu, attrs = only_case(tmp_path / "out.zarr")
    np.testing.assert_array_equal(hu, s.hu)
    assert attrs["tilt_deg"] == pytest.approx(tilt, abs=0.01)
    assert any("gantry tilt" in w for w in attrs["warnings"])
    assert attrs["spacing_mm"][0] == pytest.approx(2.0)  # along the normal
    assert attrs["slice_step_mm"] == pytest.approx([0.0, 2.0 * np.tan(np.radians(tilt)), 2.0])

    code, out = convert(tmp_path / "tilt", "-o", tmp_path / "strict.zarr", "--strict")
    assert code == 1 and "tilt" in out


# 7 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("change", ["orientation", "size", "spacing"])
def test_7_varying_orientation_or_size_fails_naming_the_file(tmp_path, convert, change):
    s = ct_series(n=6)
    odd = s.datasets[s.order[3]]
    if change == "orientation":
        c, sn = np.cos(np.radians(10)), np.sin(np.radians(10))
        odd.ImageOrientationPatient = [c, sn, 0.0, -sn, c, 0.0]
    elif change == "size":
        odd.Rows, odd.Columns = 16, 16
        odd.PixelData = np.zeros((16, 16), np.uint16).tobytes()
    else:
        odd.PixelSpacing = [0.9, 0.9]
    paths = write_series(s.datasets, tmp_path / "s")
    odd_path = paths[s.order[3]]
    code, out = convert(tmp_path / "s", "-o", tmp_path / "out.zarr")
    assert code == 1, out
    assert str(odd_path) in out
    assert "varies within the series" in out
    assert not (tmp_path / "out.zarr").exists()  # nothing converted: no new empty store


# 8 ------------------------------------------------------------------------------------
def test_8_rescale_per_slice_and_float_when_not_integer(tmp_path, convert):
    s = ct_series(n=5, slope=0.5, intercept=-1024.25, bits_stored=16)
    slopes = [0.5, 0.5, 0.25, 1.0, 0.5]
    intercepts = [-1024.25, -1100.0, -1024.25, -1024.0, -1024.25]
    expected = np.empty_like(s.hu)
    for k, i in enumerate(s.order):
        ds = s.datasets[i]
        stored = np.round((s.hu[k] - intercepts[k]) / slopes[k])
        set_stored(ds, stored)
        ds.RescaleSlope, ds.RescaleIntercept = slopes[k], intercepts[k]
        expected[k] = stored * slopes[k] + intercepts[k]
    write_series(s.datasets, tmp_path / "r")
    code, out = convert(tmp_path / "r", "-o", tmp_path / "out.zarr")
    assert code == 0, out
    hu, attrs = only_case(tmp_path / "out.zarr")
    assert hu.dtype == np.float32
    np.testing.assert_array_equal(hu, expected.astype(np.float32))
    assert not np.array_equal(expected, np.round(expected))  # the test data has fractions
    assert sorted(attrs["rescale_varies"]["slopes"]) == [0.25, 0.5, 1.0]


def test_8_integer_rescale_stays_int16(tmp_path, convert):
    s = ct_series(n=4, slope=2.0, intercept=-1100.0)
    write_series(s.datasets, tmp_path / "r")
    assert convert(tmp_path / "r", "-o", tmp_path / "out.zarr")[0] == 0
    hu, _ = only_case(tmp_path / "out.zarr")
    assert hu.dtype == np.int16
    np.testing.assert_array_equal(hu, s.hu)


# 9 ------------------------------------------------------------------------------------
def test_9_pixel_padding_becomes_air(tmp_path, convert):
    s = ct_series(n=4, signed=True, bits_stored=16, intercept=0.0)
    pad = np.zeros((32, 32), bool)
    pad[:4, :] = True
    expected = s.hu.copy()
    for k, i in enumerate(s.order):
        ds = s.datasets[i]
        stored = stored_of(ds)
        stored[pad] = -2000
        set_stored(ds, stored)
        ds.PixelPaddingValue = -2000
        expected[k][pad] = -1024
    write_series(s.datasets, tmp_path / "p")
    code, out = convert(tmp_path / "p", "-o", tmp_path / "out.zarr")
    assert code == 0, out
    hu, attrs = only_case(tmp_path / "out.zarr")
    np.testing.assert_array_equal(hu, expected)
    assert hu.min() >= -1024
    assert attrs["padding_value"] == -2000
    assert attrs["padding_voxels"] == 4 * pad.sum()


# 10 -----------------------------------------------------------------------------------
def test_10_signed_pixels_with_fewer_bits_stored_give_negative_hu(tmp_path, convert):
    s = ct_series(n=4, signed=True, bits_stored=12, intercept=0.0)  # stored = HU, -1024 .. 800
    for ds in s.datasets:
        raw = stored_of(ds)
        assert raw.min() < 0
        ds.PixelData = (raw.astype(np.int16).view(np.uint16) & 0x0FFF).tobytes()  # high bits not sign-extended
    write_series(s.datasets, tmp_path / "signed")
    code, out = convert(tmp_path / "signed", "-o", tmp_path / "out.zarr")
    assert code == 0, out
    hu, _ = only_case(tmp_path / "out.zarr")
    np.testing.assert_array_equal(hu, s.hu)
    assert hu.min() <= -1000


def test_10_unsigned_pixels_with_junk_in_unused_high_bits(tmp_path, convert):
    s = ct_series(n=4, signed=False, bits_stored=12, intercept=-1024.0)
    for ds in s.datasets:
        ds.PixelData = (stored_of(ds).astype(np.uint16) | 0xF000).tobytes()  # bits above BitsStored set
    write_series(s.datasets, tmp_path / "unsigned")
    assert convert(tmp_path / "unsigned", "-o", tmp_path / "out.zarr")[0] == 0
    hu, _ = only_case(tmp_path / "out.zarr")
    np.testing.assert_array_equal(hu, s.hu)
    assert hu.min() < -1000


# 11 -----------------------------------------------------------------------------------
def _encapsulated(ds: Dataset, frame: bytes, syntax) -> None:
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax


def test_11_compressed_transfer_syntaxes_decode_to_the_same_hu(tmp_path, convert):
    folder = tmp_path / "compressed"
    expected = {}
    # RLE and JPEG 2000 lossless through pydicom's own encoders
    for name, syntax, seed in (("rle", RLELossless, 1), ("j2k", JPEG2000Lossless, 2)):
        s = ct_series(n=4, seed=seed)
        for ds in s.datasets:
            ds.compress(syntax)
        write_series(s.datasets, folder / name)
        expected[s.datasets[0].SeriesInstanceUID] = s.hu
    # deflate: the whole dataset is zlib-compressed by pydicom's writer
    s = ct_series(n=4, seed=3)
    for ds in s.datasets:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    write_series(s.datasets, folder / "deflate")
    expected[s.datasets[0].SeriesInstanceUID] = s.hu
    # lossless JPEG (process 14 SV1): a minimal encoder in the test factory
    s = ct_series(n=4, seed=4)
    for ds in s.datasets:
        _encapsulated(ds, encode_jpeg_lossless_sv1(stored_of(ds), precision=16), JPEGLosslessSV1)
    write_series(s.datasets, folder / "ljpeg")
    expected[s.datasets[0].SeriesInstanceUID] = s.hu
    # JPEG-LS lossless: the codestream of pydicom's MR_small test file (64x64 signed 16-bit)
    jls = pydicom.dcmread(pydicom.data.get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    ref = pydicom.dcmread(pydicom.data.get_testdata_file("MR_small.dcm")).pixel_array.astype(np.float64)
    frame = next(pydicom.encaps.generate_frames(jls.PixelData, number_of_frames=1))
    s = ct_series(n=4, rows=64, cols=64, signed=True, bits_stored=16, intercept=-1024.0, seed=5)
    for ds in s.datasets:
        _encapsulated(ds, frame, JPEGLSLossless)
    write_series(s.datasets, folder / "jpegls")
    expected[s.datasets[0].SeriesInstanceUID] = np.repeat((ref - 1024.0)[None], 4, axis=0)

    for sub in ("rle", "j2k", "deflate", "ljpeg", "jpegls"):
        first = next((folder / sub).iterdir())
        assert pydicom.dcmread(first, stop_before_pixels=True).file_meta.TransferSyntaxUID.is_compressed or sub == "deflate"
    code, out = convert(folder, "-o", tmp_path / "out.zarr")
    assert code == 0, out
    found = cases(tmp_path / "out.zarr")
    assert set(found) == set(expected)
    for uid, hu in expected.items():
        np.testing.assert_array_equal(found[uid][0], hu, err_msg=str(found[uid][1]["transfer_syntaxes"]))


def test_11_missing_decoder_fails_before_writing_and_names_the_package(tmp_path, convert, monkeypatch):
    from pydicom.pixels import get_decoder

    s = ct_series(n=4)
    for ds in s.datasets:
        ds.compress(RLELossless)
    write_series(s.datasets, tmp_path / "rle")
    decoder = get_decoder(RLELossless)
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-rle>=2.0")})
    assert not decoder.is_available
    code, out = convert(tmp_path / "rle", "-o", tmp_path / "out.zarr")
    assert code == 1, out
    assert "RLE Lossless" in out and "pylibjpeg-rle" in out
    assert not (tmp_path / "out.zarr").exists()  # no case arrays, no new empty store


def test_11_constant_slice_and_implausible_range_warn(tmp_path, convert):
    s = ct_series(n=5)
    set_stored(s.datasets[s.order[1]], np.full((32, 32), 24))  # constant slice
    hot = s.datasets[s.order[4]]
    stored = stored_of(hot)
    stored[0, 1] = 4095  # 3071 HU is fine ...
    set_stored(hot, stored)
    hot.RescaleSlope = 4.0  # ... but a wrong slope makes it 15356 HU
    write_series(s.datasets, tmp_path / "w")
    code, out = convert(tmp_path / "w", "-o", tmp_path / "out.zarr")
    assert code == 0, out
    _, attrs = only_case(tmp_path / "out.zarr")
    assert any("1 constant slice" in w for w in attrs["warnings"])
    assert any("implausible HU range" in w for w in attrs["warnings"])


def test_11_clean_series_has_no_warnings(tmp_path, convert):
    s = ct_series(n=5)
    write_series(s.datasets, tmp_path / "clean")
    assert convert(tmp_path / "clean", "-o", tmp_path / "out.zarr")[0] == 0
    _, attrs = only_case(tmp_path / "out.zarr")
    assert attrs["warnings"] == []


# 12 -----------------------------------------------------------------------------------
def test_12_enhanced_multiframe_reads_per_frame_position_and_rescale(tmp_path, convert):
    s = ct_series(n=5, bits_stored=16)
    rescale = [(1.0, -1024.0), (0.5, -1024.0), (1.0, -1100.0), (2.0, -1024.0), (1.0, -1024.0)]
    ds, expected = enhanced_ct(s, rescale)
    (tmp_path / "mf").mkdir()
    ds.save_as(tmp_path / "mf" / "enhanced.dcm", enforce_file_format=True)
    code, out = convert(tmp_path / "mf", "-o", tmp_path / "out.zarr")
    assert code == 0, out
    hu, attrs = only_case(tmp_path / "out.zarr")
    np.testing.assert_array_equal(hu, expected)
    assert np.abs(hu - s.hu).max() <= 1.0  # the same anatomy, up to rescale rounding
    assert attrs["z_positions_mm"] == pytest.approx([-40 + 2.5 * k for k in range(5)])
    assert attrs["multiframe"] is True


def test_12_enhanced_multiframe_without_positions_is_refused(tmp_path, convert):
    s = ct_series(n=4)
    ds, _ = enhanced_ct(s)
    for item in ds.PerFrameFunctionalGroupsSequence:
        del item.PlanePositionSequence
    (tmp_path / "mf").mkdir()
    path = tmp_path / "mf" / "enhanced.dcm"
    ds.save_as(path, enforce_file_format=True)
    code, out = convert(tmp_path / "mf", "-o", tmp_path / "out.zarr")
    assert code == 1, out
    assert "PlanePositionSequence" in out and str(path) in out


# 13 -----------------------------------------------------------------------------------
def test_13_too_few_slices_or_missing_tags_are_skipped_with_the_reason(tmp_path, convert):
    good = ct_series(n=4, seed=1)
    short = ct_series(n=2, seed=2)
    no_pos = ct_series(n=4, seed=3)
    del no_pos.datasets[1].ImagePositionPatient
    no_orient = ct_series(n=4, seed=4)
    for ds in no_orient.datasets:
        del ds.ImageOrientationPatient
    write_series(good.datasets, tmp_path / "in" / "good")
    write_series(short.datasets, tmp_path / "in" / "short")
    pos_paths = write_series(no_pos.datasets, tmp_path / "in" / "nopos")
    write_series(no_orient.datasets, tmp_path / "in" / "noorient")
    code, out = convert(tmp_path / "in", "-o", tmp_path / "out.zarr")
    assert code == 3, out
    assert list(cases(tmp_path / "out.zarr")) == [good.datasets[0].SeriesInstanceUID]
    assert "only 2 slice position(s)" in out
    assert any(line.startswith("skipped") and "only 2 slice position(s)" in line for line in out.splitlines())
    assert "missing ImagePositionPatient" in out and str(pos_paths[1]) in out
    assert "missing ImageOrientationPatient" in out

    code, out = convert(tmp_path / "in" / "short", "-o", tmp_path / "short.zarr")
    assert code == 1, out


def test_13_invalid_orientation_is_refused_naming_the_file(tmp_path, convert):
    s = ct_series(n=4)
    s.datasets[2].ImageOrientationPatient = [0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    paths = write_series(s.datasets, tmp_path / "s")
    code, out = convert(tmp_path / "s", "-o", tmp_path / "out.zarr")
    assert code == 1, out
    assert "invalid geometry tags" in out and str(paths[2]) in out


def test_corrupted_headers_never_crash_the_converter(tmp_path, convert):
    """Random bytes flipped in file headers: every outcome is a table line, never a traceback."""
    rng = np.random.default_rng(7)
    for k in range(3):
        s = ct_series(n=4, rows=16, cols=16, seed=k)
        for p in write_series(s.datasets, tmp_path / "in" / f"s{k}"):
            data = bytearray(p.read_bytes())
            for pos in rng.integers(132, 700, size=int(rng.integers(0, 6))):
                data[pos] = int(rng.integers(0, 256))
            p.write_bytes(bytes(data))
    code, out = convert(tmp_path / "in", "-o", tmp_path / "out.zarr")
    assert code in (0, 1, 3), out
    assert "Traceback" not in out
    if code == 1:
        assert not (tmp_path / "out.zarr").exists()  # nothing converted: no new empty store
    else:
        open_store(tmp_path / "out.zarr")  # whatever happened, the store is readable


def test_8_hu_match_pydicom_modality_lut_on_its_real_ct_test_file(tmp_path, convert):
    """pydicom's CT_small.dcm (a real CT slice, signed, intercept -1024) stacked 3 times."""
    ref = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    expected = pydicom.pixels.apply_modality_lut(ref.pixel_array, ref)
    normal = np.cross(np.array(ref.ImageOrientationPatient[:3], float), np.array(ref.ImageOrientationPatient[3:], float))
    for k in range(3):
        ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [float(v) for v in np.array(ref.ImagePositionPatient, float) + 5.0 * k * normal]
        write_series([ds], tmp_path / "ct")
    code, out = convert(tmp_path / "ct", "-o", tmp_path / "out.zarr")
    assert code == 0, out
    hu, attrs = only_case(tmp_path / "out.zarr")
    assert attrs["series_uid"] == ref.SeriesInstanceUID
    for k in range(3):
        np.testing.assert_array_equal(hu[k], expected)
    assert hu.min() < -500 < hu.max()


@pytest.mark.parametrize("orientation", [(1.0, 0.0, 0.0, 0.0, -1.0, 0.0), (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)])
def test_slices_sorted_along_the_normal_not_by_z_or_instance_number(tmp_path, convert, orientation):
    """Normal -z (z descends through the stack) and a coronal stack (normal +y)."""
    s = ct_series(n=5, orientation=orientation, step=3.0)
    write_series(s.datasets, tmp_path / "s")
    code, out = convert(tmp_path / "s", "-o", tmp_path / "out.zarr")
    assert code == 0, out
    hu, attrs = only_case(tmp_path / "out.zarr")
    np.testing.assert_array_equal(hu, s.hu)
    z = np.array(attrs["z_positions_mm"])
    assert np.all(np.diff(z) == pytest.approx(3.0))
    np.testing.assert_allclose(np.array(attrs["direction"])[:, 2], s.normal)
    np.testing.assert_allclose(np.array(attrs["direction"])[:, 0], orientation[:3])
    np.testing.assert_allclose(np.array(attrs["direction"])[:, 1], orientation[3:])
    first = s.datasets[s.order[0]]
    assert attrs["origin_mm"] == pytest.approx([float(v) for v in first.ImagePositionPatient])
    assert attrs["spacing_mm"] == pytest.approx([3.0, 0.8, 0.7])


def test_8_modality_lut_sequence_is_applied_by_pydicom(tmp_path, convert):
    """A Modality LUT Sequence instead of rescale tags: HU = LUT[stored]."""
    from pydicom.sequence import Sequence

    s = ct_series(n=3)  # stored = HU + 1024 in 0..4095: indices into the LUT
    for ds in s.datasets:
        del ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType
        item = Dataset()
        item.LUTDescriptor = [4096, 0, 16]
        item.ModalityLUTType = "HU"
        item.add_new(0x00283006, "US", [2 * i for i in range(4096)])  # LUTData: a LUT that doubles
        ds.ModalityLUTSequence = Sequence([item])
    write_series(s.datasets, tmp_path / "lut")
    code, out = convert(tmp_path / "lut", "-o", tmp_path / "out.zarr")
    assert code == 0, out
    hu, attrs = only_case(tmp_path / "out.zarr")
    np.testing.assert_array_equal(hu, 2 * (s.hu + 1024))
    assert attrs["modality_lut"] == "ModalityLUTSequence"
