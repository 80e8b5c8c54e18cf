"""Builder of small, clean synthetic CT series with pydicom, for tests to alter.

    s = ct_series(n=6)                        # Series: datasets (one per slice) + expected HU
    s.datasets[2].ImageOrientationPatient = [...]   # alter with pydicom
    paths = write_series(s.datasets, tmp_path / "a")

`Series.hu` is the expected volume, (Z, Y, X) float64 HU, in ascending order along the slice
normal (which is not the order of `datasets`, nor of InstanceNumber, nor of file names).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


@dataclass
class Series:
    datasets: list[Dataset]  # in shuffled order
    hu: np.ndarray  # (Z, Y, X) float64 HU, sorted ascending along the normal
    order: list[int]  # order[k] = index in datasets of the k-th slice along the normal
    normal: np.ndarray  # (3,) slice normal


def phantom_hu(n: int, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """(n, rows, cols) int HU: air around a body ellipse with soft tissue, fat, bone, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    cy, cx = (rows - 1) / 2, (cols - 1) / 2
    body = ((yy - cy) / (rows * 0.42)) ** 2 + ((xx - cx) / (cols * 0.45)) ** 2 <= 1
    vol = np.full((n, rows, cols), -1000, dtype=np.int64)
    for k in range(n):
        s = np.where(body, 40, -1000)
        s = np.where(body & (xx < cx - cols * 0.25), -100, s)  # fat on the patient's right
        s = np.where((np.abs(yy - (cy + rows * 0.25)) < 3) & (np.abs(xx - cx) < 3), 700 + 20 * k, s)  # spine
        s = s + rng.integers(-15, 16, size=s.shape)
        s[0, 0] = -1024 + k  # a marker: every slice differs
        vol[k] = s
    return vol


def ct_series(
    n: int = 6,
    rows: int = 32,
    cols: int = 32,
    pixel_spacing: tuple[float, float] = (0.8, 0.7),
    step: float = 2.5,
    origin: tuple[float, float, float] = (-12.0, -11.0, -40.0),
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    slope: float = 1.0,
    intercept: float = -1024.0,
    signed: bool = False,
    bits_stored: int = 12,
    series_uid: str | None = "auto",
    patient_id: str = "PAT-1",
    seed: int = 0,
) -> Series:
    """A clean CT series; stored values = (HU - intercept) / slope (exact integers)."""
    hu = phantom_hu(n, rows, cols, seed).astype(np.float64)
    stored = np.round((hu - intercept) / slope).astype(np.int64)
    hu = stored * slope + intercept
    row_dir = np.array(orientation[:3], float)
    col_dir = np.array(orientation[3:], float)
    normal = np.cross(row_dir, col_dir)
    study_uid, for_uid = generate_uid(), generate_uid()
    series_uid = generate_uid() if series_uid == "auto" else series_uid
    lo = -(2 ** (bits_stored - 1)) if signed else 0
    hi = 2 ** (bits_stored - 1) - 1 if signed else 2**bits_stored - 1
    assert stored.min() >= lo and stored.max() <= hi, "test data does not fit BitsStored"
    datasets = []
    for k in range(n):
        ds = _base_dataset(CTImageStorage)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid or ""
        ds.FrameOfReferenceUID = for_uid
        ds.PatientID = patient_id
        ds.SeriesNumber = 3
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = n - k  # deliberately the reverse of the anatomical order
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [float(v) for v in np.array(origin) + k * step * normal]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
        ds.SliceThickness = abs(step)
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = 1 if signed else 0
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.RescaleType = "HU"
        ds.PixelData = stored[k].astype(np.int16 if signed else np.uint16).tobytes()
        datasets.append(ds)
    rng = np.random.default_rng(seed + 1)
    shuffled = list(rng.permutation(n))
    order = [shuffled.index(k) for k in range(n)]
    return Series([datasets[i] for i in shuffled], hu, order, normal)


def _base_dataset(sop_class: str) -> Dataset:
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    return ds


def set_stored(ds: Dataset, stored: np.ndarray) -> None:
    """Replace the pixel data of an uncompressed dataset with `stored` (Y, X) integers."""
    dtype = np.int16 if ds.PixelRepresentation == 1 else np.uint16
    ds.PixelData = np.asarray(stored).astype(dtype).tobytes()


