"""What `tcsmae ablate` runs: its settings (`AblateConfig`, whose fields are its flags), the
arms of a grid (`Arm`), the paper's named grids (Tables II, IV, V, Fig. 7) and JSON grids.

An arm is one pretraining objective (or 'scratch'), fine-tuned on the labelled store with the
same seed, hence the same folds, as every other arm. `train_config` is an arm's full
pretraining config; `pretrain_key` and `finetune_key` name its folders by a digest of all its
result depends on, so a finished arm is found again and a changed setting is a new arm.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tcsmae.errors import UserError
from tcsmae.plain import to_plain
from tcsmae.pretrain.config import (
    OBJECTIVES,
    TrainConfig,
    apply_overrides,
    load_config_file,
    objective_overrides,
    preset,
)
from tcsmae.settings import flag, invalid

SCRATCH = "scratch"
GRIDS = ("table2", "table4", "table5", "fig7")
FIG7_K = (4, 6, 8)
FIG7_RHO = (0.15, 0.35, 0.55, 0.75)
# TrainConfig fields that change how a run is executed, not what it computes
RUNTIME_FIELDS = ("device", "workers", "compile", "checkpoint_every", "log_every", "image_every",
                  "max_nonfinite", "channels_last")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass(frozen=True)
class AblateConfig:
    """Settings shared by every arm of a grid. Fields with `flag(...)` metadata are `tcsmae
    ablate`'s flags, their docstrings its help; the defaults are the paper's (a GPU job)."""

    grid: str = field(default="table2", metadata=flag("--grid", metavar="NAME|FILE.json"))
    """The arms: table2 (scratch, AE, MAE, MAE + contrastive, TCS-MAE), table4 (Patch+Unmask,
    Tissue+Unmask), table5 (MEP Scales 0-3), fig7 (K 4/6/8 x rho 15/35/55/75 %), or a JSON file
    {"name": ..., "arms": [{"name", "objective", "contrastive", "overrides", "label"}]}."""
    labels_map: str | None = field(default=None, metadata=flag("--labels-map", metavar="MAP"))
    """Label map of the fine-tuning task (JSON, or chest11, phantom, phantom-lesion); None =
    binary, every non-zero label id is foreground."""
    encoder: str = field(default="mit_b2", metadata=flag("--encoder", metavar="NAME"))
    """smp encoder of every arm (the paper: mit_b2)."""
    size: int = field(default=256, metadata=flag("--size", metavar="PX"))
    """Image side in pixels, pretraining and fine-tuning (the paper: 256)."""
    pretrain_epochs: int = field(default=60, metadata=flag("--pretrain-epochs", metavar="N"))
    """Pretraining epochs of each arm (the paper: 60)."""
    steps_per_epoch: int = field(default=0, metadata=flag("--steps-per-epoch", metavar="N"))
    """Pretraining batches per epoch; 0 = one full pass over the pretraining store."""
    pretrain_batch_size: int = field(default=30, metadata=flag("--pretrain-batch-size", metavar="N"))
    """Pretraining slices per step (the paper: 30)."""
    pretrain_lr: float = field(default=1e-4, metadata=flag("--pretrain-lr", metavar="LR"))
    """Pretraining Adam learning rate (the paper: 1e-4)."""
    pretrain_config: str | None = field(default=None, metadata=flag("--pretrain-config", metavar="FILE"))
    """JSON file of pretraining overrides for every arm (nested like a run's config.json), applied
    before each arm's objective and overrides, e.g. {"model": {"projection": "pool"}}."""
    epochs: int = field(default=50, metadata=flag("--epochs", metavar="N"))
    """Fine-tuning epochs per fold (the paper: 50)."""
    lr: float = field(default=1e-6, metadata=flag("--lr", metavar="LR"))
    """Fine-tuning Adam learning rate (the paper: 1e-6, which learns nothing in a short run: use
    ~1e-3 for quick runs)."""
    batch_size: int = field(default=16, metadata=flag("--batch-size", metavar="N"))
    """Fine-tuning slices per step."""
    folds: int = field(default=5, metadata=flag("--folds", metavar="K"))
    """Patient-grouped folds (the paper: 5); the same folds for every arm."""
    seed: int = field(default=0, metadata=flag("--seed", metavar="N"))
    """One seed for every arm: model init, masks and sample order of pretraining, folds, head
    init and sample order of fine-tuning."""
    device: str = field(default="auto", metadata=flag("--device", choices=("auto", "cpu", "cuda")))
    """'auto' (cuda if available), 'cpu' or 'cuda'."""
    workers: int = field(default=2, metadata=flag("--workers", metavar="N"))
    """Data-loading workers of every step (0 = in-process)."""
    by: Literal["groups", "classes"] = field(default="groups", metadata=flag("--by"))
    """Report columns: the label map's groups (classes when it has none) or its classes; an arm's
    DSC in the summary is the mean over these columns."""
    allow_overlap: bool = field(default=False, metadata=flag("--allow-overlap"))
    """Fine-tune even when labelled cases were in the pretraining store (leakage guard off)."""

    def __post_init__(self):
        cls = type(self)
        for name in ("pretrain_epochs", "pretrain_batch_size", "epochs", "batch_size", "folds"):
            if getattr(self, name) < 1:
                raise invalid(cls, name, getattr(self, name), "must be >= 1")
        for name in ("steps_per_epoch", "workers"):
            if getattr(self, name) < 0:
                raise invalid(cls, name, getattr(self, name), "must be >= 0")
        if self.size < 32 or self.size % 32:
            raise invalid(cls, "size", self.size, "use a multiple of 32 (the U-Net downsamples 5 times), e.g. 256")
        for name in ("lr", "pretrain_lr"):
            if not getattr(self, name) > 0:
                raise invalid(cls, name, getattr(self, name), "must be > 0")
        if self.by not in ("groups", "classes"):
            raise invalid(cls, "by", self.by, "use groups or classes")


@dataclass(frozen=True)
class Arm:
    """One row of a grid: a pretraining objective (or scratch) and its overrides."""

    name: str
    """Row and folder name (letters, digits, . _ + -)."""
    objective: str
    """'scratch' (no pretraining) or one of tcsmae.pretrain.config.OBJECTIVES."""
    contrastive: bool | None = None
    """None = the objective's own MEP levels; True = F4 F5; False = no contrastive term."""
    overrides: dict = field(default_factory=dict)
    """Nested pretraining-config overrides after the objective's, e.g. {"pipeline": {"rho": 0.35}}."""
    label: str = ""
    """The paper's name of the row."""
    paper: tuple[float, float] | None = None
    """The paper's DSC % of the row (pneumonia, mediastinal tumour), None when it has none."""

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise UserError(f"arm name {self.name!r}: use letters, digits and . _ + - (it names folders)")
        if self.objective != SCRATCH and self.objective not in OBJECTIVES:
            raise UserError(f"arm {self.name}: objective {self.objective!r} is unknown; choose "
                            f"{SCRATCH} or one of {list(OBJECTIVES)}")
        if self.contrastive not in (None, True, False):
            raise UserError(f"arm {self.name}: contrastive {self.contrastive!r} must be true, false or null")
        if not isinstance(self.overrides, dict):
            raise UserError(f"arm {self.name}: overrides must be a JSON object of config settings")
        if self.objective == SCRATCH and (self.overrides or self.contrastive is not None):
            raise UserError(f"arm {self.name}: a scratch arm is not pretrained; drop its overrides/contrastive")

    @property
    def pretrained(self) -> bool:
        return self.objective != SCRATCH


@dataclass(frozen=True)
class Grid:
    """A named list of arms; the first is the scratch baseline of every paired test."""

    name: str
    arms: tuple[Arm, ...]

    def __post_init__(self):
        names = [a.name for a in self.arms]
        doubles = sorted({n for n in names if names.count(n) > 1})
        if doubles:
            raise UserError(f"grid {self.name}: arm names {doubles} occur more than once; give each arm its own name")
        scratch = [a for a in self.arms if not a.pretrained]
        if len(scratch) > 1:
            raise UserError(f"grid {self.name}: more than one scratch arm ({[a.name for a in scratch]})")
        if not scratch:  # the baseline of the Wilcoxon tests is always there
            scratch = [Arm(SCRATCH, SCRATCH, label="Baseline (scratch)", paper=PAPER_BASELINE)]
        rest = tuple(a for a in self.arms if a.pretrained)
        if not rest:
            raise UserError(f"grid {self.name}: no pretrained arm; add one with an objective of {list(OBJECTIVES)}")
        object.__setattr__(self, "arms", (scratch[0], *rest))

    def select(self, names: list[str] | None) -> Grid:
        """The grid reduced to `names` (the scratch baseline stays); UserError for unknown names."""
        if not names:
            return self
        known = [a.name for a in self.arms]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UserError(f"--arms {' '.join(unknown)}: not in grid {self.name}; its arms: {known}")
        return Grid(self.name, tuple(a for a in self.arms if a.name in names or not a.pretrained))


# The paper's DSC % (pneumonia, mediastinal tumour), Tables II, IV and V
PAPER_BASELINE = (66.23, 62.42)
TCS_MAE = Arm("tcs-mae", "tcs-mae", label="TCS-MAE† (Tissue+Unmask, Scales 2, K 8, rho 75 %)",
              paper=(71.04, 72.78))


def named_grid(name: str) -> Grid:
    """One of GRIDS, with the paper's figures attached to its rows."""
    scratch = Arm(SCRATCH, SCRATCH, label="Baseline (scratch)", paper=PAPER_BASELINE)
    if name == "table2":
        return Grid(name, (
            scratch,
            Arm("ae", "ae", label="AE", paper=(68.78, 65.19)),
            Arm("mae", "mae", label="MAE", paper=(70.25, 68.10)),
            Arm("mae-con", "mae", contrastive=True, label="MAE + contrastive (stands in for CMAE†)",
                paper=(70.87, 68.88)),
            TCS_MAE,
        ))
    if name == "table4":
        return Grid(name, (
            scratch,
            Arm("patch-unmask", "patch-unmask", label="Patch+Unmask", paper=(71.05, 71.37)),
            TCS_MAE,
        ))
    if name == "table5":
        return Grid(name, (
            scratch,
            Arm("scales-0", "tcs-mae", contrastive=False, label="Scales 0 (no contrastive term)",
                paper=(71.72, 72.29)),
            Arm("scales-1", "tcs-mae", overrides={"model": {"mep_levels": [5]}}, label="Scales 1 (F5)",
                paper=(71.68, 72.46)),
            TCS_MAE,
            Arm("scales-3", "tcs-mae", overrides={"model": {"mep_levels": [3, 4, 5]}},
                label="Scales 3 (F3 F4 F5)", paper=(68.21, 72.43)),
        ))
    if name == "fig7":
        arms = [scratch]
        for k in FIG7_K:
            for rho in FIG7_RHO:
                if (k, rho) == (8, 0.75):
                    arms.append(TCS_MAE)
                    continue
                arms.append(Arm(f"tcs-mae-K{k}-rho{rho:g}", "tcs-mae",
                                overrides={"pipeline": {"intervals": k, "rho": rho}},
                                label=f"K {k}, rho {rho:.0%}"))
        return Grid(name, tuple(arms))
    raise UserError(f"grid {name!r} is unknown: choose one of {list(GRIDS)} or a JSON file")


def load_grid(spec: str) -> Grid:
    """A named grid, or a JSON file {"name": ..., "arms": [{"name", "objective", ...}, ...]}."""
    if spec in GRIDS:
        return named_grid(spec)
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"--grid {spec}: neither one of {list(GRIDS)} nor an existing JSON file")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"--grid {path}: not valid JSON ({exc}); fix the file") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("arms"), list):
        raise UserError(f"--grid {path}: needs a JSON object with a list \"arms\", e.g. "
                        '{"arms": [{"name": "tcs-mae", "objective": "tcs-mae"}]}')
    arms = []
    for i, entry in enumerate(doc["arms"]):
        if not isinstance(entry, dict):
            raise UserError(f"--grid {path}: arm {i} is not a JSON object")
        unknown = sorted(set(entry) - {"name", "objective", "contrastive", "overrides", "label", "paper"})
        if unknown or "name" not in entry or "objective" not in entry:
            raise UserError(f"--grid {path}: arm {i} needs \"name\" and \"objective\" and may have "
                            f"\"contrastive\", \"overrides\", \"label\", \"paper\" (unknown keys: {unknown})")
        paper = entry.get("paper")
        arms.append(Arm(entry["name"], entry["objective"], entry.get("contrastive"), entry.get("overrides") or {},
                        entry.get("label", ""), tuple(paper) if paper else None))
    return Grid(str(doc.get("name") or path.stem), tuple(arms))


