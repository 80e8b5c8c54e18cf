"""Figures of a grid: per-fold DSC per arm (box plots, like the paper's Fig. 7) and the
K x rho heat map of mean DSC (Fig. 7's masking hyperparameters). matplotlib is imported
inside the functions (Agg backend), as everywhere in tcsmae."""

from __future__ import annotations

import math
from pathlib import Path

from tcsmae.atomic_files import save_figure


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def dsc_box_plot(folds: dict[str, list[float]], path: Path, title: str) -> Path:
    """One box (with the fold values as dots) per arm, DSC in %. folds: arm -> DSC per fold (0..1)."""
    plt = _pyplot()
    names = list(folds)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(names) + 2), 3.6))
    data = [[100 * v for v in folds[n]] for n in names]
    ax.boxplot([d if d else [math.nan] for d in data], showmeans=True)
    ax.set_xticks(range(1, len(names) + 1), names)
    for i, d in enumerate(data, start=1):
        ax.plot([i] * len(d), d, "o", ms=3, alpha=0.6, color="tab:blue")
    ax.set_ylabel("DSC (%)")
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def k_rho_heat_map(cells: dict[tuple[int, float], float], path: Path, title: str) -> Path:
    """Mean DSC (%) for each (K, rho) cell; rows K, columns rho; missing cells blank."""
    import numpy as np

    plt = _pyplot()
    ks = sorted({k for k, _ in cells})
    rhos = sorted({r for _, r in cells})
    grid = np.full((len(ks), len(rhos)), np.nan)
    for (k, r), v in cells.items():
        grid[ks.index(k), rhos.index(r)] = 100 * v
    fig, ax = plt.subplots(figsize=(1.2 * len(rhos) + 2.2, 0.9 * len(ks) + 1.6))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(rhos)), [f"{r:.0%}" for r in rhos])
    ax.set_yticks(range(len(ks)), [str(k) for k in ks])
    ax.set_xlabel("rho (masking ratio)")
    ax.set_ylabel("K (HU intervals)")
    finite = grid[np.isfinite(grid)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0
    for i in range(len(ks)):
        for j in range(len(rhos)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=9,
                        color="black" if grid[i, j] > middle else "white")
    fig.colorbar(image, ax=ax, label="DSC (%)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
