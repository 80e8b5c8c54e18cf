"""Find DICOM files, read and classify their headers, and group the slices into series.

    files = discover_files([folder, ...])     # every regular file, recursively
    scans = [scan_file(f) for f in files]     # header only: class, geometry, digest
    plans, refusals = plan_series(scans)      # the series to convert, and why not the others

convert/dicom_volume.py then reads each plan. How files are classified and grouped, and the
array and geometry conventions: docs/store-format.md ("Converters", "Orientation convention").
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tcsmae.convert.manifest import NIFTI_SUFFIXES

# SOP classes (file_meta.MediaStorageSOPClassUID)
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.2"
MULTIFRAME_CT = (ENHANCED_CT, LEGACY_ENHANCED_CT)
MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"
SECONDARY_CAPTURE = (
    "1.2.840.10008.5.1.4.1.1.7",
    "1.2.840.10008.5.1.4.1.1.7.1",
    "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3",
    "1.2.840.10008.5.1.4.1.1.7.4",
)
PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

MIN_SLICES = 3
"""A series with fewer slices is refused (no volume to speak of)."""
POSITION_TOL_MM = 1e-3
"""Slices closer than this along the normal share one position (duplicates)."""
SPACING_REL_TOL = 0.01
"""Steps differing from the median step by more than this fraction (and 0.01 mm) are uneven."""
TILT_TOL_DEG = 0.01
"""Slice positions deviating from the normal by more than this angle count as gantry tilt."""
PLAUSIBLE_HU = (-1200.0, 4000.0)
"""HU outside this range after decoding (padding replaced) gives a warning."""
PADDING_HU = -1024.0
"""HU given to PixelPaddingValue voxels (air)."""

# pip packages that bring a decoder for each compressed transfer syntax (pydicom plugins)
DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.4.80": "pylibjpeg pylibjpeg-libjpeg",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "pylibjpeg pylibjpeg-libjpeg",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg",  # JPEG lossless P14
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg",  # JPEG lossless P14 SV1
    "1.2.840.10008.1.2.4.50": "pylibjpeg pylibjpeg-libjpeg",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "pylibjpeg pylibjpeg-libjpeg",  # JPEG extended
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",  # RLE lossless
}


class SeriesError(Exception):
    """A series cannot be converted; `path` names the file at fault (or None)."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class SliceHeader:
    """Header facts of one slice (one file, or one frame of an enhanced multi-frame file)."""

    path: str
    frame: int | None  # frame index in a multi-frame file, None for a single-frame file
    sop_uid: str  # file_meta.MediaStorageSOPInstanceUID ('' if absent)
    transfer_syntax: str
    series_uid: str
    study_uid: str
    patient_id: str
    frame_of_reference_uid: str
    series_number: str
    acquisition_number: str
    position: tuple[float, float, float] | None  # ImagePositionPatient, LPS mm
    orientation: tuple[float, ...] | None  # ImageOrientationPatient, 6 direction cosines
    rows: int
    columns: int
    pixel_spacing: tuple[float, float] | None  # (row spacing = y, column spacing = x), mm
    rescale: tuple[float, float] | None = None  # (slope, intercept) of a multi-frame frame
    problem: str = ""  # why this slice cannot be used ('' = fine)


@dataclass
class ScanResult:
    """What `scan_file` found in one file.

    kind: 'image' (headers filled), 'junk' (not DICOM), 'unreadable' (DICOM but corrupt),
    'localizer', 'secondary-capture', 'non-image' (no pixel data, DICOMDIR, SR, SEG, ...),
    'not-ct' (an image of another modality).
    """

    path: str
    kind: str
    reason: str = ""
    sha256: str = ""
    headers: list[SliceHeader] = field(default_factory=list)


SKIPPED_BY_DESIGN = ("junk", "localizer", "secondary-capture", "non-image", "not-ct")


