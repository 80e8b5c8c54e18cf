"""What a fine-tuning run leaves behind besides checkpoints: the fine-tuned weights, the
run's results.json and the validation-DSC figure.

    fold_K/finetuned.pt/.json  plain smp.Unet state dict + what `tcsmae predict` needs
    results.json               every finished fold's scores, mean and std over folds, per case
    val_dsc.png                online validation DSC per epoch, one line per fold (Fig. 4)

The fields of results.json: docs/finetune.md, "results.json".
"""

from __future__ import annotations

import json
from pathlib import Path

import tcsmae
from tcsmae.atomic_files import save_figure, write_json_atomic
from tcsmae.checkpoint import save_checkpoint
from tcsmae.finetune.config import FinetuneConfig
from tcsmae.finetune.metrics import over_folds
from tcsmae.plain import to_plain
from tcsmae.weights import FINETUNED_FORMAT


def export_finetuned(model, path: Path, encoder: str, label_map, cfg: FinetuneConfig, meta: dict,
                     fold: int, epoch: int) -> Path:
    """finetuned.pt (plain smp.Unet state dict) + finetuned.json (what `tcsmae predict` needs)."""
    import segmentation_models_pytorch as smp
    import torch

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_checkpoint(path, state)
    info = {
        "format": FINETUNED_FORMAT, "encoder": encoder, "in_channels": 3,
        "classes": label_map.out_channels,
        "activation": "sigmoid" if label_map.binary else "softmax",
        "threshold": cfg.threshold, "class_names": label_map.class_names,
        "label_map": label_map.to_json(), "channels": ["lung", "mediastinal", "edge"],
        "input_normalisation": "windows to 0..1, nothing further (no ImageNet mean/std)",
        "input_size": cfg.size, "pipeline": to_plain(cfg.input_pipeline()),
        "load": f"smp.Unet(encoder_name={encoder!r}, encoder_weights=None, in_channels=3, "
                f"classes={label_map.out_channels})",
        "fold": fold, "epoch": epoch, "pretrained": {k: meta[k] for k in ("encoder", "git_revision", "versions")
                                                    if k in meta} or "scratch",
        "versions": {"tcsmae": tcsmae.__version__, "torch": torch.__version__, "smp": smp.__version__},
    }
    write_json_atomic(path.with_suffix(".json"), info)
    return path


def collect_results(out_dir: Path, cfg: FinetuneConfig, label_map, meta: dict) -> dict:
    """results.json from every finished fold_K/scores.json."""

    docs = []
    for k in range(cfg.folds):
        p = out_dir / f"fold_{k}" / "scores.json"
        if p.is_file():
            docs.append(json.loads(p.read_text()))
    folds = [{"fold": d["fold"], "evaluated_epoch": d["evaluated_epoch"], **d["summary"]} for d in docs]
    mean, std = over_folds([d["summary"] for d in docs])
    cases = {c: {"fold": d["fold"], **rec} for d in docs for c, rec in d["cases"].items()}
    weights = {k: v for k, v in meta.items()} if meta else {"init": "scratch"}
    return {"run": out_dir.name, "complete": len(docs) == cfg.folds, "n_folds": cfg.folds,
            "folds": folds, "mean": mean, "std": std, "cases": cases,
            "config": cfg.record(), "label_map": label_map.to_json(), "weights": weights}


def plot_val_dsc(out_dir: Path) -> Path | None:
    """DIR/val_dsc.png: online validation DSC (%) per epoch, one line per fold (Fig. 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for p in sorted(out_dir.glob("fold_*/history.json")):
        history = json.loads(p.read_text())
        curves[p.parent.name] = [(h["epoch"], h["val_dsc"]) for h in history if h["val_dsc"] is not None]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for name, pts in curves.items():
        if pts:
            ax.plot([e for e, _ in pts], [100 * v for _, v in pts], marker="o", ms=3, label=name.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)  # whole epochs only
    ax.set_ylabel("validation DSC (%)")
    ax.set_title(f"online validation DSC - {out_dir.name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out_dir / "val_dsc.png")
