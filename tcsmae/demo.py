"""`make demo`: the main job end to end on the embedded synthetic data, on a CPU.

    python -m tcsmae.demo [--out demo-run] [--device cpu|cuda] [--quick]

Each step is a `tcsmae` subcommand, so the demo exercises exactly what users run (the steps:
`run_demo`). A step whose output is already complete is not redone, so an interrupted demo
resumes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tcsmae.cli import main as tcsmae_main


def _step(title: str, argv: list[str]) -> None:
    print(f"\n=== {title}: tcsmae {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    code = tcsmae_main(argv)
    if code != 0:
        print(f"demo: step '{title}' failed with exit code {code}", file=sys.stderr)
        raise SystemExit(code)
    print(f"--- {title} done in {time.perf_counter() - t0:.0f} s", flush=True)


def run_demo(out: Path, device: str = "cpu", quick: bool = False) -> None:
    """Run the demo's steps into `out`, each one a `tcsmae` subcommand:

      1. phantom      two synthetic chest CT collections as DICOM + NIfTI labels: one to
                      pretrain on, one (other patients) to fine-tune and evaluate on
      2. convert      both into Zarr HU stores (labels aligned through the affines)
      3. info         summary of the pretraining store
      4. preview      what the model sees (Fig. 3-style grid)
      5. pretrain     TCS-MAE, `--preset demo` (mit_b0, 128x128)
      6. export       plain smp.Unet weights + weights.json
      7. recon-ssim   reconstruction SSIM with masked and unmasked inputs (Fig. 5)
      8. finetune     organ and lesion classes (phantom map) from TCS-MAE and from scratch
      9. visualize    input, masked input, reconstruction, prediction vs reference (Fig. 6)
     10. report       the comparison table (Table II-style)
    """
    out.mkdir(parents=True, exist_ok=True)
    pre_src, ft_src = out / "phantom-pretrain", out / "phantom-finetune"
    pre_store, ft_store = out / "pretrain.zarr", out / "finetune.zarr"
    n_pre, n_ft = (4, 4) if quick else (8, 6)
    ft_epochs = "2" if quick else "6"

    if not (pre_src / "manifest.csv").is_file():
        _step("phantom (pretraining set)", ["phantom", "-o", str(pre_src), "--cases", str(n_pre), "--seed", "0"])
    if not (ft_src / "manifest.csv").is_file():
        _step("phantom (fine-tuning set, other patients)",
              ["phantom", "-o", str(ft_src), "--cases", str(n_ft), "--seed", "1"])
    _step("convert (pretraining set)", ["convert", "--manifest", str(pre_src / "manifest.csv"), "-o", str(pre_store)])
    _step("convert (fine-tuning set)", ["convert", "--manifest", str(ft_src / "manifest.csv"), "-o", str(ft_store)])
    _step("info", ["info", str(pre_store)])
    _step("preview", ["preview", "--data", str(pre_store), "--n", "6", "--seed", "0", "--size", "128",
                      "--out", str(out / "preview.png")])

    run_dir = out / "pretrain"
    last = run_dir / "checkpoints" / "last.pt"
    pretrain = ["pretrain", "--data", str(pre_store), "--out", str(run_dir), "--preset", "demo",
                "--device", device] + (["--steps-per-epoch", "20"] if quick else [])
    if last.is_file():
        pretrain += ["--resume", str(last)]
    _step("pretrain (TCS-MAE, demo preset)", pretrain)
    weights = out / "weights.pt"
    _step("export", ["export", str(last), "-o", str(weights)])
    _step("recon-ssim", ["recon-ssim", "--weights", str(weights), "--data", str(ft_store), "--n", "32",
                         "--size", "128", "--device", device, "--out", str(out / "recon-ssim")])

    common = ["--data", str(ft_store), "--labels-map", "phantom", "--folds", "2",
              "--epochs", ft_epochs, "--lr", "1e-3", "--size", "128", "--batch-size", "8",
              "--device", device, "--seed", "0"]
    runs = {"scratch": "scratch", "tcs-mae": str(weights)}
    for name, init in runs.items():
        _step(f"finetune ({name})", ["finetune", "--out", str(out / f"finetune-{name}"), "--init", init,
                                     "--encoder", "mit_b0", *common])
    _step("visualize (Fig. 6: input, masked, reconstruction, prediction vs reference)",
          ["visualize", "--weights", str(weights), "--data", str(ft_store), "--n", "3", "--seed", "0",
           "--finetuned", str(out / "finetune-tcs-mae" / "fold_0" / "finetuned.pt"), "--device", device,
           "-o", str(out / "reconstructions.png")])
    _step("report", ["report", *(str(out / f"finetune-{n}") for n in runs), "--names", *runs,
                     "--by", "groups", "-o", str(out / "report.md")])
    print(f"\nDemo finished. Look at {out}/preview.png (what the model sees), "
          f"{out}/reconstructions.png, {out}/recon-ssim/, {out}/finetune-*/val_dsc.png and {out}/report.md.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tcsmae.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-run"), help="output folder (default demo-run)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="fewer cases and steps (a smoke run)")
    args = parser.parse_args(argv)
    run_demo(args.out, args.device, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
