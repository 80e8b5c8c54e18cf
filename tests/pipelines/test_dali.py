"""DALI pipelines against the reference (CPU path) and against each other (GPU, marked gpu).

Tolerances: without resize, windows and masks are exact and edges agree to float rounding
(1e-6). The CPU path resizes with torch (the reference itself), the GPU path with the same
weight tables in CuPy: images to 1e-5, HU to 1e-2, and since a float-rounding difference
in the resized HU can move a pixel across an interval boundary, at most 0.1 % of mask
pixels may flip.
"""

from __future__ import annotations

import numpy as np
import pytest

from tcsmae.pipelines.config import PipelineConfig
from tcsmae.pipelines.loader import make_loader
from tcsmae.pipelines.reference import preprocess_slice
from tcsmae.pipelines.resize import pad_to_square, resize_nearest
from tcsmae.pipelines.source import draw_mask
from tcsmae.store.writer import StoreWriter

from pipeline_helpers import gpu, random_ct, run_graph


def _inputs(cfg, shapes, seed=0, integer=False):
    rng = np.random.default_rng(seed)
    hus = [random_ct(rng, (1,) + s, integer)[0].astype(np.float32) for s in shapes]
    if cfg.size > 0:
        hus = [pad_to_square(h, cfg.pad_hu) for h in hus]
    out_shapes = [(cfg.size, cfg.size) if cfg.size else h.shape for h in hus]
    draws = [draw_mask(cfg, 0, i, s) for i, s in enumerate(out_shapes)]
    return hus, draws


def _check_against_reference(got, hus, draws, cfg, atol, max_flipped):
    for i, (hu, draw) in enumerate(zip(hus, draws)):
        ref = preprocess_slice(hu, draw, cfg)
        np.testing.assert_allclose(got["original"][i], ref["original"], atol=atol)
        np.testing.assert_allclose(got["hu"][i][0], ref["hu"], atol=1e-2)
        flipped = (got["mask"][i][0] != ref["mask"]).mean()
        assert flipped <= max_flipped
        assert np.array_equal(got["masked"][i], got["original"][i] * got["mask"][i])
        assert got["mask"][i].dtype == np.float32 and set(np.unique(got["mask"][i])) <= {0, 1}


@pytest.mark.parametrize("masking_mode", ["tissue", "patch", "none"])
def test_cpu_pipeline_equals_reference_without_resize(masking_mode):
    cfg = PipelineConfig(size=0, masking=masking_mode, patch_size=8)
    hus, draws = _inputs(cfg, [(40, 40)] * 3 + [(24, 36)])       # a non-square one too
    got = run_graph(hus, draws, cfg)
    for i, (hu, draw) in enumerate(zip(hus, draws)):
        ref = preprocess_slice(hu, draw, cfg)
        assert np.array_equal(got["original"][i][:2], ref["original"][:2])
        np.testing.assert_allclose(got["original"][i][2], ref["original"][2], atol=1e-6)
        assert np.array_equal(got["mask"][i][0], ref["mask"])
        assert np.array_equal(got["hu"][i][0], hu)
    if masking_mode == "none":
        assert all((m == 1).all() for m in got["mask"])


def test_cpu_pipeline_equals_reference_with_resize():
    cfg = PipelineConfig(size=32)
    hus, draws = _inputs(cfg, [(64, 64), (64, 64), (48, 64)], integer=True)
    got = run_graph(hus, draws, cfg)
    assert all(o.shape == (3, 32, 32) for o in got["original"])
    _check_against_reference(got, hus, draws, cfg, atol=1e-5, max_flipped=1e-3)


@pytest.mark.parametrize("stacked", [False, True])
def test_labels_follow_the_geometry_nearest_neighbour(stacked):
    cfg = PipelineConfig(size=24, masking="none")
    hus, draws = _inputs(cfg, [(48, 48), (48, 48)])
    rng = np.random.default_rng(1)
    labels = [rng.integers(0, 300, (48, 48)).astype(np.int16) for _ in hus]
    got = run_graph(hus, draws, cfg, labels=labels, stacked=stacked)
    for lab, out in zip(labels, got["label"]):
        assert np.array_equal(out[0], resize_nearest(lab, 24))


