"""The conversion manifest: a CSV of what to convert, shared by both converters.

Columns `source` (required), `labels`, `case_id`, `patient_id` (docs/store-format.md,
"Conversion inputs"); empty cells mean "not given", other columns are ignored, relative
paths are relative to the manifest's folder. `read_manifest(path)` gives one ManifestRow
per line. Also home of what both converters know about sources (NIFTI_SUFFIXES).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from tcsmae.errors import UserError

COLUMNS = ("source", "labels", "case_id", "patient_id")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
"""File name endings of a NIfTI source (the DICOM converter points such files to convert-nifti)."""


@dataclass(frozen=True)
class ManifestRow:
    """One line of a manifest."""

    source: Path
    """The source to convert, an absolute path (resolved against the manifest's folder)."""
    labels: Path | None
    """Label map for this source, or None."""
    case_id: str | None
    """Case id override, or None for the converter's automatic id."""
    patient_id: str | None
    """Patient id override, or None to keep the source's."""
    line: int
    """Line number in the CSV file (1 = header), for error messages."""


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """Read a manifest CSV; raises UserError naming the file and line for any mistake.

    Checks: the file exists, has a header with a `source` column, every row has a source,
    every named source/labels path exists, and case ids are not repeated.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"manifest {path} does not exist; give a CSV file with columns {', '.join(COLUMNS)}")
    base = path.resolve().parent
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a BOM from spreadsheet exports
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"manifest {path} cannot be read as UTF-8 text ({exc})") from None
    reader = csv.DictReader(text.splitlines())
    header = [(h or "").strip() for h in (reader.fieldnames or [])]
    if "source" not in header:
        raise UserError(
            f"manifest {path}: header {header!r} has no 'source' column; the header row must name "
            f"the columns, e.g. {','.join(COLUMNS)}"
        )
    reader.fieldnames = header
    rows: list[ManifestRow] = []
    seen_ids: dict[str, int] = {}
    for line_no, record in enumerate(reader, start=2):
        cells = {k: (v or "").strip() for k, v in record.items() if k is not None and isinstance(v, str)}
        if not any(cells.values()):
            continue  # blank line
        source = cells.get("source", "")
        if not source:
            raise UserError(f"manifest {path}, line {line_no}: empty 'source' cell; every row needs a source")
        labels = cells.get("labels") or None
        case_id = cells.get("case_id") or None
        patient_id = cells.get("patient_id") or None
        source_path = _resolve(base, source)
        if not source_path.exists():
            raise UserError(f"manifest {path}, line {line_no}: source {source_path} does not exist")
        labels_path = _resolve(base, labels) if labels else None
        if labels_path is not None and not labels_path.is_file():
            raise UserError(f"manifest {path}, line {line_no}: labels file {labels_path} does not exist")
        if case_id is not None:
            if case_id in seen_ids:
                raise UserError(
                    f"manifest {path}, line {line_no}: case_id {case_id!r} already used on line "
                    f"{seen_ids[case_id]}; case ids must be unique"
                )
            seen_ids[case_id] = line_no
        rows.append(ManifestRow(source_path, labels_path, case_id, patient_id, line_no))
    if not rows:
        raise UserError(f"manifest {path} lists no sources (only a header or empty)")
    return rows


def _resolve(base: Path, cell: str) -> Path:
    p = Path(cell).expanduser()
    return p if p.is_absolute() else (base / p)
