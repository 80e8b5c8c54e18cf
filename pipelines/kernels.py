"""Fast batched steps: each CuPy kernel with its NumPy twin of the same signature beside it.

window_edges (both windows, Sobel edges, HU as channel 3), resize (torch's antialiased
bilinear, from `resize_weights` tables) and tissue/patch mask apply (-> packed (N, 8, H, W)
float32, channels PACKED). The NumPy twins are what the CPU path runs; the references in
windowing/edges/masking are the spec both are tested against. CuPy is imported only inside
the *_cupy functions. Signatures and notes: docs/pipelines.md, "CPU and GPU paths".
"""

from __future__ import annotations

import functools

import numpy as np

from tcsmae.pipelines.config import SOBEL_MAX

_SCALINGS = {"clip": 0, "divide": 1}

PACKED = ("lung", "mediastinal", "edge", "masked_lung", "masked_mediastinal", "masked_edge",
          "mask", "hu")
"""Channels of the packed output: original = 0:3, masked = 3:6, mask = 6:7, HU = 7:8."""


def split_packed(packed) -> dict:
    """packed (N, 8, H, W) NumPy array or torch tensor -> views original (N, 3, H, W),
    masked (N, 3, H, W), mask (N, 1, H, W), hu (N, 1, H, W)."""
    return {"original": packed[:, 0:3], "masked": packed[:, 3:6], "mask": packed[:, 6:7],
            "hu": packed[:, 7:8]}


