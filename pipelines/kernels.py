"""Fast batched steps: each CuPy kernel with its NumPy twin of the same signature beside it.

    window_edges_{numpy,cupy}(hu, lung, mediastinal, scaling, clip) -> stack
        hu (N, Y, X) float32|int16 HU  ->  stack (N, 4, Y, X) float32 =
        (lung window, mediastinal window, edge channel, HU as float32)
        One fused pass: both windows (Eq. 5), Sobel of both with numpy-'reflect' borders,
        their maximum, fixed scaling (Eq. 6-9). HU rides along as channel 3 so one resize
        moves image and HU together (the mask is computed from the resized HU).

    tissue_mask_apply_{numpy,cupy}(stack, chosen, lo, hi) -> (original, masked, mask)
        stack (N, 4, H, W) float32, chosen (N, K) uint8 (1 = interval masked)
        -> original (N, 3, H, W), masked = M * original, mask M (N, 1, H, W), float32.
        Interval index in float64 exactly as masking.interval_index.

    patch_mask_apply_{numpy,cupy}(stack, grid, patch_size) -> (original, masked, mask)
        grid (N, GY, GX) uint8 (1 = patch masked); same outputs.

The NumPy twins are what the CPU path runs; the references in windowing/edges/masking are
the spec both are tested against. CuPy is imported only inside the *_cupy functions.
"""

from __future__ import annotations

import functools

import numpy as np

from .config import SOBEL_MAX

_SCALINGS = {"clip": 0, "divide": 1}


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
    """NumPy twin. hu (N, Y, X) float32|int16 HU -> (N, 4, Y, X) float32 (see module doc).

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


def tissue_mask_apply_numpy(stack: np.ndarray, chosen: np.ndarray, lo: float, hi: float
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NumPy twin. stack (N, 4, H, W) float32, chosen (N, K) uint8 -> original, masked, mask."""
    n, _, h, w = stack.shape
    k = chosen.shape[1]
    scaled = (stack[:, 3].astype(np.float64) - float(lo)) * float(k) / (float(hi) - float(lo))
    idx = np.clip(np.floor(scaled), 0, k - 1).astype(np.intp)          # (N, H, W)
    keep = (1 - np.asarray(chosen, dtype=np.uint8)).astype(np.float32)  # (N, K)
    mask = np.take_along_axis(keep, idx.reshape(n, -1), axis=1).reshape(n, 1, h, w)
    original = np.ascontiguousarray(stack[:, :3])
    return original, original * mask, mask


def patch_mask_apply_numpy(stack: np.ndarray, grid: np.ndarray, patch_size: int
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NumPy twin. stack (N, 4, H, W) float32, grid (N, GY, GX) uint8 -> original, masked, mask."""
    _, _, h, w = stack.shape
    ys = np.arange(h) // patch_size
    xs = np.arange(w) // patch_size
    keep = (1 - np.asarray(grid, dtype=np.uint8)).astype(np.float32)
    mask = keep[:, ys[:, None], xs[None, :]][:, None]                    # (N, 1, H, W)
    original = np.ascontiguousarray(stack[:, :3])
    return original, original * mask, mask


# --------------------------------------------------------------------------- CuPy kernels
_CUDA_SOURCE = r"""
__device__ __forceinline__ int reflect_index(int i, int n) {
    // numpy 'reflect': -1 -> 1, n -> n - 2 (edge pixel not repeated)
    if (n == 1) return 0;
    if (i < 0) return -i;
    if (i >= n) return 2 * n - 2 - i;
    return i;
}

template <typename T>
__device__ void window_edges_impl(const T* __restrict__ hu, float* __restrict__ out,
                                  int n, int h, int w,
                                  float lung_low, float lung_width,
                                  float med_low, float med_width,
                                  int scaling, float clip_value, float sobel_max) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long plane = (long long)h * w;
    if (i >= (long long)n * plane) return;
    int b = (int)(i / plane);
    long long p = i - (long long)b * plane;
    int y = (int)(p / w);
    int x = (int)(p - (long long)y * w);
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

extern "C" __global__ void tissue_mask_apply(const float* __restrict__ stack,
        const unsigned char* __restrict__ chosen, float* __restrict__ original,
        float* __restrict__ masked, float* __restrict__ mask,
        int n, int h, int w, int k, double lo, double hi) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long plane = (long long)h * w;
    if (i >= (long long)n * plane) return;
    int b = (int)(i / plane);
    long long p = i - (long long)b * plane;
    const float* s = stack + (long long)b * 4 * plane + p;
    double scaled = ((double)s[3 * plane] - lo) * (double)k / (hi - lo);
    scaled = fmin(fmax(floor(scaled), 0.0), (double)(k - 1));
    int idx = (int)scaled;
    float m = chosen[(long long)b * k + idx] ? 0.f : 1.f;
    long long o = (long long)b * 3 * plane + p;
    for (int c = 0; c < 3; ++c) {
        float v = s[c * plane];
        original[o + c * plane] = v;
        masked[o + c * plane] = v * m;
    }
    mask[(long long)b * plane + p] = m;
}

