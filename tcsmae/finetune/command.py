"""`tcsmae finetune`: downstream segmentation from pretrained (or scratch) weights, K-fold CV.

    tcsmae finetune --data STORE.zarr --out DIR --init weights.pt|scratch [--encoder NAME]
        [--labels-map MAP.json|chest11|phantom] [--folds 5 [--fold K]] [--epochs 50]
        [--lr 1e-6] [--device auto|cpu|cuda] [--allow-overlap] [--evaluate last|best] ...

This module is the command and the run over the patient-grouped folds; fold.py trains one.
Model, loss, the output folder, results.json's fields and what its nulls mean:
docs/finetune.md.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from tcsmae.atomic_files import write_json_atomic
from tcsmae.device import resolve_device
from tcsmae.errors import UserError
from tcsmae.finetune.config import FinetuneConfig, resolve_encoder
from tcsmae.finetune.fold import run_fold
from tcsmae.finetune.folds import check_leakage, make_folds, write_folds
from tcsmae.finetune.labelmap import check_against_ids, load_label_map
from tcsmae.finetune.model import build_model
from tcsmae.finetune.outputs import collect_results, export_finetuned, plot_val_dsc
from tcsmae.finetune.report import Run, format_report
from tcsmae.settings import add_flags, apply_settings, flag_overrides
from tcsmae.store.reader import open_store
from tcsmae.weights import pipeline_from_metadata, weights_metadata

# the names tests and callers use from here; run_fold, collect_results and plot_val_dsc are
# looked up in this module by `finetune`, so a test can replace them here
__all__ = ["HELP", "FinetuneConfig", "build_model", "export_finetuned", "finetune", "run_fold",
           "collect_results", "plot_val_dsc", "add_arguments", "run"]

HELP = "fine-tune a U-Net from pretrained weights (or scratch) with patient-grouped K-fold CV, DSC and HD95"


def start_summary(cfg: FinetuneConfig, encoder: str, device, folds: list, chosen, slices: dict[str, int]) -> str:
    """What the run will do, printed once at the start: settings, then each chosen fold's data.

    folds: tcsmae.finetune.folds Fold entries (train, val case ids); slices: case id -> slice count.
    """
    start = "scratch (random weights)" if cfg.init == "scratch" else cfg.init
    which = "all" if cfg.fold is None else f"only fold {cfg.fold}"
    lines = [f"fine-tuning {encoder} from {start} on {device}: {cfg.folds} fold(s) ({which}), "
             f"{cfg.epochs} epochs, lr {cfg.lr:g}, batch {cfg.batch_size}, size {cfg.size}, "
             f"{sum(len(f.val) for f in folds)} labelled cases"]
    for k in chosen:
        train = sum(slices[c] for c in folds[k].train)
        val = sum(slices[c] for c in folds[k].val)
        lines.append(f"  fold {k}: train {len(folds[k].train)} case(s) ({train} slices, "
                     f"{train // cfg.batch_size} batches per epoch), validation {len(folds[k].val)} case(s) "
                     f"({val} slices)")
    return "\n".join(lines)


def finetune(data: str | Path, out: str | Path, cfg: FinetuneConfig) -> dict:
    """Run the configured folds and write results.json; returns its content."""

    out_dir = Path(out)
    store = open_store(data)
    label_map = load_label_map(cfg.label_map)
    meta = weights_metadata(cfg.init)
    encoder = resolve_encoder(cfg, meta)
    if meta:
        cfg = replace(cfg, pipeline=pipeline_from_metadata(meta, cfg.size))
    labelled = [c for c in store.case_ids if store.has_labels(c)]
    unlabelled = [c for c in store.case_ids if c not in labelled]
    if not labelled:
        raise UserError(f"{data}: no case has labels; convert with --labels (or a manifest labels column)")
    if unlabelled:
        warnings.warn(f"{len(unlabelled)} case(s) without labels are left out: {unlabelled[:5]}", stacklevel=2)
    present = {i for c in labelled for i in store.label_ids(c)}  # recorded at conversion
    for msg in check_against_ids(label_map, present, str(data)):
        warnings.warn(msg, stacklevel=2)
    attrs = {c: store.case_attrs(c) for c in labelled}
    for msg in check_leakage(attrs, meta.get("pretraining_cases"), cfg.allow_overlap):
        warnings.warn(msg + " (allowed by --allow-overlap)", stacklevel=2)
    out_dir.mkdir(parents=True, exist_ok=True)
    folds, messages = make_folds(labelled, [attrs[c].get("patient_id", "") for c in labelled], cfg.folds, cfg.seed)
    write_folds(out_dir, folds, cfg.folds, cfg.seed, messages)
    chosen = range(cfg.folds) if cfg.fold is None else [cfg.fold]
    per_case = np.bincount(store.slice_case, minlength=len(store.case_ids))
    slices = {c: int(per_case[i]) for i, c in enumerate(store.case_ids)}
    print(start_summary(cfg, encoder, resolve_device(cfg.device), folds, chosen, slices))
    for k in chosen:
        run_fold(store, data, cfg, k, folds[k].train, folds[k].val, label_map, encoder, meta, out_dir)
        results = collect_results(out_dir, cfg, label_map, meta)
        write_json_atomic(out_dir / "results.json", results)
    plot_val_dsc(out_dir)
    return results


def add_arguments(parser) -> None:
    """--data and --out, then one flag per FinetuneConfig field with a flag."""
    parser.add_argument("--data", required=True, type=Path, help="labelled store (STORE.zarr)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (re-run to resume)")
    add_flags(parser, FinetuneConfig)


def run(args) -> int:
    cfg = apply_settings(FinetuneConfig(), flag_overrides(args, FinetuneConfig), where="command-line flags")
    results = finetune(args.data, args.out, cfg)

    print(format_report([Run(name=Path(args.out).name, path=Path(args.out) / "results.json", results=results)]),
          end="")
    print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'val_dsc.png'}")
    return 0
