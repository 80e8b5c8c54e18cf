"""The processing graph: HU slices in, (original, masked, mask) out; one definition, both devices.

`processing_graph(hu, draw, cfg, device_id)` is a plain function of DALI input nodes (the
style of DALI's own examples); a thin `@pipeline_def` elsewhere adds the source
(loader.py for the Zarr store, bench.py for in-memory batches). `device_id=None` builds the
CPU path, an integer the GPU path:

    step                      CPU path (one python_function,        GPU path
                              batch split over threads)
    [augment] affine warp     fn.warp_affine (native)               fn.warp_affine (native)
    windows + Sobel edges     kernels.window_edges_numpy            window_edges_cupy (fused)
    resize to size x size     torch antialiased bilinear            fn.resize (native)
                              (= the reference)
    mask, I_m = M * I_o       *_mask_apply_numpy                    *_mask_apply_cupy
    labels (fine-tuning)      fn.resize INTERP_NN (native)          fn.resize INTERP_NN

Why: DALI's native CPU arithmetic measured about half the speed of a plain NumPy
DataLoader on 2 cores, and DALI's CPU resize of the 4-channel 512 -> 256 stack ran ~3.7x
slower than torch's; NumPy and torch release the GIL, so one chunk of the batch per thread
runs in parallel. DALI's resize (GPU) equals torch's to ~1e-7 except in the outermost
output pixel ring, where it replicates the border instead of renormalising the filter.
Randomness is never drawn here: `draw` comes from the source (masking.py).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import kernels
from .config import PipelineConfig
from .resize import resize_bilinear


def _group_by_shape(samples: list) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault((tuple(s.shape), str(s.dtype)), []).append(i)
    return groups


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
    """Base of the python_function callables: runs a batched twin per group of equal shapes.

    On the CPU a group is split into one chunk per thread (NumPy releases the GIL).
    """

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


class WindowEdges(_BatchStep):
    """GPU python_function: list of (Y, X) HU -> list of (4, Y, X) float32 (window_edges_cupy)."""

    def __init__(self, cfg: PipelineConfig, gpu: bool = True, threads: int = 1):
        super().__init__(gpu, threads)
        self.args = (cfg.lung_window, cfg.mediastinal_window, cfg.edge_scaling, cfg.edge_clip)

    def _run(self, hu):
        if self.gpu:
            return kernels.window_edges_cupy(hu, *self.args)
        return kernels.window_edges_numpy(hu, *self.args)

    def __call__(self, hus: list) -> list:
        out: list = [None] * len(hus)
        for idx in _group_by_shape(hus).values():
            batch = self._stack([hus[i] for i in idx])
            stack = self._concat(self._map_chunks(self._run, batch))
            for j, i in enumerate(idx):
                out[i] = stack[j]
        return out


class ApplyMask(_BatchStep):
    """python_function: (4, H, W) stacks and draws -> original, masked, mask (lists).

    With `whole_transform=True` (CPU path) the inputs are (Y, X) HU slices instead, and the
    whole transform (window_edges_numpy, torch resize, mask) runs per chunk of the batch.
    """

    def __init__(self, cfg: PipelineConfig, gpu: bool, threads: int = 1,
                 whole_transform: bool = False, with_hu: bool = False):
        super().__init__(gpu, threads)
        self.with_hu = with_hu
        self.patch = cfg.masking == "patch"
        self.patch_size = cfg.patch_size
        self.hu_range = cfg.hu_range
        self.size = cfg.size
        self.whole_transform = whole_transform
        self.window_args = (cfg.lung_window, cfg.mediastinal_window, cfg.edge_scaling,
                            cfg.edge_clip)

    def _run(self, stack, draw):
        if self.whole_transform:
            stack = kernels.window_edges_numpy(stack, *self.window_args)
            if self.size > 0:
                stack = resize_bilinear(stack, self.size)
        if self.patch:
            f = kernels.patch_mask_apply_cupy if self.gpu else kernels.patch_mask_apply_numpy
            out = f(stack, draw, self.patch_size)
        else:
            f = kernels.tissue_mask_apply_cupy if self.gpu else kernels.tissue_mask_apply_numpy
            out = f(stack, draw, *self.hu_range)
        return out + (stack[:, 3:4].copy(),) if self.with_hu else out

    def __call__(self, stacks: list, draws: list) -> tuple[list, ...]:
        n = len(stacks)
        n_out = 4 if self.with_hu else 3
        outs = tuple([None] * n for _ in range(n_out))
        groups: dict[tuple, list[int]] = {}
        for i, (s, d) in enumerate(zip(stacks, draws)):
            groups.setdefault((tuple(s.shape), str(s.dtype), tuple(d.shape)), []).append(i)
        for idx in groups.values():
            stack = self._stack([stacks[i] for i in idx])
            if self.gpu:
                import cupy as cp

                draw = cp.stack([draws[i] for i in idx])
            else:
                draw = np.stack([draws[i] for i in idx])
            parts = self._map_chunks(self._run, stack, draw)
            for o, arr in zip(outs, (self._concat([p[k] for p in parts]) for k in range(n_out))):
                for j, i in enumerate(idx):
                    o[i] = arr[j]
        return outs


def processing_graph(hu, draw, cfg: PipelineConfig, device_id: int | None = None,
                     affine=None, label=None, cpu_threads: int = 1, with_hu: bool = False
                     ) -> dict:
    """Build the transform on DALI nodes.

    hu: node of (Y, X) float32|int16 HU, layout "HW" (already padded to a square when
        cfg.size > 0; the source does it). draw: node of (K,) uint8 or (GY, GX) uint8.
    affine: optional node of (2, 3) float32 destination-to-source matrices (augmentation).
    label: optional node of (Y, X) int16 labels on the same grid (fine-tuning; DALI resize
        takes no int32).
    device_id: None -> CPU path; an int -> GPU path (outputs in GPU memory).
    cpu_threads: threads the NumPy twins split a batch over (CPU path).
    with_hu: also return "hu", (1, H, W) float32 HU on the output grid (preview, tests).
    Returns {"original": (3, H, W), "masked": (3, H, W), "mask": (1, H, W) float32 nodes,
    and "label": (1, H, W) int16 when given}.
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
        hu = fn.cast(hu, dtype=types.FLOAT)
        hu = fn.expand_dims(hu, axes=[2], new_axis_names="C")             # (Y, X, 1) HWC
        hu = fn.warp_affine(hu, affine, fill_value=cfg.pad_hu, interp_type=types.INTERP_LINEAR)
        hu = fn.squeeze(hu, axes=[2])                                     # (Y, X)
        if label is not None:
            label = fn.expand_dims(label, axes=[2], new_axis_names="C")
            label = fn.warp_affine(label, affine, fill_value=0, interp_type=types.INTERP_NN)
            label = fn.squeeze(label, axes=[2])

    if gpu:
        stack = fn.python_function(hu, function=WindowEdges(cfg), batch_processing=True,
                                   device=device, output_layouts="CHW")
        if cfg.size > 0:
            stack = fn.resize(stack, size=[cfg.size, cfg.size], interp_type=types.INTERP_LINEAR,
                              antialias=True, dtype=types.FLOAT, device=device)
        step = ApplyMask(cfg, gpu=True, with_hu=with_hu)
        inputs = (stack, draw)
    else:
        step = ApplyMask(cfg, gpu=False, threads=cpu_threads, whole_transform=True,
                         with_hu=with_hu)
        inputs = (hu, draw)
    n_out = 4 if with_hu else 3
    nodes = fn.python_function(*inputs, function=step, num_outputs=n_out,
                               batch_processing=True, device=device,
                               output_layouts=["CHW"] * n_out)
    out = dict(zip(("original", "masked", "mask", "hu"), nodes))
    if label is not None:
        label = fn.expand_dims(label, axes=[0], new_axis_names="C")       # (1, Y, X) CHW
        if cfg.size > 0:
            label = fn.resize(label, size=[cfg.size, cfg.size], interp_type=types.INTERP_NN,
                              antialias=False, device=device)
        out["label"] = label
    return out
