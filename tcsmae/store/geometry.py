"""Where a store array sits in patient space (`Geometry`), and exact NIfTI reorientation.

Arrays are (Z, Y, X) like an axial DICOM series, with geometry in patient LPS mm (the
convention and attribute names: docs/store-format.md, "Orientation convention" and
"Per-array attributes"). One `Geometry` type serves every source: the DICOM converter
(with per-slice positions), the NIfTI converter and readers of stored attributes.
`nifti_to_store_grid` and `store_to_nifti` move NIfTI images into and out of this layout
by axis flips and transposes only, never resampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# nibabel axis codes of the store's array axes (Z, Y, X): nibabel names the direction each
# axis runs *toward*, in RAS letters. Z -> Superior, Y -> Posterior, X -> Left.
STORE_AXCODES: tuple[str, str, str] = ("S", "P", "L")

# RAS <-> LPS: negate x and y (an involution, so one matrix serves both ways).
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Geometry:
    """Where a (Z, Y, X) array sits in patient LPS space (docs/store-format.md).

    The LPS position of voxel [k, j, i] (z, y, x) is
    origin_mm + direction @ ([i, j, k] * [spacing_x, spacing_y, spacing_z]) for an even
    grid; `positions_mm`, when known, holds each slice's true position (gaps, uneven steps,
    gantry tilt).
    """

    spacing_mm: tuple[float, float, float]
    """Voxel step along the array axes [z, y, x], mm (always positive; z: median step for DICOM)."""
    origin_mm: tuple[float, float, float]
    """LPS position [x, y, z] of the centre of voxel [0, 0, 0], mm."""
    direction: tuple[tuple[float, float, float], ...]
    """3x3, direction[i][j] = LPS component i of the unit vector of array axis j (x, y, z);
    for DICOM, column z is the slice normal."""
    z_positions_mm: tuple[float, ...]
    """Per slice, first voxel's LPS position projected on the slice normal, mm; length Z."""
    source_affine: tuple[tuple[float, ...], ...] | None = None
    """4x4 RAS voxel-to-world affine of the source NIfTI (its own axis order), if any."""
    source_shape: tuple[int, ...] | None = None
    """Spatial shape of the source NIfTI array (its own axis order), if any."""
    warnings: tuple[str, ...] = field(default=())
    """Things a reader should know (oblique axes, shear, uneven spacing, gantry tilt)."""
    positions_mm: tuple[tuple[float, float, float], ...] | None = None
    """Per slice, LPS [x, y, z] of its first voxel, mm (DICOM ImagePositionPatient), length Z;
    None when the grid is even by construction (NIfTI, stored attributes)."""

    def __post_init__(self):
        assert len(self.spacing_mm) == 3 and all(s > 0 for s in self.spacing_mm), self.spacing_mm
        assert np.asarray(self.direction).shape == (3, 3), self.direction
        assert self.positions_mm is None or len(self.positions_mm) == len(self.z_positions_mm), \
            (len(self.positions_mm), len(self.z_positions_mm))

    def lps_affine_zyx(self) -> np.ndarray:
        """(4, 4) float64: maps homogeneous array index [z, y, x, 1] to LPS mm [x, y, z, 1]
        (the even grid: slice step = direction column z * spacing z)."""
        d = np.asarray(self.direction, dtype=np.float64)
        sz, sy, sx = self.spacing_mm
        aff = np.eye(4)
        aff[:3, 0] = d[:, 2] * sz
        aff[:3, 1] = d[:, 1] * sy
        aff[:3, 2] = d[:, 0] * sx
        aff[:3, 3] = self.origin_mm
        return aff

    def slice_positions_mm(self) -> np.ndarray:
        """(Z, 3) float64: LPS [x, y, z] of each slice's first voxel, mm (`positions_mm`
        when known, else the even grid's)."""
        if self.positions_mm is not None:
            return np.asarray(self.positions_mm, dtype=np.float64).reshape(-1, 3)
        step = np.asarray(self.direction, dtype=np.float64)[:, 2] * self.spacing_mm[0]
        k = np.arange(len(self.z_positions_mm), dtype=np.float64)[:, None]
        return np.asarray(self.origin_mm, dtype=np.float64) + k * step

    def slice_step_mm(self) -> np.ndarray:
        """(3,) float64: LPS vector from the first slice to the next, mm; with `positions_mm`,
        the mean step from the first to the last slice (tilted series: not along the normal)."""
        if self.positions_mm is None:
            return np.asarray(self.direction, dtype=np.float64)[:, 2] * self.spacing_mm[0]
        first, last = np.asarray(self.positions_mm[0]), np.asarray(self.positions_mm[-1])
        return (last - first) / max(len(self.positions_mm) - 1, 1)

    def voxel_to_lps(self) -> np.ndarray:
        """(4, 4) float64: maps voxel index [x, y, z, 1] to LPS mm, slice step `slice_step_mm`
        (the DICOM convention's axis order; `lps_affine_zyx` takes [z, y, x, 1])."""
        d = np.asarray(self.direction, dtype=np.float64)
        a = np.eye(4)
        a[:3, 0] = d[:, 0] * self.spacing_mm[2]
        a[:3, 1] = d[:, 1] * self.spacing_mm[1]
        a[:3, 2] = self.slice_step_mm()
        a[:3, 3] = self.origin_mm  # the first slice's position
        return a

    def to_attrs(self) -> dict:
        """The store's per-array attributes (JSON-ready): spacing_mm, origin_mm, direction,
        z_positions_mm, and source_affine / source_shape when known."""
        attrs = {
            "spacing_mm": [float(v) for v in self.spacing_mm],
            "origin_mm": [float(v) for v in self.origin_mm],
            "direction": [[float(v) for v in row] for row in self.direction],
            "z_positions_mm": [float(v) for v in self.z_positions_mm],
        }
        if self.source_affine is not None:
            attrs["source_affine"] = [[float(v) for v in row] for row in self.source_affine]
        if self.source_shape is not None:
            attrs["source_shape"] = [int(v) for v in self.source_shape]
        return attrs

    @classmethod
    def from_attrs(cls, attrs: dict, n_slices: int | None = None) -> "Geometry":
        """Inverse of `to_attrs` (extra keys ignored). z_positions_mm is recomputed when absent."""
        spacing = tuple(float(v) for v in attrs["spacing_mm"])
        origin = tuple(float(v) for v in attrs["origin_mm"])
        direction = tuple(tuple(float(v) for v in row) for row in attrs["direction"])
        z_pos = attrs.get("z_positions_mm")
        if z_pos is None:
            assert n_slices is not None, "z_positions_mm missing: pass n_slices"
            z_pos = _z_positions(np.asarray(origin), np.asarray(direction), spacing[0], n_slices)
        src_aff = attrs.get("source_affine")
        src_shape = attrs.get("source_shape")
        return cls(
            spacing_mm=spacing,
            origin_mm=origin,
            direction=direction,
            z_positions_mm=tuple(float(v) for v in z_pos),
            source_affine=None if src_aff is None else tuple(tuple(float(v) for v in r) for r in src_aff),
            source_shape=None if src_shape is None else tuple(int(v) for v in src_shape),
            warnings=tuple(attrs.get("warnings", ())),
        )


