"""Segmentation metrics per case, in 3D on the stored grid: DSC and HD95 in millimetres.

Definitions are MONAI's (method-notes, "Evaluation"; spelled out in docs/finetune.md,
"Metrics"). DSC is undefined when the reference is empty (the structure is absent from the
case), HD95 when the prediction or the reference is empty. Undefined values are None, never
NaN; `summarise` averages the defined ones and counts the rest. Distances are computed in
the bounding box of P | R only, so a small structure in a large volume costs little.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class CaseScore:
    """Metrics of one structure in one case."""

    dsc: float | None
    """Dice similarity coefficient in 0..1; None when the reference is empty."""
    hd95_mm: float | None
    """95th-percentile Hausdorff distance in mm; None when prediction or reference is empty."""


def _check_pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    assert pred.shape == ref.shape, f"prediction {pred.shape} and reference {ref.shape} differ"
    return pred, ref


def dice(pred: np.ndarray, ref: np.ndarray) -> float | None:
    """DSC of two binary masks of any equal shape; None when `ref` is empty.

    pred, ref: (Z, Y, X) bool (or anything cast to bool), same shape.
    """
    pred, ref = _check_pair(pred, ref)
    n_ref = int(ref.sum())
    if n_ref == 0:
        return None
    n_pred = int(pred.sum())
    overlap = int(np.logical_and(pred, ref).sum())
    return 2.0 * overlap / (n_pred + n_ref)


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: foreground with at least one background face neighbour.

    mask: (Z, Y, X) bool -> (Z, Y, X) bool. Voxels on the array border are surface (the
    outside counts as background).
    """
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    eroded = ndimage.binary_erosion(mask, structure=structure, border_value=0)
    return mask & ~eroded


def _directed_distances(from_surface: np.ndarray, to_surface: np.ndarray,
                        spacing: tuple[float, ...]) -> np.ndarray:
    """For each voxel of `from_surface`, the distance in mm to the nearest of `to_surface`."""
    # distance_transform_edt measures the distance to the nearest zero, so the target
    # surface must be the zeros.
    dist = ndimage.distance_transform_edt(~to_surface, sampling=spacing)
    return dist[from_surface]


def hausdorff_percentile(pred: np.ndarray, ref: np.ndarray, spacing_mm,
                         percentile: float = 95.0) -> float | None:
    """Symmetric percentile Hausdorff distance in mm (MONAI's definition); None if either is empty.

    pred, ref: (Z, Y, X) bool, same shape; spacing_mm: (z, y, x) voxel size in mm.
    percentile: 95 gives HD95, 100 the classic (maximum) Hausdorff distance.
    """
    pred, ref = _check_pair(pred, ref)
    spacing = tuple(float(s) for s in spacing_mm)
    assert len(spacing) == pred.ndim, f"spacing {spacing} does not match shape {pred.shape}"
    if not pred.any() or not ref.any():
        return None
    # Crop to the bounding box of both masks: voxels outside it are background in both,
    # so erosion with border_value=0 and the nearest-surface distances are unchanged.
    union = pred | ref
    box = tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx in np.nonzero(union))
    pred_surface = surface(pred[box])
    ref_surface = surface(ref[box])
    forward = _directed_distances(pred_surface, ref_surface, spacing)
    backward = _directed_distances(ref_surface, pred_surface, spacing)
    return float(max(np.percentile(forward, percentile), np.percentile(backward, percentile)))


def hd95(pred: np.ndarray, ref: np.ndarray, spacing_mm) -> float | None:
    """HD95 in mm; see `hausdorff_percentile`."""
    return hausdorff_percentile(pred, ref, spacing_mm, 95.0)


def score_case(pred: np.ndarray, ref: np.ndarray, spacing_mm) -> CaseScore:
    """DSC and HD95 of one binary structure in one case.

    pred, ref: (Z, Y, X) bool on the stored grid; spacing_mm: (z, y, x) in mm.
    """
    return CaseScore(dsc=dice(pred, ref), hd95_mm=hd95(pred, ref, spacing_mm))


