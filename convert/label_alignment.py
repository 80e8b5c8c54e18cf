"""Put a NIfTI label map onto the grid of a DICOM series, through both affines.

NIfTI affines map voxel indices to RAS+ mm; DICOM positions are LPS+ mm, so the first two
world axes flip sign. The label map must lie on exactly the DICOM grid (same voxels, any
axis order or flips): then the mapping from DICOM voxel (x, y, z) to NIfTI voxel (i, j, k)
is a signed permutation plus an integer offset, and aligning is a transpose and flips.
A label map on any other grid is an error; it is never resampled (resampling labels
silently moves organ borders).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tcsmae.errors import UserError

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
AXIS_TOL = 1e-3
"""Largest allowed deviation of the index mapping from a signed permutation (entries of M)."""
OFFSET_TOL = 1e-2
"""Largest allowed deviation of voxel offsets from whole voxels."""


class LabelGridError(UserError):
    """The label map does not lie on the image grid."""


def permutation_from_affine(mapping: np.ndarray, source_shape: tuple[int, int, int], target_shape_xyz: tuple[int, int, int], what: str) -> tuple[list[int], list[bool]]:
    """Axis order and flips from a (4, 4) voxel->voxel mapping (target x,y,z -> source i,j,k).

    Returns `axes` (source axis for target axis a) and `flip` (whether target axis a runs
    backwards through the source). Raises LabelGridError when the mapping is not a signed
    permutation with whole-voxel offsets covering exactly the source's extent.
    """
    rot = mapping[:3, :3]
    offset = mapping[:3, 3]
    rounded = np.round(rot)
    if np.abs(rot - rounded).max() > AXIS_TOL or not _is_signed_permutation(rounded):
        raise LabelGridError(
            f"{what}: its voxel grid is rotated or scaled relative to the DICOM grid "
            f"(index mapping {np.round(rot, 4).tolist()}); it is not resampled: give a label map "
            "on the grid of the DICOM series"
        )
    axes, flip = [], []
    for a in range(3):  # target axis a = x, y, z
        p = int(np.flatnonzero(rounded[:, a])[0])
        axes.append(p)
        flip.append(bool(rounded[p, a] < 0))
    for a, p in enumerate(axes):
        if source_shape[p] != target_shape_xyz[a]:
            raise LabelGridError(
                f"{what}: shape {tuple(source_shape)} does not match the DICOM series "
                f"(x, y, z) = {tuple(target_shape_xyz)} (axis {p} of the label map lies along DICOM axis "
                f"{'xyz'[a]}); give a label map on the grid of the DICOM series"
            )
        expected = (source_shape[p] - 1) if flip[a] else 0
        if abs(offset[p] - expected) > OFFSET_TOL:
            raise LabelGridError(
                f"{what}: shifted by {offset[p] - expected:+.3f} voxels along its axis {p} relative to the "
                "DICOM series; it is not resampled: give a label map on the grid of the DICOM series"
            )
    return axes, flip


def _is_signed_permutation(m: np.ndarray) -> bool:
    return bool(np.all(np.abs(m).sum(axis=0) == 1) and np.all(np.abs(m).sum(axis=1) == 1) and np.all(np.isin(m, (-1, 0, 1))))


def align_labels(nifti_path: str | Path, voxel_to_lps: np.ndarray, positions_mm: np.ndarray, shape_zyx: tuple[int, int, int]) -> np.ndarray:
    """Label map of `nifti_path` on the DICOM grid.

    voxel_to_lps: (4, 4) float64, DICOM voxel (x, y, z, 1) -> LPS mm.
    positions_mm: (Z, 3) float64, ImagePositionPatient of every sorted slice (checked one by
        one, so a series with a gap or uneven steps is refused rather than misaligned).
    shape_zyx: (Z, Y, X) of the DICOM volume.
    Returns (Z, Y, X) integer labels (the file's integer dtype, uint8/uint16/int32 for floats).
    Raises LabelGridError (a UserError) when the label map is on another grid.
    """
    import nibabel as nib

    path = Path(nifti_path)
    what = f"label map {path}"
    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise UserError(f"{what} cannot be read as NIfTI ({type(exc).__name__}: {exc})") from None
    if len(img.shape) != 3:
        raise LabelGridError(f"{what} has shape {img.shape}; a 3D label map is needed")
    nifti_to_lps = RAS_TO_LPS @ img.affine
    lps_to_nifti = np.linalg.inv(nifti_to_lps)
    mapping = lps_to_nifti @ voxel_to_lps  # DICOM (x, y, z) -> NIfTI (i, j, k)
    z_count, y_count, x_count = shape_zyx
    axes, flip = permutation_from_affine(mapping, tuple(img.shape), (x_count, y_count, z_count), what)

    # every slice, not just the first: a series with gaps has no single affine
    ijk = (lps_to_nifti[:3, :3] @ positions_mm.T).T + lps_to_nifti[:3, 3]  # (Z, 3)
    expected = (mapping[:3, :3] @ np.stack([np.zeros(z_count), np.zeros(z_count), np.arange(z_count)])).T + mapping[:3, 3]
    worst = float(np.abs(ijk - expected).max()) if z_count else 0.0
    if worst > OFFSET_TOL * 10:
        raise LabelGridError(
            f"{what}: the DICOM slices are not evenly spaced on the label map's grid (off by up to "
            f"{worst:.3f} voxels); a label map cannot cover a series with gaps or uneven steps"
        )

    data = np.asanyarray(img.dataobj)
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise UserError(f"{what} holds non-integer values; a label map must hold integer label ids")
        top = float(data.max()) if data.size else 0.0
        low = float(data.min()) if data.size else 0.0
        dtype = np.uint8 if low >= 0 and top < 256 else np.uint16 if low >= 0 and top < 65536 else np.int32
        data = data.astype(dtype)
    elif data.dtype.kind not in "iub":
        raise UserError(f"{what} has dtype {data.dtype}; a label map must hold integer label ids")
    if data.dtype.kind == "b":
        data = data.astype(np.uint8)
    xyz = np.transpose(data, axes)  # axis a of the result = DICOM axis a (x, y, z)
    for a in range(3):
        if flip[a]:
            xyz = np.flip(xyz, axis=a)
    return np.ascontiguousarray(np.transpose(xyz, (2, 1, 0)))  # (Z, Y, X)
