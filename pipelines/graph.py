"""The processing graph: HU slices in, packed (original, masked, mask, HU) out; one
definition, both devices.

`processing_graph(hu, draw, cfg, device_id)` builds it on DALI input nodes; `device_id=None`
is the CPU path (NumPy twins and torch's resize, the batch split over threads), an integer
the GPU path (CuPy kernels). One python_function with one packed output keeps DALI's
per-sample Python cost low; NumPy and torch beat DALI's own CPU operators on the CPU.
Randomness is never drawn here: `draw` comes from the source. Step table and the
measurements behind these choices: docs/pipelines.md, "CPU and GPU paths".
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tcsmae.pipelines import kernels
from tcsmae.pipelines.config import PipelineConfig
from tcsmae.pipelines.resize import resize_bilinear


def _cupy_batch(samples: list):
    """Samples (cupy arrays of one shape and dtype) -> (N, ...) cupy array.

    DALI usually hands a batch as one contiguous buffer; then this is a view (no copy).
    """
    import cupy as cp

    first = samples[0]
    nbytes = first.nbytes
    base = first.data.ptr
    contiguous = all(
        s.flags.c_contiguous and s.data.ptr == base + i * nbytes for i, s in enumerate(samples)
    )
    if contiguous and first.flags.c_contiguous:
        return cp.ndarray((len(samples),) + first.shape, dtype=first.dtype, memptr=first.data)
    return cp.stack(samples)


class _BatchStep:
    """Batching helpers of a python_function callable: stacking samples (a view on the GPU
    when DALI's buffer is contiguous) and, on the CPU, one chunk per thread (NumPy and
    torch release the GIL)."""

    def __init__(self, gpu: bool, threads: int):
        self.gpu = gpu
        self.threads = max(1, int(threads))
        self._pool = None
        self._lock = threading.Lock()

    def __getstate__(self):  # the pool and lock are rebuilt lazily (e.g. after spawn)
        state = self.__dict__.copy()
        state["_pool"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _map_chunks(self, fn, *batches):
        n = len(batches[0])
        if self.gpu or self.threads == 1 or n < 2:
            return [fn(*batches)]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="tcsmae-np")
        bounds = np.linspace(0, n, min(self.threads, n) + 1).astype(int)
        futures = [self._pool.submit(fn, *(b[lo:hi] for b in batches))
                   for lo, hi in zip(bounds[:-1], bounds[1:])]
        return [f.result() for f in futures]

    def _stack(self, samples: list):
        return _cupy_batch(samples) if self.gpu else np.stack(samples)

    def _concat(self, parts: list):
        if len(parts) == 1:
            return parts[0]
        if self.gpu:
            import cupy as cp

            return cp.concatenate(parts)
        return np.concatenate(parts)


class Transform(_BatchStep):
    """python_function: lists of (Y, X) HU and draws -> list of (8, H, W) packed float32.

    Runs window_edges -> resize (if cfg.size > 0) -> mask apply on each group of samples
    with equal shapes, as NumPy twins + torch split over threads (CPU) or CuPy kernels (GPU).
    stacked=True: each DALI sample is a whole batch instead, (N, Y, X) HU and (N, ...)
    draws -> (N, 8, H, W) packed.
    """

    def __init__(self, cfg: PipelineConfig, gpu: bool, threads: int = 1, stacked: bool = False):
        super().__init__(gpu, threads)
        self.stacked = stacked
        self.window_args = (cfg.lung_window, cfg.mediastinal_window, cfg.edge_scaling,
                            cfg.edge_clip)
        self.size = cfg.size
        self.patch = cfg.masking == "patch"
        self.patch_size = cfg.patch_size
        self.hu_range = cfg.hu_range

    def _run(self, hu, draw):
        if self.gpu:
            stack = kernels.window_edges_cupy(hu, *self.window_args)
            if self.size > 0:
                stack = kernels.resize_cupy(stack, self.size)
            if self.patch:
                return kernels.patch_mask_apply_cupy(stack, draw, self.patch_size)
            return kernels.tissue_mask_apply_cupy(stack, draw, *self.hu_range)
        stack = kernels.window_edges_numpy(hu, *self.window_args)
        if self.size > 0:
            stack = resize_bilinear(stack, self.size)
        if self.patch:
            return kernels.patch_mask_apply_numpy(stack, draw, self.patch_size)
        return kernels.tissue_mask_apply_numpy(stack, draw, *self.hu_range)

    def __call__(self, hus: list, draws: list) -> list:
        if self.stacked:
            return [self._concat(self._map_chunks(self._run, h, d)) for h, d in zip(hus, draws)]
        out: list = [None] * len(hus)
        groups: dict[tuple, list[int]] = {}
        for i, (h, d) in enumerate(zip(hus, draws)):
            groups.setdefault((tuple(h.shape), str(h.dtype), tuple(d.shape)), []).append(i)
        for idx in groups.values():
            hu = self._stack([hus[i] for i in idx])
            draw = self._stack([draws[i] for i in idx])
            packed = self._concat(self._map_chunks(self._run, hu, draw))
            for j, i in enumerate(idx):
                out[i] = packed[j]
        return out


def processing_graph(hu, draw, cfg: PipelineConfig, device_id: int | None = None,
                     affine=None, label=None, cpu_threads: int = 1, stacked: bool = False
                     ) -> dict:
    """Build the transform on DALI nodes.

    hu: node of (Y, X) float32|int16 HU, layout "HW" (already padded to a square when
        cfg.size > 0; the source does it). draw: node of (K,) uint8 or (GY, GX) uint8.
    stacked: each sample is a whole batch of equal-shape slices: hu (N, Y, X), draw
        (N, ...), label (N, Y, X); outputs gain the leading N. One DALI sample per batch
        removes DALI's per-sample Python cost (the GPU path's limit); no augmentation.
    affine: optional node of (2, 3) float32 destination-to-source matrices (augmentation).
    label: optional node of (Y, X) int16 labels on the same grid (fine-tuning; DALI's
        resize takes no int32).
    device_id: None -> CPU path; an int -> GPU path (outputs in GPU memory).
    cpu_threads: threads the CPU path splits a batch over.
    Returns {"packed": (8, H, W) float32 node (channels kernels.PACKED), and "label":
    (1, H, W) int16 when given}; stacked: (N, 8, H, W) and (N, H, W).
    """
    from nvidia.dali import fn, types

    gpu = device_id is not None
    device = "gpu" if gpu else "cpu"
    if gpu:
        hu, draw = hu.gpu(), draw.gpu()
        if affine is not None:
            affine = affine.gpu()
        if label is not None:
            label = label.gpu()

    if affine is not None:
        assert not stacked, "augmentation warps per sample: stacked batches cannot take it"
        hu = fn.cast(hu, dtype=types.FLOAT)
        hu = fn.expand_dims(hu, axes=[2], new_axis_names="C")             # (Y, X, 1) HWC
        hu = fn.warp_affine(hu, affine, fill_value=cfg.pad_hu, interp_type=types.INTERP_LINEAR)
        hu = fn.squeeze(hu, axes=[2])                                     # (Y, X)
        if label is not None:
            label = fn.expand_dims(label, axes=[2], new_axis_names="C")
            label = fn.warp_affine(label, affine, fill_value=0, interp_type=types.INTERP_NN)
            label = fn.squeeze(label, axes=[2])

    packed = fn.python_function(hu, draw, function=Transform(cfg, gpu, cpu_threads, stacked),
                                batch_processing=True, device=device,
                                output_layouts=None if stacked else "CHW")
    out = {"packed": packed}
    if label is not None:
        if stacked:  # (N, Y, X): the slices play the channels of one image
            label = fn.reshape(label, layout="CHW")
        else:
            label = fn.expand_dims(label, axes=[0], new_axis_names="C")   # (1, Y, X) CHW
        if cfg.size > 0:
            label = fn.resize(label, size=[cfg.size, cfg.size], interp_type=types.INTERP_NN,
                              antialias=False, device=device)
        out["label"] = label
    return out
