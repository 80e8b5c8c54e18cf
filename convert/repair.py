"""The command that rewrites one damaged case of a store from its source.

A damaged case (missing or corrupted shard file, broken zarr.json) is repaired by converting
its source again with --overwrite; a plain re-run says "up to date", because it compares
source digests, not the stored bytes. `repair_command` rebuilds that command from the
attributes the converter recorded (docs/store-format.md, "Per-array attributes"):

    NIfTI  tcsmae convert-nifti SRC [--labels L] --case-id ID [--patient-id P] -o STORE --overwrite
    DICOM  tcsmae convert DIR [--labels L] [--case-id ID] [--patient-id P] -o STORE --overwrite

SRC is the NIfTI file (or the TotalSegmentator case folder), DIR the folder of the series'
first file. The DICOM --case-id / --patient-id are given only when the original run gave
them (a default id: the SeriesInstanceUID, its `_<n>` stacks, or `dcm-<digest>`; a patient
override: the recorded source digest includes it).
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from pathlib import Path


def _generic(store: Path) -> str:
    return (f"`tcsmae convert SRC -o {shlex.quote(str(store))} --overwrite` (SRC: the case's "
            "DICOM folder; `tcsmae convert-nifti` for a NIfTI file)")


def _image_attrs(store: Path, case_id: str) -> dict | None:
    try:
        attrs = json.loads((store / "images" / case_id / "zarr.json").read_text())["attributes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return attrs if isinstance(attrs, dict) else None


def _dicom_default_id(case_id: str, series_uid: str) -> bool:
    """Whether the converter would choose `case_id` by itself (no --case-id needed)."""
    if series_uid:
        return case_id == series_uid or re.fullmatch(re.escape(series_uid) + r"_\d+", case_id) is not None
    return re.fullmatch(r"dcm-[0-9a-f]+(_\d+)?", case_id) is not None


def _dicom_patient_override(attrs: dict) -> bool:
    """Whether the case was converted with --patient-id (or a manifest patient_id): its source
    digest then equals the DICOM digest combined with `patient_id:<id>` (mirrors
    dicom_to_zarr._with_inputs_digest)."""
    dicom, source, patient = attrs.get("dicom_sha256"), attrs.get("source_sha256"), attrs.get("patient_id")
    if not dicom or not source or source == dicom or not patient:
        return False
    parts = [dicom]
    labels = attrs.get("labels_source")
    if labels:
        try:
            parts.append("labels:" + hashlib.sha256(Path(labels).read_bytes()).hexdigest())
        except OSError:
            return False
    parts.append("patient_id:" + patient)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest() == source


def repair_command(store: str | Path, case_id: str) -> str:
    """`tcsmae convert ... -o STORE --overwrite` (in backquotes) that rewrites case `case_id`
    from the source recorded in its attributes; a generic form when they are unreadable."""
    store = Path(store)
    attrs = _image_attrs(store, case_id)
    first = attrs.get("source_first_file") if attrs else None
    if not first:
        return _generic(store)
    labels = attrs.get("labels_source")
    patient = attrs.get("patient_id") or ""
    if attrs.get("source_format") == "nifti":
        is_folder = labels and Path(labels).name == "segmentations" and attrs.get("label_table")
        words = ["tcsmae", "convert-nifti", str(Path(first).parent) if is_folder else first]
        if labels and not is_folder:
            words += ["--labels", labels]
        words += ["--case-id", case_id]
        if patient:
            words += ["--patient-id", patient]
    else:
        words = ["tcsmae", "convert", str(Path(first).parent)]
        if labels:
            words += ["--labels", labels]
        if not _dicom_default_id(case_id, attrs.get("series_uid", "")):
            words += ["--case-id", case_id]
        if _dicom_patient_override(attrs):
            words += ["--patient-id", patient]
    words += ["-o", str(store), "--overwrite"]
    return "`" + " ".join(shlex.quote(w) for w in words) + "`"
