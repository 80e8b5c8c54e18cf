"""What `tcsmae bench` and bench/train_step_bench.py read off a training step: its FLOPs
(3x the counted forward, for MFU), peak memory, MFU against the GPU's dense bf16 peak, and
a profile (top kernels, torch profiler trace). `measure_train_step` is the stand-alone
probe: a fresh training setup timed on one in-memory synthetic batch."""

from __future__ import annotations

import time

import torch

from tcsmae.distributed import DistContext as _Ctx
from tcsmae.distributed import resolve_device
from tcsmae.pretrain.batches import SyntheticBatches
from tcsmae.pretrain.config import TrainConfig
from tcsmae.pretrain.step import build_training, read_steps, step_inputs, train_step

# Dense bf16 peak of known GPUs (datasheet figures, without sparsity), for MFU estimates;
# the first name contained in the device name wins, so "H100 PCIe" precedes "H100".
GPU_PEAK_BF16 = (("H100 PCIe", 756e12, "H100 PCIe dense bf16 756 TFLOP/s"),
                 ("H100", 989e12, "H100 SXM dense bf16 989 TFLOP/s"),
                 ("H200", 989e12, "H200 dense bf16 989 TFLOP/s"),
                 ("A100", 312e12, "A100 dense bf16 312 TFLOP/s"),
                 ("L40S", 362e12, "L40S dense bf16 362 TFLOP/s"),
                 ("B200", 2250e12, "B200 dense bf16 2250 TFLOP/s"))


def gpu_peak(name: str | None) -> tuple[float | None, str | None]:
    """(FLOP/s, description) of a GPU name's dense bf16 peak; (None, None) when unknown."""
    for key, flops, text in GPU_PEAK_BF16:
        if name and key in name:
            return flops, text
    return None, None


def mfu(flops_per_s: float, device: torch.device) -> tuple[float | None, str | None]:
    """(model FLOP utilisation = flops_per_s / the device's dense bf16 peak, the peak's
    description); (None, None) without a known peak (the CPU, an unlisted GPU)."""
    peak, text = gpu_peak(torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    return (flops_per_s / peak if peak else None), text


def step_flops(setup, batch: dict, device: torch.device) -> float:
    """Training FLOPs of one step on `batch`: 3x the forward of both branches (PaLM's MFU
    convention), counted by torch.utils.flop_counter.FlopCounterMode, uncompiled, under the
    step's autocast. The forward is counted, not a whole step, because FlopCounterMode's
    backward formula treats depthwise convolutions (MiT's Mix-FFN) as dense and overstates
    them ~200x."""
    from torch.utils.flop_counter import FlopCounterMode

    masked, original, _ = step_inputs(batch, setup, device)
    amp = setup.amp
    with (torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None),
          FlopCounterMode(display=False) as counter):
        setup.core(masked, original)
    return 3.0 * float(counter.get_total_flops())


def profile_steps(setup, batch: dict, ctx, steps: int = 3, trace_path=None, rows: int = 20) -> dict:
    """Profile `steps` training steps (after the caller's warm-up) with torch.profiler.

    Returns {"device_time": "cuda" or "cpu", "steps", "step_ms" (wall per step, synchronised),
    "total_self_ms" (per step, all ops), "trace" (path or None), "top": the `rows` ops with
    the most self time: {name, calls, self_ms (per step), share (of total_self_ms)}}; self
    CUDA time of kernels on a GPU, self CPU time on the CPU. `trace_path`: also write the
    trace there (Chrome trace JSON)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = ctx.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        results = [train_step(setup, batch, ctx) for _ in range(steps)]
        read_steps(results)
        sync()
        wall = time.perf_counter() - start
    if trace_path is not None:
        prof.export_chrome_trace(str(trace_path))

    def self_us(event) -> float:
        if cuda:
            return float(getattr(event, "self_device_time_total", None)
                         or getattr(event, "self_cuda_time_total", 0))
        return float(event.self_cpu_time_total)

    events = [e for e in prof.key_averages() if self_us(e) > 0]
    total = sum(self_us(e) for e in events) or 1.0
    top = sorted(events, key=self_us, reverse=True)[:rows]
    return {"device_time": "cuda" if cuda else "cpu", "steps": steps, "step_ms": 1e3 * wall / steps,
            "total_self_ms": total / 1e3 / steps, "trace": None if trace_path is None else str(trace_path),
            "top": [{"name": e.key, "calls": e.count / steps, "self_ms": self_us(e) / 1e3 / steps,
                     "share": self_us(e) / total} for e in top]}


def profile_table(prof: dict) -> str:
    """The top ops of `profile_steps` as a Markdown table."""
    what = "self CUDA time" if prof["device_time"] == "cuda" else "self CPU time"
    lines = [f"top {len(prof['top'])} ops by {what}, per step of {prof['step_ms']:.1f} ms wall "
             f"({prof['total_self_ms']:.1f} ms {what} in all)"
             + (f"; trace {prof['trace']}" if prof.get("trace") else ""),
             "", f"| op | calls/step | {what} ms/step | share |", "|---|---:|---:|---:|"]
    for row in prof["top"]:
        name = row["name"].replace("|", "/")
        name = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"| {name} | {row['calls']:g} | {row['self_ms']:.3f} | {100 * row['share']:.1f} % |")
    return "\n".join(lines)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new GPU peak (torch's allocator); nothing on the CPU (its peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float:
    """GB: GPU = torch.cuda.max_memory_allocated since the last reset; CPU = the process's
    peak resident set (ru_maxrss, Linux kB), everything so far included."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB


def measure_train_step(cfg: TrainConfig, device: str | torch.device, batch_size: int,
                       seconds: float = 10.0, warmup_steps: int = 3, profile: bool = False) -> dict:
    """Training-step throughput on in-memory synthetic batches at cfg.input_size.

    Runs `warmup_steps` steps (compilation included with cfg.compile), then as many as fit in
    `seconds`; `profile=True` also prints the top kernels of 3 steps (profile_table). Returns
    {pairs_per_s, peak_mem_gb (peak_memory_gb over the timed steps), mfu (None without a
    known GPU peak), flops_per_pair (step_flops / batch_size), steps, batch_size, device,
    precision, encoder, size}.
    """
    from dataclasses import replace

    dev = resolve_device(str(device))
    cfg = replace(cfg, batch_size=batch_size, device=str(dev))
    ctx = _Ctx(rank=0, world_size=1, local_rank=0, device=dev)
    setup = build_training(cfg, ctx)
    source = SyntheticBatches(batch_size, cfg.input_size, steps_per_epoch=1, seed=cfg.seed, device=dev,
                              input_dtype=setup.input_dtype, channels_last=setup.channels_last)
    batch = source.batch(0, 0)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    flops_per_step = step_flops(setup, batch, dev)
    for _ in range(warmup_steps):
        train_step(setup, batch, ctx)
    sync()
    if profile:
        print(profile_table(profile_steps(setup, batch, ctx)))
    reset_peak_memory(dev)
    steps, start = 0, time.perf_counter()
    while True:
        train_step(setup, batch, ctx)
        steps += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    pairs_per_s = steps * batch_size / elapsed
    return {"pairs_per_s": pairs_per_s, "peak_mem_gb": peak_memory_gb(dev),
            "mfu": mfu(flops_per_step * steps / elapsed, dev)[0],
            "flops_per_pair": flops_per_step / batch_size, "steps": steps, "batch_size": batch_size,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "precision": str(setup.amp or torch.float32).replace("torch.", ""),
            "encoder": cfg.model.encoder, "size": cfg.input_size}
