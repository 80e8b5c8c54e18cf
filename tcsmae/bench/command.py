"""The `tcsmae bench` command line: flags -> `BenchConfig` -> `run_bench` -> result file
and table."""

from __future__ import annotations

import os
import sys

from tcsmae.bench.config import BenchConfig
from tcsmae.bench.report import markdown_table, write_result
from tcsmae.bench.suite import run_bench

HELP = "measure throughput: Zarr reads, preprocessing (NumPy baseline vs DALI CPU/GPU), training steps, end to end"


def add_arguments(parser) -> None:
    a = parser.add_argument
    a("--data", metavar="STORE.zarr", help="tcsmae store (default: phantom chest CT at 512x512, "
      "built once in $TCSMAE_CACHE or ~/.cache/tcsmae)")
    a("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    a("--workers", type=int, default=None, metavar="W",
      help="baseline DataLoader workers = DALI CPU threads = read-stage processes; the end-to-end "
      "loader gets W threads and W/2 reader processes (default: CPU count)")
    a("--batch-size", type=int, default=None, metavar="N",
      help="batch in every stage (default: 30 on cuda, the paper's; 8 on cpu and with --quick)")
    a("--size", type=int, default=None, metavar="PX", help="output side (default 256; --quick 128)")
    a("--seconds", type=float, default=None, metavar="S",
      help="timed seconds per stage measurement, after warm-up (default 10; --quick 2)")
    a("--encoder", default=None, help="smp encoder (default mit_b2; --quick mit_b0)")
    a("--quick", action="store_true",
      help="demo preset: mit_b0, 128x128, batch 8, 2 s per measurement, a small phantom (< 2 min on 2 CPU cores)")
    a("--pool-slices", type=int, default=None, metavar="N",
      help="distinct slices held in memory for the preprocess stage (default 256; --quick 32)")
    a("--batch-sweep", type=int, nargs="*", default=None, metavar="N",
      help="train_step batch sizes to try for the best one (default on a GPU: 30 64 128; none on the CPU)")
    a("--out", required=True, metavar="FILE.json", help="result file (written atomically)")


def config_from_args(args) -> BenchConfig:
    """BenchConfig from the flags; --quick changes the defaults, explicit flags win."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    quick = bool(args.quick)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    sweep = args.batch_sweep
    if sweep is None:
        sweep = (30, 64, 128) if device == "cuda" and not quick else ()
    pick = lambda value, normal, fast: value if value is not None else (fast if quick else normal)  # noqa: E731
    return BenchConfig(
        data=args.data, device=device, workers=pick(args.workers, cpus, cpus),
        # the paper's batch of 30 on a GPU; on a CPU mit_b2 at 30 takes ~75 s and 17 GB a step
        batch_size=pick(args.batch_size, 30 if device == "cuda" else 8, 8), size=pick(args.size, 256, 128),
        seconds=pick(args.seconds, 10.0, 2.0), encoder=pick(args.encoder, "mit_b2", "mit_b0"),
        quick=quick, pool_slices=pick(args.pool_slices, 256, 32), batch_sweep=tuple(sweep),
        # GPU: 1,024 slices, so that epoch boundaries (prefetch refills) are rare at batch 30
        phantom_cases=4 if quick else (32 if device == "cuda" else 16), phantom_slices=16 if quick else 32,
    )


def command_line(args) -> str:
    """The flags as given, as one shell command (recorded in the result)."""
    import shlex

    parts = ["tcsmae", "bench"]
    for flag in ("data", "device", "workers", "batch_size", "size", "seconds", "encoder", "pool_slices"):
        value = getattr(args, flag)
        if value is not None:
            parts += [f"--{flag.replace('_', '-')}", str(value)]
    if args.quick:
        parts.append("--quick")
    if args.batch_sweep is not None:
        parts += ["--batch-sweep", *map(str, args.batch_sweep)]
    parts += ["--out", str(args.out)]
    return shlex.join(parts)


def run(args) -> int:
    cfg = config_from_args(args)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    command = command_line(args)

    def save(partial: dict) -> None:
        write_result({"command": command, **partial}, args.out)

    result = run_bench(cfg, say, save)
    result["command"] = command
    path = write_result(result, args.out)
    print(markdown_table(result))
    print(f"\nwrote {path} ({result['stage_seconds']['total']:.0f} s)")
    return 1 if result["errors"] else 0