def train_config(arm: Arm, settings: AblateConfig) -> TrainConfig:
    """The arm's pretraining config: the paper's preset, the ablation's size settings, the
    --pretrain-config file, the arm's objective, then the arm's overrides."""
    assert arm.pretrained, arm
    cfg = apply_overrides(preset("paper"), {
        "model": {"encoder": settings.encoder}, "pipeline": {"size": settings.size},
        "epochs": settings.pretrain_epochs, "steps_per_epoch": settings.steps_per_epoch,
        "batch_size": settings.pretrain_batch_size, "lr": settings.pretrain_lr, "seed": settings.seed,
        "device": settings.device, "workers": settings.workers,
        "image_every": 0,  # no TensorBoard pictures: the ablation compares fine-tuning
    }, where="ablate settings")
    if settings.pretrain_config:
        cfg = load_config_file(settings.pretrain_config, cfg)
    cfg = apply_overrides(cfg, objective_overrides(arm.objective, arm.contrastive), where=f"arm {arm.name}")
    return apply_overrides(cfg, arm.overrides, where=f"arm {arm.name} overrides")


def _digest(doc) -> str:
    return hashlib.sha256(json.dumps(to_plain(doc), sort_keys=True).encode()).hexdigest()[:10]


def pretrain_key(arm: Arm, cfg: TrainConfig, data: str | Path) -> str:
    """Folder name of the arm's pretraining: name + digest of the config (less RUNTIME_FIELDS)
    and the pretraining store's path."""
    plain = {k: v for k, v in to_plain(cfg).items() if k not in RUNTIME_FIELDS}
    return f"{arm.name}-{_digest({'config': plain, 'data': str(Path(data).resolve())})}"


def _label_map_id(labels_map: str | None) -> str | None:
    """A shipped map's name as is, a file by its resolved path."""
    if labels_map and Path(labels_map).is_file():
        return str(Path(labels_map).resolve())
    return labels_map


def finetune_key(arm: Arm, pretrained: str | None, settings: AblateConfig, labelled: str | Path) -> str:
    """Folder name of the arm's fine-tuning: name + digest of its starting point (the
    pretraining key or scratch with the encoder), the labelled store and the fine-tuning settings."""
    doc = {"init": pretrained or f"scratch:{settings.encoder}", "labelled": str(Path(labelled).resolve()),
           "labels_map": _label_map_id(settings.labels_map), "size": settings.size,
           **{k: getattr(settings, k) for k in ("epochs", "lr", "batch_size", "folds", "seed", "allow_overlap")}}
    return f"{arm.name}-{_digest(doc)}"