@functools.lru_cache(maxsize=64)
def resize_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weight table of torch's antialiased bilinear resize along one axis.

    Output pixel i sits at input coordinate c = s (i + 0.5), s = in/out; the triangle filter
    has half-width max(s, 1) input pixels; taps j in [start_i, start_i + count_i) get weight
    max(0, 1 - |(j + 0.5 - c) / max(s, 1)|), normalised to sum 1 (taps outside the image
    are dropped, not clamped: this is where DALI's resize differs, in the border ring).
    Returns start (out,) int32, count (out,) int32, weights (out, T) float32 (zero-padded).
    """
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    starts, counts, rows = [], [], []
    for i in range(out_size):
        centre = scale * (i + 0.5)
        lo = max(int(centre - support + 0.5), 0)
        n = min(int(centre + support + 0.5), in_size) - lo
        w = np.maximum(0.0, 1.0 - np.abs((np.arange(n) + lo - centre + 0.5) * invscale))
        total = w.sum()
        starts.append(lo)
        counts.append(n)
        rows.append(w / total if total != 0 else w)
    taps = max(counts)
    weights = np.zeros((out_size, taps), dtype=np.float64)
    for i, w in enumerate(rows):
        weights[i, :len(w)] = w
    return (np.array(starts, np.int32), np.array(counts, np.int32),
            weights.astype(np.float32))


def _resize_axis_numpy(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    start, count, weights = resize_weights(x.shape[axis], size)
    idx = np.minimum(start[:, None] + np.arange(weights.shape[1]), x.shape[axis] - 1)
    taken = np.take(x, idx, axis=axis)                 # axis -> (size, T)
    taken = np.moveaxis(taken, (axis, axis + 1), (-2, -1))
    out = (taken * weights).sum(axis=-1, dtype=np.float32)
    return np.moveaxis(out, -1, axis)


def resize_numpy(stack: np.ndarray, size: int) -> np.ndarray:
    """NumPy twin of resize_cupy: stack (N, C, Y, X) float32 -> (N, C, size, size) float32."""
    x = _resize_axis_numpy(np.asarray(stack, dtype=np.float32), size, axis=3)
    return _resize_axis_numpy(x, size, axis=2)


# --------------------------------------------------------------------------- NumPy twins
def _reflect_pad(hu: np.ndarray, padded: np.ndarray) -> None:
    """numpy-'reflect' pad by 1: hu (Y, X) -> padded (Y+2, X+2) (rows, then columns)."""
    h, w = hu.shape
    padded[1:-1, 1:-1] = hu
    padded[0] = padded[2] if h > 1 else padded[1]
    padded[-1] = padded[-3] if h > 1 else padded[1]
    padded[:, 0] = padded[:, 2] if w > 1 else padded[:, 1]
    padded[:, -1] = padded[:, -3] if w > 1 else padded[:, 1]


def window_edges_numpy(hu: np.ndarray, lung: tuple[float, float],
                       mediastinal: tuple[float, float], scaling: str, clip: float
                       ) -> np.ndarray:
    """NumPy twin. hu (N, Y, X) float32|int16 HU -> (N, 4, Y, X) float32: lung window,
    mediastinal window, edge channel, HU as float32 (one fused pass: windows, Sobel of both
    with numpy-'reflect' borders, their maximum, fixed scaling).

    Per slice (a batch of temporaries would not fit in the caches), on the flattened padded
    image so that every step is a contiguous 1-D operation (strided 2-D views run several
    times slower): with W2 = X + 2, pixel (y, x) of the padded image is element y*W2 + x,
    and the 3x3 neighbourhood of output pixel (y, x) starts at element y*W2 + x. Outputs are
    computed on a (Y, W2) grid whose last two columns are discarded. Sobel in separable
    form: Gx = [1 2 1]^T (x) [-1 0 1], Gy = its transpose. Windowing commutes with the
    padding (pointwise), so the windows of the padded HU are the padded windows.
    """
    n, h, w = hu.shape
    w2 = w + 2
    size = (h + 2) * w2
    m = h * w2                                             # outputs on the (Y, W2) grid
    out = np.empty((n, 4, h, w), dtype=np.float32)
    lows = np.array([lung[0] - lung[1] / 2.0, mediastinal[0] - mediastinal[1] / 2.0],
                    dtype=np.float32)[:, None]
    widths = np.array([lung[1], mediastinal[1]], dtype=np.float32)[:, None]
    hu_pad = np.empty((h + 2, w2), dtype=np.float32)
    win = np.empty((2, size), dtype=np.float32)            # both windows, padded, flat
    # two spare zeros at the end: the last row's discarded columns read past the image
    dx = np.zeros((2, size), dtype=np.float32)
    sy = np.zeros((2, size), dtype=np.float32)
    gx = np.empty((2, m), dtype=np.float32)
    gy = np.empty((2, m), dtype=np.float32)
    for i in range(n):
        _reflect_pad(hu[i], hu_pad)
        np.subtract(hu_pad.reshape(1, size), lows, out=win)
        np.divide(win, widths, out=win)
        np.clip(win, np.float32(0.0), np.float32(1.0), out=win)
        np.subtract(win[:, 2:], win[:, :-2], out=dx[:, :-2])             # d/dx at column x+1
        np.add(dx[:, :m], dx[:, 2 * w2:2 * w2 + m], out=gx)
        gx += dx[:, w2:w2 + m]
        gx += dx[:, w2:w2 + m]
        np.add(win[:, :-2], win[:, 2:], out=sy[:, :-2])                  # [1 2 1] along x
        sy[:, :-2] += win[:, 1:-1]
        sy[:, :-2] += win[:, 1:-1]
        np.subtract(sy[:, 2 * w2:2 * w2 + m], sy[:, :m], out=gy)   # d/dy at row y+1
        np.multiply(gx, gx, out=gx)
        np.multiply(gy, gy, out=gy)
        np.add(gx, gy, out=gx)
        np.sqrt(gx, out=gx)
        edge = np.maximum(gx[0], gx[1], out=gy[0])
        if scaling == "clip":
            np.minimum(edge, np.float32(clip), out=edge)
        elif scaling == "divide":
            np.divide(edge, np.float32(SOBEL_MAX), out=edge)
        else:
            raise ValueError(f"unknown edge scaling {scaling!r}")
        o = out[i]
        o[:2] = win.reshape(2, h + 2, w2)[:, 1:-1, 1:-1]
        o[2] = edge.reshape(h, w2)[:, :w]
        o[3] = hu_pad[1:-1, 1:-1]
    return out


def _pack_numpy(stack: np.ndarray, mask: np.ndarray) -> np.ndarray:
    n, _, h, w = stack.shape
    packed = np.empty((n, 8, h, w), dtype=np.float32)
    packed[:, 0:3] = stack[:, :3]
    np.multiply(stack[:, :3], mask, out=packed[:, 3:6])
    packed[:, 6:7] = mask
    packed[:, 7] = stack[:, 3]
    return packed


def tissue_mask_apply_numpy(stack: np.ndarray, chosen: np.ndarray, lo: float, hi: float
                            ) -> np.ndarray:
    """NumPy twin. stack (N, 4, H, W) float32, chosen (N, K) uint8 (1 = interval masked)
    -> packed (N, 8, H, W) float32, channels PACKED; interval index in float64 exactly as
    masking.interval_index."""
    n, _, h, w = stack.shape
    k = chosen.shape[1]
    scaled = (stack[:, 3].astype(np.float64) - float(lo)) * float(k) / (float(hi) - float(lo))
    idx = np.clip(np.floor(scaled), 0, k - 1).astype(np.intp)          # (N, H, W)
    keep = (1 - np.asarray(chosen, dtype=np.uint8)).astype(np.float32)  # (N, K)
    mask = np.take_along_axis(keep, idx.reshape(n, -1), axis=1).reshape(n, 1, h, w)
    return _pack_numpy(stack, mask)


def patch_mask_apply_numpy(stack: np.ndarray, grid: np.ndarray, patch_size: int
                           ) -> np.ndarray:
    """NumPy twin. stack (N, 4, H, W) float32, grid (N, GY, GX) uint8 (1 = patch masked)
    -> packed (N, 8, H, W) float32, channels PACKED."""
    _, _, h, w = stack.shape
    ys = np.arange(h) // patch_size
    xs = np.arange(w) // patch_size
    keep = (1 - np.asarray(grid, dtype=np.uint8)).astype(np.float32)
    mask = keep[:, ys[:, None], xs[None, :]][:, None]                    # (N, 1, H, W)
    return _pack_numpy(stack, mask)


# --------------------------------------------------------------------------- CuPy kernels
_CUDA_SOURCE = r"""
__device__ __forceinline__ int reflect_index(int i, int n) {
    // numpy 'reflect': -1 -> 1, n -> n - 2 (edge pixel not repeated)
    if (n == 1) return 0;
    if (i < 0) return -i;
    if (i >= n) return 2 * n - 2 - i;
    return i;
}

// One thread per (sample b, pixel p = y * w + x) of an (n, h, w) grid; false past the end.
struct Pixel { int b, y, x; long long p, plane; };
__device__ __forceinline__ bool pixel_of_thread(int n, int h, int w, Pixel& px) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    px.plane = (long long)h * w;
    if (i >= (long long)n * px.plane) return false;
    px.b = (int)(i / px.plane);
    px.p = i - (long long)px.b * px.plane;
    px.y = (int)(px.p / w);
    px.x = (int)(px.p - (long long)px.y * w);
    return true;
}