def score_label_maps(pred: np.ndarray, ref: np.ndarray, spacing_mm,
                     classes: list[str], groups: dict[str, list[str]] | None = None
                     ) -> dict[str, dict[str, CaseScore]]:
    """Scores of every class and every group of one case.

    pred, ref: (Z, Y, X) int class maps, 0 = background, class i (1-based) = classes[i-1].
    groups: group name -> member class names; a group's mask is the union of its classes.
    Returns {"classes": {name: CaseScore}, "groups": {name: CaseScore}}.
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    assert pred.shape == ref.shape, f"prediction {pred.shape} and reference {ref.shape} differ"
    index = {name: i + 1 for i, name in enumerate(classes)}
    out: dict[str, dict[str, CaseScore]] = {"classes": {}, "groups": {}}
    for name, i in index.items():
        out["classes"][name] = score_case(pred == i, ref == i, spacing_mm)
    for group, members in (groups or {}).items():
        ids = [index[m] for m in members]
        out["groups"][group] = score_case(np.isin(pred, ids), np.isin(ref, ids), spacing_mm)
    return out


def summarise(values: list[float | None]) -> tuple[float | None, int]:
    """Mean of the defined values and the count of undefined ones.

    Returns (mean or None when nothing is defined, number of None entries). Never NaN.
    """
    defined = [float(v) for v in values if v is not None]
    for v in defined:
        assert math.isfinite(v), f"non-finite metric value {v}"
    mean = sum(defined) / len(defined) if defined else None
    return mean, len(values) - len(defined)


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and population standard deviation of the defined values.

    The mean is None when no value is defined, the std when fewer than 2 are (the spread of
    one value is unknown, not 0).
    """
    defined = np.array([v for v in values if v is not None], dtype=np.float64)
    if defined.size == 0:
        return None, None
    return float(defined.mean()), (float(defined.std()) if defined.size >= 2 else None)


# ---------------------------------------------------------------------------------------
# Aggregation: cases -> fold -> mean and std over folds (the shape of results.json)

METRIC_KEYS = ("dsc", "hd95_mm")


def case_record(scores: dict[str, dict[str, CaseScore]]) -> dict:
    """JSON form of one case's scores: {"classes"|"groups": {name: {"dsc", "hd95_mm"}}}."""
    return {kind: {name: {"dsc": s.dsc, "hd95_mm": s.hd95_mm} for name, s in entries.items()}
            for kind, entries in scores.items()}


def fold_summary(cases: list[dict]) -> dict:
    """A fold's figures: per class and group, the mean over its cases of each metric.

    cases: case_record() dicts of the fold's validation cases.
    Returns {"classes"|"groups": {name: {"dsc": mean|None, "hd95_mm": mean|None,
    "n_undefined": {"dsc": int, "hd95_mm": int}, "n_cases": int}}}.
    """
    out: dict[str, dict] = {"classes": {}, "groups": {}}
    if not cases:
        return out
    for kind in out:
        for name in cases[0].get(kind, {}):
            entry: dict = {"n_undefined": {}, "n_cases": len(cases)}
            for key in METRIC_KEYS:
                mean, n_undefined = summarise([c[kind][name][key] for c in cases])
                entry[key] = mean
                entry["n_undefined"][key] = n_undefined
            out[kind][name] = entry
    return out


def over_folds(folds: list[dict]) -> tuple[dict, dict]:
    """Mean and standard deviation (population, ddof 0) over folds of the fold means.

    folds: fold_summary() dicts. Both results have the fold shape; their `n_undefined`
    and `n_cases` are totals over folds. A fold whose mean is None is left out; the std is
    None when fewer than 2 folds have a defined mean.
    """
    mean: dict[str, dict] = {"classes": {}, "groups": {}}
    std: dict[str, dict] = {"classes": {}, "groups": {}}
    if not folds:
        return mean, std
    for kind in mean:
        for name in folds[0].get(kind, {}):
            m: dict = {}
            s: dict = {}
            for key in METRIC_KEYS:
                m[key], s[key] = mean_std([f[kind][name][key] for f in folds])
            total = {key: sum(f[kind][name]["n_undefined"][key] for f in folds) for key in METRIC_KEYS}
            n_cases = sum(f[kind][name]["n_cases"] for f in folds)
            m["n_undefined"], s["n_undefined"] = total, dict(total)
            m["n_cases"] = s["n_cases"] = n_cases
            mean[kind][name], std[kind][name] = m, s
    return mean, std
