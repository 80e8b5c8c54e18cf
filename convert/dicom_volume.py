"""Read one planned DICOM series into a HU volume, its Geometry and its store attributes.

`read_series` sorts the slices along the normal, drops identical duplicates, decodes each
slice through its modality LUT (exact int16 when the rescale is integer) and records what a
user should know (uneven spacing, gantry tilt, padding, implausible HU) as warnings;
`case_attrs` gives the image attributes of docs/store-format.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tcsmae.convert.dicom_scan import (
    MIN_SLICES,
    PADDING_HU,
    PLAUSIBLE_HU,
    POSITION_TOL_MM,
    SPACING_REL_TOL,
    TILT_TOL_DEG,
    SeriesError,
    SeriesPlan,
    SliceHeader,
    quiet_pydicom,
    slice_normal,
)
from tcsmae.store.geometry import Geometry


def series_geometry(slices: list[SliceHeader]) -> tuple[Geometry, float, bool]:
    """Geometry of slices already sorted along the normal with unique positions.

    Returns (geometry with per-slice `positions_mm` and a warning for uneven spacing or
    gantry tilt, tilt in degrees (0.0 below TILT_TOL_DEG), whether the steps are uneven).
    """
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
    direction = np.stack([row_dir, col_dir, normal], axis=1)  # (3, 3), columns x, y, z
    geometry = Geometry(
        spacing_mm=(median_step, float(first.pixel_spacing[0]), float(first.pixel_spacing[1])),
        origin_mm=tuple(float(v) for v in positions[0]),
        direction=tuple(tuple(float(v) for v in row) for row in direction),
        z_positions_mm=tuple(float(v) for v in z),
        warnings=tuple(messages),
        positions_mm=tuple(tuple(float(v) for v in p) for p in positions),
    )
    return geometry, tilt, uneven


# ---------------------------------------------------------------- reading pixels
@dataclass
class SeriesVolume:
    """A decoded series: hu (Z, Y, X) HU sorted along the normal (int16 when every value is an
    exact integer in range, else float32), and its facts."""

    hu: np.ndarray
    geometry: Geometry  # with positions_mm, one per slice of hu
    slices: list[SliceHeader]  # sorted, duplicates removed
    warnings: list[str]
    extra_attrs: dict
    tilt_deg: float = 0.0  # gantry tilt, degrees (0.0: slices move along the normal)
    uneven: bool = False  # steps between slices differ (gaps, uneven spacing)


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
    geometry, tilt_deg, uneven = series_geometry(slices)
    messages = list(plan.warnings) + list(geometry.warnings)
    if strict and uneven:
        raise SeriesError(f"--strict: {geometry.warnings[0]}", plan.first_file)
    if strict and tilt_deg > 0:
        raise SeriesError(f"--strict: gantry tilt of {tilt_deg:.2f} deg", plan.first_file)

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
    return SeriesVolume(hu, geometry, slices, messages, _extra_attrs(geometry, tilt_deg, slices, reader),
                        tilt_deg, uneven)


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


def _extra_attrs(geometry: Geometry, tilt_deg: float, slices: list[SliceHeader], reader) -> dict:
    """DICOM-only store attributes: modality LUT, rescales, padding, tilt, multi-frame."""
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
    if tilt_deg > 0:
        extra["tilt_deg"] = tilt_deg
        # the true step between slices (LPS mm); `direction` column z stays the slice normal
        extra["slice_step_mm"] = geometry.slice_step_mm().tolist()
    if any(h.frame is not None for h in slices):
        extra["multiframe"] = True
    return extra


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
    first = volume.slices[0]
    attrs = volume.geometry.to_attrs()  # spacing_mm, origin_mm, direction, z_positions_mm
    attrs.update({
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
    })
    if plan.conversion:
        attrs["conversion"] = dict(plan.conversion)
    attrs.update(volume.extra_attrs)
    return attrs
