"""Phantom cases on disk: what `tcsmae phantom -o DIR` writes.

    DIR/dicom/phantom_000/IM0001.dcm ...  one axial CT series per case (explicit VR little
                                          endian; InstanceNumber 1 = most superior slice)
    DIR/labels/phantom_000.nii.gz         uint8 label map, RAS+ layout, on the DICOM grid
    DIR/manifest.csv                      source, labels, case_id, patient_id (relative paths)

Files are the same byte for byte for a given seed (UIDs derive from (seed, case, slice)).
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np

from tcsmae.errors import UserError
from tcsmae.phantom.anatomy import GENERATOR_VERSION, PhantomCase, PhantomConfig, make_case
from tcsmae.store.geometry import store_to_nifti

RESCALE_INTERCEPT = -1024
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's UID root


# ----------------------------------------------------------------------------- writing


def _uid(*parts) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(prefix=UID_PREFIX, entropy_srcs=["tcsmae-phantom", *map(str, parts)])


def _fmt(v: float) -> str:
    """A DICOM decimal string (<= 16 characters) for a float."""
    s = f"{v:.6f}".rstrip("0").rstrip(".")
    return s if len(s) <= 16 else f"{v:.8g}"


def write_dicom_series(case: PhantomCase, folder: Path, seed: int, index: int) -> list[Path]:
    """Write the case as one CT series, a file per slice; returns the file paths."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    folder.mkdir(parents=True, exist_ok=True)
    nz, ny, nx = case.hu.shape
    dz, ps, _ = case.spacing_mm
    study, series, frame = _uid(seed, index, "study"), _uid(seed, index, "series"), _uid(seed, index, "for")
    paths = []
    for k in range(nz):
        instance = nz - k  # 1 = most superior slice
        sop = _uid(seed, index, "sop", k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"IM{instance:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientID = case.patient_id
        ds.PatientName = f"Phantom^{seed:04d}^{index:03d}"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.StudyID = "1"
        ds.Modality = "CT"
        ds.Manufacturer = "tcsmae phantom"
        ds.ManufacturerModelName = f"phantom v{GENERATOR_VERSION}"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SeriesNumber = 1
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = instance
        ds.PatientPosition = "HFS"
        ds.KVP = "120"
        ds.SliceThickness = _fmt(dz)
        z = case.origin_mm[2] + k * dz
        ds.ImagePositionPatient = [_fmt(case.origin_mm[0]), _fmt(case.origin_mm[1]), _fmt(z)]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceLocation = _fmt(z)
        ds.PixelSpacing = [_fmt(ps), _fmt(ps)]
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = str(RESCALE_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        stored = (case.hu[k].astype(np.int32) - RESCALE_INTERCEPT).astype("<i2")
        ds.PixelData = stored.tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def label_nifti(case: PhantomCase):
    """The case's label map as a nibabel Nifti1Image, uint8, RAS+ layout, affine from the DICOM grid."""

    attrs = {"spacing_mm": list(case.spacing_mm), "origin_mm": list(case.origin_mm),
             "direction": np.eye(3).tolist()}
    return store_to_nifti(case.labels, attrs, dtype=np.uint8)


def write_phantom(cfg: PhantomConfig, out: Path, overwrite: bool = False, progress: bool = True) -> list[PhantomCase]:
    """Write cfg.cases cases under `out` (layout: the module docstring); returns the cases'
    summaries without their arrays (make_case(cfg, i) gives them again, identically).
    Each case folder appears atomically (temp folder + rename); manifest.csv is written last."""
    import dataclasses

    import nibabel as nib
    from tqdm import tqdm

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder; choose another -o")
    manifest_path = out / "manifest.csv"
    if manifest_path.exists() or (out / "dicom").exists():
        if not overwrite:
            raise UserError(f"{out} already holds a phantom (dicom/ or manifest.csv); pass --overwrite "
                            "to replace it, or choose another -o")
        for name in ("dicom", "labels"):
            shutil.rmtree(out / name, ignore_errors=True)
        manifest_path.unlink(missing_ok=True)
    (out / "dicom").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)

    cases, rows = [], []
    for i in tqdm(range(cfg.cases), desc="phantom", unit="case", disable=not progress):
        case = make_case(cfg, i)
        final = out / "dicom" / case.case_id
        tmp = out / "dicom" / f".tmp-{case.case_id}"
        shutil.rmtree(tmp, ignore_errors=True)
        write_dicom_series(case, tmp, cfg.seed, i)
        os.replace(tmp, final)
        label_path = out / "labels" / f"{case.case_id}.nii.gz"
        tmp_label = out / "labels" / f".tmp-{case.case_id}.nii.gz"
        nib.save(label_nifti(case), str(tmp_label))
        os.replace(tmp_label, label_path)
        rows.append({"source": f"dicom/{case.case_id}", "labels": f"labels/{case.case_id}.nii.gz",
                     "case_id": case.case_id, "patient_id": case.patient_id})
        cases.append(dataclasses.replace(case, hu=None, labels=None))
    tmp_manifest = out / ".manifest.csv.tmp"
    with open(tmp_manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["source", "labels", "case_id", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp_manifest, manifest_path)
    return cases