template <typename T>
__device__ void window_edges_impl(const T* __restrict__ hu, float* __restrict__ out,
                                  int n, int h, int w,
                                  float lung_low, float lung_width,
                                  float med_low, float med_width,
                                  int scaling, float clip_value, float sobel_max) {
    Pixel px;
    if (!pixel_of_thread(n, h, w, px)) return;
    const int b = px.b, y = px.y, x = px.x;
    const long long p = px.p, plane = px.plane;
    const T* img = hu + (long long)b * plane;

    const float sx[3][3] = {{-1.f, 0.f, 1.f}, {-2.f, 0.f, 2.f}, {-1.f, 0.f, 1.f}};
    float gxl = 0.f, gyl = 0.f, gxm = 0.f, gym = 0.f, center = 0.f;
    for (int dy = 0; dy < 3; ++dy) {
        int yy = reflect_index(y + dy - 1, h);
        for (int dx = 0; dx < 3; ++dx) {
            int xx = reflect_index(x + dx - 1, w);
            float v = (float)img[(long long)yy * w + xx];
            float l = fminf(fmaxf((v - lung_low) / lung_width, 0.f), 1.f);
            float m = fminf(fmaxf((v - med_low) / med_width, 0.f), 1.f);
            float kx = sx[dy][dx];
            float ky = sx[dx][dy];
            gxl += kx * l; gyl += ky * l;
            gxm += kx * m; gym += ky * m;
            if (dy == 1 && dx == 1) center = v;
        }
    }
    float edge = fmaxf(sqrtf(gxl * gxl + gyl * gyl), sqrtf(gxm * gxm + gym * gym));
    edge = (scaling == 0) ? fminf(edge, clip_value) : edge / sobel_max;
    float* o = out + (long long)b * 4 * plane + p;
    o[0] = fminf(fmaxf((center - lung_low) / lung_width, 0.f), 1.f);
    o[plane] = fminf(fmaxf((center - med_low) / med_width, 0.f), 1.f);
    o[2 * plane] = edge;
    o[3 * plane] = center;
}

