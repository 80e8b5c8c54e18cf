"""The `tcsmae bench` command line: flags -> `BenchConfig` -> `run_bench` -> result file
and table."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tcsmae.bench.config import BenchConfig
from tcsmae.bench.probe import profile_table
from tcsmae.bench.report import markdown_table, write_result
from tcsmae.bench.suite import run_bench
from tcsmae.settings import add_flags, apply_settings, flag_overrides

HELP = "measure throughput: Zarr reads, preprocessing (NumPy baseline vs DALI CPU/GPU), training steps, end to end"


def add_arguments(parser) -> None:
    """One flag per BenchConfig field with a flag, then --quick and --out."""
    add_flags(parser, BenchConfig, show_defaults=False)  # the defaults depend on --quick and the device
    parser.add_argument("--quick", action="store_true",
                        help="demo preset: mit_b0, 128x128, batch 8, 2 s per measurement, a small phantom "
                        "(< 2 min on 2 CPU cores)")
    parser.add_argument("--out", required=True, metavar="FILE.json", help="result file (written atomically)")


def config_from_args(args) -> BenchConfig:
    """BenchConfig from the flags; --quick and the device change the defaults, explicit flags win."""
    import torch

    given = flag_overrides(args, BenchConfig)
    device = given.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    quick = bool(args.quick)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    defaults = {
        "device": device, "workers": cpus, "quick": quick, "compile": device == "cuda",
        # the paper's batch of 30 on a GPU; on a CPU mit_b2 at 30 takes ~75 s and 17 GB a step
        "batch_size": 30 if device == "cuda" and not quick else 8, "size": 128 if quick else 256,
        "seconds": 2.0 if quick else 10.0, "encoder": "mit_b0" if quick else "mit_b2",
        "pool_slices": 32 if quick else 256, "batch_sweep": (30, 64, 128) if device == "cuda" and not quick else (),
        # GPU: 1,024 slices, so that epoch boundaries (prefetch refills) are rare at batch 30
        "phantom_cases": 4 if quick else (32 if device == "cuda" else 16), "phantom_slices": 16 if quick else 32,
    }
    return apply_settings(BenchConfig(), {**defaults, **given}, where="command-line flags")


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
    if args.compile is not None:
        parts.append("--compile" if args.compile else "--no-compile")
    if args.profile:
        parts.append("--profile")
    parts += ["--out", str(args.out)]
    return shlex.join(parts)


def trace_path(out) -> Path:
    """The profiler trace written beside the result file: FILE.json -> FILE.trace.json."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".json") + ".trace.json")


def run(args) -> int:
    cfg = config_from_args(args)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    command = command_line(args)

    def save(partial: dict) -> None:
        write_result({"command": command, **partial}, args.out)

    result = run_bench(cfg, say, save, trace_path=trace_path(args.out) if cfg.profile else None)
    result["command"] = command
    path = write_result(result, args.out)
    print(markdown_table(result))
    if result.get("profile"):
        print("\n" + profile_table(result["profile"]))
    print(f"\nwrote {path} ({result['stage_seconds']['total']:.0f} s)")
    return 1 if result["errors"] else 0