@pytest.mark.parametrize("size", [0, 32])
def test_stacked_batch_equals_per_sample(size):
    cfg = PipelineConfig(size=size)
    hus, draws = _inputs(cfg, [(48, 48)] * 3, integer=True)
    a = run_graph(hus, draws, cfg, stacked=True)
    b = run_graph(hus, draws, cfg)
    for key in ("original", "masked", "mask", "hu"):
        assert all(np.array_equal(x, y) for x, y in zip(a[key], b[key])), key


def test_augmentation_is_keyed_and_keeps_air_outside():
    from tcsmae.pipelines.source import draw_affine

    cfg = PipelineConfig(size=32, augment=True)
    hus, draws = _inputs(cfg, [(48, 48)] * 2)
    affines = [draw_affine(cfg, 0, i, 48) for i in range(2)]
    a = run_graph(hus, draws, cfg, affines=affines)
    b = run_graph(hus, draws, cfg, affines=affines)
    assert all(np.array_equal(x, y) for x, y in zip(a["original"], b["original"]))
    plain = run_graph(hus, draws, PipelineConfig(size=32))
    assert not np.allclose(a["original"][0], plain["original"][0])
    identity = [np.array([[1, 0, 0], [0, 1, 0]], np.float32)] * 2
    same = run_graph(hus, draws, cfg, affines=identity)
    np.testing.assert_allclose(same["original"][0], plain["original"][0], atol=1e-5)


@pytest.fixture(scope="module")
def real_store(tmp_path_factory, real_hu):
    path = tmp_path_factory.mktemp("real") / "real.zarr"
    attrs = {"spacing_mm": [2.0, 0.977, 0.977], "source_sha256": "real"}
    with StoreWriter(path, codec="none") as w:
        w.write_case("real", real_hu, attrs)
    return path


@pytest.mark.parametrize("size", [0, 128])
def test_cpu_loader_equals_reference_on_real_series(real_store, real_hu, size):
    cfg = PipelineConfig(size=size)
    loader = make_loader(real_store, cfg, batch_size=3, py_workers=0)
    batch = next(iter(loader))
    for i in range(3):
        z = int(batch["z"][i])
        draw = draw_mask(cfg, 0, z, (size, size) if size else real_hu.shape[1:])
        ref = preprocess_slice(real_hu[z], draw, cfg)
        if size == 0:
            assert np.array_equal(batch["original"][i][:2].numpy(), ref["original"][:2])
            assert np.array_equal(batch["mask"][i][0].numpy(), ref["mask"])
        np.testing.assert_allclose(batch["original"][i].numpy(), ref["original"], atol=1e-5)
        assert (batch["mask"][i][0].numpy() != ref["mask"]).mean() <= 1e-3
        assert 0.0 < (batch["mask"][i] == 0).float().mean() < 1.0    # some pixels masked, not all


# ------------------------------------------------------------------ GPU == CPU
@gpu
@pytest.mark.parametrize("masking_mode", ["tissue", "patch"])
def test_gpu_pipeline_equals_cpu_without_resize(masking_mode):
    cfg = PipelineConfig(size=0, masking=masking_mode, patch_size=8)
    hus, draws = _inputs(cfg, [(40, 40)] * 4)
    cpu = run_graph(hus, draws, cfg)
    gpu_out = run_graph(hus, draws, cfg, device_id=0)
    for i in range(4):
        assert np.array_equal(gpu_out["original"][i][:2], cpu["original"][i][:2])
        np.testing.assert_allclose(gpu_out["original"][i][2], cpu["original"][i][2], atol=2e-6)
        assert np.array_equal(gpu_out["mask"][i], cpu["mask"][i])
        assert np.array_equal(gpu_out["hu"][i], cpu["hu"][i])