extern "C" __global__ void window_edges_f32(const float* hu, float* out, int n, int h, int w,
        float ll, float lw, float ml, float mw, int scaling, float clip_value, float sobel_max) {
    window_edges_impl<float>(hu, out, n, h, w, ll, lw, ml, mw, scaling, clip_value, sobel_max);
}

extern "C" __global__ void window_edges_i16(const short* hu, float* out, int n, int h, int w,
        float ll, float lw, float ml, float mw, int scaling, float clip_value, float sobel_max) {
    window_edges_impl<short>(hu, out, n, h, w, ll, lw, ml, mw, scaling, clip_value, sobel_max);
}

__device__ __forceinline__ void write_packed(const float* s, float* packed, long long plane,
                                             long long p, int b, float m) {
    float* o = packed + (long long)b * 8 * plane + p;
    for (int c = 0; c < 3; ++c) {
        float v = s[c * plane];
        o[c * plane] = v;
        o[(c + 3) * plane] = v * m;
    }
    o[6 * plane] = m;
    o[7 * plane] = s[3 * plane];
}

extern "C" __global__ void tissue_mask_apply(const float* __restrict__ stack,
        const unsigned char* __restrict__ chosen, float* __restrict__ packed,
        int n, int h, int w, int k, double lo, double hi) {
    Pixel px;
    if (!pixel_of_thread(n, h, w, px)) return;
    const float* s = stack + (long long)px.b * 4 * px.plane + px.p;
    double scaled = ((double)s[3 * px.plane] - lo) * (double)k / (hi - lo);
    scaled = fmin(fmax(floor(scaled), 0.0), (double)(k - 1));
    int idx = (int)scaled;
    float m = chosen[(long long)px.b * k + idx] ? 0.f : 1.f;
    write_packed(s, packed, px.plane, px.p, px.b, m);
}

extern "C" __global__ void patch_mask_apply(const float* __restrict__ stack,
        const unsigned char* __restrict__ grid, float* __restrict__ packed,
        int n, int h, int w, int gy, int gx, int patch_size) {
    Pixel px;
    if (!pixel_of_thread(n, h, w, px)) return;
    const float* s = stack + (long long)px.b * 4 * px.plane + px.p;
    float m = grid[((long long)px.b * gy + px.y / patch_size) * gx + px.x / patch_size] ? 0.f : 1.f;
    write_packed(s, packed, px.plane, px.p, px.b, m);
}

// Separable resize with weight tables (resize_weights): one thread per output element.
// Along x: src (rows, in_w) -> dst (rows, out_w).
extern "C" __global__ void resize_x(const float* __restrict__ src, float* __restrict__ dst,
        long long rows, int in_w, int out_w, const int* __restrict__ start,
        const int* __restrict__ count, const float* __restrict__ weights, int taps) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * out_w) return;
    long long row = i / out_w;
    int j = (int)(i - row * out_w);
    const float* s = src + row * in_w + start[j];
    const float* wt = weights + (long long)j * taps;
    float acc = 0.f;
    for (int t = 0; t < count[j]; ++t) acc += wt[t] * s[t];
    dst[i] = acc;
}