extern "C" __global__ void patch_mask_apply(const float* __restrict__ stack,
        const unsigned char* __restrict__ grid, float* __restrict__ original,
        float* __restrict__ masked, float* __restrict__ mask,
        int n, int h, int w, int gy, int gx, int patch_size) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long plane = (long long)h * w;
    if (i >= (long long)n * plane) return;
    int b = (int)(i / plane);
    long long p = i - (long long)b * plane;
    int y = (int)(p / w);
    int x = (int)(p - (long long)y * w);
    const float* s = stack + (long long)b * 4 * plane + p;
    float m = grid[((long long)b * gy + y / patch_size) * gx + x / patch_size] ? 0.f : 1.f;
    long long o = (long long)b * 3 * plane + p;
    for (int c = 0; c < 3; ++c) {
        float v = s[c * plane];
        original[o + c * plane] = v;
        masked[o + c * plane] = v * m;
    }
    mask[(long long)b * plane + p] = m;
}
"""

_THREADS = 256


@functools.lru_cache(maxsize=None)
def _module():
    import cupy as cp

    return cp.RawModule(code=_CUDA_SOURCE, options=("--std=c++14",))


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


def tissue_mask_apply_cupy(stack, chosen, lo: float, hi: float):
    """CuPy twin of tissue_mask_apply_numpy (same shapes, cupy arrays)."""
    import cupy as cp

    stack = cp.ascontiguousarray(stack, dtype=cp.float32)
    chosen = cp.ascontiguousarray(chosen, dtype=cp.uint8)
    n, _, h, w = stack.shape
    k = chosen.shape[1]
    original = cp.empty((n, 3, h, w), dtype=cp.float32)
    masked = cp.empty_like(original)
    mask = cp.empty((n, 1, h, w), dtype=cp.float32)
    _launch("tissue_mask_apply", n * h * w, (
        stack, chosen, original, masked, mask, np.int32(n), np.int32(h), np.int32(w),
        np.int32(k), np.float64(lo), np.float64(hi)))
    return original, masked, mask


def patch_mask_apply_cupy(stack, grid, patch_size: int):
    """CuPy twin of patch_mask_apply_numpy (same shapes, cupy arrays)."""
    import cupy as cp

    stack = cp.ascontiguousarray(stack, dtype=cp.float32)
    grid = cp.ascontiguousarray(grid, dtype=cp.uint8)
    n, _, h, w = stack.shape
    gy, gx = grid.shape[1], grid.shape[2]
    original = cp.empty((n, 3, h, w), dtype=cp.float32)
    masked = cp.empty_like(original)
    mask = cp.empty((n, 1, h, w), dtype=cp.float32)
    _launch("patch_mask_apply", n * h * w, (
        stack, grid, original, masked, mask, np.int32(n), np.int32(h), np.int32(w),
        np.int32(gy), np.int32(gx), np.int32(patch_size)))
    return original, masked, mask
