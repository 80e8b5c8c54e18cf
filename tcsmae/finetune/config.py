"""What a fine-tuning run is configured with, and the weights it starts from.

`FinetuneConfig` holds one run's settings (`record()` goes into checkpoints and results.json).
The starting weights are an exported weights.pt with weights.json beside it (`tcsmae
export`), or 'scratch': weights.json names the encoder and the pretraining preprocessing,
which fine-tuning reuses so its inputs match pretraining (`resolve_encoder`,
`input_pipeline`). The U-Net built from them: tcsmae.finetune.model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, get_args

from tcsmae.errors import UserError
from tcsmae.pipelines.config import PipelineConfig
from tcsmae.plain import to_plain
from tcsmae.settings import NO_FLAGS, flag, invalid

Evaluate = Literal["last", "best"]
EVALUATE = get_args(Evaluate)


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run; `record()` goes into checkpoints, scores.json and results.json.
    Fields with `flag(...)` metadata are `tcsmae finetune`'s flags, their docstrings its help."""

    init: str = field(default="scratch", metadata=flag("--init", required=True))
    """Exported pretrained weights (weights.pt from `tcsmae export`, weights.json beside it)
    or 'scratch'."""
    encoder: str = field(default="", metadata=flag("--encoder"))
    """smp encoder; '' = the one in weights.json (mit_b2 with --init scratch)."""
    label_map: str | None = field(default=None, metadata=flag("--labels-map"))
    """Label map JSON, or a shipped one: chest11, phantom, phantom-lesion; None = binary,
    every non-zero label id is foreground."""
    folds: int = field(default=5, metadata=flag("--folds"))
    """K of the patient-grouped K-fold CV (the paper: 5); 1 = train and validate on all cases."""
    fold: int | None = field(default=None, metadata=flag("--fold"))
    """Run only this fold (0-based); None = all folds in turn."""
    epochs: int = field(default=50, metadata=flag("--epochs"))
    """Epochs per fold (the paper: 50)."""
    lr: float = field(default=1e-6, metadata=flag("--lr"))
    """Adam learning rate (the paper: 1e-6; learns little in a short run, use ~1e-3 for checks)."""
    batch_size: int = field(default=16, metadata=flag("--batch-size"))
    """Slices per step (the paper does not state its fine-tuning batch)."""
    size: int = field(default=256, metadata=flag("--size"))
    """Training side in pixels (the paper: 256); a multiple of 32."""
    seed: int = field(default=0, metadata=flag("--seed"))
    """Seed of folds, head init and sample order."""
    device: str = field(default="auto", metadata=flag("--device"))
    """'auto' (cuda if available), 'cpu' or 'cuda'."""
    allow_overlap: bool = field(default=False, metadata=flag("--allow-overlap"))
    """Fine-tune even when cases were in the pretraining data (leakage guard off)."""
    evaluate: Evaluate = field(default="last", metadata=flag("--evaluate"))
    """Checkpoint that scores a fold: 'last' (unbiased) or 'best' (highest online validation
    DSC, chosen on the same cases it is scored on, so optimistic)."""
    threshold: float = 0.5
    """Sigmoid threshold of the 1-channel (binary) head."""
    ce_weight: float = 1.0
    """Weight of the cross-entropy term."""
    dice_weight: float = 1.0
    """Weight of the Dice term."""
    workers: int = field(default=1, metadata=flag("--workers"))
    """Loader reader processes (0 = read slices in the main process)."""
    precision: Literal["auto", "bf16", "fp32"] = field(default="auto", metadata=flag("--precision"))
    """Network autocast in training: 'auto' = bf16 on the GPU, fp32 on the CPU; 'bf16' or 'fp32'.
    The losses and the validation are fp32."""
    pipeline: PipelineConfig = field(default_factory=lambda: PipelineConfig(masking="none"), metadata=NO_FLAGS)
    """The pretraining's preprocessing (windows, edges, HU range), taken from weights.json when
    the weights record it, so inputs match pretraining; the inputs are `input_pipeline()`."""

    def __post_init__(self):
        cls = type(self)
        if self.folds < 1:
            raise invalid(cls, "folds", self.folds, "must be >= 1")
        if self.fold is not None and not 0 <= self.fold < self.folds:
            raise invalid(cls, "fold", self.fold, f"must lie in 0..{self.folds - 1} for --folds {self.folds}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise invalid(cls, name, getattr(self, name), "must be >= 1")
        if not self.lr > 0:
            raise invalid(cls, "lr", self.lr, "must be > 0")
        if self.size < 32 or self.size % 32:
            raise invalid(cls, "size", self.size, "use a multiple of 32 (the U-Net downsamples 5 times), e.g. 256")
        if self.evaluate not in EVALUATE:
            raise invalid(cls, "evaluate", self.evaluate, f"choose one of {list(EVALUATE)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise invalid(cls, "device", self.device, "use auto, cpu or cuda")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise invalid(cls, "precision", self.precision, "use auto, bf16 or fp32")
        if not 0 < self.threshold < 1:
            raise invalid(cls, "threshold", self.threshold, "must lie in (0, 1)")

    def input_pipeline(self) -> PipelineConfig:
        """The preprocessing of the fine-tuning inputs: `pipeline` on every slice, unmasked and
        unaugmented, at `size`, shuffled by `seed`."""
        return replace(self.pipeline, masking="none", size=self.size, augment=False, seed=self.seed,
                       body_fraction_min=0.0)

    def record(self) -> dict:
        """The settings as checkpoints, scores.json and results.json hold them (and fold resumes
        compare them): plain values, `pipeline` being `input_pipeline()`."""
        return to_plain(replace(self, pipeline=self.input_pipeline()))


def resolve_encoder(cfg: FinetuneConfig, meta: dict) -> str:
    """The encoder name: from weights.json, checked against --encoder."""
    if not meta:
        return cfg.encoder or "mit_b2"
    stored = meta.get("encoder")
    if not stored:
        raise UserError(f"--init {cfg.init}: weights.json has no 'encoder' entry; re-run `tcsmae export`")
    if cfg.encoder and cfg.encoder != stored:
        raise UserError(f"--encoder {cfg.encoder} but --init {cfg.init} holds a {stored} encoder; "
                        f"drop --encoder or pass --encoder {stored}")
    return stored
