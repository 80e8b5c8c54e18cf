"""Preprocessing throughput (bench stage `preprocess`): baseline vs DALI CPU vs DALI GPU.

All three run the same transform (windows, edges, resize, tissue mask) on the same HU
batches already in host memory (pinned for the GPU), so reading is measured apart:

    from tcsmae.bench.preprocess import measure_preprocess, synthetic_batches
    figures = measure_preprocess(synthetic_batches(8, 64), PipelineConfig(), "cpu", workers=2)
    # {"baseline": {"slices_per_s": ...}, "dali_cpu": {...}, "dali_gpu": {... or None}}

`python -m tcsmae.bench.preprocess --workers 2 --seconds 10` prints a table.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tcsmae.pipelines.baseline import baseline_loader
from tcsmae.pipelines.config import PipelineConfig
from tcsmae.pipelines.graph import processing_graph
from tcsmae.pipelines.source import draw_mask


def synthetic_batches(n_batches: int, batch_size: int, side: int = 512, seed: int = 0
                      ) -> list[np.ndarray]:
    """HU batches of a body-like disc with noise: list of (N, side, side) int16 HU."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    r = np.hypot(yy - side / 2, xx - side / 2) / (side / 2)
    base = np.where(r < 0.8, 40.0, -1000.0)
    base = np.where((r < 0.6) & (np.abs(xx - side / 2) > side * 0.08), -850.0, base)
    out = []
    for _ in range(n_batches):
        noise = rng.normal(0, 30, (batch_size, side, side))
        out.append(np.clip(base + noise, -1024, 3071).astype(np.int16))
    return out


def _draws(cfg: PipelineConfig, batches: list[np.ndarray]) -> list[np.ndarray]:
    shape = (cfg.size, cfg.size) if cfg.size > 0 else batches[0].shape[1:]
    draws, sid = [], 0
    for b in batches:
        draws.append(np.stack([draw_mask(cfg, 0, sid + i, shape) for i in range(len(b))]))
        sid += len(b)
    return draws


class _Cycle:
    """external_source callable cycling over preloaded (hu, draw) batches (no copy).

    Each batch is handed as a dense (N, ...) array (N DALI samples), or, stacked, as a
    one-sample list holding the whole batch."""

    def __init__(self, batches, draws, stacked: bool):
        self.batches, self.draws, self.stacked, self.i = batches, draws, stacked, 0

    def __call__(self):
        i = self.i
        self.i = (i + 1) % len(self.batches)
        if self.stacked:
            return [self.batches[i]], [self.draws[i]]
        return self.batches[i], self.draws[i]


def memory_pipeline(batches, draws, cfg: PipelineConfig, device_id: int | None, threads: int,
                    prefetch: int = 2, stacked: bool = True):
    """DALI pipeline over in-memory HU batches -> packed (8, H, W) per sample, or with
    stacked=True (what the loader does for uniform stores) one (N, 8, H, W) per batch."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def
    def pipe():
        hu, draw = fn.external_source(source=_Cycle(batches, draws, stacked), num_outputs=2,
                                      batch=True, no_copy=True,
                                      layout=[None if stacked else "HW", None])
        return processing_graph(hu, draw, cfg, device_id, cpu_threads=threads,
                                stacked=stacked)["packed"]

    return pipe(batch_size=1 if stacked else len(batches[0]), num_threads=threads,
                device_id=device_id, prefetch_queue_depth=prefetch, seed=cfg.seed)


def _time_dali(pipe, batch_size: int, seconds: float, gpu: bool) -> float:
    pipe.build()
    for _ in range(3):
        out = pipe.run()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        out = pipe.run()
        count += batch_size
    if gpu:
        np.asarray(out[0].as_cpu()[0])            # wait for the last batch
    elapsed = time.perf_counter() - start
    return count / elapsed


def _time_baseline(batches, draws, cfg, workers: int, seconds: float) -> float:
    slices = np.concatenate(batches)
    loader = baseline_loader(slices, np.concatenate(draws), cfg, len(batches[0]), workers)
    count, start, warm = 0, None, 0
    while True:
        for original, masked, mask in loader:
            if start is None:
                warm += 1
                if warm == max(2, workers):       # workers up and running
                    start = time.perf_counter()
                continue
            count += len(original)
            if time.perf_counter() - start >= seconds:
                return count / (time.perf_counter() - start)


def measure_preprocess(hu_batches: list[np.ndarray], cfg: PipelineConfig, device: str = "cpu",
                       workers: int = 2, seconds: float = 10.0,
                       which: tuple[str, ...] = ("baseline", "dali_cpu", "dali_gpu"),
                       stacked: bool = True) -> dict:
    """Slices/s of each path on the same HU batches ((N, Y, X) int16 each, >= 2 batches).

    device 'cpu' measures baseline and dali_cpu (dali_gpu -> None); 'cuda' all three, the GPU
    path reading from pinned host memory. workers: DataLoader workers of the baseline and
    DALI CPU threads. stacked: one DALI sample per batch (the loader's mode for stores of
    one grid) or one per slice. Returns {name: {"slices_per_s": float, ...} | None}.
    """
    draws = _draws(cfg, hu_batches)
    n = len(hu_batches[0])
    result: dict = {name: None for name in ("baseline", "dali_cpu", "dali_gpu")}
    if "baseline" in which:
        result["baseline"] = {"slices_per_s": _time_baseline(hu_batches, draws, cfg, workers,
                                                             seconds)}
    if "dali_cpu" in which:
        pipe = memory_pipeline(hu_batches, draws, cfg, None, workers, stacked=stacked)
        result["dali_cpu"] = {"slices_per_s": _time_dali(pipe, n, seconds, gpu=False),
                              "stacked": stacked}
        del pipe
    if device == "cuda" and "dali_gpu" in which:
        import torch

        pinned = [torch.from_numpy(b).pin_memory().numpy() for b in hu_batches]
        pipe = memory_pipeline(pinned, draws, cfg, torch.cuda.current_device(), workers,
                               prefetch=2, stacked=stacked)
        result["dali_gpu"] = {"slices_per_s": _time_dali(pipe, n, seconds, gpu=True),
                              "stacked": stacked}
        del pipe
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()  # give training stages the memory back
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--which", default="baseline,dali_cpu,dali_gpu")
    parser.add_argument("--per-sample", action="store_true",
                        help="one DALI sample per slice instead of one per batch")
    args = parser.parse_args(argv)
    cfg = PipelineConfig(size=args.size)
    batches = synthetic_batches(args.batches, args.batch_size, args.side)
    figures = measure_preprocess(batches, cfg, args.device, args.workers, args.seconds,
                                 tuple(args.which.split(",")), stacked=not args.per_sample)
    base = (figures["baseline"] or {}).get("slices_per_s")
    mode = "per-sample" if args.per_sample else "stacked"
    print(f"| path | slices/s | x baseline |  ({args.side}x{args.side} int16 -> 2x3x"
          f"{args.size}x{args.size}, batch {args.batch_size}, {args.workers} workers, {mode})")
    print("| --- | --- | --- |")
    for name, fig in figures.items():
        rate = None if fig is None else fig["slices_per_s"]
        ratio = f"{rate / base:.2f}" if rate and base else "-"
        print(f"| {name} | {'-' if rate is None else f'{rate:.0f}'} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
