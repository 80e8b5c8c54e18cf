"""`tcsmae finetune`: downstream segmentation from pretrained (or scratch) weights, K-fold CV.

    tcsmae finetune --data STORE.zarr --out DIR --init weights.pt|scratch [--encoder NAME]
        [--labels-map MAP.json|chest11|phantom] [--folds 5 [--fold K]] [--epochs 50]
        [--lr 1e-6] [--batch-size 16] [--size 256] [--device auto|cpu|cuda]
        [--allow-overlap] [--seed 0] [--evaluate last|best]

Model: the exported smp U-Net (encoder and decoder) with the 3-channel reconstruction head
replaced by a freshly initialised smp head: 1 channel (sigmoid) for one class, C + 1
channels (softmax, channel 0 = background) for C classes. Loss: cross-entropy (BCE for one
class) + Dice (smp.losses), equal weights. Adam; defaults lr 1e-6 and 50 epochs are the
paper's (IV.B), far too slow for a quick check: pass e.g. --lr 1e-3 there.

Data: the pipelines' loader with masking off (labels resized nearest-neighbour), restricted
to the fold's training cases. Validation segments whole volumes (tcsmae.inference): the
predictions go back to the stored grid and are stacked into volumes; DSC per epoch
(mean over the classes present, then over cases) goes to history and `DIR/val_dsc.png`
(like the paper's Fig. 4). After the last epoch the fold is scored with DSC and HD95 in
mm per class and per group (tcsmae.metrics) using the `--evaluate` checkpoint.

Output folder:

    DIR/folds.json                 the patient-grouped split (tcsmae.folds)
    DIR/fold_K/last.pt, best.pt    checkpoints (resume: run the same command again)
    DIR/fold_K/scores.json         per-case scores, the fold summary, the DSC history
    DIR/fold_K/history.json        per epoch: training loss, online validation DSC (per case too)
    DIR/fold_K/finetuned.pt/.json  the fine-tuned smp.Unet state dict + what `predict` needs
    DIR/results.json               folds, mean, std, cases, config, label map, weights' metadata
    DIR/val_dsc.png                online validation DSC per epoch (Fig. 4)

results.json:

    folds      [{"fold": k, "evaluated_epoch": e,
                 "classes": {name: {"dsc", "hd95_mm", "n_undefined": {"dsc", "hd95_mm"}, "n_cases"}},
                 "groups": {...same...}}]      a fold's figure = mean over its validation cases
    mean, std  same shape, over folds (population std); n_undefined and n_cases are totals
    cases      {case_id: {"fold": k, "classes": {name: {"dsc", "hd95_mm"}}, "groups": ...}}
               (per-case values: the pairs of `tcsmae report`'s Wilcoxon test)
    config     asdict(FinetuneConfig); label_map; weights (weights.json, or {"init": "scratch"})
    complete   all folds done; n_folds; run (folder name)

Undefined values are null (never NaN): DSC when the reference is empty (the structure is
absent from the case), HD95 when the prediction or the reference is empty (tcsmae.metrics);
means are over the defined values and n_undefined counts the rest.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tcsmae.atomic_files import save_figure
from tcsmae.errors import UserError
from tcsmae.pipelines.config import PipelineConfig

HELP = "fine-tune a U-Net from pretrained weights (or scratch) with patient-grouped K-fold CV, DSC and HD95"

FORMAT = "tcsmae-finetune"
MAX_NONFINITE = 10  # consecutive non-finite losses before a fold aborts
VERSION = 1
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


# ---------------------------------------------------------------------------------------
# Pretrained weights


def weights_metadata(init: str) -> dict:
    """weights.json beside an exported weights.pt ({} for scratch)."""
    if init == "scratch":
        return {}
    path = Path(init)
    if not path.is_file():
        raise UserError(f"--init {init}: no such file; give weights.pt from `tcsmae export` or 'scratch'")
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise UserError(f"--init {init}: {meta_path} is missing; `tcsmae export` writes it beside "
                        "the weights (it names the encoder and the preprocessing)")
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{meta_path}: not valid JSON ({exc}); re-run `tcsmae export`") from None


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


def build_model(encoder: str, out_channels: int, init: str):
    """smp.Unet with encoder and decoder from `init` (or random) and a fresh head of out_channels.

    The head is smp's own initialisation of a new `Unet(classes=out_channels)`; every other
    tensor of the exported state dict must load (strict apart from the head).
    """
    import segmentation_models_pytorch as smp
    import torch

    names = smp.encoders.get_encoder_names()
    if encoder not in names:
        raise UserError(f"encoder {encoder!r} is not an smp encoder; supported encoders: {names}")
    model = smp.Unet(encoder_name=encoder, encoder_weights=None, in_channels=3, classes=out_channels)
    if init == "scratch":
        return model
    try:
        state = torch.load(init, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"--init {init}: cannot be read as a state dict ({type(exc).__name__}: {exc}); "
                        "give weights.pt from `tcsmae export`") from None
    if not isinstance(state, dict):
        raise UserError(f"--init {init}: not a plain state dict; give weights.pt from `tcsmae export`")
    body = {k: v for k, v in state.items() if not k.startswith("segmentation_head.")}
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in body.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise UserError(f"--init {init} does not fit smp.Unet({encoder!r}): {len(wrong)} tensors differ in "
                        f"shape, e.g. {wrong[0]}; was it exported with another encoder?")
    missing, unexpected = model.load_state_dict(body, strict=False)
    missing = [k for k in missing if not k.startswith("segmentation_head.")]
    if missing or unexpected:
        raise UserError(f"--init {init} does not fit smp.Unet({encoder!r}): missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}; was it exported with another encoder?")
    return model


# ---------------------------------------------------------------------------------------
# Losses and batches


def make_loss(binary: bool, ce_weight: float, dice_weight: float):
    """(logits (N, C, H, W), target (N, H, W) int64 class index) -> scalar loss, fp32."""
    import torch
    from segmentation_models_pytorch.losses import DiceLoss, SoftBCEWithLogitsLoss

    if binary:
        ce = SoftBCEWithLogitsLoss()
        dice = DiceLoss("binary", from_logits=True)

        def loss(logits, target):
            t = target[:, None].float()  # (N, 1, H, W)
            return ce_weight * ce(logits.float(), t) + dice_weight * dice(logits.float(), t)
    else:
        ce = torch.nn.CrossEntropyLoss()
        dice = DiceLoss("multiclass", from_logits=True)

        def loss(logits, target):
            return ce_weight * ce(logits.float(), target) + dice_weight * dice(logits.float(), target)
    return loss


class TrainingBatches:
    """The pipelines' loader over a fold's training cases, masking off, labels mapped to classes.

    `batches(epoch)` yields dicts with `original` (N, 3, S, S) float32 and `target`
    (N, S, S) int64 class indices on `device`.
    """

    def __init__(self, store_path, cfg: FinetuneConfig, case_ids: list[str], label_map, device):
        self.store_path = Path(store_path)
        self.cfg = cfg
        self.case_ids = list(case_ids)
        self.label_map = label_map
        self.device = device
        self._loader = None

    def _make_loader(self, epoch: int):
        from tcsmae.pipelines.loader import make_loader

        kind = "cuda" if self.device.type == "cuda" else "cpu"
        device_id = (self.device.index or 0) if kind == "cuda" else None
        return make_loader(self.store_path, self.cfg.pipeline, self.cfg.batch_size, kind,
                           rank=0, world_size=1, epoch=epoch, step=0, with_labels=True,
                           num_threads=2, py_workers=self.cfg.workers, device_id=device_id,
                           case_ids=self.case_ids)

    def __call__(self, epoch: int):
        import torch

        if self._loader is None:
            self._loader = self._make_loader(epoch)
        self._loader.set_epoch(epoch)
        table = None
        for batch in self._loader:
            label = batch["label"]
            top = int(label.max())
            if table is None or top >= table.numel():
                table = torch.from_numpy(self.label_map.lookup(top)).to(label.device)
            yield {"original": batch["original"].float(), "target": table[label]}


# ---------------------------------------------------------------------------------------
# One fold


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return torch.device(name)


def _case_dsc(pred, ref, n_classes: int) -> float | None:
    """Mean DSC over the classes present in the reference (online validation figure)."""
    from tcsmae.metrics import dice

    values = [d for c in range(1, n_classes + 1) if (d := dice(pred == c, ref == c)) is not None]
    return sum(values) / len(values) if values else None


class Validator:
    """Segments a fold's validation volumes; caches inputs and references up to a memory budget."""

    def __init__(self, store, case_ids, cfg: FinetuneConfig, label_map, device, cache_bytes=1 << 30):
        if len(label_map.classes) > 254:
            raise UserError(f"label map {label_map.source}: {len(label_map.classes)} classes; at most 254 are supported")
        self.store, self.case_ids, self.cfg = store, list(case_ids), cfg
        self.label_map, self.device = label_map, device
        self.cache_bytes = cache_bytes
        self._refs: dict = {}
        self._inputs: dict = {}
        self._cached_bytes = 0

    def reference(self, case_id):
        """(Z, Y, X) uint8 class map of the stored labels (cached while under the budget)."""
        if case_id in self._refs:
            return self._refs[case_id]
        ref = self.label_map.to_classes(self.store.label(case_id)[:]).astype(np.uint8)
        if self._cached_bytes + ref.nbytes <= self.cache_bytes:
            self._refs[case_id] = ref
            self._cached_bytes += ref.nbytes
        return ref

    def inputs(self, case_id):
        """(Z, 3, S, S) float32 model inputs of a case, cached while under the memory budget."""
        from tcsmae.inference import volume_input

        if case_id in self._inputs:
            return self._inputs[case_id]
        images = volume_input(self.store.image(case_id), self.cfg.pipeline)
        if self._cached_bytes + images.nbytes <= self.cache_bytes:
            self._inputs[case_id] = images
            self._cached_bytes += images.nbytes
        return images

    def predict(self, model, case_id):
        """(Z, Y, X) uint8 predicted class map on the stored grid."""
        from tcsmae.inference import segment_inputs

        model.eval()
        shape = tuple(self.store.image(case_id).shape[1:])
        return segment_inputs(model, self.inputs(case_id), shape, self.device,
                              batch_size=self.cfg.batch_size, threshold=self.cfg.threshold)

    def online_dsc(self, model) -> tuple[float | None, dict[str, float | None]]:
        """Mean over cases of the mean DSC over present classes, and the per-case values."""
        per_case = {c: _case_dsc(self.predict(model, c), self.reference(c), len(self.label_map.classes))
                    for c in self.case_ids}
        defined = [v for v in per_case.values() if v is not None]
        return (sum(defined) / len(defined) if defined else None), per_case

    def scores(self, model) -> dict:
        """case id -> case_record of DSC and HD95 per class and group (tcsmae.metrics)."""
        from tqdm import tqdm

        from tcsmae.metrics import case_record, score_label_maps

        out = {}
        for case_id in tqdm(self.case_ids, desc="scoring", unit="case", leave=False):
            spacing = self.store.case_attrs(case_id)["spacing_mm"]
            scores = score_label_maps(self.predict(model, case_id), self.reference(case_id), spacing,
                                      self.label_map.class_names,
                                      {k: list(v) for k, v in self.label_map.groups.items()})
            out[case_id] = case_record(scores)
        return out


