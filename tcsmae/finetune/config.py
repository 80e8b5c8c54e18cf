"""What a fine-tuning run is configured with, and the U-Net it starts from.

`FinetuneConfig` holds one run's settings (`asdict` goes into checkpoints and results.json).
The starting weights are an exported weights.pt with weights.json beside it (`tcsmae
export`), or 'scratch': weights.json names the encoder and the pretraining preprocessing,
which fine-tuning reuses so its inputs match pretraining. `build_model` is the smp U-Net
(encoder and decoder from those weights) with the 3-channel reconstruction head replaced by
a freshly initialised smp head: 1 channel (sigmoid) for one class, C + 1 channels (softmax,
channel 0 = background) for C classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tcsmae.errors import UserError
from tcsmae.pipelines.config import PipelineConfig

EVALUATE = ("last", "best")


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run; `asdict` goes into checkpoints and results.json."""

    init: str = "scratch"
    """Path of exported pretrained weights (weights.pt with weights.json beside it) or 'scratch'."""
    encoder: str = ""
    """smp encoder; '' = the one in weights.json (required with --init scratch: default mit_b2)."""
    label_map: str | None = None
    """--labels-map: JSON path or shipped name; None = binary, every non-zero id is foreground."""
    folds: int = 5
    """K of the patient-grouped K-fold CV (the paper: 5); 1 = train and validate on all cases."""
    fold: int | None = None
    """Run only this fold (0-based); None = all folds in turn."""
    epochs: int = 50
    """Epochs per fold (the paper: 50)."""
    lr: float = 1e-6
    """Adam learning rate (the paper: 1e-6; learns little in a short run, use ~1e-3 for checks)."""
    batch_size: int = 16
    """Slices per step (the paper does not state its fine-tuning batch)."""
    size: int = 256
    """Training side in pixels (the paper: 256); a multiple of 32."""
    seed: int = 0
    """Seed of folds, head init and sample order."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu' or 'cuda'."""
    allow_overlap: bool = False
    """Fine-tune even when cases were in the pretraining data (leakage guard off)."""
    evaluate: str = "last"
    """Checkpoint that scores a fold: 'last' (unbiased) or 'best' (highest online validation
    DSC, chosen on the same cases it is scored on, so optimistic)."""
    threshold: float = 0.5
    """Sigmoid threshold of the 1-channel (binary) head."""
    ce_weight: float = 1.0
    """Weight of the cross-entropy term."""
    dice_weight: float = 1.0
    """Weight of the Dice term."""
    workers: int = 1
    """Loader reader processes (0 = read slices in the main process)."""
    precision: str = "auto"
    """Network autocast in training: 'auto' = bf16 on the GPU, fp32 on the CPU; 'bf16' or 'fp32'.
    The losses and the validation are fp32."""
    pipeline: PipelineConfig = field(default_factory=lambda: PipelineConfig(masking="none"))
    """Preprocessing (windows, edges, size); masking is always off. Taken from weights.json
    when the weights record it, so inputs match pretraining."""

    def __post_init__(self):
        if self.folds < 1:
            raise UserError(f"--folds {self.folds}: must be >= 1")
        if self.fold is not None and not 0 <= self.fold < self.folds:
            raise UserError(f"--fold {self.fold}: must lie in 0..{self.folds - 1} for --folds {self.folds}")
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError(f"--epochs {self.epochs}, --batch-size {self.batch_size}: both must be >= 1")
        if not self.lr > 0:
            raise UserError(f"--lr {self.lr}: must be > 0")
        if self.size < 32 or self.size % 32:
            raise UserError(f"--size {self.size}: use a multiple of 32 (the U-Net downsamples 5 times), e.g. 256")
        if self.evaluate not in EVALUATE:
            raise UserError(f"--evaluate {self.evaluate!r}: choose one of {list(EVALUATE)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UserError(f"--device {self.device!r}: use auto, cpu or cuda")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise UserError(f"precision {self.precision!r}: use auto, bf16 or fp32")
        if not 0 < self.threshold < 1:
            raise UserError(f"threshold {self.threshold}: must lie in (0, 1)")
        p = self.pipeline
        if (p.masking, p.size, p.augment, p.seed, p.body_fraction_min) != ("none", self.size, False, self.seed, 0.0):
            # every slice, unmasked, at the fine-tuning size, shuffled by the fine-tuning seed
            object.__setattr__(self, "pipeline", replace(p, masking="none", size=self.size, augment=False,
                                                         seed=self.seed, body_fraction_min=0.0))


def jsonable(value):
    """Tuples -> lists recursively, so a config survives JSON and weights_only loads."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def pipeline_from_metadata(meta: dict, size: int) -> PipelineConfig:
    """The pretraining preprocessing (weights.json `config.pipeline`), masking off, at `size`."""
    known = {f for f in PipelineConfig.__dataclass_fields__}
    stored = meta.get("pipeline") or (meta.get("config") or {}).get("pipeline") or {}
    recorded = {k: (tuple(v) if isinstance(v, list) else v) for k, v in stored.items() if k in known}
    recorded.update(masking="none", size=size, augment=False)
    return PipelineConfig(**recorded)


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
