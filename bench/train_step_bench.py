"""Training-step throughput: pairs/s, peak memory and MFU on synthetic in-memory batches.

    .venv/bin/python bench/train_step_bench.py [--device cpu|cuda] [--encoders mit_b0 mit_b2]
        [--size 256] [--batch-size 30 ...] [--seconds 20] [--compile] [--json OUT.json]

A pair = one slice through both branches (masked + original): one training sample.
Calls tcsmae.bench.probe.measure_train_step: full steps (forward of both branches, fp32
losses, backward, Adam), bf16 autocast on CUDA, fp32 on the CPU. Its FLOPs (3x the forward
counted by torch.utils.flop_counter), peak memory and MFU come from the probe functions
that `tcsmae bench`'s train_step stage also uses.
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import replace


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--encoders", nargs="+", default=["mit_b0", "mit_b2"])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch-size", type=int, nargs="+", default=[30])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--profile", action="store_true", help="print the top kernels of 3 steps")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()

    import torch

    from tcsmae.bench.probe import measure_train_step
    from tcsmae.pretrain.config import ModelConfig, preset

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for encoder in args.encoders:
        for batch in args.batch_size:
            cfg = preset("paper")
            cfg = replace(cfg, model=ModelConfig(encoder=encoder), compile=args.compile,
                          channels_last=not args.no_channels_last,
                          pipeline=replace(cfg.pipeline, size=args.size))
            r = measure_train_step(cfg, args.device, batch, seconds=args.seconds, profile=args.profile)
            r["compile"], r["channels_last"] = args.compile, not args.no_channels_last
            rows.append(r)
            mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            print(f"{encoder:8s} {args.size}x{args.size} batch {batch:4d} on {r['device']} ({r['precision']}): "
                  f"{r['pairs_per_s']:8.1f} pairs/s, peak {r['peak_mem_gb']:.2f} GB, "
                  f"{r['flops_per_pair'] / 1e9:.1f} GFLOP/pair, MFU {mfu}", flush=True)
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
