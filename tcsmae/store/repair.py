"""The command that rewrites one damaged case of a store from its source.

The converters record the arguments of each case's conversion (`conversion_arguments`, the
`conversion` attribute); `repair_command` turns them back into `tcsmae convert ...
--overwrite` or `tcsmae convert-nifti ... --overwrite`, or, for a case without them, into a
best guess that says what to check (docs/store-format.md, "Checking a store").
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

from tcsmae.store.format import CODECS


def conversion_arguments(command: str, sources: list, labels, case_id: str | None,
                         patient_id: str | None) -> dict:
    """A case's `conversion` attribute, without its codec (added by the writer's caller): the
    arguments that convert it again, as given (None: not given), paths made absolute.

    command: "convert" or "convert-nifti"; sources: the SRC arguments (or the manifest row's
    source); labels: the label map argument or None."""
    return {
        "command": command,
        "sources": [os.path.abspath(s) for s in sources],
        "labels": None if labels is None else os.path.abspath(labels),
        "case_id": case_id,
        "patient_id": patient_id,
    }


def _generic(store: Path) -> str:
    return (f"`tcsmae convert SRC -o {shlex.quote(str(store))} --overwrite` (SRC: the case's "
            "DICOM folder; `tcsmae convert-nifti` for a NIfTI file)")


def image_attrs(store: Path, case_id: str) -> dict | None:
    try:
        attrs = json.loads((store / "images" / case_id / "zarr.json").read_text())["attributes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return attrs if isinstance(attrs, dict) else None


def _recorded_words(conversion: dict) -> list[str] | None:
    """The command line (without -o) from a `conversion` attribute, or None when it is not one."""
    command, sources = conversion.get("command"), conversion.get("sources")
    if command not in ("convert", "convert-nifti") or not isinstance(sources, list) or not sources:
        return None
    words = ["tcsmae", command, *map(str, sources)]
    for flag, key in (("--labels", "labels"), ("--case-id", "case_id"), ("--patient-id", "patient_id"),
                      ("--structure-ids", "structure_ids")):
        if conversion.get(key) is not None:
            words += [flag, str(conversion[key])]
    if conversion.get("codec") in CODECS:
        words += ["--codec", conversion["codec"]]
    return words


def _dicom_default_id(case_id: str, series_uid: str) -> bool:
    """Whether the converter would choose `case_id` by itself (no --case-id needed)."""
    if series_uid:
        return case_id == series_uid or re.fullmatch(re.escape(series_uid) + r"_\d+", case_id) is not None
    return re.fullmatch(r"dcm-[0-9a-f]+(_\d+)?", case_id) is not None


def _dicom_patient_override(attrs: dict) -> bool:
    """Whether the case was converted with --patient-id (or a manifest patient_id): its source
    digest then equals inputs_digest of its DICOM digest, label map and patient id."""
    dicom, source, patient = attrs.get("dicom_sha256"), attrs.get("source_sha256"), attrs.get("patient_id")
    if not dicom or not source or source == dicom or not patient:
        return False
    try:
        return inputs_digest(dicom, attrs.get("labels_source") or None, patient) == source
    except OSError:
        return False


def _guessed_words(attrs: dict, case_id: str) -> tuple[list[str], list[str]]:
    """(command line without -o, the parts to check) for a case converted before its
    arguments were recorded."""
    first = attrs["source_first_file"]
    labels = attrs.get("labels_source")
    patient = attrs.get("patient_id") or ""
    check = []
    if attrs.get("source_format") == "nifti":
        is_folder = labels and Path(labels).name == "segmentations" and attrs.get("label_table")
        words = ["tcsmae", "convert-nifti", str(Path(first).parent) if is_folder else first]
        if labels and not is_folder:
            words += ["--labels", labels]
        words += ["--case-id", case_id]
        if patient:
            words += ["--patient-id", patient]
        if not Path(first).is_absolute() or (labels and not Path(labels).is_absolute()):
            check.append("the paths (as typed then, relative to the folder that conversion ran in)")
    else:
        words = ["tcsmae", "convert", str(Path(first).parent)]
        check.append("that SRC holds the whole series (the folder of its first file; the series may span "
                     "several folders, and other series in it are converted again too)")
        if labels:
            words += ["--labels", labels]
            if not Path(labels).is_absolute():
                check.append("the --labels path (as typed then, relative to the folder that conversion ran in)")
        if not _dicom_default_id(case_id, attrs.get("series_uid", "")):
            words += ["--case-id", case_id]
        if _dicom_patient_override(attrs):
            words += ["--patient-id", patient]
        else:
            check.append(f"whether it needs --patient-id (the case records patient id {patient!r})")
    if attrs.get("codec") in CODECS:
        words += ["--codec", attrs["codec"]]
    return words, check


def repair_command(store: str | Path, case_id: str) -> str:
    """`tcsmae convert ... -o STORE --overwrite` (in backquotes) that rewrites case `case_id`:
    from its recorded conversion arguments; for a case converted before they were recorded,
    a best guess followed by what to check; a generic form when its attributes are unreadable."""
    store = Path(store)
    attrs = image_attrs(store, case_id)
    if not attrs:
        return _generic(store)
    conversion = attrs.get("conversion")
    words = _recorded_words(conversion) if isinstance(conversion, dict) else None
    check: list[str] = []
    if words is None:
        if not attrs.get("source_first_file"):
            return _generic(store)
        words, check = _guessed_words(attrs, case_id)
    words += ["-o", str(store), "--overwrite"]
    command = "`" + " ".join(shlex.quote(w) for w in words) + "`"
    if check:
        command += (" (a best guess: the case was converted before tcsmae recorded its conversion "
                    f"arguments; check {'; '.join(check)})")
    return command


def inputs_digest(dicom_digest: str, labels, patient_id: str | None) -> str:
    """The case's source digest: its DICOM files, plus the label map (a path, hashed) and the
    patient id when given (so that adding labels later is a change, not 'up to date').
    The repair command recomputes it to recognise a --patient-id override. OSError: unreadable labels."""
    import hashlib

    if labels is None and patient_id is None:
        return dicom_digest
    parts = [dicom_digest]
    if labels is not None:
        with open(labels, "rb") as f:
            parts.append("labels:" + hashlib.file_digest(f, "sha256").hexdigest())
    if patient_id is not None:
        parts.append("patient_id:" + patient_id)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()
