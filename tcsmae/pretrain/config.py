"""Pretraining configuration: frozen dataclasses, two presets, JSON files.

    TrainConfig                     everything one pretraining run depends on
      .model: ModelConfig           network and MEP heads (method-notes "Model")
      .loss: LossConfig             SSIM + NT-Xent (method-notes "Losses")
      .pipeline: PipelineConfig     windows, masks, size (pipelines/config.py, embedded as is)

`preset("paper")` is the paper's configuration (the default); `preset("demo")` is small
enough for a CPU. `load_config_file(path, base)` applies a JSON file of (nested) overrides;
`asdict(cfg)` goes into every checkpoint and `config_from_dict` reads it back. Fields
with `flag(...)` metadata are `tcsmae pretrain`'s flags, their docstrings its help.
No torch import here: the CLI reads configs before deciding to pay for torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from tcsmae.errors import UserError
from tcsmae.pipelines.config import PipelineConfig
from tcsmae.plain import to_plain
from tcsmae.settings import apply_settings, flag

PRESETS = ("paper", "demo")
MEP_LEVEL_CHOICES = ((), (5,), (4, 5), (3, 4, 5))  # Table V: Scales 0, 1, 2, 3
MEP_HEADS = ("flatten", "pool")  # --mep-head choices; 'pool' is stored as "maxpool"
PAPER_MEP_LEVELS = (4, 5)  # 'Scales 2', the paper's contrastive levels

# objective -> (pipeline.masking, model.branches, its MEP levels); the paper's names in docs/method.md
OBJECTIVE_SETTINGS = {
    "ae": ("none", "masked", ()),  # AE of Table II: plain reconstruction, no masking
    "mae": ("patch", "masked", ()),  # MAE of Table II: patch masking, masked branch only
    "patch-unmask": ("patch", "both", PAPER_MEP_LEVELS),  # 'Patch+Unmask' of Table IV
    "tcs-mae": ("tissue", "both", PAPER_MEP_LEVELS),  # 'Tissue+Unmask' of Table IV = TCS-MAE
}
OBJECTIVES = tuple(OBJECTIVE_SETTINGS)


def objective_overrides(name: str, contrastive: bool | None = None) -> dict:
    """Nested TrainConfig overrides of a named pretraining objective (for `apply_overrides`).

    name: one of OBJECTIVES. contrastive: None = the objective's own MEP levels (none for
    ae and mae, F4 F5 otherwise); True = F4 F5 ('Scales 2'); False = no contrastive term.
    objective_overrides("mae", contrastive=True) is MAE with the contrastive term (the
    original view is encoded for it, not reconstructed).
    """
    if name not in OBJECTIVE_SETTINGS:
        raise UserError(f"objective {name!r} is unknown: choose one of {list(OBJECTIVES)}")
    masking, branches, levels = OBJECTIVE_SETTINGS[name]
    if contrastive is not None:
        levels = PAPER_MEP_LEVELS if contrastive else ()
    return {"pipeline": {"masking": masking}, "model": {"branches": branches, "mep_levels": list(levels)}}


def parse_mep_levels(tokens: list[str]) -> tuple[int, ...]:
    """--mep-levels tokens: ['none'] -> (); ['F4', 'F5'] or ['4,5'] -> (4, 5)."""

    parts = [p for t in tokens for p in t.replace(",", " ").split()]
    if [p.lower() for p in parts] in (["none"], ["0"]):
        return ()
    try:
        return tuple(int(p.upper().removeprefix("F")) for p in parts)
    except ValueError:
        raise UserError(f"--mep-levels {' '.join(tokens)}: use none, F5, F4 F5 or F3 F4 F5") from None


@dataclass(frozen=True)
class ModelConfig:
    """The U-Net and its multi-level embedding projections (MEP)."""

    encoder: str = field(default="mit_b2", metadata=flag("--encoder", metavar="NAME"))
    """smp encoder name (any of segmentation_models_pytorch.encoders.get_encoder_names())."""
    encoder_weights: str | None = None
    """smp pretrained-weights tag (e.g. "imagenet"), None = random init as in the paper."""
    mep_levels: tuple[int, ...] = field(default=(4, 5), metadata=flag(
        "--mep-levels", metavar="LEVEL", nargs="+", parse=parse_mep_levels))
    """Encoder levels F1..F5 with a projection head (Table V): none = no contrastive term
    ('Scales 0'), F5 'Scales 1', F4 F5 'Scales 2' (paper default), F3 F4 F5 'Scales 3'.
    F1..F5 are the last five of smp's six encoder feature maps."""
    projection: str = field(default="flatten", metadata=flag("--mep-head", choices=MEP_HEADS))
    """MEP head of each level: 'flatten' = flatten + one Linear (Eq. 16, the paper; its size grows
    with the input: 14.7 M parameters for F4 F5 of mit_b2 at 256 px); 'pool' = global max-pool +
    one Linear (the authors' public code, the 'authors' variant). Stored as "flatten" or "maxpool"."""
    projection_dim: int = 128
    """D, the size of each projected embedding."""
    branches: Literal["both", "masked"] = field(default="both", metadata=flag("--branches"))
    """Reconstructed views: 'both' = the masked and the original view (the semi-masked dual AE
    of TCS-MAE, 'X+Unmask'); 'masked' = the masked view only (MAE, AE): the original view
    then passes the encoder only when MEP levels ask for the contrastive term."""
    branch_forward: Literal["joint", "separate"] = field(default="joint", metadata=flag("--branch-forward"))
    """'joint' = one forward of the concatenated batch [masked; original] (BatchNorm statistics
    over both views); 'separate' = one forward per view (BatchNorm statistics per view)."""

    def __post_init__(self):
        object.__setattr__(self, "mep_levels", tuple(int(v) for v in self.mep_levels))
        levels = self.mep_levels
        if any(v < 1 or v > 5 for v in levels) or list(levels) != sorted(set(levels)):
            raise UserError(
                f"model.mep_levels={list(levels)} is not valid: use increasing distinct levels "
                f"from 1..5, e.g. one of {[list(c) for c in MEP_LEVEL_CHOICES]}"
            )
        if self.projection == "pool":
            object.__setattr__(self, "projection", "maxpool")
        if self.projection not in ("flatten", "maxpool"):
            raise UserError(f"model.projection={self.projection!r} (--mep-head): use 'flatten' or 'pool'")
        if self.branches not in ("both", "masked"):
            raise UserError(f"model.branches={self.branches!r} (--branches): use 'both' or 'masked'")
        if self.branch_forward not in ("joint", "separate"):
            raise UserError(f"model.branch_forward={self.branch_forward!r} (--branch-forward): use 'joint' "
                            "or 'separate'")
        if self.projection_dim < 1:
            raise UserError(f"model.projection_dim={self.projection_dim}: must be >= 1")
        if not self.encoder:
            raise UserError("model.encoder is empty: name an smp encoder such as 'mit_b2'")