def _checkpoint(model, optimizer, epoch, history, best_dsc, cfg, fold, encoder, out_channels) -> dict:
    from tcsmae.checkpoint import capture_rng_state

    return {"format": FORMAT, "version": VERSION, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "epoch": epoch, "history": history,
            "best_dsc": best_dsc, "config": _plain(asdict(cfg)), "run_key": _run_key(cfg), "fold": fold,
            "encoder": encoder, "out_channels": out_channels, "rng": capture_rng_state()}


def _run_key(cfg: FinetuneConfig) -> dict:
    """The settings a finished or interrupted fold must share to be reused or resumed."""
    key = _plain(asdict(cfg))
    for volatile in ("fold", "device", "workers", "epochs", "precision"):  # more epochs = continue training
        key.pop(volatile)
    return key


def _key_changes(old: dict, new: dict, prefix: str = "") -> str:
    """'size: 64 -> 96, ...': the settings that differ between two run keys (nested dicts)."""
    changes = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _key_changes(a, b, f"{prefix}{k}.")
            changes += [inner] if inner else []
        elif a != b:
            changes.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return ", ".join(changes)


def _plain(value):
    """Tuples -> lists recursively, so a config survives JSON and weights_only loads."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def run_fold(store, store_path, cfg: FinetuneConfig, fold_index: int, train_ids, val_ids, label_map,
             encoder: str, meta: dict, out_dir: Path) -> dict:
    """Train one fold (resuming from fold_K/last.pt), score it, export; returns scores.json content."""
    import torch
    from tqdm import tqdm

    from tcsmae.checkpoint import restore_rng_state, save_checkpoint
    from tcsmae.atomic_files import write_json_atomic

    fold_dir = out_dir / f"fold_{fold_index}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    scores_path = fold_dir / "scores.json"
    if scores_path.is_file():
        done = json.loads(scores_path.read_text())
        if done.get("run_key") == _run_key(cfg) and len(done.get("history", [])) >= cfg.epochs:
            print(f"fold {fold_index}: already done ({scores_path})")
            return done
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed * 1000 + fold_index)
    model = build_model(encoder, label_map.out_channels, cfg.init).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_fn = make_loss(label_map.binary, cfg.ce_weight, cfg.dice_weight)
    history: list[dict] = []
    best_dsc = -math.inf
    start_epoch = 0
    last_path, best_path = fold_dir / "last.pt", fold_dir / "best.pt"
    if last_path.is_file():
        ckpt = torch.load(last_path, map_location="cpu", weights_only=True)
        if ckpt.get("run_key") != _run_key(cfg):
            raise UserError(f"{last_path} was written with other settings ({_key_changes(ckpt.get('run_key') or {}, _run_key(cfg))}); "
                            "re-run with the same options to resume it, or choose a new --out")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, history, best_dsc = int(ckpt["epoch"]), list(ckpt["history"]), float(ckpt["best_dsc"])
        restore_rng_state(ckpt["rng"])
        print(f"fold {fold_index}: resuming after epoch {start_epoch} from {last_path}")
    batches = TrainingBatches(store_path, cfg, train_ids, label_map, device)
    validator = Validator(store, val_ids, cfg, label_map, device)
    bf16 = device.type == "cuda" and cfg.precision in ("auto", "bf16")
    nonfinite = 0
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        total, steps = 0.0, 0
        bar = tqdm(batches(epoch), desc=f"fold {fold_index} epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                   leave=False)
        for batch in bar:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(batch["original"])
            loss = loss_fn(logits, batch["target"])  # fp32 (make_loss casts)
            value = loss.item()
            if not math.isfinite(value):
                nonfinite += 1
                if nonfinite >= MAX_NONFINITE:
                    raise UserError(f"fold {fold_index}: {nonfinite} non-finite losses in a row; lower --lr "
                                    f"(now {cfg.lr:g})")
                continue  # skip the step
            nonfinite = 0
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += value
            steps += 1
            bar.set_postfix(loss=f"{value:.4f}")
        if steps == 0:
            raise UserError(f"fold {fold_index}: the loader gave no batch for {len(train_ids)} training "
                            f"case(s); lower --batch-size (now {cfg.batch_size})")
        val_dsc, per_case = validator.online_dsc(model)
        history.append({"epoch": epoch + 1, "train_loss": total / steps, "val_dsc": val_dsc,
                        "val_dsc_cases": per_case})
        print(f"fold {fold_index} epoch {epoch + 1}: loss {total / steps:.4f}, validation DSC "
              f"{'n/a' if val_dsc is None else f'{val_dsc:.4f}'}")
        improved = val_dsc is not None and val_dsc > best_dsc
        best_dsc = val_dsc if improved else best_dsc
        ckpt = _checkpoint(model, optimizer, epoch + 1, history, best_dsc, cfg, fold_index, encoder,
                           label_map.out_channels)
        if improved or not best_path.is_file():
            save_checkpoint(best_path, ckpt)
        save_checkpoint(last_path, ckpt)
        write_json_atomic(fold_dir / "history.json", history)
        plot_val_dsc(out_dir)
    evaluated = torch.load(best_path if cfg.evaluate == "best" else last_path, map_location="cpu",
                           weights_only=True)
    model.load_state_dict(evaluated["model"])
    cases = validator.scores(model)
    from tcsmae.metrics import fold_summary

    doc = {"fold": fold_index, "evaluated": cfg.evaluate, "evaluated_epoch": int(evaluated["epoch"]),
           "train_cases": list(train_ids), "val_cases": list(val_ids), "cases": cases,
           "summary": fold_summary(list(cases.values())), "history": history,
           "config": _plain(asdict(cfg)), "run_key": _run_key(cfg)}
    export_finetuned(model, fold_dir / "finetuned.pt", encoder, label_map, cfg, meta, fold_index,
                     int(evaluated["epoch"]))
    write_json_atomic(scores_path, doc)
    return doc


# ---------------------------------------------------------------------------------------
# Export, results, plot


def export_finetuned(model, path: Path, encoder: str, label_map, cfg: FinetuneConfig, meta: dict,
                     fold: int, epoch: int) -> Path:
    """finetuned.pt (plain smp.Unet state dict) + finetuned.json (what `tcsmae predict` needs)."""
    import segmentation_models_pytorch as smp
    import torch

    import tcsmae
    from tcsmae.checkpoint import save_checkpoint
    from tcsmae.atomic_files import write_json_atomic

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_checkpoint(path, state)
    info = {
        "format": "tcsmae-finetuned", "encoder": encoder, "in_channels": 3,
        "classes": label_map.out_channels,
        "activation": "sigmoid" if label_map.binary else "softmax",
        "threshold": cfg.threshold, "class_names": label_map.class_names,
        "label_map": label_map.to_json(), "channels": ["lung", "mediastinal", "edge"],
        "input_normalisation": "windows to 0..1, nothing further (no ImageNet mean/std)",
        "input_size": cfg.size, "pipeline": _plain(asdict(cfg.pipeline)),
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
    from tcsmae.metrics import over_folds

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
            "config": _plain(asdict(cfg)), "label_map": label_map.to_json(), "weights": weights}


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
    ax.set_ylabel("validation DSC (%)")
    ax.set_title(f"online validation DSC - {out_dir.name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out_dir / "val_dsc.png")


# ---------------------------------------------------------------------------------------
# The whole run


def finetune(data: str | Path, out: str | Path, cfg: FinetuneConfig) -> dict:
    """Run the configured folds and write results.json; returns its content."""
    from tcsmae.convert.store import open_store
    from tcsmae.atomic_files import write_json_atomic
    from tcsmae.folds import check_leakage, make_folds, write_folds
    from tcsmae.labelmap import check_against_ids, load_label_map

    out_dir = Path(out)
    store = open_store(data)
    label_map = load_label_map(cfg.label_map)
    meta = weights_metadata(cfg.init)
    encoder = resolve_encoder(cfg, meta)
    if meta:
        cfg = replace(cfg, pipeline=pipeline_from_metadata(meta, cfg.size))
    labelled = [c for c in store.case_ids if store.has_labels(c)]
    unlabelled = [c for c in store.case_ids if c not in labelled]
    if not labelled:
        raise UserError(f"{data}: no case has labels; convert with --labels (or a manifest labels column)")
    if unlabelled:
        warnings.warn(f"{len(unlabelled)} case(s) without labels are left out: {unlabelled[:5]}", stacklevel=2)
    present = set()
    for c in labelled:
        present.update(np.unique(store.label(c)[...]).tolist())
    for msg in check_against_ids(label_map, present, str(data)):
        warnings.warn(msg, stacklevel=2)
    attrs = {c: store.case_attrs(c) for c in labelled}
    for msg in check_leakage(attrs, meta.get("pretraining_cases"), cfg.allow_overlap):
        warnings.warn(msg + " (allowed by --allow-overlap)", stacklevel=2)
    out_dir.mkdir(parents=True, exist_ok=True)
    folds, messages = make_folds(labelled, [attrs[c].get("patient_id", "") for c in labelled], cfg.folds, cfg.seed)
    write_folds(out_dir, folds, cfg.folds, cfg.seed, messages)
    chosen = range(cfg.folds) if cfg.fold is None else [cfg.fold]
    for k in chosen:
        run_fold(store, data, cfg, k, folds[k].train, folds[k].val, label_map, encoder, meta, out_dir)
        results = collect_results(out_dir, cfg, label_map, meta)
        write_json_atomic(out_dir / "results.json", results)
    plot_val_dsc(out_dir)
    return results


def add_arguments(parser) -> None:
    d = FinetuneConfig()
    parser.add_argument("--data", required=True, type=Path, help="labelled store (STORE.zarr)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (re-run to resume)")
    parser.add_argument("--init", required=True, help="weights.pt from `tcsmae export`, or 'scratch'")
    parser.add_argument("--encoder", default="", help="smp encoder (default: weights.json's; mit_b2 for scratch)")
    parser.add_argument("--labels-map", dest="label_map", default=None,
                        help="label map JSON, or a shipped one: chest11, phantom, phantom-lesion "
                             "(default: binary, every non-zero label)")
    parser.add_argument("--folds", type=int, default=d.folds, help=f"K of patient-grouped K-fold CV (default {d.folds}; 1 = train=val)")
    parser.add_argument("--fold", type=int, default=None, help="run only fold K (0-based)")
    parser.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs per fold (default {d.epochs}, the paper's)")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr:g}, the paper's)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help=f"slices per step (default {d.batch_size})")
    parser.add_argument("--size", type=int, default=d.size, help=f"training side in pixels (default {d.size})")
    parser.add_argument("--device", default=d.device, help="auto, cpu or cuda")
    parser.add_argument("--allow-overlap", action="store_true", help="fine-tune even on cases seen in pretraining")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of folds, head init and sample order")
    parser.add_argument("--evaluate", choices=EVALUATE, default=d.evaluate,
                        help="checkpoint that scores each fold (default last)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=d.precision,
                        help="training autocast: auto = bf16 on the GPU, fp32 on the CPU")
    parser.add_argument("--workers", type=int, default=d.workers,
                        help=f"loader reader processes (default {d.workers}; 0 = main process)")


def run(args) -> int:
    cfg = FinetuneConfig(init=args.init, encoder=args.encoder, label_map=args.label_map, folds=args.folds,
                         fold=args.fold, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                         size=args.size, seed=args.seed, device=args.device, allow_overlap=args.allow_overlap,
                         evaluate=args.evaluate, workers=args.workers, precision=args.precision)
    results = finetune(args.data, args.out, cfg)
    from tcsmae.report import Run, format_report

    print(format_report([Run(name=Path(args.out).name, path=Path(args.out) / "results.json", results=results)]),
          end="")
    print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'val_dsc.png'}")
    return 0