# ---------------------------------------------------------------- discovery and scanning
def discover_files(sources: list[str | Path]) -> list[Path]:
    """Every regular file under `sources` (files or folders, searched recursively), sorted.

    Hidden files and folders (name starting with '.') are left out. Raises FileNotFoundError
    naming a source that does not exist.
    """
    found: list[Path] = []
    for src in sources:
        src = Path(src)
        if src.is_file():
            found.append(src)
        elif src.is_dir():
            for root, dirs, names in os.walk(src):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found.extend(Path(root) / n for n in sorted(names) if not n.startswith("."))
        else:
            raise FileNotFoundError(str(src))
    unique = sorted({p.resolve() for p in found})
    return unique


@contextmanager
def quiet_pydicom():
    """Silence pydicom's value-validation warnings (a 600,000-file run would print thousands)."""
    from pydicom import config

    old = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        config.settings.reading_validation_mode = old


def scan_file(path: str | Path) -> ScanResult:
    """Read the header of one file (pixel data is skipped, not decoded) and classify it.

    The file is streamed once through sha256 (for the case's source digest, in bounded
    memory), which also brings it into the page cache for the decoding step.
    """
    with quiet_pydicom():
        return _scan_file(path)


def _scan_file(path: str | Path) -> ScanResult:
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = str(path)
    try:
        with open(path, "rb") as f:
            f.seek(128)
            if f.read(4) != b"DICM":  # a Part 10 file; anything else is junk (pydicom agrees)
                if path.endswith(NIFTI_SUFFIXES):
                    return ScanResult(path, "junk", "a NIfTI file, not DICOM: use `tcsmae convert-nifti`")
                return ScanResult(path, "junk", "not a DICOM file (no DICM preamble)")
            f.seek(0)
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as exc:
        return ScanResult(path, "unreadable", f"cannot read file: {exc}")
    try:
        ds = pydicom.dcmread(path, defer_size=1024)  # large values (pixel data) are skipped, not read
    except InvalidDicomError as exc:
        return ScanResult(path, "unreadable", f"invalid DICOM file ({exc})", digest)
    except Exception as exc:  # pydicom raises many types on corrupt input
        return ScanResult(path, "unreadable", f"corrupt or truncated DICOM ({type(exc).__name__}: {exc})", digest)
    try:
        return _classify(ds, path, digest)
    except Exception as exc:  # a header value pydicom parsed but that makes no sense
        return ScanResult(path, "unreadable", f"unusable DICOM header ({type(exc).__name__}: {exc})", digest)


def _classify(ds, path: str, digest: str) -> ScanResult:
    meta = getattr(ds, "file_meta", None)
    sop_class = str(getattr(meta, "MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", "") or "")
    has_pixels = any(tag in ds for tag in PIXEL_TAGS)
    modality = str(ds.get("Modality", "") or "").upper()
    if sop_class == MEDIA_DIRECTORY or "DirectoryRecordSequence" in ds:
        return ScanResult(path, "non-image", "DICOMDIR", digest)
    if sop_class in SECONDARY_CAPTURE:
        return ScanResult(path, "secondary-capture", "secondary capture", digest)
    is_ct = sop_class in (CT_IMAGE, *MULTIFRAME_CT) or (not sop_class and modality == "CT")
    if not is_ct:
        if not has_pixels:
            return ScanResult(path, "non-image", f"no pixel data ({_uid_name(sop_class) or 'unknown class'})", digest)
        return ScanResult(path, "not-ct", f"not a CT image ({_uid_name(sop_class) or modality or 'unknown class'})", digest)
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        return ScanResult(path, "localizer", "localizer/scout image", digest)

    sop_uid = str(getattr(meta, "MediaStorageSOPInstanceUID", "") or ds.get("SOPInstanceUID", "") or "")
    ts = str(getattr(meta, "TransferSyntaxUID", "") or "1.2.840.10008.1.2")
    common = dict(
        path=path,
        sop_uid=sop_uid,
        transfer_syntax=ts,
        series_uid=_text(ds, "SeriesInstanceUID"),
        study_uid=_text(ds, "StudyInstanceUID"),
        patient_id=_text(ds, "PatientID"),
        frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"),
        series_number=_text(ds, "SeriesNumber"),
        acquisition_number=_text(ds, "AcquisitionNumber"),
        rows=int(ds.get("Rows", 0) or 0),
        columns=int(ds.get("Columns", 0) or 0),
    )
    problem = "" if has_pixels else "CT image without pixel data (truncated file?)"
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if sop_class in MULTIFRAME_CT:
        headers = _multiframe_headers(ds, frames, common, problem)
    else:
        if frames > 1 and not problem:
            problem = f"CT Image Storage file with NumberOfFrames={frames}; not supported"
        headers = [
            SliceHeader(
                frame=None,
                position=_floats(ds.get("ImagePositionPatient"), 3),
                orientation=_floats(ds.get("ImageOrientationPatient"), 6),
                pixel_spacing=_floats(ds.get("PixelSpacing"), 2),
                problem=problem,
                **common,
            )
        ]
    return ScanResult(path, "image", "", digest, headers)