def _z_positions(origin: np.ndarray, direction: np.ndarray, spacing_z: float, n: int) -> list[float]:
    """Slice positions along the normal = unit(cross(x_dir, y_dir)), as from DICOM IPP."""
    normal = np.cross(direction[:, 0], direction[:, 1])
    normal = normal / np.linalg.norm(normal)
    step = direction[:, 2] * spacing_z
    return [float(np.dot(origin + k * step, normal)) for k in range(n)]


def geometry_from_lps_affine(aff_zyx: np.ndarray, n_slices: int, source_affine=None,
                             source_shape=None, warnings=()) -> Geometry:
    """Geometry of a (Z, Y, X) array whose index [z, y, x, 1] maps to LPS by `aff_zyx` (4x4)."""
    cols = np.asarray(aff_zyx, dtype=np.float64)[:3, :3]
    spacing_zyx = np.linalg.norm(cols, axis=0)  # (3,) for axes z, y, x
    if np.any(spacing_zyx <= 0):
        raise ValueError(f"degenerate affine (zero-length axis): {aff_zyx.tolist()}")
    unit = cols / spacing_zyx  # columns z, y, x
    direction = unit[:, ::-1]  # columns x, y, z
    origin = np.asarray(aff_zyx, dtype=np.float64)[:3, 3]
    warn = list(warnings)
    gram = direction.T @ direction
    if not np.allclose(gram, np.eye(3), atol=1e-4):
        warn.append("voxel axes are not orthogonal (sheared affine, e.g. gantry tilt): "
                    f"axis cosines {np.round(gram[np.triu_indices(3, 1)], 5).tolist()}")
    return Geometry(
        spacing_mm=tuple(float(v) for v in spacing_zyx),
        origin_mm=tuple(float(v) for v in origin),
        direction=tuple(tuple(float(v) for v in row) for row in direction),
        z_positions_mm=tuple(_z_positions(origin, direction, float(spacing_zyx[0]), n_slices)),
        source_affine=None if source_affine is None else tuple(tuple(float(v) for v in r) for r in np.asarray(source_affine)),
        source_shape=None if source_shape is None else tuple(int(v) for v in source_shape),
        warnings=tuple(warn),
    )


