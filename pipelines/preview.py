"""`tcsmae preview`: look at what the model sees.

    tcsmae preview --data STORE.zarr --n 8 --seed 0 [--size 256] [--device cpu|cuda]
                   [--out grid.png] [--npz batch.npz]

Draws the first batch of epoch 0 (shuffled by the seed) through the same pipeline as
training, as a grid like the paper's Fig. 3: one row per sample, columns lung window,
mediastinal window, edge channel, mask (white = kept), masked image (lung channel).
--npz saves the batch's arrays (`save_npz`); with --size 0 they are not resized.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tcsmae.atomic_files import save_figure
from tcsmae.device import resolve_device
from tcsmae.errors import UserError
from tcsmae.pipelines.config import PipelineConfig
from tcsmae.pipelines.kernels import split_packed
from tcsmae.pipelines.loader import build_pipeline
from tcsmae.pipelines.source import SliceSource

HELP = "draw what the model sees (Fig. 3-style grid: windows, edges, mask, masked) and save the batch"

COLUMNS = ("lung", "mediastinal", "edge", "mask", "masked")


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="store (.zarr) written by `tcsmae convert`")
    parser.add_argument("--n", type=int, default=8, help="number of slices (rows); default 8")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle and masks; default 0")
    parser.add_argument("--size", type=int, default=256, help="output side; 0 = stored grid; default 256")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default cpu")
    parser.add_argument("--masking", choices=["tissue", "patch", "none"], default="tissue",
                        help="default tissue (TCS-MAE); patch = the MAE baseline")
    parser.add_argument("--rho", type=float, default=0.75, help="tissue masking ratio; default 0.75")
    parser.add_argument("--out", default="preview.png", help="grid image (PNG); default preview.png")
    parser.add_argument("--npz", default=None, help="also save the batch as NPZ: hu (N,H,W) HU, original and masked (N,3,H,W), mask (N,H,W), case_index, z")


def preview_batch(store_path, cfg, n: int, device: str = "cpu") -> dict:
    """First batch of epoch 0 as NumPy: dict of per-sample lists (shapes may differ at size 0).

    Keys: hu (H, W), original (3, H, W), masked (3, H, W), mask (H, W), case_index, z,
    case_id (the store's case id, str).
    """

    source = SliceSource(store_path, cfg, batch_size=n, stacked=False)  # grids may differ
    device_id = 0 if device == "cuda" else None
    pipe = build_pipeline(source, cfg, n, device_id, num_threads=2, py_workers=0)
    pipe.build()
    outputs = pipe.run()

    def arrays(tl):
        tl = tl.as_cpu() if hasattr(tl, "as_cpu") else tl
        return [np.array(tl[i]) for i in range(len(tl))]

    packed, case, z = (arrays(o) for o in outputs[:3])
    parts = [split_packed(p[None]) for p in packed]
    return {"original": [p["original"][0] for p in parts],
            "masked": [p["masked"][0] for p in parts],
            "mask": [p["mask"][0, 0] for p in parts], "hu": [p["hu"][0, 0] for p in parts],
            "case_index": [int(c[0]) for c in case], "z": [int(v[0]) for v in z],
            "case_id": [source.store.case_ids[int(c[0])] for c in case]}


def draw_grid(batch: dict, path: Path, title: str) -> None:
    """Fig. 3-style PNG: rows = samples, columns = COLUMNS (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(batch["original"])
    fig, axes = plt.subplots(n, len(COLUMNS), figsize=(2.0 * len(COLUMNS), 2.0 * n),
                             squeeze=False)
    for i in range(n):
        images = (batch["original"][i][0], batch["original"][i][1], batch["original"][i][2],
                  batch["mask"][i], batch["masked"][i][0])
        for j, image in enumerate(images):
            ax = axes[i, j]
            ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(COLUMNS[j], fontsize=9)
        axes[i, 0].set_ylabel(f"{batch['case_id'][i]}\nz {batch['z'][i]}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)


def save_npz(batch: dict, path: Path) -> None:
    """NPZ of the batch; UserError if the samples' grids differ.

    Arrays: `hu` (N, H, W) float32 HU on the output grid, `original` and `masked`
    (N, 3, H, W) float32 0..1, `mask` (N, H, W) float32 0|1, `case_index` and `z` (N,) int64.
    With --size 0 nothing is resized, so the equations can be checked exactly on these arrays.
    """
    shapes = {h.shape for h in batch["hu"]}
    if len(shapes) > 1:
        raise UserError(f"--npz {path}: the slices have different grids {sorted(shapes)} "
                        "with --size 0; use a positive --size to save them together")
    arrays = {
        "hu": np.stack(batch["hu"]).astype(np.float32),
        "original": np.stack(batch["original"]).astype(np.float32),
        "masked": np.stack(batch["masked"]).astype(np.float32),
        "mask": np.stack(batch["mask"]).astype(np.float32),
        "case_index": np.array(batch["case_index"], dtype=np.int64),
        "z": np.array(batch["z"], dtype=np.int64),
    }
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def run(args) -> int:
    if args.n < 1:
        raise UserError(f"--n {args.n}: give at least 1 slice")
    if args.device == "cuda":
        resolve_device("cuda")  # UserError without a GPU
    cfg = PipelineConfig(size=args.size, seed=args.seed, masking=args.masking, rho=args.rho)
    batch = preview_batch(args.data, cfg, args.n, args.device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = (f"{Path(args.data).name}: seed {cfg.seed}, {cfg.masking} masking"
             + (f" rho {cfg.rho}" if cfg.masking == "tissue" else "")
             + f", size {cfg.size or 'stored'}, {args.device}")
    draw_grid(batch, out, title)
    print(f"wrote {out}")
    if args.npz:
        npz = Path(args.npz)
        npz.parent.mkdir(parents=True, exist_ok=True)
        save_npz(batch, npz)
        print(f"wrote {npz}")
    return 0
