"""Batched twins (what the CPU path runs) against the reference; CuPy kernels against their
NumPy twins on random and real inputs: on a GPU (marked gpu), and everywhere through the
CPU emulation of the CUDA source (tests/pipelines/cuda_emulator.py) and an NVRTC compile."""

from __future__ import annotations

import numpy as np
import pytest

from tcsmae.pipelines import edges, kernels, masking, windowing

from pipeline_helpers import gpu

LUNG, MED = (-500.0, 1200.0), (30.0, 300.0)


def _reference_stack(hu: np.ndarray, scaling: str = "clip") -> np.ndarray:
    out = []
    for h in hu.astype(np.float32):
        lung, med = windowing.lung_and_mediastinal(h, LUNG, MED)
        out.append(np.stack([lung, med, edges.edge_channel(lung, med, scaling, 1.0), h]))
    return np.stack(out)


@pytest.mark.parametrize("shape", [(3, 40, 52), (2, 1, 5), (1, 6, 1), (2, 2, 2), (1, 33, 17)])
@pytest.mark.parametrize("scaling", ["clip", "divide"])
def test_window_edges_numpy_matches_reference(shape, scaling):
    hu = np.random.default_rng(1).uniform(-1200, 800, shape).astype(np.float32)
    got = kernels.window_edges_numpy(hu, LUNG, MED, scaling, 1.0)
    ref = _reference_stack(hu, scaling)
    assert got.shape == shape[:1] + (4,) + shape[1:] and got.dtype == np.float32
    assert np.array_equal(got[:, [0, 1, 3]], ref[:, [0, 1, 3]])     # windows, HU: exact
    np.testing.assert_allclose(got[:, 2], ref[:, 2], atol=1e-6)      # edges: float rounding


def test_window_edges_numpy_int16_equals_float():
    hu = np.random.default_rng(2).integers(-1024, 2000, (2, 24, 24)).astype(np.int16)
    a = kernels.window_edges_numpy(hu, LUNG, MED, "clip", 1.0)
    b = kernels.window_edges_numpy(hu.astype(np.float32), LUNG, MED, "clip", 1.0)
    assert np.array_equal(a, b)


def test_window_edges_numpy_on_real_slices(real_hu):
    hu = real_hu[:2, :128, :128]
    got = kernels.window_edges_numpy(hu, LUNG, MED, "clip", 1.0)
    ref = _reference_stack(hu)
    assert np.array_equal(got[:, :2], ref[:, :2])
    np.testing.assert_allclose(got[:, 2], ref[:, 2], atol=1e-6)


def _random_stack(rng, n=3, h=20, w=24):
    stack = rng.uniform(0, 1, (n, 4, h, w)).astype(np.float32)
    stack[:, 3] = rng.uniform(-1200, 800, (n, h, w)).astype(np.float32)
    # exact interval boundaries must land as the pinned formula says
    stack[:, 3, 0, :8] = np.linspace(-1000, 312.5, 8, dtype=np.float32)
    return stack


def test_tissue_mask_apply_numpy_matches_reference():
    rng = np.random.default_rng(3)
    stack = _random_stack(rng)
    chosen = np.stack([masking.draw_intervals(rng, 8, 6) for _ in range(3)])
    packed = kernels.tissue_mask_apply_numpy(stack, chosen, -1000, 500)
    assert packed.shape == (3, 8, 20, 24) and packed.dtype == np.float32
    parts = kernels.split_packed(packed)
    original, masked, mask = parts["original"], parts["masked"], parts["mask"]
    assert np.array_equal(parts["hu"][:, 0], stack[:, 3])
    for i in range(3):
        ref = masking.tissue_mask(stack[i, 3], chosen[i], -1000, 500)
        assert np.array_equal(mask[i, 0], ref)
        assert np.array_equal(original[i], stack[i, :3])
        assert np.array_equal(masked[i], masking.apply_mask(stack[i, :3], ref))


def test_patch_mask_apply_numpy_matches_reference():
    rng = np.random.default_rng(4)
    stack = _random_stack(rng, h=20, w=24)
    grids = np.stack([masking.draw_patches(rng, (3, 3), 0.75) for _ in range(3)])
    parts = kernels.split_packed(kernels.patch_mask_apply_numpy(stack, grids, 8))
    masked, mask = parts["masked"], parts["mask"]
    for i in range(3):
        ref = masking.patch_mask(grids[i], 8, (20, 24))
        assert np.array_equal(mask[i, 0], ref)
        assert np.array_equal(masked[i], stack[i, :3] * ref)


@pytest.mark.parametrize("in_size, out_size", [(512, 256), (48, 32), (100, 37), (5, 12), (7, 7)])
def test_resize_numpy_matches_torch_reference(in_size, out_size):
    from tcsmae.pipelines.resize import resize_bilinear

    x = np.random.default_rng(8).uniform(0, 1, (2, 3, in_size, in_size)).astype(np.float32)
    np.testing.assert_allclose(kernels.resize_numpy(x, out_size), resize_bilinear(x, out_size),
                               atol=2e-6)