@gpu
@pytest.mark.parametrize("integer, stacked", [(False, False), (True, False), (True, True)])
def test_gpu_pipeline_equals_cpu_with_resize(integer, stacked):
    cfg = PipelineConfig(size=64)
    hus, draws = _inputs(cfg, [(128, 128)] * 3 + [(96, 128)], integer=integer)
    if integer:
        hus = [h.astype(np.int16) for h in hus]
    cpu = run_graph(hus, draws, cfg)
    gpu_out = run_graph(hus, draws, cfg, device_id=0, stacked=stacked)
    for i in range(4):
        np.testing.assert_allclose(gpu_out["original"][i], cpu["original"][i], atol=1e-5)
        np.testing.assert_allclose(gpu_out["hu"][i], cpu["hu"][i], atol=1e-2)
        assert (gpu_out["mask"][i] != cpu["mask"][i]).mean() <= 1e-3


@gpu
def test_gpu_pipeline_equals_cpu_on_real_series(real_hu):
    cfg = PipelineConfig(size=256)
    hus = [h for h in real_hu]
    draws = [draw_mask(cfg, 0, i, (256, 256)) for i in range(len(hus))]
    cpu = run_graph(hus, draws, cfg)
    gpu_out = run_graph(hus, draws, cfg, device_id=0, stacked=True)
    for i in range(len(hus)):
        np.testing.assert_allclose(gpu_out["original"][i], cpu["original"][i], atol=1e-5)
        assert (gpu_out["mask"][i] != cpu["mask"][i]).mean() <= 1e-3


@gpu
def test_gpu_loader_yields_cuda_tensors(tiny_store):
    import torch

    path, _ = tiny_store
    loader = make_loader(path, PipelineConfig(size=32, dtype="float16"), batch_size=4,
                         device="cuda", py_workers=1, with_labels=False)
    assert loader._source.stacked
    cpu_loader = make_loader(path, PipelineConfig(size=32, dtype="float16"), batch_size=4,
                             py_workers=0)
    batch, ref = next(iter(loader)), next(iter(cpu_loader))
    assert batch["original"].is_cuda and batch["original"].dtype == torch.float16
    assert batch["mask"].is_cuda and batch["z"].shape == (4,)
    assert torch.equal(batch["z"].cpu(), ref["z"])
    flipped = (batch["mask"].cpu() != ref["mask"]).float().mean()
    assert flipped <= 1e-3
    per_sample = make_loader(path, PipelineConfig(size=32), batch_size=4, device="cuda",
                             py_workers=0, stacked=False, with_labels=True)
    labelled = next(iter(per_sample))
    assert labelled["label"].is_cuda and labelled["label"].shape == (4, 32, 32)
    assert torch.equal(labelled["z"].cpu(), ref["z"])


def test_gpu_branch_plumbing_with_numpy_stand_ins(monkeypatch):
    """The GPU branch of Transform (grouping, batching, kernel order) run on the CPU with
    each CuPy kernel replaced by its NumPy twin; the kernels themselves are tested on a GPU."""
    from tcsmae.pipelines import graph, kernels

    monkeypatch.setattr(graph, "_cupy_batch", np.stack)
    for name in ("window_edges", "resize", "tissue_mask_apply", "patch_mask_apply"):
        monkeypatch.setattr(kernels, f"{name}_cupy", getattr(kernels, f"{name}_numpy"))
    for mode in ("tissue", "patch"):
        cfg = PipelineConfig(size=32, masking=mode)
        hus, draws = _inputs(cfg, [(48, 48), (40, 48), (48, 48)], integer=True)
        hus[1] = hus[1].astype(np.int16)                     # mixed dtypes -> two groups
        gpu_like = graph.Transform(cfg, gpu=True)(hus, draws)
        cpu = graph.Transform(cfg, gpu=False, threads=2)(hus, draws)
        for g, c in zip(gpu_like, cpu):
            assert g.shape == (8, 32, 32)
            np.testing.assert_allclose(g[:6], c[:6], atol=1e-5)
            assert (g[6] != c[6]).mean() <= 1e-3
        same = [hus[0], hus[2]]
        stacked = graph.Transform(cfg, gpu=True, stacked=True)([np.stack(same)],
                                                               [np.stack([draws[0], draws[2]])])
        assert len(stacked) == 1 and stacked[0].shape == (2, 8, 32, 32)
        np.testing.assert_allclose(stacked[0][1, :6], cpu[2][:6], atol=1e-5)