def nifti_to_store_grid(img, scaled: bool = True) -> tuple[np.ndarray, Geometry]:
    """Reorient a 3D NIfTI image into the store's (Z, Y, X) layout, exactly (no resampling).

    img: nibabel.Nifti1Image (or any nibabel spatial image) with a 3D array, or 4D with a
         trailing axis of length 1.
    scaled: True -> values with scl_slope/scl_inter applied (np.asanyarray(img.dataobj):
         the on-disk dtype when unscaled, float otherwise); False -> raw stored values.
    Returns (array (Z, Y, X), same dtype as the source values, C-contiguous; Geometry).

    The axis permutation/flips come from nibabel.orientations.io_orientation (nearest
    axis-aligned layout); the geometry is the exact source affine carried through those
    flips, so oblique direction cosines are preserved and noted in Geometry.warnings.
    """
    from nibabel.orientations import (
        apply_orientation,
        axcodes2ornt,
        inv_ornt_aff,
        io_orientation,
        ornt_transform,
    )

    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise ValueError(f"expected a 3D image, got shape {img.shape}")
    data = np.asanyarray(img.dataobj) if scaled else np.asanyarray(img.dataobj.get_unscaled())
    data = data.reshape(shape)
    affine = np.asarray(img.affine, dtype=np.float64)

    transform = ornt_transform(io_orientation(affine), axcodes2ornt(STORE_AXCODES))
    out = np.array(apply_orientation(data, transform), order="C", copy=True)  # owns its memory (no memmap)
    new_affine_ras = affine @ inv_ornt_aff(transform, shape)
    aff_lps = _RAS_TO_LPS @ new_affine_ras

    warnings = []
    unit = aff_lps[:3, :3] / np.linalg.norm(aff_lps[:3, :3], axis=0)
    off_axis_deg = np.degrees(np.arccos(np.clip(np.abs(unit).max(axis=0), 0, 1)))  # per axis
    if np.any(off_axis_deg > 1e-3):
        warnings.append(f"oblique source affine (axes up to {off_axis_deg.max():.3f} deg off the "
                        f"patient axes); stored in the nearest axis-aligned layout, exact affine "
                        f"kept in source_affine")
    geom = geometry_from_lps_affine(aff_lps, out.shape[0], source_affine=affine,
                                    source_shape=shape, warnings=warnings)
    return out, geom


