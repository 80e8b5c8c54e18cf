"""Preprocessing settings: one frozen dataclass, saved with every checkpoint via `asdict`.

The defaults are the method's (docs/method.md, after the method notes' "Input image" and
"Tissue mask"). Order of operations, fixed for every path: pad to a square (when resizing)
-> [augment] -> windows -> edges -> resize (lung, mediastinal, edge, HU) -> mask from the
resized HU -> I_m = M * I_o (docs/pipelines.md, "Order of operations").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from tcsmae.errors import UserError
from tcsmae.settings import flag

MASKING_MODES = ("tissue", "patch", "none")
EDGE_SCALINGS = ("clip", "divide")
DTYPES = ("float32", "float16", "bfloat16")

# Largest Sobel magnitude of an image in [0, 1]: |Gx| <= 4 and |Gy| <= 4.
SOBEL_MAX = 4.0 * math.sqrt(2.0)


@dataclass(frozen=True)
class PipelineConfig:
    lung_window: tuple[float, float] = (-500.0, 1200.0)
    """Lung window (level, width) in HU; I = clip((HU - level + width/2) / width, 0, 1)."""

    mediastinal_window: tuple[float, float] = (30.0, 300.0)
    """Mediastinal window (level, width) in HU, same formula."""

    hu_range: tuple[float, float] = (-1000.0, 500.0)
    """Tissue-mask HU range [lo, hi]; values outside fall into the first or last interval."""

    intervals: int = field(default=8, metadata=flag("--intervals", metavar="K"))
    """K: number of equal HU intervals of the tissue mask (the paper: 8; Fig. 7 tries 4, 6, 8)."""

    rho: float = field(default=0.75, metadata=flag("--rho", metavar="R"))
    """Tissue masking ratio: floor(rho * K) distinct intervals masked per sample (the paper:
    0.75 for mediastinal, 0.35 for pneumonia targets)."""

    masking: Literal["tissue", "patch", "none"] = field(default="tissue", metadata=flag("--masking"))
    """'tissue' (TCS-MAE), 'patch' (MAE baseline, Patch+Unmask ablation) or 'none' (M = 1)."""

    patch_size: int = 16
    """Side of a square patch in output pixels (patch masking)."""

    patch_ratio: float = 0.75
    """Fraction of patches masked (patch masking): round(ratio * n_patches) patches."""

    size: int = field(default=256, metadata=flag("--size", metavar="PX"))
    """Output side in pixels (square, aspect kept by air padding); 0 keeps the stored grid."""

    edge_scaling: Literal["clip", "divide"] = "clip"
    """Fixed rule mapping the Sobel magnitude (0..5.66) to 0..1, never per image:
    'clip' = min(magnitude, edge_clip); 'divide' = magnitude / (4 * sqrt(2))."""

    edge_clip: float = 1.0
    """Clip value of the 'clip' edge scaling."""

    seed: int = 0
    """Seed of every random draw (shuffle, masks, augmentation), keyed with epoch and slice."""

    augment: bool = False
    """Random affine of the HU (rotation +-20 deg, translation 5 %, scale 0.9-1.1)."""

    rotation_deg: float = 20.0
    """Augmentation: rotation drawn uniformly in [-rotation_deg, rotation_deg] degrees."""

    translation: float = 0.05
    """Augmentation: shift drawn uniformly in [-t, t] times the side, per axis."""

    scale_range: tuple[float, float] = (0.9, 1.1)
    """Augmentation: isotropic scale drawn uniformly in this range."""

    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Dtype of `original` and `masked` handed to the model: float32, float16 or bfloat16.
    `original` is also the SSIM target (I_o): bfloat16 rounds it by up to 2e-3 (0..1 range),
    more than the late-training SSIM gains (method-notes), so keep float32 for pretraining
    (the network runs in bf16 autocast on the GPU either way)."""

    pad_hu: float = -1024.0
    """HU of the air used to pad non-square slices to a square."""

    body_fraction_min: float = 0.0
    """Skip slices whose index body fraction (share of pixels > -500 HU) is below this."""

    def __post_init__(self) -> None:
        for name in ("lung_window", "mediastinal_window"):
            level, width = getattr(self, name)
            if not width > 0:
                raise UserError(f"PipelineConfig.{name}: width {width} must be > 0 HU")
        lo, hi = self.hu_range
        if not hi > lo:
            raise UserError(f"PipelineConfig.hu_range: ({lo}, {hi}) needs hi > lo")
        if self.intervals < 1:
            raise UserError(f"PipelineConfig.intervals: {self.intervals} must be >= 1")
        if not 0.0 <= self.rho <= 1.0:
            raise UserError(f"PipelineConfig.rho: {self.rho} must lie in [0, 1]")
        if self.masking not in MASKING_MODES:
            raise UserError(
                f"PipelineConfig.masking: {self.masking!r}; choose one of {list(MASKING_MODES)}"
            )
        if self.patch_size < 1:
            raise UserError(f"PipelineConfig.patch_size: {self.patch_size} must be >= 1")
        if not 0.0 <= self.patch_ratio <= 1.0:
            raise UserError(f"PipelineConfig.patch_ratio: {self.patch_ratio} must lie in [0, 1]")
        if self.size < 0:
            raise UserError(f"PipelineConfig.size: {self.size}; use a positive side or 0")
        if self.edge_scaling not in EDGE_SCALINGS:
            raise UserError(
                f"PipelineConfig.edge_scaling: {self.edge_scaling!r}; "
                f"choose one of {list(EDGE_SCALINGS)}"
            )
        if not self.edge_clip > 0:
            raise UserError(f"PipelineConfig.edge_clip: {self.edge_clip} must be > 0")
        if self.dtype not in DTYPES:
            raise UserError(f"PipelineConfig.dtype: {self.dtype!r}; choose one of {list(DTYPES)}")
        s_lo, s_hi = self.scale_range
        if not 0 < s_lo <= s_hi:
            raise UserError(f"PipelineConfig.scale_range: {self.scale_range} needs 0 < lo <= hi")
        if not 0.0 <= self.body_fraction_min <= 1.0:
            raise UserError(
                f"PipelineConfig.body_fraction_min: {self.body_fraction_min} must lie in [0, 1]"
            )
        if self.augment and self.size == 0:
            raise UserError("PipelineConfig: augment=True needs size > 0 (a square grid)")

    @property
    def n_masked_intervals(self) -> int:
        """floor(rho * K), the number of intervals masked per sample (tissue masking)."""
        return int(math.floor(self.rho * self.intervals + 1e-9))
