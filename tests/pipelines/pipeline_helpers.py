"""Helpers of the pipeline tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import numpy as np
import pytest

from tcsmae.store.writer import StoreWriter

ATTRS = {"spacing_mm": [2.0, 1.0, 1.0], "origin_mm": [0.0, 0.0, 0.0],
         "direction": [[1, 0, 0], [0, 1, 0], [0, 0, 1]], "patient_id": "p",
         "study_uid": "1", "series_uid": "1", "warnings": []}


def random_ct(rng: np.random.Generator, shape: tuple[int, int, int], integer: bool
              ) -> np.ndarray:
    """A blocky HU volume spanning air to bone (so every tissue interval occurs)."""
    z, y, x = shape
    coarse = rng.uniform(-1100, 700, (z, (y + 3) // 4, (x + 3) // 4))
    hu = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)[:, :y, :x]
    hu = hu + rng.normal(0, 20, hu.shape)
    hu[:, :2] = -1024.0                        # some air rows
    return np.round(hu).astype(np.int16) if integer else hu.astype(np.float32)


def make_store(path, cases: dict[str, tuple[tuple[int, int, int], bool]], seed: int = 0,
               labels: bool = False):
    """Store with one case per entry: case_id -> ((Z, Y, X), integer HU?)."""
    rng = np.random.default_rng(seed)
    volumes = {}
    with StoreWriter(path, codec="none") as w:
        for case_id, (shape, integer) in cases.items():
            hu = random_ct(rng, shape, integer)
            lab = rng.integers(0, 12, shape).astype(np.uint8) if labels else None
            attrs = dict(ATTRS, source_sha256=f"sha-{case_id}")
            w.write_case(case_id, hu, attrs, labels=lab)
            volumes[case_id] = (hu.astype(np.float32), lab)
    return volumes


def real_hu_slices(shared_data, n: int = 3) -> np.ndarray:
    """The first `n` slices (by file name) of the real DICOM series: (n, 512, 512) float32 HU."""
    import pydicom

    files = sorted((shared_data / "totalseg-dicom-series").glob("*.dcm"))[:n]
    out = []
    for f in files:
        ds = pydicom.dcmread(f)
        out.append(ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope)
                   + float(ds.RescaleIntercept))
    return np.stack(out)


gpu = pytest.mark.gpu
"""Mark for tests that need CUDA; they skip where none is present (tests/conftest.py)."""


def run_graph(hus: list, draws: list, cfg, device_id=None, labels=None, affines=None,
              threads: int = 2, stacked: bool = False) -> dict:
    """One batch of in-memory slices through processing_graph -> dict of lists of arrays:
    original (3, H, W), masked (3, H, W), mask (1, H, W), hu (1, H, W), [label (1, H, W)].
    stacked: hand the batch to DALI as one sample (equal shapes needed)."""
    if stacked:
        hus, draws = [np.stack(hus)], [np.stack(draws)]
        labels = None if labels is None else [np.stack(labels)]
    from nvidia.dali import fn, pipeline_def

    from tcsmae.pipelines.graph import processing_graph
    from tcsmae.pipelines.kernels import split_packed

    @pipeline_def
    def pipe():
        hu = fn.external_source(source=lambda: hus, batch=True,
                                layout=None if stacked else "HW")
        draw = fn.external_source(source=lambda: draws, batch=True)
        label = None if labels is None else fn.external_source(
            source=lambda: labels, batch=True, layout="CHW" if stacked else "HW")
        affine = None if affines is None else fn.external_source(source=lambda: affines,
                                                                 batch=True)
        out = processing_graph(hu, draw, cfg, device_id, affine=affine, label=label,
                               cpu_threads=threads, stacked=stacked)
        return (out["packed"], out["label"]) if labels is not None else out["packed"]

    p = pipe(batch_size=len(hus), num_threads=threads, device_id=device_id,
             prefetch_queue_depth=1)
    p.build()
    outputs = p.run()

    def arrays(tl):
        tl = tl.as_cpu() if hasattr(tl, "as_cpu") else tl
        return [np.array(tl[i]) for i in range(len(tl))]

    packed = arrays(outputs[0])
    if stacked:
        packed = list(packed[0])
    result = {k: [split_packed(a[None])[k][0] for a in packed]
              for k in ("original", "masked", "mask", "hu")}
    if labels is not None:
        result["label"] = arrays(outputs[1])
        if stacked:
            result["label"] = [lab[None] for lab in result["label"][0]]
    return result
