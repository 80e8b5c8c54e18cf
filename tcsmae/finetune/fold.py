"""One fine-tuning fold: train on its training cases, validate every epoch, score, export.

`run_fold` trains the U-Net (tcsmae.finetune.model.build_model) with Adam on the pipelines'
loader (masking off, labels mapped to classes) over the fold's training cases; the loss is
cross-entropy (BCE for one class) + Dice. After every epoch it validates
(tcsmae.finetune.validation) and writes fold_K/last.pt, best.pt and history.json. A fold
resumes from last.pt and a finished one (scores.json) is reused while `_run_key` (the
encoder as resolved, the init weights by content) is the same. At the end the `--evaluate`
checkpoint is scored and exported (fold_K/finetuned.pt/.json, scores.json).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tcsmae.atomic_files import write_json_atomic
from tcsmae.checkpoint import capture_rng_state, restore_rng_state, save_checkpoint
from tcsmae.device import resolve_device
from tcsmae.errors import UserError
from tcsmae.finetune.config import FinetuneConfig
from tcsmae.finetune.metrics import fold_summary
from tcsmae.finetune.model import build_model
from tcsmae.finetune.outputs import export_finetuned, plot_val_dsc
from tcsmae.finetune.validation import Validator
from tcsmae.pipelines.loader import make_loader
from tcsmae.weights import init_identity

FORMAT = "tcsmae-finetune"
MAX_NONFINITE = 10  # consecutive non-finite losses before a fold aborts
VERSION = 1


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
        kind = "cuda" if self.device.type == "cuda" else "cpu"
        device_id = (self.device.index or 0) if kind == "cuda" else None
        return make_loader(self.store_path, self.cfg.input_pipeline(), self.cfg.batch_size, kind,
                           rank=0, world_size=1, epoch=epoch, step=0, with_labels=True,
                           num_threads=2, py_workers=self.cfg.workers, device_id=device_id,
                           case_ids=self.case_ids)

    def __len__(self) -> int:
        """Batches per epoch (the last, partial batch is dropped)."""
        if self._loader is None:
            self._loader = self._make_loader(0)
        return len(self._loader)

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


def _checkpoint(model, optimizer, epoch, history, best_dsc, cfg, fold, encoder, out_channels, run_key) -> dict:
    return {"format": FORMAT, "version": VERSION, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "epoch": epoch, "history": history,
            "best_dsc": best_dsc, "config": cfg.record(), "run_key": run_key, "fold": fold,
            "encoder": encoder, "out_channels": out_channels, "rng": capture_rng_state()}


def _config_key(cfg: FinetuneConfig) -> dict:
    """The configuration without what may change between runs of a fold (the whole run key
    of checkpoints from tcsmae versions whose key lacks the encoder and the init weights)."""
    key = cfg.record()
    for volatile in ("fold", "device", "workers", "epochs", "precision"):  # more epochs = continue training
        key.pop(volatile)
    return key


def _run_key(cfg: FinetuneConfig, encoder: str, init_id: str) -> dict:
    """The settings a finished or interrupted fold must share to be reused or resumed.

    encoder: as resolved (--encoder equal to weights.json's, or left out, is the same run);
    init_id: `init_identity(cfg.init)`, so the same weights under another path are the same.
    """
    return {**_config_key(cfg), "encoder": encoder, "init": init_id}


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


def _resume(last_path: Path, same_run: tuple, model, optimizer) -> tuple[int, list, float]:
    """Load fold_K/last.pt into model and optimizer (and the random state); returns (epochs
    done, history, best online DSC). A checkpoint of other settings is a UserError naming them."""
    import torch

    ckpt = torch.load(last_path, map_location="cpu", weights_only=True)
    if ckpt.get("run_key") not in same_run:
        changes = min((_key_changes(ckpt.get("run_key") or {}, k) for k in same_run), key=lambda c: c.count(" -> "))
        raise UserError(f"{last_path} was written with other settings ({changes}); "
                        "re-run with the same options to resume it, or choose a new --out")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    restore_rng_state(ckpt["rng"])
    return int(ckpt["epoch"]), list(ckpt["history"]), float(ckpt["best_dsc"])


def _train_epoch(model, optimizer, loss_fn, bar, bf16: bool, nonfinite: int, fold_index: int,
                 cfg: FinetuneConfig) -> tuple[float | None, int]:
    """One epoch over the batches of `bar` (a tqdm over the loader). A non-finite loss skips
    its step; MAX_NONFINITE in a row (counted across epochs: `nonfinite` comes in and goes out)
    abort the fold. Returns (mean training loss, or None when no step ran; nonfinite)."""
    import torch

    model.train()
    total, steps = 0.0, 0
    for batch in bar:
        with torch.autocast(batch["original"].device.type, dtype=torch.bfloat16, enabled=bf16):
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
    return (total / steps if steps else None), nonfinite


def run_fold(store, store_path, cfg: FinetuneConfig, fold_index: int, train_ids, val_ids, label_map,
             encoder: str, meta: dict, out_dir: Path) -> dict:
    """Train one fold (resuming from fold_K/last.pt), score it, export; returns scores.json content."""
    import torch
    from tqdm import tqdm

    fold_dir = out_dir / f"fold_{fold_index}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    run_key = _run_key(cfg, encoder, init_identity(cfg.init))
    same_run = (run_key, _config_key(cfg))  # the second: a checkpoint written by an older tcsmae
    scores_path = fold_dir / "scores.json"
    if scores_path.is_file():
        done = json.loads(scores_path.read_text())
        if done.get("run_key") in same_run and len(done.get("history", [])) >= cfg.epochs:
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
        start_epoch, history, best_dsc = _resume(last_path, same_run, model, optimizer)
        print(f"fold {fold_index}: resuming after epoch {start_epoch} from {last_path}")
    batches = TrainingBatches(store_path, cfg, train_ids, label_map, device)
    validator = Validator(store, val_ids, cfg, label_map, device)
    bf16 = device.type == "cuda" and cfg.precision in ("auto", "bf16")
    nonfinite = 0
    for epoch in range(start_epoch, cfg.epochs):
        bar = tqdm(batches(epoch), desc=f"fold {fold_index} epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                   total=len(batches), leave=False)
        train_loss, nonfinite = _train_epoch(model, optimizer, loss_fn, bar, bf16, nonfinite, fold_index, cfg)
        if train_loss is None:
            raise UserError(f"fold {fold_index}: the loader gave no batch for {len(train_ids)} training "
                            f"case(s); lower --batch-size (now {cfg.batch_size})")
        val_dsc, per_case = validator.online_dsc(model)
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_dsc": val_dsc,
                        "val_dsc_cases": per_case})
        print(f"fold {fold_index} epoch {epoch + 1}: loss {train_loss:.4f}, validation DSC "
              f"{'n/a' if val_dsc is None else f'{100 * val_dsc:.2f}%'}")
        improved = val_dsc is not None and val_dsc > best_dsc
        best_dsc = val_dsc if improved else best_dsc
        ckpt = _checkpoint(model, optimizer, epoch + 1, history, best_dsc, cfg, fold_index, encoder,
                           label_map.out_channels, run_key)
        if improved or not best_path.is_file():
            save_checkpoint(best_path, ckpt)
        save_checkpoint(last_path, ckpt)
        write_json_atomic(fold_dir / "history.json", history)
        plot_val_dsc(out_dir)
    evaluated = torch.load(best_path if cfg.evaluate == "best" else last_path, map_location="cpu",
                           weights_only=True)
    model.load_state_dict(evaluated["model"])
    cases = validator.scores(model)

    doc = {"fold": fold_index, "evaluated": cfg.evaluate, "evaluated_epoch": int(evaluated["epoch"]),
           "train_cases": list(train_ids), "val_cases": list(val_ids), "cases": cases,
           "summary": fold_summary(list(cases.values())), "history": history,
           "config": cfg.record(), "run_key": run_key}
    export_finetuned(model, fold_dir / "finetuned.pt", encoder, label_map, cfg, meta, fold_index,
                     int(evaluated["epoch"]))
    write_json_atomic(scores_path, doc)
    return doc