// Along y: src (planes, in_h, w) -> dst (planes, out_h, w).
extern "C" __global__ void resize_y(const float* __restrict__ src, float* __restrict__ dst,
        long long planes, int in_h, int out_h, int w, const int* __restrict__ start,
        const int* __restrict__ count, const float* __restrict__ weights, int taps) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long per_plane = (long long)out_h * w;
    if (i >= planes * per_plane) return;
    long long plane = i / per_plane;
    long long r = i - plane * per_plane;
    int y = (int)(r / w);
    int x = (int)(r - (long long)y * w);
    const float* s = src + (plane * in_h + start[y]) * w + x;
    const float* wt = weights + (long long)y * taps;
    float acc = 0.f;
    for (int t = 0; t < count[y]; ++t) acc += wt[t] * s[(long long)t * w];
    dst[i] = acc;
}
"""

_THREADS = 256


@functools.lru_cache(maxsize=None)
def _module():
    import cupy as cp

    return cp.RawModule(code=_CUDA_SOURCE)


def _launch(name: str, total: int, args: tuple) -> None:
    kernel = _module().get_function(name)
    blocks = (total + _THREADS - 1) // _THREADS
    if blocks:
        kernel((blocks,), (_THREADS,), args)


def window_edges_cupy(hu, lung: tuple[float, float], mediastinal: tuple[float, float],
                      scaling: str, clip: float):
    """CuPy twin of window_edges_numpy. hu (N, Y, X) float32|int16 cupy -> (N, 4, Y, X) f32."""
    import cupy as cp

    if hu.dtype == cp.int16:
        name = "window_edges_i16"
    else:
        name = "window_edges_f32"
        hu = hu.astype(cp.float32, copy=False)
    hu = cp.ascontiguousarray(hu)
    n, h, w = hu.shape
    out = cp.empty((n, 4, h, w), dtype=cp.float32)
    (ll, lw), (ml, mw) = lung, mediastinal
    _launch(name, n * h * w, (
        hu, out, np.int32(n), np.int32(h), np.int32(w),
        np.float32(ll - lw / 2.0), np.float32(lw), np.float32(ml - mw / 2.0), np.float32(mw),
        np.int32(_SCALINGS[scaling]), np.float32(clip), np.float32(SOBEL_MAX)))
    return out


def _mask_apply_cupy(kernel: str, stack, draw, *params):
    """Launch a *_mask_apply kernel: stack (N, 4, H, W), draw (N, ...) uint8 -> packed."""
    import cupy as cp

    stack = cp.ascontiguousarray(stack, dtype=cp.float32)
    draw = cp.ascontiguousarray(draw, dtype=cp.uint8)
    n, _, h, w = stack.shape
    packed = cp.empty((n, 8, h, w), dtype=cp.float32)
    _launch(kernel, n * h * w, (stack, draw, packed, np.int32(n), np.int32(h), np.int32(w),
                                *params))
    return packed


def tissue_mask_apply_cupy(stack, chosen, lo: float, hi: float):
    """CuPy twin of tissue_mask_apply_numpy: -> packed (N, 8, H, W) float32 cupy array."""
    return _mask_apply_cupy("tissue_mask_apply", stack, chosen, np.int32(chosen.shape[1]),
                            np.float64(lo), np.float64(hi))


def patch_mask_apply_cupy(stack, grid, patch_size: int):
    """CuPy twin of patch_mask_apply_numpy: -> packed (N, 8, H, W) float32 cupy array."""
    return _mask_apply_cupy("patch_mask_apply", stack, grid, np.int32(grid.shape[1]),
                            np.int32(grid.shape[2]), np.int32(patch_size))


@functools.lru_cache(maxsize=64)
def _weights_on_device(in_size: int, out_size: int, device_id: int):
    import cupy as cp

    start, count, weights = resize_weights(in_size, out_size)
    return cp.asarray(start), cp.asarray(count), cp.asarray(weights), weights.shape[1]


def resize_cupy(stack, size: int):
    """CuPy twin of resize_numpy: stack (N, C, Y, X) float32 cupy -> (N, C, size, size)."""
    import cupy as cp

    stack = cp.ascontiguousarray(stack, dtype=cp.float32)
    n, c, h, w = stack.shape
    device = cp.cuda.Device().id
    start, count, weights, taps = _weights_on_device(w, size, device)
    tmp = cp.empty((n, c, h, size), dtype=cp.float32)
    rows = n * c * h
    _launch("resize_x", rows * size, (stack, tmp, np.int64(rows), np.int32(w), np.int32(size),
                                      start, count, weights, np.int32(taps)))
    start, count, weights, taps = _weights_on_device(h, size, device)
    out = cp.empty((n, c, size, size), dtype=cp.float32)
    planes = n * c
    _launch("resize_y", planes * size * size, (tmp, out, np.int64(planes), np.int32(h),
                                               np.int32(size), np.int32(size), start, count,
                                               weights, np.int32(taps)))
    return out