@dataclass(frozen=True)
class LossConfig:
    """L = L_ssim + weight * L_con (Eq. 18)."""

    contrastive: Literal["ntxent", "cosine"] = "ntxent"
    """'ntxent' = SimCLR NT-Xent with a learnable temperature (the paper, method-notes);
    'cosine' = cosine_scale * cosine-embedding loss (the authors' public code)."""
    weight: float = 1.0
    """lambda, the weight of the contrastive term."""
    temperature_init: float = 0.07
    """Initial NT-Xent temperature T (learnable, stored as log(1/T) like CLIP)."""
    temperature_floor: float = 0.01
    """T is clamped to >= this value."""
    learn_temperature: bool = True
    """False keeps T fixed at temperature_init."""
    ssim_window: int = 11
    """Gaussian SSIM window in pixels (odd); the authors' code used 15."""
    ssim_sigma: float = 1.5
    """Standard deviation of the SSIM window, pixels."""
    ssim_k1: float = 0.01
    """SSIM stabiliser K1 (data_range is 1.0: images are in 0..1)."""
    ssim_k2: float = 0.03
    """SSIM stabiliser K2."""
    cosine_scale: float = 1000.0
    """Factor of the authors' cosine-embedding loss (contrastive='cosine' only)."""

    def __post_init__(self):
        if self.contrastive not in ("ntxent", "cosine"):
            raise UserError(f"loss.contrastive={self.contrastive!r}: use 'ntxent' or 'cosine'")
        if self.ssim_window < 3 or self.ssim_window % 2 == 0:
            raise UserError(f"loss.ssim_window={self.ssim_window}: use an odd size >= 3 (11 or 15)")
        if not 0 < self.temperature_floor <= self.temperature_init:
            raise UserError(
                f"loss.temperature_floor={self.temperature_floor}, temperature_init="
                f"{self.temperature_init}: need 0 < floor <= init (defaults 0.01, 0.07)"
            )
        if self.weight < 0:
            raise UserError(f"loss.weight={self.weight}: lambda must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """One pretraining run. Batch size is per rank; the global batch is batch_size * world."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Network and projection heads."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss terms and their options."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """Preprocessing and masking (owned by pipelines/config.py); its `size` is the input size."""
    epochs: int = field(default=60, metadata=flag("--epochs", metavar="N"))
    """Number of epochs in all (the paper: 60); with --resume, the new total."""
    steps_per_epoch: int = field(default=0, metadata=flag("--steps-per-epoch", metavar="N"))
    """Batches per epoch per rank; 0 = one full pass over the store (for huge stores, cap it)."""
    batch_size: int = field(default=30, metadata=flag("--batch-size", metavar="N"))
    """Slices per rank per step (the paper: 30 on one GPU)."""
    lr: float = field(default=1e-4, metadata=flag("--lr", metavar="LR"))
    """Adam learning rate at the paper's batch of 30 (the paper: 1e-4); --lr-scale decides how
    it follows a larger global batch."""
    lr_scale: Literal["none", "linear", "sqrt"] = field(default="none", metadata=flag("--lr-scale"))
    """How the lr follows the global batch B = batch size x ranks: 'none' = --lr at any batch
    (the paper's setting), 'linear' = lr x B/30, 'sqrt' = lr x sqrt(B/30); 30 is the paper's
    batch (one GPU)."""
    lr_gamma: float = 0.96
    """ExponentialLR factor applied once per epoch."""
    seed: int = field(default=0, metadata=flag("--seed", metavar="N"))
    """Seed of the model init; setting it (flag or config file) also sets `pipeline.seed`,
    the seed of the masks and the sample order, unless that is given too."""
    device: str = field(default="auto", metadata=flag("--device", choices=("auto", "cpu", "cuda")))
    """'auto' (cuda if available), 'cpu' or 'cuda' ('cuda:N' in a config file)."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = field(default="auto", metadata=flag("--precision"))
    """'auto' (bf16 autocast on GPU, fp32 on CPU), 'bf16', 'fp16' (with a grad scaler) or 'fp32'.
    Losses are always computed in fp32."""
    channels_last: bool = True
    """Use channels_last memory format for the network (faster convolutions on GPU)."""
    compile: bool = field(default=False, metadata=flag("--compile"))
    """torch.compile the whole step (forward, fp32 losses, backward; CUDA graphs on one GPU).
    `tcsmae pretrain` turns it on for CUDA unless --no-compile or a config file says otherwise;
    the first step compiles (minutes; kernels cached in $TORCHINDUCTOR_CACHE_DIR, default
    ~/.cache/tcsmae/inductor). `tcsmae bench --compile` measures the gain; on a 2-core CPU
    compiling took ~3 min for a step no faster than the eager one."""
    checkpoint_every: int = field(default=1000, metadata=flag("--checkpoint-every", metavar="N"))
    """Write checkpoints/last.pt every N global steps (0 = only at epoch ends)."""
    log_every: int = field(default=1, metadata=flag("--log-every", metavar="N"))
    """Write a metrics.jsonl line every N steps (and one for each skipped step). The losses
    are read back from the GPU only then, at checkpoints and at epoch ends: N > 1 leaves the
    steps between without a host sync."""
    image_every: int = 500
    """Write TensorBoard reconstruction images every N steps (0 = never)."""
    max_nonfinite: int = 10
    """Abort after this many consecutive steps with a non-finite loss (each is skipped)."""
    workers: int = field(default=2, metadata=flag("--workers", metavar="N"))
    """Data-loading worker threads/processes per rank (0 = in-process)."""

    def __post_init__(self):
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "log_every": self.log_every,
                    "max_nonfinite": self.max_nonfinite}
        for name, value in positive.items():
            if value < 1:
                raise UserError(f"{name}={value}: must be >= 1")
        for name in ("steps_per_epoch", "checkpoint_every", "image_every", "workers"):
            if getattr(self, name) < 0:
                raise UserError(f"{name}={getattr(self, name)}: must be >= 0")
        if self.lr <= 0 or not 0 < self.lr_gamma <= 1:
            raise UserError(f"lr={self.lr}, lr_gamma={self.lr_gamma}: need lr > 0 and 0 < gamma <= 1")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UserError(f"device={self.device!r}: use auto, cpu or cuda")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise UserError(f"precision={self.precision!r}: use auto, bf16, fp16 or fp32")
        if self.lr_scale not in ("none", "linear", "sqrt"):
            raise UserError(f"lr_scale={self.lr_scale!r}: use none, linear or sqrt")
        if self.input_size < 32 or self.input_size % 32:
            raise UserError(
                f"pipeline size={self.input_size}: pretraining needs a fixed square size that is a "
                "multiple of 32 (the U-Net downsamples 5 times), e.g. 256 (paper) or 128 (demo)"
            )

    @property
    def input_size(self) -> int:
        """Training image side in pixels (the pipeline's output size)."""
        return int(self.pipeline.size)

    REFERENCE_BATCH = 30  # the paper's global batch, to which `lr` belongs

    def effective_lr(self, world_size: int) -> float:
        """The Adam lr used for a global batch of batch_size x world_size (see lr_scale)."""
        ratio = self.batch_size * world_size / self.REFERENCE_BATCH
        return self.lr * {"none": 1.0, "linear": ratio, "sqrt": ratio ** 0.5}[self.lr_scale]


def preset(name: str) -> TrainConfig:
    """The named preset: 'paper' (mit_b2, 256x256, batch 30, Adam 1e-4, gamma 0.96, 60 epochs)
    or 'demo' (mit_b0, 128x128, batch 8, 3 x up to 100 steps at lr 3e-3: a few minutes on a
    CPU, enough for reconstructions that show the phantom's anatomy; the paper's 1e-4 learns
    too little in so few steps)."""
    if name == "paper":
        return TrainConfig(pipeline=replace(PipelineConfig(), size=256))
    if name == "demo":
        return TrainConfig(
            model=ModelConfig(encoder="mit_b0"),
            pipeline=replace(PipelineConfig(), size=128),
            epochs=3, steps_per_epoch=100, batch_size=8, lr=3e-3, checkpoint_every=100, image_every=50,
        )
    raise UserError(f"preset {name!r} is unknown: choose one of {list(PRESETS)}")


def apply_overrides(cfg: TrainConfig, overrides: dict, where: str = "overrides") -> TrainConfig:
    """cfg with nested overrides such as {"model": {"encoder": "mit_b0"}, "epochs": 3}.

    A top-level "seed" also sets the pipeline's seed (masks, sample order, augmentation)
    unless the overrides give "pipeline": {"seed": ...} themselves, so one seed changes a
    whole run, from a flag or from a config file alike.
    """
    pipe = overrides.get("pipeline", {})
    if "seed" in overrides and isinstance(pipe, dict) and "seed" not in pipe:
        overrides = {**overrides, "pipeline": {**pipe, "seed": overrides["seed"]}}
    return apply_settings(cfg, overrides, where)


def load_config_file(path: str | Path, base: TrainConfig) -> TrainConfig:
    """`base` updated by the JSON object in `path` (nested like asdict(TrainConfig))."""
    path = Path(path)
    try:
        overrides = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist: pass an existing JSON file") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"config file {path} is not valid JSON ({exc}): fix the file") from None
    if not isinstance(overrides, dict):
        raise UserError(f"config file {path}: top level must be a JSON object like {{\"epochs\": 3}}")
    return apply_overrides(base, overrides, where=f"config file {path}")


def config_from_dict(d: dict) -> TrainConfig:
    """Inverse of to_plain(asdict(cfg)) (e.g. from a checkpoint)."""
    return apply_overrides(TrainConfig(), d, where="stored config")


__all__ = [
    "ModelConfig", "LossConfig", "TrainConfig", "PipelineConfig", "preset", "to_plain",
    "apply_overrides", "load_config_file", "config_from_dict", "parse_mep_levels", "PRESETS",
    "OBJECTIVES", "objective_overrides",
]