def _multiframe_headers(ds, frames: int, common: dict, problem: str) -> list[SliceHeader]:
    """One SliceHeader per frame of an enhanced CT, from the functional group sequences."""
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != frames and not problem:
        problem = (
            f"enhanced multi-frame CT has {len(per_frame)} per-frame functional groups for "
            f"{frames} frames; cannot place its frames"
        )

    def group(item, sequence: str, attr: str):
        for source in (item, shared):
            if source is not None and sequence in source and len(source[sequence].value) > 0:
                value = source[sequence].value[0].get(attr)
                if value is not None and value != "":
                    return value
        return None

    headers = []
    for f in range(frames):
        item = per_frame[f] if f < len(per_frame) else None
        position = _floats(group(item, "PlanePositionSequence", "ImagePositionPatient"), 3)
        orientation = _floats(group(item, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        spacing = _floats(group(item, "PixelMeasuresSequence", "PixelSpacing"), 2)
        slope = group(item, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = group(item, "PixelValueTransformationSequence", "RescaleIntercept")
        rescale = None if slope is None or intercept is None else (float(slope), float(intercept))
        frame_problem = problem
        if not frame_problem and position is None:
            frame_problem = f"enhanced multi-frame CT frame {f} has no PlanePositionSequence/ImagePositionPatient"
        headers.append(
            SliceHeader(
                frame=f, position=position, orientation=orientation, pixel_spacing=spacing,
                rescale=rescale, problem=frame_problem, **common,
            )
        )
    return headers


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        if value is None or isinstance(value, (str, bytes)) or len(value) != n:
            return None
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None


def _uid_name(uid: str) -> str:
    from pydicom.uid import UID

    if not uid:
        return ""
    name = UID(uid).name
    return name if name != uid else uid


# ---------------------------------------------------------------- grouping into series
@dataclass
class SeriesPlan:
    """One series to convert: its slices (unsorted), case id and digests."""

    case_id: str
    description: str  # how the series was identified, for messages
    slices: list[SliceHeader]
    source_sha256: str  # digest of the source files (order-independent); plus label map and patient id when given
    dicom_sha256: str = ""  # digest of the DICOM files alone (tells a changed image from changed labels)
    warnings: list[str] = field(default_factory=list)
    labels: str | None = None  # NIfTI label map to align to this series
    patient_id: str | None = None  # override of the patient id
    conversion: dict = field(default_factory=dict)  # the arguments that convert it, recorded for repairs

    @property
    def first_file(self) -> str:
        return self.slices[0].path


@dataclass
class Refusal:
    """A series (or file) not converted. failed=False: skipped for a reason (too few slices,
    missing tags), shown as 'skipped'; both count against the exit code (an image series
    that was not converted)."""

    what: str
    reason: str
    path: str | None = None
    failed: bool = True


def series_key(h: SliceHeader) -> str:
    """Series identity: SeriesInstanceUID, else FrameOfReferenceUID+SeriesNumber+AcquisitionNumber."""
    if h.series_uid:
        return h.series_uid
    return f"FoR={h.frame_of_reference_uid or '-'} SeriesNumber={h.series_number or '-'} AcquisitionNumber={h.acquisition_number or '-'}"


def _valid_geometry(h: SliceHeader) -> bool:
    r, c = np.asarray(h.orientation[:3]), np.asarray(h.orientation[3:])
    unit = abs(np.linalg.norm(r) - 1) < 1e-2 and abs(np.linalg.norm(c) - 1) < 1e-2
    finite = np.all(np.isfinite(h.orientation)) and np.all(np.isfinite(h.position)) and np.all(np.isfinite(h.pixel_spacing))
    return bool(finite and unit and abs(r @ c) < 1e-2 and min(h.pixel_spacing) > 0 and h.rows > 0 and h.columns > 0)


def _geometry_key(h: SliceHeader) -> tuple:
    iop = tuple(round(v, 4) + 0.0 for v in h.orientation) if h.orientation else None
    ps = tuple(round(v, 4) for v in h.pixel_spacing) if h.pixel_spacing else None
    return (h.rows, h.columns, ps, iop)


def _describe_geometry(key: tuple) -> str:
    rows, cols, ps, iop = key
    return f"{rows}x{cols} pixels, PixelSpacing {list(ps) if ps else None}, orientation {list(iop) if iop else None}"


def plan_series(scans: list[ScanResult]) -> tuple[list[SeriesPlan], list[Refusal]]:
    """Group the image slices of `scans` into series and check what headers can tell.

    Returns the series to convert and the refusals: unreadable files, series with missing
    position/orientation, fewer than MIN_SLICES slices, orientation/size varying within a
    series (unless it splits cleanly into stacks of >= MIN_SLICES each), missing decoders.
    """
    sha_of = {s.path: s.sha256 for s in scans}
    refusals = [Refusal(s.path, s.reason, s.path) for s in scans if s.kind == "unreadable"]
    groups: dict[str, list[SliceHeader]] = defaultdict(list)
    for s in scans:
        if s.kind == "image":
            for h in s.headers:
                groups[series_key(h)].append(h)

    plans: list[SeriesPlan] = []
    for key, slices in sorted(groups.items()):
        refusal = _header_refusal(key, slices)
        if refusal is None:
            stacks: dict[tuple, list[SliceHeader]] = defaultdict(list)
            for h in slices:
                stacks[_geometry_key(h)].append(h)
            refusal = _mixed_geometry_refusal(key, stacks)
        if refusal is not None:
            refusals.append(refusal)
            continue
        stack_plans, stack_refusals = _plan_stacks(key, stacks, sha_of)
        plans += stack_plans
        refusals += stack_refusals
    return plans, refusals


def _header_refusal(key: str, slices: list[SliceHeader]) -> Refusal | None:
    """Why the series `key` cannot be placed from its headers (a slice's problem, missing or
    invalid geometry tags), or None."""
    bad = next((h for h in slices if h.problem), None)
    if bad is not None:
        return Refusal(key, bad.problem, bad.path)
    missing = next((h for h in slices if h.position is None or h.orientation is None or h.pixel_spacing is None), None)
    if missing is not None:
        tags = [n for n, v in (("ImagePositionPatient", missing.position),
                               ("ImageOrientationPatient", missing.orientation),
                               ("PixelSpacing", missing.pixel_spacing)) if v is None]
        return Refusal(key, f"missing {', '.join(tags)}; cannot place the slices", missing.path, failed=False)
    odd = next((h for h in slices if not _valid_geometry(h)), None)
    if odd is not None:
        return Refusal(
            key, f"invalid geometry tags: ImageOrientationPatient {list(odd.orientation)} (two orthogonal unit "
            f"vectors expected), PixelSpacing {list(odd.pixel_spacing)} (positive expected)", odd.path,
        )
    return None


def _mixed_geometry_refusal(key: str, stacks: dict[tuple, list[SliceHeader]]) -> Refusal | None:
    """A refusal when orientation or size varies within the series and some stack of one
    geometry has fewer than MIN_SLICES slices (no clean split), else None."""
    if len(stacks) <= 1 or min(len(v) for v in stacks.values()) >= MIN_SLICES:
        return None
    majority = max(stacks, key=lambda k: len(stacks[k]))
    odd_key = next(k for k in stacks if k != majority)
    odd = stacks[odd_key][0]
    return Refusal(
        key,
        f"orientation or size varies within the series: {odd.path} has {_describe_geometry(odd_key)}, "
        f"while {len(stacks[majority])} slices have {_describe_geometry(majority)}",
        odd.path,
    )


def _plan_stacks(key: str, stacks: dict[tuple, list[SliceHeader]], sha_of: dict[str, str]):
    """One SeriesPlan per stack of one geometry (case id `<uid>_<n>` when split), or a Refusal
    (too few positions, no decoder). Returns (plans, refusals)."""
    plans, refusals = [], []
    ordered = sorted(stacks.items(), key=lambda kv: repr(kv[0]))
    for index, (gkey, stack) in enumerate(ordered):
        description = (key if len(ordered) == 1
                       else f"{key} (stack {index + 1} of {len(ordered)}: {_describe_geometry(gkey)})")
        n_positions = _count_positions(stack)
        if n_positions < MIN_SLICES:
            refusals.append(Refusal(description, f"only {n_positions} slice position(s); at least {MIN_SLICES} needed",
                                    stack[0].path, failed=False))
            continue
        missing_decoder = check_decoders({h.transfer_syntax for h in stack})
        if missing_decoder:
            refusals.append(Refusal(description, missing_decoder, stack[0].path))
            continue
        base = stack[0].series_uid
        if base:
            case_id = base if len(ordered) == 1 else f"{base}_{index + 1}"
        else:
            case_id = "dcm-" + _digest(sorted({h.sop_uid or sha_of[h.path] for h in stack}))[:24]
        files = sorted({h.path for h in stack})
        digest = _digest(sorted(sha_of[p] for p in files))
        plan = SeriesPlan(case_id, description, stack, digest, dicom_sha256=digest)
        if len(ordered) > 1:
            plan.warnings.append(f"series {key} split by orientation/size into {len(ordered)} stacks; "
                                 f"this is stack {index + 1}")
        plans.append(plan)
    return plans, refusals


def _digest(items: list[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


def _count_positions(stack: list[SliceHeader]) -> int:
    normal = slice_normal(stack[0].orientation)
    d = np.sort([float(np.dot(h.position, normal)) for h in stack])
    return int(1 + np.count_nonzero(np.diff(d) > POSITION_TOL_MM)) if len(d) else 0


def check_decoders(transfer_syntaxes: set[str]) -> str:
    """'' if pydicom can decode every syntax, else a message naming the syntax and the fix."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    for ts in sorted(transfer_syntaxes):
        uid = UID(ts)
        try:
            decoder = get_decoder(uid)
        except NotImplementedError:
            return f"no pixel data decoder exists in pydicom for transfer syntax {uid.name} ({ts})"
        if not decoder.is_available:
            packages = DECODER_PACKAGES.get(ts, "pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg pylibjpeg-rle")
            deps = "; ".join(decoder.missing_dependencies)
            return (
                f"no decoder installed for transfer syntax {uid.name} ({ts}); install one with "
                f"`pip install {packages}`" + (f" (pydicom plugins: {deps})" if deps else "")
            )
    return ""


def slice_normal(orientation: tuple[float, ...]) -> np.ndarray:
    """Unit slice normal cross(row_dir, col_dir) of ImageOrientationPatient, (3,) float64 LPS."""
    row_dir = np.asarray(orientation[:3], dtype=np.float64)
    col_dir = np.asarray(orientation[3:], dtype=np.float64)
    n = np.cross(row_dir, col_dir)
    return n / np.linalg.norm(n)
