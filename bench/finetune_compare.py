"""Benchmark (not a test): phantom pretraining -> fine-tuning comparison, written to docs/.

    .venv/bin/python bench/finetune_compare.py [--out runs/finetune-compare] [--device cpu|cuda]
        [--pretrain-cases 12] [--finetune-cases 10] [--pretrain-epochs 4] [--steps-per-epoch 150]
        [--finetune-epochs 20] [--folds 5] [--size 128] [--encoder mit_b0] [--doc docs/finetune-comparison.md]

Three runs per task, like the rows of the paper's Tables II/III:
  scratch   the U-Net from random weights (the paper's baseline)
  mae       pretrained with 16x16 patch masking, ratio 0.75 (the MAE-style baseline)
  tcs-mae   pretrained with tissue masking (K = 8, rho = 0.75) and the MEP contrastive term
Two tasks on a phantom collection of other patients than the pretraining one:
  lesion    binary, ground-glass lesions (`phantom-lesion`, the pneumonia stand-in, Table II)
  organs    multiclass phantom organs and lesions (`phantom`), reported per group (Table III)

Every step is a `tcsmae` subcommand, so the numbers come from exactly what users run; a
finished step is not redone (re-run to resume). The tables (mean +- std over folds, Wilcoxon
signed-rank over cases against scratch) and the settings go to the Markdown document.
Phantom data is easy and small: expect small differences; this measures the machinery,
not the paper's claim.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from tcsmae.cli import main as tcsmae


def step(title: str, argv: list[str]) -> float:
    print(f"\n=== {title}: tcsmae {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    code = tcsmae(argv)
    if code != 0:
        raise SystemExit(f"step '{title}' failed with exit code {code}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/finetune-compare"))
    p.add_argument("--doc", type=Path, default=Path("docs/finetune-comparison.md"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--pretrain-cases", type=int, default=12)
    p.add_argument("--finetune-cases", type=int, default=10)
    p.add_argument("--pretrain-epochs", type=int, default=4)
    p.add_argument("--steps-per-epoch", type=int, default=150)
    p.add_argument("--finetune-epochs", type=int, default=20)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--encoder", default="mit_b0")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning lr (the paper's 1e-6 learns nothing this short)")
    a = p.parse_args(argv)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    timings = out / "timings.json"  # wall time of steps that ran, kept across resumed runs
    seconds: dict[str, float] = json.loads(timings.read_text()) if timings.is_file() else {}

    def timed(key: str, title: str, argv: list[str]) -> None:
        seconds[key] = step(title, argv)
        timings.write_text(json.dumps(seconds, indent=1))

    pre_src, ft_src = out / "phantom-pretrain", out / "phantom-finetune"
    pre_store, ft_store = out / "pretrain.zarr", out / "finetune.zarr"
    if not (pre_src / "manifest.csv").is_file():
        step("phantom (pretraining)", ["phantom", "-o", str(pre_src), "--cases", str(a.pretrain_cases), "--seed", "10"])
    if not (ft_src / "manifest.csv").is_file():
        step("phantom (fine-tuning)", ["phantom", "-o", str(ft_src), "--cases", str(a.finetune_cases), "--seed", "11"])
    if not (pre_store / "slice_index.npz").is_file():
        step("convert", ["convert", "--manifest", str(pre_src / "manifest.csv"), "-o", str(pre_store)])
    if not (ft_store / "slice_index.npz").is_file():
        step("convert", ["convert", "--manifest", str(ft_src / "manifest.csv"), "-o", str(ft_store)])

    inits = {"scratch": "scratch"}
    for name, masking in (("mae", "patch"), ("tcs-mae", "tissue")):
        run_dir = out / f"pretrain-{name}"
        weights = out / f"weights-{name}.pt"
        if not weights.is_file():
            argv = ["pretrain", "--data", str(pre_store), "--out", str(run_dir), "--preset", "demo",
                    "--encoder", a.encoder, "--size", str(a.size), "--masking", masking,
                    "--epochs", str(a.pretrain_epochs), "--steps-per-epoch", str(a.steps_per_epoch),
                    "--device", a.device, "--seed", "0"]
            if name == "mae":
                argv += ["--mep-levels", "none"]  # MAE: reconstruction only
            last = run_dir / "checkpoints" / "last.pt"
            if last.is_file():
                argv += ["--resume", str(last)]
            timed(f"pretrain {name}", f"pretrain ({name})", argv)
            step(f"export ({name})", ["export", str(last), "-o", str(weights)])
        inits[name] = str(weights)

    tables = []
    for task, label_map, by in (("lesion", "phantom-lesion", "classes"), ("organs", "phantom", "groups")):
        dirs = []
        for name, init in inits.items():
            run_dir = out / f"finetune-{task}-{name}"
            dirs.append(str(run_dir))
            done = run_dir / "results.json"
            if done.is_file() and json.loads(done.read_text()).get("complete"):
                continue
            timed(f"finetune {task} {name}", f"finetune ({task}, {name})", [
                "finetune", "--data", str(ft_store), "--out", str(run_dir), "--init", init,
                "--encoder", a.encoder, "--labels-map", label_map, "--folds", str(a.folds),
                "--epochs", str(a.finetune_epochs), "--lr", str(a.lr), "--size", str(a.size),
                "--batch-size", "8", "--device", a.device, "--seed", "0"])
        md = out / f"report-{task}.md"
        step(f"report ({task})", ["report", *dirs, "--names", *inits, "--by", by, "-o", str(md)])
        tables.append((task, label_map, md.read_text()))

    lines = ["# Fine-tuning comparison on phantom data (benchmark, not a test)", "",
             f"Written by `bench/finetune_compare.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{platform.processor() or platform.machine()}, device {a.device}.", "",
             "Settings: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k not in ("out", "doc")),
             "", "Pretraining: `--preset demo` with the encoder and size above; `mae` = patch masking "
             "(16x16, ratio 0.75) without the contrastive term, `tcs-mae` = tissue masking "
             "(K 8, rho 0.75) with MEP levels F4 F5. Fine-tuning: CE + Dice, Adam, evaluation on the "
             "last epoch, DSC and HD95 (mm) per case on the stored grid, mean ± std over folds.", "",
             "Read with care: phantom data are easy and few, and short CPU runs are far from converged "
             "(small lesions in particular). The tables show that the whole chain works and what its "
             "numbers look like; a p-value over a handful of cases is no evidence either way. Wall times "
             "depend on the machine's load at the time.", ""]
    for task, label_map, text in tables:
        lines += [f"## {task} (`--labels-map {label_map}`)", "", text.strip(), ""]
    lines += ["## Wall time per step (s)", "", "| step | s |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in seconds.items()]
    a.doc.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.doc.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(a.doc)
    print(f"\nwrote {a.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
