"""TODO docstring."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

from tcsmae.errors import UserError
from tcsmae.pipelines.config import PipelineConfig


def load_pretrained(weights: str | Path):
    """(smp.Unet in eval mode, weights.json metadata, PipelineConfig) of exported pretrained weights."""
    import segmentation_models_pytorch as smp
    import torch


    weights = Path(weights)
    meta_path = weights.with_suffix(".json")
    if not weights.is_file() or not meta_path.is_file():
        raise UserError(f"--weights {weights}: need the file and {meta_path.name} beside it, as written by "
                        "`tcsmae export`")
    meta = json.loads(meta_path.read_text())
    if meta.get("classes", 3) != 3:
        raise UserError(f"{weights} has a {meta.get('classes')}-channel head: reconstruction needs the "
                        "pretrained 3-channel weights from `tcsmae export`, not a fine-tuned model")
    model = smp.Unet(encoder_name=meta["encoder"], encoder_weights=None, in_channels=3, classes=3)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    known = set(PipelineConfig.__dataclass_fields__)
    stored = (meta.get("config") or {}).get("pipeline") or {}
    cfg = PipelineConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in stored.items() if k in known})
    return model.eval(), meta, replace(cfg, augment=False)


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


def init_identity(init: str) -> str:
    """'scratch', or 'sha256:<hex>' of the weights file: the same weights under another path
    (relative or absolute, a copy) are the same start, so a run resumes from them."""
    if init == "scratch":
        return init
    digest = hashlib.sha256()
    with open(init, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def load_finetuned(weights: str | Path):
    """(model in eval mode, finetuned.json metadata) from `tcsmae finetune`'s export."""
    import segmentation_models_pytorch as smp
    import torch

    weights = Path(weights)
    meta_path = weights.with_suffix(".json")
    if not weights.is_file():
        raise UserError(f"--weights {weights}: no such file; give DIR/fold_K/finetuned.pt from `tcsmae finetune`")
    if not meta_path.is_file():
        raise UserError(f"--weights {weights}: {meta_path} is missing; it is written beside the weights by "
                        "`tcsmae finetune` and names the encoder, classes and preprocessing")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != "tcsmae-finetuned":
        raise UserError(f"{meta_path} is not fine-tuned model metadata (format {meta.get('format')!r}); "
                        "pretrained weights.pt cannot segment: fine-tune them first with `tcsmae finetune`")
    model = smp.Unet(encoder_name=meta["encoder"], encoder_weights=None, in_channels=3, classes=meta["classes"])
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    return model.eval(), meta