def test_resize_weights_by_hand():
    # 4 -> 2: output 0 at input coordinate 1.0, half-width 2: taps 0, 1, 2 at 0.75/0.75/0.25
    start, count, weights = kernels.resize_weights(4, 2)
    assert start.tolist() == [0, 1] and count.tolist() == [3, 3]
    np.testing.assert_allclose(weights[0], np.array([0.75, 0.75, 0.25]) / 1.75, rtol=1e-6)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)


# ------------------------------------------------------------------ GPU twins
@pytest.fixture(scope="module")
def emulated_module(tmp_path_factory):
    import cuda_emulator

    lib = cuda_emulator.build(kernels._CUDA_SOURCE, tmp_path_factory.mktemp("cuda-emulated"))
    return cuda_emulator.EmulatedModule(lib, kernels._CUDA_SOURCE)


@pytest.fixture
def emulated_cupy(emulated_module, monkeypatch):
    """NumPy as `cupy`, with the CUDA source compiled for the CPU behind kernels._module."""
    import sys

    import cuda_emulator

    fake = cuda_emulator.numpy_cupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(kernels, "_module", lambda: emulated_module)
    return fake


@pytest.fixture(params=[pytest.param("cuda", marks=gpu), "emulated"])
def cp(request):
    """The `cupy` the *_cupy launchers run with: the real one on a GPU, or NumPy with the CUDA
    source compiled for the CPU (each kernel run thread by thread)."""
    if request.param == "cuda":
        import cupy

        return cupy
    return request.getfixturevalue("emulated_cupy")


