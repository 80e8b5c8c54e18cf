"""DICOM series: find files, classify them, group slices into series, read a series as HU.

The pipeline of the DICOM converter, each step a plain function:

    files   = discover_files([folder, ...])            # every regular file, recursively
    scans   = [scan_file(f) for f in files]            # header only: class, geometry, digest
    plans, refusals = plan_series(scans)               # group into series, check headers
    volume  = read_series(plan, strict=False)          # decode, HU per slice, sort, checks

Classification uses `file_meta.MediaStorageSOPClassUID` and the presence of pixel data (not
SOPClassUID, which anonymisers blank). Slices are sorted by their position along the slice
normal n = cross(row direction, column direction) of ImageOrientationPatient, ascending.

Array convention of a volume: (Z, Y, X) = (slice, row, column) as stored in the DICOM
files: for an axial series rows run anterior -> posterior, columns patient right -> left.
Geometry attributes (LPS, mm) follow docs/store-format.md: `direction` column 0 is the unit
vector of array axis x (along a row, ImageOrientationPatient[:3]), column 1 of axis y (down
a column, ImageOrientationPatient[3:]), column 2 the slice normal.
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

from tcsmae.convert.nifti_to_zarr import NIFTI_SUFFIXES


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
        bad = next((h for h in slices if h.problem), None)
        if bad is not None:
            refusals.append(Refusal(key, bad.problem, bad.path))
            continue
        missing = next((h for h in slices if h.position is None or h.orientation is None or h.pixel_spacing is None), None)
        if missing is not None:
            tags = [n for n, v in (("ImagePositionPatient", missing.position), ("ImageOrientationPatient", missing.orientation), ("PixelSpacing", missing.pixel_spacing)) if v is None]
            refusals.append(Refusal(key, f"missing {', '.join(tags)}; cannot place the slices", missing.path, failed=False))
            continue
        odd = next((h for h in slices if not _valid_geometry(h)), None)
        if odd is not None:
            refusals.append(Refusal(
                key, f"invalid geometry tags: ImageOrientationPatient {list(odd.orientation)} (two orthogonal unit "
                f"vectors expected), PixelSpacing {list(odd.pixel_spacing)} (positive expected)", odd.path,
            ))
            continue
        stacks: dict[tuple, list[SliceHeader]] = defaultdict(list)
        for h in slices:
            stacks[_geometry_key(h)].append(h)
        if len(stacks) > 1 and min(len(v) for v in stacks.values()) < MIN_SLICES:
            majority = max(stacks, key=lambda k: len(stacks[k]))
            odd_key = next(k for k in stacks if k != majority)
            odd = stacks[odd_key][0]
            refusals.append(Refusal(
                key,
                f"orientation or size varies within the series: {odd.path} has {_describe_geometry(odd_key)}, "
                f"while {len(stacks[majority])} slices have {_describe_geometry(majority)}",
                odd.path,
            ))
            continue
        ordered = sorted(stacks.items(), key=lambda kv: repr(kv[0]))
        for index, (gkey, stack) in enumerate(ordered):
            description = key if len(ordered) == 1 else f"{key} (stack {index + 1} of {len(ordered)}: {_describe_geometry(gkey)})"
            n_positions = _count_positions(stack)
            if n_positions < MIN_SLICES:
                refusals.append(Refusal(description, f"only {n_positions} slice position(s); at least {MIN_SLICES} needed", stack[0].path, failed=False))
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
                plan.warnings.append(f"series {key} split by orientation/size into {len(ordered)} stacks; this is stack {index + 1}")
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


# ---------------------------------------------------------------- geometry
def slice_normal(orientation: tuple[float, ...]) -> np.ndarray:
    """Unit slice normal cross(row_dir, col_dir) of ImageOrientationPatient, (3,) float64 LPS."""
    row_dir = np.asarray(orientation[:3], dtype=np.float64)
    col_dir = np.asarray(orientation[3:], dtype=np.float64)
    n = np.cross(row_dir, col_dir)
    return n / np.linalg.norm(n)


@dataclass
class Geometry:
    """Grid of a sorted series, LPS mm; shape (Z, Y, X)."""

    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]  # (z = median step along normal, y = row spacing, x = column spacing)
    origin_mm: tuple[float, float, float]  # ImagePositionPatient of the first sorted slice
    direction: np.ndarray  # (3, 3) float64; column j = unit vector of array axis j (x, y, z)
    positions_mm: np.ndarray  # (Z, 3) float64 ImagePositionPatient of every slice
    z_positions_mm: np.ndarray  # (Z,) float64 position along the normal
    tilt_deg: float
    warnings: list[str]
    uneven: bool

    def voxel_to_lps(self) -> np.ndarray:
        """(4, 4) float64 affine from (x, y, z, 1) voxel indices to LPS mm (uniform step assumed)."""
        a = np.eye(4)
        a[:3, 0] = self.direction[:, 0] * self.spacing_mm[2]
        a[:3, 1] = self.direction[:, 1] * self.spacing_mm[1]
        z = self.shape[0]
        step = (self.positions_mm[-1] - self.positions_mm[0]) / max(z - 1, 1)
        a[:3, 2] = step
        a[:3, 3] = self.positions_mm[0]
        return a


def series_geometry(slices: list[SliceHeader]) -> Geometry:
    """Geometry of slices already sorted along the normal with unique positions."""
    first = slices[0]
    row_dir = np.asarray(first.orientation[:3], dtype=np.float64)
    col_dir = np.asarray(first.orientation[3:], dtype=np.float64)
    row_dir /= np.linalg.norm(row_dir)
    col_dir /= np.linalg.norm(col_dir)
    normal = slice_normal(first.orientation)
    positions = np.array([h.position for h in slices], dtype=np.float64)  # (Z, 3)
    z = positions @ normal
    steps = np.diff(z)
    median_step = float(np.median(steps))
    messages: list[str] = []
    tol = max(0.01, SPACING_REL_TOL * median_step)
    uneven = bool(np.any(np.abs(steps - median_step) > tol))
    if uneven:
        gaps = [f"{z[i]:.2f}->{z[i + 1]:.2f}" for i in np.flatnonzero(steps > median_step + tol)[:5]]
        messages.append(
            f"uneven slice spacing: steps {steps.min():.3f} to {steps.max():.3f} mm (median {median_step:.3f} mm)"
            + (f"; missing slice(s) between z (mm) {', '.join(gaps)}" if gaps else "")
            + "; true positions are kept in z_positions_mm"
        )
    travel = positions[-1] - positions[0]
    tilt = float(np.degrees(np.arccos(np.clip(abs(travel @ normal) / np.linalg.norm(travel), 0.0, 1.0))))
    if tilt <= TILT_TOL_DEG:
        tilt = 0.0
    else:
        messages.append(f"gantry tilt {tilt:.2f} deg: slice positions are not along the slice normal (grid is sheared)")
    spacing = (median_step, float(first.pixel_spacing[0]), float(first.pixel_spacing[1]))
    return Geometry(
        shape=(len(slices), first.rows, first.columns),
        spacing_mm=spacing,
        origin_mm=tuple(float(v) for v in positions[0]),
        direction=np.stack([row_dir, col_dir, normal], axis=1),
        positions_mm=positions,
        z_positions_mm=z,
        tilt_deg=tilt,
        warnings=messages,
        uneven=uneven,
    )


# ---------------------------------------------------------------- reading pixels
@dataclass
class SeriesVolume:
    """A decoded series: hu (Z, Y, X) float32 HU sorted along the normal, and its facts."""

    hu: np.ndarray
    geometry: Geometry
    slices: list[SliceHeader]  # sorted, duplicates removed
    warnings: list[str]
    extra_attrs: dict


def read_series(plan: SeriesPlan, strict: bool = False) -> SeriesVolume:
    """Decode every slice, apply the modality LUT per slice, sort along the normal, check.

    Slices are sorted by header position first and decoded straight into the volume, so
    a series costs one (Z, Y, X) array: int16 while every slice's HU are exact integers in
    range (integer slope/intercept), float32 otherwise.

    Raises SeriesError (naming the file) for: undecodable/truncated pixel data, differing
    pixels at one position, fewer than MIN_SLICES positions, and under `strict` uneven
    spacing or gantry tilt.
    """
    normal = slice_normal(plan.slices[0].orientation)
    rows, cols = plan.slices[0].rows, plan.slices[0].columns
    ordered = sorted(
        ((float(np.dot(h.position, normal)), h) for h in plan.slices),
        key=lambda t: (t[0], t[1].path, t[1].frame or 0),
    )
    runs: list[list[SliceHeader]] = []  # slices sharing one position
    last = None
    for d, h in ordered:
        if last is not None and abs(d - last) <= POSITION_TOL_MM:
            runs[-1].append(h)
        else:
            runs.append([h])
            last = d
    if len(runs) < MIN_SLICES:
        raise SeriesError(f"only {len(runs)} distinct slice position(s); at least {MIN_SLICES} needed", plan.first_file)
    slices = [run[0] for run in runs]
    geometry = series_geometry(slices)
    messages = list(plan.warnings) + geometry.warnings
    if strict and geometry.uneven:
        raise SeriesError(f"--strict: {geometry.warnings[0]}", plan.first_file)
    if strict and geometry.tilt_deg > 0:
        raise SeriesError(f"--strict: gantry tilt of {geometry.tilt_deg:.2f} deg", plan.first_file)

    with quiet_pydicom():
        hu, dropped, constant, lo, hi, reader = _decode_runs(runs, geometry, rows, cols)
    if dropped:
        messages.append(f"dropped {len(dropped)} duplicate slice(s) with identical pixels: {', '.join(dropped[:5])}")
    if constant:
        messages.append(f"{len(constant)} constant slice(s) after decoding (check the data): {', '.join(constant[:3])}")
    if lo < PLAUSIBLE_HU[0] or hi > PLAUSIBLE_HU[1]:
        messages.append(
            f"implausible HU range [{lo:g}, {hi:g}] for CT (expected within {list(PLAUSIBLE_HU)}); "
            "check RescaleSlope/RescaleIntercept and PixelPaddingValue"
        )
    return _finish(hu, geometry, slices, messages, reader)


def _decode_runs(runs, geometry, rows, cols):
    """Decode the first slice of each position run into the volume; check the others equal it."""
    reader = _SliceReader(rows, cols, multi_frame_paths={h.path for run in runs for h in run if h.frame is not None})
    hu = np.empty((len(runs), rows, cols), dtype=np.int16)
    dropped, constant = [], []
    lo, hi = np.inf, -np.inf
    for z, run in enumerate(runs):
        s = reader.hu(run[0])
        s_lo, s_hi = s.min(), s.max()
        if hu.dtype == np.int16 and (s.dtype.kind == "f" or s_lo < -32768 or s_hi > 32767):
            hu = hu.astype(np.float32)  # once per series at most
        hu[z] = s
        lo, hi = min(lo, float(s_lo)), max(hi, float(s_hi))
        if s_lo == s_hi:
            constant.append(_slice_name(run[0]))
        for other in run[1:]:
            if not np.array_equal(reader.hu(other), s):
                raise SeriesError(
                    f"two slices at one position ({geometry.z_positions_mm[z]:.3f} mm along the normal) differ "
                    f"in pixels: {_slice_name(run[0])} and {_slice_name(other)}", other.path,
                )
            dropped.append(_slice_name(other))
    return hu, dropped, constant, lo, hi, reader


def _finish(hu, geometry, slices, messages, reader) -> SeriesVolume:
    extra: dict = {"modality_lut": ", ".join(sorted(reader.luts))}
    if len(reader.rescales) > 1:
        extra["rescale_varies"] = {
            "slopes": sorted({r[0] for r in reader.rescales})[:16],
            "intercepts": sorted({r[1] for r in reader.rescales})[:16],
        }
    if reader.padding_value is not None:
        extra["padding_value"] = reader.padding_value
        extra["padding_voxels"] = reader.padding_voxels
        extra["padding_hu"] = PADDING_HU
    if geometry.tilt_deg > 0:
        extra["tilt_deg"] = geometry.tilt_deg
        # the true step between slices (LPS mm); `direction` column z stays the slice normal
        extra["slice_step_mm"] = geometry.voxel_to_lps()[:3, 2].tolist()
    if any(h.frame is not None for h in slices):
        extra["multiframe"] = True
    return SeriesVolume(hu, geometry, slices, messages, extra)


class _SliceReader:
    """Decodes slices to HU one at a time; keeps multi-frame files decoded while in use.

    hu(header) -> (Y, X) int32 when the modality LUT is an integer rescale (exactly what
    pydicom's apply_modality_lut computes, without the float64 round trip), else float64
    from pydicom.pixels.apply_modality_lut.
    """

    def __init__(self, rows: int, cols: int, multi_frame_paths: set[str]):
        self.shape = (rows, cols)
        self.multi_frame_paths = multi_frame_paths
        self.cache: dict[str, tuple] = {}
        self.luts: set[str] = set()
        self.rescales: set[tuple[float, float]] = set()
        self.padding_value = None
        self.padding_voxels = 0

    def _load(self, path: str):
        import pydicom

        if path in self.cache:
            return self.cache[path]
        try:
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array
        except Exception as exc:
            raise SeriesError(f"cannot decode pixel data of {path}: {type(exc).__name__}: {exc}", path) from None
        if pixels.ndim == 2:
            pixels = pixels[None]
        if pixels.shape[1:] != self.shape:
            raise SeriesError(f"{path}: pixel array {pixels.shape[1:]} does not match Rows/Columns {self.shape}", path)
        loaded = (ds, pixels, _padding_mask(ds, pixels.dtype))
        if path in self.multi_frame_paths:
            self.cache[path] = loaded
        return loaded

    def hu(self, h: SliceHeader) -> np.ndarray:
        from pydicom.pixels import apply_modality_lut

        ds, pixels, pad = self._load(h.path)
        stored = pixels[h.frame or 0]
        top_level_rescale = False  # pydicom's apply_modality_lut applies exactly this rescale
        if h.rescale is not None:
            slope, intercept = h.rescale
            self.luts.add("rescale (per-frame functional groups)")
        elif "ModalityLUTSequence" in ds:
            slope = intercept = None
            self.luts.add("ModalityLUTSequence")
        elif _has_value(ds, "RescaleSlope") and _has_value(ds, "RescaleIntercept"):
            slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
            top_level_rescale = True
            self.luts.add("rescale")
        elif _has_value(ds, "RescaleSlope") or _has_value(ds, "RescaleIntercept"):
            # pydicom ignores a lone slope or intercept; DICOM's defaults (1, 0) are meant
            slope = float(ds.RescaleSlope) if _has_value(ds, "RescaleSlope") else 1.0
            intercept = float(ds.RescaleIntercept) if _has_value(ds, "RescaleIntercept") else 0.0
            self.luts.add("rescale (slope or intercept missing, DICOM default used)")
        else:
            slope, intercept = 1.0, 0.0
            self.luts.add("none")
        if slope is None:
            hu = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
        else:
            self.rescales.add((slope, intercept))
            if slope.is_integer() and intercept.is_integer() and abs(slope) <= 1024 and abs(intercept) <= 2**20:
                # integer rescale: the same values as pydicom's float64 result, in int32
                hu = stored.astype(np.int32)
                if slope != 1:
                    hu *= int(slope)
                if intercept != 0:
                    hu += int(intercept)
            elif top_level_rescale:
                hu = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
            else:  # per-frame functional groups or a lone slope/intercept, which pydicom ignores
                hu = stored.astype(np.float64) * slope + intercept
        if pad is not None:
            mask = pad(stored)
            n_pad = int(np.count_nonzero(mask))
            if n_pad:
                hu[mask] = PADDING_HU
            self.padding_value = pad.describe
            self.padding_voxels += n_pad
        return hu


def _has_value(ds, keyword: str) -> bool:
    value = ds.get(keyword)
    return value is not None and value != ""


def _slice_name(h: SliceHeader) -> str:
    return h.path if h.frame is None else f"{h.path}[frame {h.frame}]"


class _PaddingMask:
    """Mask of PixelPaddingValue (..PixelPaddingRangeLimit) in stored pixel values."""

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = min(lo, hi), max(lo, hi)
        self.describe = self.lo if self.lo == self.hi else [self.lo, self.hi]

    def __call__(self, stored: np.ndarray) -> np.ndarray:
        if self.lo == self.hi:
            return stored == self.lo
        return (stored >= self.lo) & (stored <= self.hi)


def _padding_mask(ds, dtype: np.dtype) -> _PaddingMask | None:
    if "PixelPaddingValue" not in ds:
        return None
    bits = int(ds.get("BitsAllocated", 16) or 16)

    def as_stored(value) -> int:
        v = int(value)
        if np.dtype(dtype).kind == "i" and v >= 2 ** (bits - 1):
            v -= 2**bits  # US-encoded bit pattern of a signed value
        return v

    lo = as_stored(ds.PixelPaddingValue)
    hi = as_stored(ds.PixelPaddingRangeLimit) if "PixelPaddingRangeLimit" in ds else lo
    return _PaddingMask(lo, hi)


def case_attrs(plan: SeriesPlan, volume: SeriesVolume) -> dict:
    """The store attributes of a converted series (names fixed by docs/store-format.md)."""
    g = volume.geometry
    first = volume.slices[0]
    attrs = {
        "spacing_mm": [float(v) for v in g.spacing_mm],
        "origin_mm": [float(v) for v in g.origin_mm],
        "direction": g.direction.tolist(),
        "z_positions_mm": [float(v) for v in g.z_positions_mm],
        "patient_id": plan.patient_id if plan.patient_id is not None else first.patient_id,
        "study_uid": first.study_uid,
        "series_uid": first.series_uid,
        "source_sha256": plan.source_sha256,
        "dicom_sha256": plan.dicom_sha256,
        "warnings": list(volume.warnings),
        "source_format": "dicom",
        "source_files": len({h.path for h in plan.slices}),
        "source_first_file": plan.first_file,
        "transfer_syntaxes": sorted({h.transfer_syntax for h in plan.slices}),
    }
    if plan.conversion:
        attrs["conversion"] = dict(plan.conversion)
    attrs.update(volume.extra_attrs)
    return attrs
