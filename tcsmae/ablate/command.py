"""`tcsmae ablate`: the paper's comparisons as one command.

    tcsmae ablate --data PRETRAIN.zarr --labelled LABELLED.zarr --out DIR
        [--grid table2|table4|table5|fig7|GRID.json] [--labels-map MAP] [--arms NAME ...] [--list]
        [--encoder mit_b2] [--size 256] [--pretrain-epochs 60] [--steps-per-epoch N] [--epochs 50]
        [--lr 1e-6] [--folds 5] [--seed 0] [--device auto|cpu|cuda] ...

Per arm of the grid: pretrain -> export -> fine-tune (patient-grouped folds, the same seed and
folds for every arm), then `tcsmae report` (Wilcoxon against scratch), OUT/summary.md with the
paper's figures and orderings, OUT/results.json, and the figures (DSC per fold per arm; the
K x rho heat map when the grid varies them). Run the same command again to resume.
"""

from __future__ import annotations

import json
from pathlib import Path

from tcsmae.ablate.grid import AblateConfig, load_grid, pretrain_key, train_config
from tcsmae.ablate.run import run_grid
from tcsmae.ablate.summary import write_summary
from tcsmae.settings import add_flags, apply_settings, flag_overrides

HELP = "run the paper's comparisons (Tables II, IV, V, Fig. 7): pretrain, export, fine-tune and report each arm"


def add_arguments(parser) -> None:
    """--data, --labelled, --out, --arms, --list, then one flag per AblateConfig field."""
    a = parser.add_argument
    a("--data", required=True, type=Path, metavar="STORE.zarr", help="pretraining store")
    a("--labelled", required=True, type=Path, metavar="STORE.zarr",
      help="labelled store to fine-tune and score on (other patients than --data)")
    a("--out", required=True, type=Path, metavar="DIR", help="results folder (run the same command again to resume)")
    a("--arms", nargs="+", metavar="NAME", help="run only these arms of the grid (scratch always runs)")
    a("--list", action="store_true", help="print the grid's arms and their settings, run nothing")
    add_flags(parser, AblateConfig)


def describe(grid, settings: AblateConfig, data: Path) -> str:
    """The arms, one line each: name, the paper's row, masking, K, rho, MEP levels, branches, folder."""
    lines = [f"grid {grid.name}: {len(grid.arms)} arms"]
    for arm in grid.arms:
        if not arm.pretrained:
            lines.append(f"  {arm.name:<22} {arm.label or '-'}: no pretraining")
            continue
        cfg = train_config(arm, settings)
        pipe, model = cfg.pipeline, cfg.model
        masking = {"tissue": f"tissue K {pipe.intervals} rho {pipe.rho:g}",
                   "patch": f"patch {pipe.patch_size} px ratio {pipe.patch_ratio:g}"}.get(pipe.masking, "none")
        levels = " ".join(f"F{v}" for v in model.mep_levels)
        head = f"MEP {levels} ({'pool' if model.projection == 'maxpool' else 'flatten'})" if levels else "no MEP"
        lines.append(f"  {arm.name:<22} {arm.label or '-'}: masking {masking}, {head}, branches {model.branches} "
                     f"({model.branch_forward}) -> pretrain/{pretrain_key(arm, cfg, data)}")
    return "\n".join(lines)


def run(args) -> int:
    settings = apply_settings(AblateConfig(), flag_overrides(args, AblateConfig), where="command-line flags")
    grid = load_grid(settings.grid).select(args.arms)
    print(describe(grid, settings, args.data))
    if args.list:
        return 0
    runs = run_grid(grid, settings, args.data, args.labelled, args.out)
    seconds_path = args.out / "timings.json"
    seconds = json.loads(seconds_path.read_text()) if seconds_path.is_file() else {}
    doc = write_summary(runs, grid.name, settings, args.data, args.labelled, args.out, seconds)
    print(f"wrote {args.out / 'summary.md'}, {args.out / 'report.md'}, {args.out / 'results.json'} and "
          + ", ".join(str(args.out / f) for f in doc["figures"]))
    return 0