def test_cuda_source_compiles_with_nvrtc_and_exports_every_kernel():
    """NVRTC (the compiler CuPy's RawModule uses; shipped with torch's CUDA wheels) compiles the
    source for Ampere and Hopper without a warning, and the PTX holds every kernel."""
    import re

    from cuda.bindings import nvrtc

    import cuda_emulator

    names = set(cuda_emulator.kernel_signatures(kernels._CUDA_SOURCE))
    assert {"window_edges_f32", "window_edges_i16", "tissue_mask_apply", "patch_mask_apply",
            "resize_x", "resize_y"} <= names
    for arch in (b"compute_80", b"compute_90"):
        err, prog = nvrtc.nvrtcCreateProgram(kernels._CUDA_SOURCE.encode(), b"kernels.cu", 0, [], [])
        assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS
        opts = [b"--gpu-architecture=" + arch, b"--std=c++17"]
        (result,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        # writable buffers: NVRTC writes into them, and `b" " * 1` would be CPython's shared
        # one-byte object (overwriting it broke later torch.load calls in this process)
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        log = bytearray(size)
        nvrtc.nvrtcGetProgramLog(prog, log)
        assert result == nvrtc.nvrtcResult.NVRTC_SUCCESS, log.decode()
        assert log.strip(b" \0\n") == b"", log.decode()
        _, size = nvrtc.nvrtcGetPTXSize(prog)
        ptx = bytearray(size)
        nvrtc.nvrtcGetPTX(prog, ptx)
        assert set(re.findall(r"\.entry (\w+)", ptx.decode(errors="replace"))) == names
        nvrtc.nvrtcDestroyProgram(prog)


def test_emulation_runs_every_kernel_through_its_launcher(emulated_module, emulated_cupy):
    rng = np.random.default_rng(10)
    stack = _random_stack(rng, 2, 16, 16)
    emulated_module.launches.clear()
    for dtype in (np.float32, np.int16):
        kernels.window_edges_cupy(stack[:, 3].astype(dtype), LUNG, MED, "clip", 1.0)
    kernels.tissue_mask_apply_cupy(stack, np.ones((2, 8), np.uint8), -1000, 500)
    kernels.patch_mask_apply_cupy(stack, np.ones((2, 1, 1), np.uint8), 16)
    kernels.resize_cupy(stack, 8)
    launched = {name for name, _, _ in emulated_module.launches}
    assert launched == set(emulated_module.signatures)
    assert all(threads == kernels._THREADS for _, _, threads in emulated_module.launches)
    # one thread per output element, rounded up to whole blocks
    assert ("tissue_mask_apply", 2, kernels._THREADS) in emulated_module.launches


@pytest.mark.parametrize("dtype", [np.float32, np.int16])
@pytest.mark.parametrize("shape", [(4, 64, 80), (2, 1, 7), (3, 5, 1), (2, 512, 512)])
@pytest.mark.parametrize("scaling", ["clip", "divide"])
def test_window_edges_cupy_matches_numpy(cp, dtype, shape, scaling):
    hu = np.random.default_rng(5).uniform(-1200, 2000, shape).astype(dtype)
    got = cp.asnumpy(kernels.window_edges_cupy(cp.asarray(hu), LUNG, MED, scaling, 1.0))
    want = kernels.window_edges_numpy(hu, LUNG, MED, scaling, 1.0)
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.array_equal(got[:, [0, 1, 3]], want[:, [0, 1, 3]])
    np.testing.assert_allclose(got[:, 2], want[:, 2], atol=2e-6)


def test_window_edges_cupy_on_real_slices(cp, real_hu):
    got = cp.asnumpy(kernels.window_edges_cupy(cp.asarray(real_hu), LUNG, MED, "clip", 1.0))
    want = kernels.window_edges_numpy(real_hu, LUNG, MED, "clip", 1.0)
    assert np.array_equal(got[:, [0, 1, 3]], want[:, [0, 1, 3]])
    np.testing.assert_allclose(got[:, 2], want[:, 2], atol=2e-6)


def test_tissue_mask_apply_cupy_matches_numpy(cp, real_hu):
    rng = np.random.default_rng(6)
    stacks = [_random_stack(rng, 4, 33, 47),
              kernels.window_edges_numpy(real_hu, LUNG, MED, "clip", 1.0)]
    for stack in stacks:
        chosen = np.stack([masking.draw_intervals(rng, 8, 6) for _ in range(len(stack))])
        got = kernels.tissue_mask_apply_cupy(cp.asarray(stack), cp.asarray(chosen), -1000, 500)
        want = kernels.tissue_mask_apply_numpy(stack, chosen, -1000, 500)
        assert np.array_equal(cp.asnumpy(got), want)


def test_patch_mask_apply_cupy_matches_numpy(cp):
    rng = np.random.default_rng(7)
    stack = _random_stack(rng, 3, 40, 36)
    grids = np.stack([masking.draw_patches(rng, (3, 3), 0.5) for _ in range(3)])
    got = kernels.patch_mask_apply_cupy(cp.asarray(stack), cp.asarray(grids), 16)
    want = kernels.patch_mask_apply_numpy(stack, grids, 16)
    assert np.array_equal(cp.asnumpy(got), want)


@pytest.mark.parametrize("in_size, out_size", [(512, 256), (48, 32), (100, 37), (5, 12)])
def test_resize_cupy_matches_numpy(cp, in_size, out_size, real_hu):
    x = np.random.default_rng(9).uniform(-1000, 1000, (3, 4, in_size, in_size))
    x = x.astype(np.float32)
    got = cp.asnumpy(kernels.resize_cupy(cp.asarray(x), out_size))
    np.testing.assert_allclose(got, kernels.resize_numpy(x, out_size), rtol=1e-6, atol=1e-3)
    stack = kernels.window_edges_numpy(real_hu, LUNG, MED, "clip", 1.0)
    got = cp.asnumpy(kernels.resize_cupy(cp.asarray(stack), 256))
    want = kernels.resize_numpy(stack, 256)
    np.testing.assert_allclose(got[:, :3], want[:, :3], atol=1e-6)
    np.testing.assert_allclose(got[:, 3], want[:, 3], atol=1e-3)          # HU


@pytest.mark.parametrize("masking_mode", ["tissue", "patch"])
def test_gpu_transform_matches_cpu_transform(cp, masking_mode, real_hu):
    """The GPU branch of graph.Transform (the CuPy launchers in sequence, as DALI's GPU
    python_function runs them on a stacked batch) against its CPU branch, on real slices."""
    from tcsmae.pipelines.config import PipelineConfig
    from tcsmae.pipelines.graph import Transform

    cfg = PipelineConfig(size=128, masking=masking_mode)
    rng = np.random.default_rng(11)
    hu = real_hu.astype(np.int16)
    if masking_mode == "tissue":
        draw = np.stack([masking.draw_intervals(rng, 8, 6) for _ in range(len(hu))])
    else:
        draw = np.stack([masking.draw_patches(rng, (8, 8), 0.75) for _ in range(len(hu))])
    (want,) = Transform(cfg, gpu=False, stacked=True)([hu], [draw])
    (got,) = Transform(cfg, gpu=True, stacked=True)([cp.asarray(hu)], [cp.asarray(draw)])
    got = cp.asnumpy(got)
    assert got.shape == want.shape == (len(hu), 8, 128, 128)
    parts_got, parts_want = kernels.split_packed(got), kernels.split_packed(want)
    np.testing.assert_allclose(parts_got["original"], parts_want["original"], atol=1e-5)
    np.testing.assert_allclose(parts_got["hu"], parts_want["hu"], atol=1e-2)
    flipped = parts_got["mask"] != parts_want["mask"]
    assert flipped.mean() <= 1e-3        # resize rounding may move a pixel across a boundary
    agree = ~np.broadcast_to(flipped, parts_got["masked"].shape)
    np.testing.assert_allclose(parts_got["masked"][agree], parts_want["masked"][agree], atol=1e-5)
    assert 0.0 < (parts_want["mask"] == 0).mean() < 1.0


@gpu
def test_cupy_batch_view_and_fallback():
    import cupy as cp

    from tcsmae.pipelines.graph import _cupy_batch

    base = cp.arange(5 * 6 * 7, dtype=cp.float32).reshape(5, 6, 7)
    samples = [cp.from_dlpack(base[i]) for i in range(5)]       # contiguous, as DALI hands
    view = _cupy_batch(samples)
    assert view.data.ptr == base.data.ptr and bool((view == base).all())
    shuffled = [samples[i] for i in (1, 0, 2, 3, 4)]
    copy = _cupy_batch(shuffled)
    assert copy.data.ptr != base.data.ptr and bool((copy[0] == base[1]).all())