def stored_of(ds: Dataset) -> np.ndarray:
    """(Y, X) int64 stored values of an uncompressed dataset."""
    dtype = np.int16 if ds.PixelRepresentation == 1 else np.uint16
    return np.frombuffer(ds.PixelData, dtype=dtype).reshape(ds.Rows, ds.Columns).astype(np.int64)


def write_series(datasets: list[Dataset], folder: Path, prefix: str = "") -> list[Path]:
    """Write each dataset as <folder>/<prefix><SOPInstanceUID>.dcm (a proper Part 10 file)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        p = folder / f"{prefix}{ds.file_meta.MediaStorageSOPInstanceUID}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def copy_dataset(ds: Dataset, new_uid: bool = True) -> Dataset:
    """A deep copy, with a fresh SOP instance UID unless new_uid is False."""
    out = copy.deepcopy(ds)
    if new_uid:
        out.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        out.SOPInstanceUID = out.file_meta.MediaStorageSOPInstanceUID
    return out


def sr_document() -> Dataset:
    """A structured report: no pixel data."""
    ds = _base_dataset("1.2.840.10008.5.1.4.1.1.88.22")  # Enhanced SR
    ds.Modality = "SR"
    ds.SOPClassUID = ""  # anonymisers blank it: classification must use file meta
    ds.SeriesInstanceUID = generate_uid()
    return ds


def presentation_state() -> Dataset:
    ds = _base_dataset("1.2.840.10008.5.1.4.1.1.11.1")  # Grayscale Softcopy Presentation State
    ds.Modality = "PR"
    ds.SeriesInstanceUID = generate_uid()
    return ds


def secondary_capture(like: Dataset) -> Dataset:
    """A screenshot-like image in the same series as `like` (same UIDs), SC storage class."""
    ds = copy_dataset(like)
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPClassUID = ""
    return ds


def localizer(like: Dataset) -> Dataset:
    """A scout image in the same series as `like`: ImageType LOCALIZER, coronal orientation."""
    ds = copy_dataset(like)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
    return ds


def enhanced_ct(series: Series, per_frame_rescale: list[tuple[float, float]] | None = None) -> tuple[Dataset, np.ndarray]:
    """One Enhanced CT multi-frame dataset holding the slices of `series` (in shuffled order).

    Positions go in the per-frame PlanePositionSequence; orientation and pixel measures in
    the shared groups; rescale per frame when given (stored values are recomputed so that
    the HU stay those of `series.hu`). Returns (dataset, expected HU (Z, Y, X) sorted).
    """
    src = series.datasets
    first = src[0]
    ds = _base_dataset(ENHANCED_CT)
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "PatientID", "SeriesNumber",
               "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated",
               "BitsStored", "HighBit", "PixelRepresentation"):
        setattr(ds, kw, getattr(first, kw))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.NumberOfFrames = len(src)
    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = list(first.ImageOrientationPatient)
    shared.PlaneOrientationSequence = Sequence([orient])
    measures = Dataset()
    measures.PixelSpacing = list(first.PixelSpacing)
    measures.SliceThickness = first.SliceThickness
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames, per_frame = [], []
    for f, s in enumerate(src):
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = list(s.ImagePositionPatient)
        item.PlanePositionSequence = Sequence([pos])
        slope, intercept = per_frame_rescale[f] if per_frame_rescale else (float(s.RescaleSlope), float(s.RescaleIntercept))
        hu = stored_of(s) * float(s.RescaleSlope) + float(s.RescaleIntercept)
        stored = np.round((hu - intercept) / slope)
        rescale = Dataset()
        rescale.RescaleSlope = slope
        rescale.RescaleIntercept = intercept
        rescale.RescaleType = "HU"
        item.PixelValueTransformationSequence = Sequence([rescale])
        per_frame.append(item)
        frames.append(stored.astype(np.int16 if s.PixelRepresentation == 1 else np.uint16))
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    stack = np.stack(frames)
    ds.PixelData = stack.tobytes()
    expected = np.stack([
        stack[series.order[k]].astype(np.float64) * (per_frame_rescale[series.order[k]][0] if per_frame_rescale else 1.0)
        + (per_frame_rescale[series.order[k]][1] if per_frame_rescale else float(first.RescaleIntercept))
        for k in range(len(src))
    ])
    return ds, expected


# ---------------------------------------------------------------- lossless JPEG (process 14, SV1)
def encode_jpeg_lossless_sv1(image: np.ndarray, precision: int = 16) -> bytes:
    """A minimal lossless JPEG (ITU T.81 process 14, predictor 1) codestream of (Y, X) unsigned ints.

    pydicom has no encoder for this syntax, so tests make their own: predictor 1 (left
    neighbour; first column uses the one above; first pixel 2**(P-1)), one Huffman table
    with every difference category 0..16 coded by a fixed-length 5-bit code.
    """
    img = np.asarray(image, dtype=np.int64)
    rows, cols = img.shape
    pred = np.empty_like(img)
    pred[:, 1:] = img[:, :-1]
    pred[1:, 0] = img[:-1, 0]
    pred[0, 0] = 1 << (precision - 1)
    diff = (img - pred) % 65536
    diff = np.where(diff >= 32768, diff - 65536, diff)  # modulo 2**16 as T.81 H.1.2.1

    bits: list[str] = []
    for d in diff.ravel():
        d = int(d)
        ssss = 0 if d == 0 else abs(d).bit_length()
        bits.append(format(ssss, "05b"))
        if ssss and ssss < 16:
            v = d if d > 0 else d + (1 << ssss) - 1
            bits.append(format(v, f"0{ssss}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    data = bytearray()
    for i in range(0, len(stream), 8):
        byte = int(stream[i:i + 8], 2)
        data.append(byte)
        if byte == 0xFF:
            data.append(0x00)  # byte stuffing

    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload

    sof = bytes([precision]) + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    counts = [0] * 16
    counts[4] = 17  # 17 codes of length 5: categories 0..16
    dht = bytes([0x00]) + bytes(counts) + bytes(range(17))
    sos = bytes([1, 1, 0x00, 1, 0, 0])  # Ss = predictor 1, Se = 0, Ah/Al = 0
    return b"\xff\xd8" + segment(0xC3, sof) + segment(0xC4, dht) + segment(0xDA, sos) + bytes(data) + b"\xff\xd9"


# ---------------------------------------------------------------- NIfTI label maps for a series
def dicom_affine(series: Series) -> np.ndarray:
    """(4, 4) voxel (x, y, z) -> LPS mm affine of a clean (untilted, evenly spaced) series."""
    first = series.datasets[series.order[0]]
    iop = np.array(first.ImageOrientationPatient, float)
    ps = np.array(first.PixelSpacing, float)
    second = series.datasets[series.order[1]]
    step = np.array(second.ImagePositionPatient, float) - np.array(first.ImagePositionPatient, float)
    a = np.eye(4)
    a[:3, 0] = iop[:3] * ps[1]
    a[:3, 1] = iop[3:] * ps[0]
    a[:3, 2] = step
    a[:3, 3] = np.array(first.ImagePositionPatient, float)
    return a


def write_nifti_labels(labels_zyx: np.ndarray, voxel_to_lps: np.ndarray, path: Path,
                       axes: tuple[int, int, int] = (0, 1, 2), flips: tuple[bool, bool, bool] = (False, True, False),
                       dtype=np.uint8) -> Path:
    """Save labels (Z, Y, X) on a DICOM grid as NIfTI (RAS affine), with its axes reordered/flipped.

    flips[a]: DICOM axis a (x, y, z) runs backwards in the file; axes[p]: the DICOM axis that
    NIfTI axis p holds. The default (y flipped) is how dcm2niix-style files store axial CT.
    """
    import nibabel as nib

    xyz = np.transpose(labels_zyx, (2, 1, 0))
    a = voxel_to_lps.copy()
    for ax in range(3):
        if flips[ax]:
            xyz = np.flip(xyz, axis=ax)
            n = xyz.shape[ax]
            f = np.eye(4)
            f[ax, ax] = -1
            f[ax, 3] = n - 1
            a = a @ f
    data = np.transpose(xyz, axes)
    p = np.zeros((4, 4))
    p[3, 3] = 1
    for new, old in enumerate(axes):
        p[old, new] = 1
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ a @ p
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data).astype(dtype), ras), str(path))
    return path