def store_to_nifti(array_zyx: np.ndarray, attrs: dict, dtype=None):
    """A (Z, Y, X) store array (image or label map) back to a nibabel Nifti1Image.

    array_zyx: (Z, Y, X) array on the store grid described by `attrs`.
    attrs: the case's store attributes (spacing_mm, origin_mm, direction, optionally
           source_affine and source_shape, as written by `Geometry.to_attrs`).
    dtype: on-disk dtype of the NIfTI (default: the array's dtype).

    When `source_affine`/`source_shape` are present (the case came from NIfTI), the result has
    the source's own voxel layout and exactly its affine. Otherwise (DICOM source) the array
    is put in the nearest RAS layout (as NIfTI tools expect) with the affine derived from
    the store geometry.
    """
    import nibabel as nib
    from nibabel.orientations import (
        apply_orientation,
        axcodes2ornt,
        inv_ornt_aff,
        io_orientation,
        ornt_transform,
    )

    array_zyx = np.asarray(array_zyx)
    if array_zyx.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) array, got shape {array_zyx.shape}")
    geom = Geometry.from_attrs(attrs, n_slices=array_zyx.shape[0])
    store_aff_ras = _RAS_TO_LPS @ geom.lps_affine_zyx()

    if geom.source_affine is not None:
        target_aff = np.asarray(geom.source_affine, dtype=np.float64)
        target_ornt = io_orientation(target_aff)
    else:
        target_aff = None
        target_ornt = axcodes2ornt(("R", "A", "S"))  # axis i runs toward R, A, S
    # The array's layout as its affine says (STORE_AXCODES for NIfTI sources; a DICOM
    # series keeps its own row/column layout, e.g. sagittal).
    transform = ornt_transform(io_orientation(store_aff_ras), target_ornt)
    data = np.ascontiguousarray(apply_orientation(array_zyx, transform))
    if target_aff is None:
        target_aff = store_aff_ras @ inv_ornt_aff(transform, array_zyx.shape)
    elif geom.source_shape is not None and tuple(data.shape) != tuple(geom.source_shape):
        raise ValueError(f"array shape {array_zyx.shape} reoriented to {data.shape} does not match "
                         f"source_shape {geom.source_shape}")
    if dtype is not None:
        data = data.astype(dtype)
    img = nib.Nifti1Image(data, target_aff)
    img.set_qform(target_aff, code=1)
    img.set_sform(target_aff, code=1)
    return img


def grid_mismatch(shape_a: tuple[int, ...], geom_a: Geometry, shape_b: tuple[int, ...],
                  geom_b: Geometry, tol_mm: float | None = None) -> str | None:
    """Why two (Z, Y, X) grids differ, or None when they are the same grid.

    Compares shapes, then the LPS positions of the 8 corner voxels; tol_mm defaults to
    1% of the smallest voxel step (NIfTI stores its affine in float32, so exact equality
    is too strict). Use it to refuse a label map that is not on its image's grid.
    """
    if tuple(shape_a) != tuple(shape_b):
        return f"shape (Z, Y, X) {tuple(shape_a)} != {tuple(shape_b)}"
    if tol_mm is None:
        tol_mm = 0.01 * min(min(geom_a.spacing_mm), min(geom_b.spacing_mm))
    corners = np.array([[z, y, x, 1] for z in (0, shape_a[0] - 1) for y in (0, shape_a[1] - 1)
                        for x in (0, shape_a[2] - 1)], dtype=np.float64)
    pa = corners @ geom_a.lps_affine_zyx().T
    pb = corners @ geom_b.lps_affine_zyx().T
    err = np.abs(pa - pb)[:, :3].max()
    if err > tol_mm:
        return (f"voxel positions differ by up to {err:.4g} mm (tolerance {tol_mm:.3g} mm): "
                f"origin {np.round(geom_a.origin_mm, 3).tolist()} vs {np.round(geom_b.origin_mm, 3).tolist()}, "
                f"spacing [z,y,x] {np.round(geom_a.spacing_mm, 4).tolist()} vs "
                f"{np.round(geom_b.spacing_mm, 4).tolist()}")
    return None
