"""`tcsmae recon-ssim`: SSIM between slices and their reconstructions (the paper's Fig. 5).

    tcsmae recon-ssim --weights weights.pt [more.pt ...] --data STORE.zarr --n 1000 [--out DIR]

`n` seeded random slices (the same for every model) are reconstructed by each pretrained model
from the masked input (its own masking from weights.json, or --masking; epoch 0's masks) and
from the unmasked one (the paper's asterisk), and compared with the original 3-channel image
(pytorch-msssim: window 11, sigma 1.5, data_range 1, mean over channels). Inputs come from
tcsmae.pipelines.reference. Writes DIR/recon_ssim.json, .npz (per-sample values) and .png.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from tcsmae.atomic_files import save_figure, write_json_atomic
from tcsmae.device import resolve_device
from tcsmae.errors import UserError
from tcsmae.pipelines.reference import prepared_pair
from tcsmae.store.reader import open_store
from tcsmae.weights import load_pretrained

HELP = "SSIM between slices and their reconstructions from masked and unmasked inputs (Fig. 5)"


def sample_slices(n_slices: int, n: int, seed: int):
    """n distinct slice ids (sorted) drawn with numpy's default_rng(seed); all when n >= n_slices."""
    import numpy as np

    if n >= n_slices:
        return np.arange(n_slices)
    return np.sort(np.random.default_rng(seed).choice(n_slices, size=n, replace=False))


def reconstruction_ssim(model, store, slice_ids, cfg, device="cpu", batch_size: int = 16) -> dict:
    """Per-sample SSIM of the reconstructions of masked and unmasked inputs.

    Returns {"masked": (n,) float, "unmasked": (n,) float} as lists.
    """
    import numpy as np
    import torch
    from pytorch_msssim import ssim
    from tqdm import tqdm

    model = model.to(device)
    masked_scores, unmasked_scores = [], []
    for start in tqdm(range(0, len(slice_ids), batch_size), desc="recon-ssim", unit="batch"):
        pairs = [prepared_pair(store, int(i), cfg) for i in slice_ids[start:start + batch_size]]
        original = torch.from_numpy(np.stack([p[0] for p in pairs])).to(device)  # (B, 3, S, S)
        masked = torch.from_numpy(np.stack([p[1] for p in pairs])).to(device)
        with torch.no_grad():
            for inputs, sink in ((masked, masked_scores), (original, unmasked_scores)):
                recon = torch.sigmoid(model(inputs).float())
                sink += ssim(recon, original, data_range=1.0, size_average=False).cpu().tolist()
    return {"masked": masked_scores, "unmasked": unmasked_scores}


def plot_ssim(results: dict[str, dict], path: Path) -> Path:
    """Line plot of per-sample SSIM, one solid (masked) and one dashed (unmasked, *) line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=120)
    for name, res in results.items():
        line, = ax.plot(res["masked"], lw=0.8, label=f"{name} (masked input)")
        ax.plot(res["unmasked"], lw=0.8, ls="--", color=line.get_color(), label=f"{name}* (unmasked input)")
    ax.set_xlabel("sample")
    ax.set_ylabel("SSIM")
    ax.set_title("reconstruction SSIM")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def add_arguments(parser) -> None:
    parser.add_argument("--weights", nargs="+", required=True, type=Path,
                        help="pretrained weights.pt from `tcsmae export` (several to compare)")
    parser.add_argument("--names", nargs="+", help="one name per weights file (default: file stems)")
    parser.add_argument("--data", required=True, type=Path, help="store to draw slices from")
    parser.add_argument("--n", type=int, default=1000, help="number of slices (default 1000, as the paper)")
    parser.add_argument("--out", type=Path, default=Path("recon-ssim"), help="output folder")
    parser.add_argument("--masking", choices=("tissue", "patch"), help="override each model's own masking")
    parser.add_argument("--size", type=int, default=0, help="input side (default: each model's training size)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the slice choice and the masks")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=16, help="slices per forward pass")


def run(args) -> int:
    import numpy as np

    names = args.names or [w.stem if w.stem != "weights" else w.parent.name for w in args.weights]
    if len(names) != len(args.weights):
        raise UserError(f"--names gives {len(names)} names for {len(args.weights)} weights; give one per file")
    if args.n < 1:
        raise UserError(f"--n {args.n}: must be >= 1")
    if args.size and (args.size < 0 or args.size % 32):
        raise UserError(f"--size {args.size}: use a positive multiple of 32 (the U-Net halves it 5 times), "
                        "or leave it out for each model's training size")
    store = open_store(args.data)
    slice_ids = sample_slices(store.n_slices, args.n, args.seed)
    device = resolve_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    results, settings = {}, {}
    for name, weights in zip(names, args.weights):
        model, meta, cfg = load_pretrained(weights)
        cfg = replace(cfg, seed=args.seed, masking=args.masking or cfg.masking,
                      size=args.size or cfg.size or int(meta.get("input_size", 256)))
        if cfg.masking == "none":
            cfg = replace(cfg, masking="tissue")  # a model pretrained without masking: show tissue masks
        results[name] = reconstruction_ssim(model, store, slice_ids, cfg, device, args.batch_size)
        settings[name] = {"weights": str(weights), "masking": cfg.masking, "size": cfg.size,
                          "rho": cfg.rho, "intervals": cfg.intervals}
        m, u = np.mean(results[name]["masked"]), np.mean(results[name]["unmasked"])
        print(f"{name}: mean SSIM {m:.4f} (masked input), {u:.4f} (unmasked input), {len(slice_ids)} slices")
    sizes = {settings[n]["size"] for n in names}
    if len(sizes) > 1:
        ran = ", ".join(f"{n} {settings[n]['size']}" for n in names)
        print(f"warning: the models ran at different sizes ({ran}); "
              "their SSIM values are not comparable: pass --size to run them all at one", file=sys.stderr)
    case_ids = [store.case_ids[int(store.slice_case[i])] for i in slice_ids]
    z = [int(store.slice_z[i]) for i in slice_ids]
    doc = {"data": str(args.data), "slice_ids": slice_ids.tolist(), "case_ids": case_ids, "z": z,
           "ssim": {"window": 11, "sigma": 1.5, "data_range": 1.0, "library": "pytorch-msssim"},
           "models": {name: {**settings[name], "masked": results[name]["masked"],
                             "unmasked": results[name]["unmasked"],
                             "mean_masked": float(np.mean(results[name]["masked"])),
                             "mean_unmasked": float(np.mean(results[name]["unmasked"]))} for name in names}}
    write_json_atomic(args.out / "recon_ssim.json", doc)
    tmp = args.out / "recon_ssim.tmp.npz"
    np.savez(tmp, slice_ids=slice_ids, **{f"{n}_masked": np.asarray(results[n]["masked"]) for n in names},
             **{f"{n}_unmasked": np.asarray(results[n]["unmasked"]) for n in names})
    tmp.replace(args.out / "recon_ssim.npz")
    plot_ssim(results, args.out / "recon_ssim.png")
    print(f"wrote {args.out / 'recon_ssim.json'}, .npz and .png")
    return 0
