"""`tcsmae visualize`: Fig. 6-style panels for chosen slices.

    tcsmae visualize --weights weights.pt --data STORE.zarr [--finetuned DIR/fold_0/finetuned.pt]
        [--slices CASE:Z ... | --n 3] [--masking tissue|patch] [--seed 0] -o fig.png

One row per slice: the input (mediastinal window), the masked input, its reconstruction by
the pretrained model, and with --finetuned the prediction (red) against the reference
outline (green) over the input. Without --slices, `--n` random slices that hold labels
(or any slices of an unlabelled store).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from tcsmae.atomic_files import save_figure
from tcsmae.device import resolve_device
from tcsmae.errors import UserError
from tcsmae.finetune.inference import classes_from_logits, model_input
from tcsmae.finetune.labelmap import label_map_from_record
from tcsmae.pipelines.reference import prepared_pair
from tcsmae.pipelines.resize import pad_to_square, resize_nearest
from tcsmae.store.reader import open_store
from tcsmae.weights import load_finetuned, load_pretrained, recorded_pipeline

HELP = "draw Fig. 6-style panels: input, masked, reconstruction, prediction vs reference"


def parse_slices(tokens: list[str], store) -> list[int]:
    """'CASE:Z' tokens -> store slice ids (UserError naming the bad token)."""
    import numpy as np

    ids = []
    for token in tokens:
        case, _, z = token.rpartition(":")
        if not case or not z.isdigit():
            raise UserError(f"--slices {token!r}: write CASE:Z, e.g. {store.case_ids[0]}:10")
        if case not in store.case_ids:
            raise UserError(f"--slices {token!r}: no case {case!r}; cases: {store.case_ids[:10]}")
        c = store.case_ids.index(case)
        hit = np.flatnonzero((store.slice_case == c) & (store.slice_z == int(z)))
        if hit.size == 0:
            raise UserError(f"--slices {token!r}: case {case} has no slice {z}")
        ids.append(int(hit[0]))
    return ids


def _labelled_slices(store):
    import numpy as np

    labelled = [i for i, c in enumerate(store.case_ids) if store.has_labels(c)]
    return np.flatnonzero(np.isin(store.slice_case, labelled)) if labelled else np.arange(store.n_slices)


def draw_panels(rows: list[dict], path: Path, titles: list[str]) -> Path:
    """rows: dicts of 2-D arrays per panel (`input`, `masked`, `recon`, optional `overlay` =
    (image, reference, prediction)); writes a PNG grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(titles)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.6 * cols, 2.6 * len(rows)), dpi=110, squeeze=False)
    for r, row in enumerate(rows):
        for c, key in enumerate(["input", "masked", "recon", "overlay"][:cols]):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if key == "overlay":
                image, ref, pred = row["overlay"]
                ax.imshow(image, cmap="gray", vmin=0, vmax=1)
                if ref.any():
                    ax.contour(ref > 0, levels=[0.5], colors="lime", linewidths=0.8)
                if pred.any():
                    ax.contour(pred > 0, levels=[0.5], colors="red", linewidths=0.8)
            else:
                ax.imshow(row[key], cmap="gray", vmin=0, vmax=1)
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
        axes[r, 0].set_ylabel(row["name"], fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def add_arguments(parser) -> None:
    parser.add_argument("--weights", required=True, type=Path, help="pretrained weights.pt from `tcsmae export`")
    parser.add_argument("--data", required=True, type=Path, help="store holding the slices")
    parser.add_argument("--finetuned", type=Path, help="finetuned.pt from `tcsmae finetune` (adds prediction panels)")
    parser.add_argument("--slices", nargs="+", metavar="CASE:Z", help="slices to draw (default: --n random ones)")
    parser.add_argument("--n", type=int, default=3, help="random slices when --slices is not given (default 3)")
    parser.add_argument("--masking", choices=("tissue", "patch"), help="override the model's own masking")
    parser.add_argument("--seed", type=int, default=0, help="seed of the slice choice and the masks")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("-o", "--out", type=Path, default=Path("panels.png"), help="output PNG")


def run(args) -> int:
    import numpy as np
    import torch

    store = open_store(args.data)
    device = resolve_device(args.device)
    model, meta, cfg = load_pretrained(args.weights)
    cfg = replace(cfg, seed=args.seed, masking=args.masking or cfg.masking,
                  size=cfg.size or int(meta.get("input_size", 256)))
    if cfg.masking == "none":
        cfg = replace(cfg, masking="tissue")
    if args.slices:
        ids = parse_slices(args.slices, store)
    else:
        pool = _labelled_slices(store)
        ids = np.sort(np.random.default_rng(args.seed).choice(pool, size=min(args.n, len(pool)), replace=False))
    seg = seg_meta = seg_cfg = None
    if args.finetuned is not None:
        seg, seg_meta = load_finetuned(args.finetuned)
        seg = seg.to(device)
        seg_cfg = recorded_pipeline(seg_meta, base=cfg)  # the fine-tuning preprocessing
    model = model.to(device)
    rows = []
    for slice_id in ids:
        case, z = int(store.slice_case[slice_id]), int(store.slice_z[slice_id])
        original, masked = prepared_pair(store, int(slice_id), cfg)
        with torch.no_grad():
            recon = torch.sigmoid(model(torch.from_numpy(masked[None]).to(device)).float())[0].cpu().numpy()
        row = {"name": f"{store.case_ids[case]}:{z}", "input": original[1], "masked": masked[1], "recon": recon[1]}
        if seg is not None:
            x = torch.from_numpy(model_input(store.read_slice(case, z), seg_cfg)[None]).to(device)
            with torch.no_grad():
                pred = classes_from_logits(seg(x), seg_meta.get("threshold", 0.5))[0].cpu().numpy()
            image = x[0, 1].cpu().numpy()
            ref = np.zeros_like(pred)
            if store.has_labels(store.case_ids[case]):
                lm = label_map_from_record(seg_meta["label_map"], str(args.finetuned))
                ref = resize_nearest(pad_to_square(lm.to_classes(store.read_label_slice(case, z)), 0), seg_cfg.size)
            row["overlay"] = (image, ref, pred)
        rows.append(row)
    titles = ["input (mediastinal window)", "masked", "reconstruction"] + (["prediction (red) vs reference (green)"] if seg is not None else [])
    if len(rows) == 0:
        raise UserError(f"{args.data}: no slice to draw")
    draw_panels(rows, args.out, titles)
    print(f"wrote {args.out} ({len(rows)} slice(s))")
    return 0
