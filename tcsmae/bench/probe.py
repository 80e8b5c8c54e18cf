"""TODO docstring."""

from __future__ import annotations

import time

import torch

from tcsmae.distributed import DistContext as _Ctx
from tcsmae.distributed import resolve_device
from tcsmae.pretrain.batches import SyntheticBatches
from tcsmae.pretrain.config import TrainConfig
from tcsmae.pretrain.step import build_training, step_inputs, train_step

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


def device_peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of the device (for MFU); None when unknown (e.g. the CPU)."""
    if device.type != "cuda":
        return None
    return gpu_peak(torch.cuda.get_device_name(device))[0]


def measure_train_step(cfg: TrainConfig, device: str | torch.device, batch_size: int,
                       seconds: float = 10.0, warmup_steps: int = 3, profile: bool = False) -> dict:
    """Training-step throughput on in-memory synthetic batches at cfg.input_size.

    Runs `warmup_steps` steps (compilation included with cfg.compile), then as many as fit in
    `seconds`; `profile=True` also prints the top CUDA kernels of 3 steps. Returns
    {pairs_per_s, peak_mem_gb (GPU: max allocated; CPU: process peak RSS), mfu (None without a
    known GPU peak), flops_per_pair, steps, batch_size, device, precision}.
    """
    import resource
    from dataclasses import replace

    from torch.utils.flop_counter import FlopCounterMode


    dev = resolve_device(str(device))
    cfg = replace(cfg, batch_size=batch_size, device=str(dev))
    ctx = _Ctx(rank=0, world_size=1, local_rank=0, device=dev)
    setup = build_training(cfg, ctx)
    source = SyntheticBatches(batch_size, cfg.input_size, steps_per_epoch=1, seed=cfg.seed, device=dev)
    batch = source.batch(0, 0)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    masked, original = step_inputs(batch, setup, dev)
    with torch.no_grad(), torch.autocast(dev.type, dtype=setup.amp or torch.float32, enabled=setup.amp is not None):
        with FlopCounterMode(display=False) as counter:  # forward of both branches, uncompiled
            setup.core(masked, original)
    # training = 3x the forward (PaLM's MFU convention); FlopCounterMode's own backward count
    # treats depthwise convolutions (MiT's Mix-FFN) as dense and overstates them ~200x.
    flops_per_step = 3.0 * float(counter.get_total_flops())
    for _ in range(warmup_steps):
        train_step(setup, batch, ctx)
    sync()
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            for _ in range(3):
                train_step(setup, batch, ctx)
            sync()
        key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    steps, start = 0, time.perf_counter()
    while True:
        train_step(setup, batch, ctx)
        steps += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    pairs_per_s = steps * batch_size / elapsed
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 1e9
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB (Linux)
    peak_flops = device_peak_flops(dev)
    mfu = None if peak_flops is None else flops_per_step * steps / elapsed / peak_flops
    return {"pairs_per_s": pairs_per_s, "peak_mem_gb": peak, "mfu": mfu,
            "flops_per_pair": flops_per_step / batch_size, "steps": steps, "batch_size": batch_size,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "precision": str(setup.amp or torch.float32).replace("torch.", ""),
            "encoder": cfg.model.encoder, "size": cfg.input_size}
