"""Exported weights on disk: a plain smp.Unet state dict NAME.pt with NAME.json beside it.

Two kinds, told apart by the JSON: pretrained weights from `tcsmae export` (format
PRETRAINED_FORMAT, a 3-channel reconstruction head; hand-made or older JSON may lack the
format) and fine-tuned models from `tcsmae finetune` (format FINETUNED_FORMAT, one head
channel per class). This is the one reader of that pair and of the preprocessing it records
(`recorded_pipeline`); the writers (tcsmae.pretrain.export, tcsmae.finetune.outputs) take
their format names from here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

from tcsmae.errors import UserError
from tcsmae.pipelines.config import PipelineConfig

PRETRAINED_FORMAT = "tcsmae-weights"
"""weights.json `format` written by `tcsmae export`."""

FINETUNED_FORMAT = "tcsmae-finetuned"
"""finetuned.json `format` written by `tcsmae finetune`."""

CHANNELS = ("lung", "mediastinal", "edge")
"""The 3 input channels, in order (JSON `channels`)."""


@dataclass(frozen=True)
class ExportKind:
    """What an error message tells the user to give, and the command that writes it."""

    example: str
    """The file to give, e.g. 'weights.pt'."""
    command: str
    """The command writing the pair, e.g. 'tcsmae export'."""
    records: str
    """What the JSON names (said when it is missing)."""


PRETRAINED = ExportKind("weights.pt", "tcsmae export", "the encoder and the preprocessing")
FINETUNED = ExportKind("DIR/fold_K/finetuned.pt", "tcsmae finetune", "the encoder, classes and preprocessing")


def is_finetuned(meta: dict) -> bool:
    """True for the JSON of a fine-tuned model (`format` FINETUNED_FORMAT)."""
    return meta.get("format") == FINETUNED_FORMAT


def read_metadata(path: str | Path, kind: ExportKind = PRETRAINED, flag: str = "--weights") -> dict:
    """The JSON beside exported weights `path` (same stem, suffix .json), as a dict.

    UserError (naming `flag` and the file) when the weights or the JSON are missing or the
    JSON does not parse; the kind is not checked here (see load_pretrained/load_finetuned).
    """
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file():
        scratch = " or 'scratch'" if flag == "--init" else ""
        raise UserError(f"{flag} {path}: no such file; give {kind.example} from `{kind.command}`{scratch}")
    if not meta_path.is_file():
        raise UserError(f"{flag} {path}: {meta_path} is missing; `{kind.command}` writes it beside "
                        f"the weights (it names {kind.records})")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{meta_path}: not valid JSON ({exc}); re-run `{kind.command}`") from None
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path}: not a JSON object; re-run `{kind.command}`")
    return meta


def read_state_dict(path: str | Path, kind: ExportKind = PRETRAINED, flag: str = "--weights") -> dict:
    """The state dict in exported weights `path` ({name: tensor}, on the CPU, weights_only).

    UserError when it cannot be read, is not a dict, or is a training checkpoint instead."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{flag} {path}: cannot be read as a state dict ({type(exc).__name__}: {exc}); "
                        f"give {kind.example} from `{kind.command}`") from None
    if not isinstance(state, dict):
        raise UserError(f"{flag} {path}: not a plain state dict; give {kind.example} from `{kind.command}`")
    if "model" in state and "optimizer" in state:
        if kind is PRETRAINED:
            raise UserError(f"{flag} {path} is a pretraining checkpoint, not exported weights: run "
                            f"`tcsmae export {path} -o weights.pt` and pass {flag} weights.pt")
        raise UserError(f"{flag} {path} is a training checkpoint, not exported weights: give "
                        f"{kind.example}, written by `{kind.command}`")
    return state


def read_exported(path: str | Path, kind: ExportKind = PRETRAINED, flag: str = "--weights",
                  check=None) -> tuple[dict, dict]:
    """(state dict, JSON metadata) of exported weights `path` and the JSON beside it.

    check: optional callable given the metadata before the weights are read (raises UserError)."""
    meta = read_metadata(path, kind, flag)
    if check is not None:
        check(meta)
    return read_state_dict(path, kind, flag), meta


def _unet(state: dict, meta: dict, classes: int):
    """smp.Unet(meta['encoder'], 3 -> classes) holding `state` (strict), in eval mode."""
    import segmentation_models_pytorch as smp

    model = smp.Unet(encoder_name=meta["encoder"], encoder_weights=None, in_channels=3, classes=classes)
    model.load_state_dict(state, strict=True)
    return model.eval()


def recorded_pipeline(meta: dict, base: PipelineConfig | None = None, **overrides) -> PipelineConfig:
    """The preprocessing recorded in exported weights' JSON, with `overrides` applied.

    Read from `pipeline` (fine-tuned) or `config.pipeline` (pretrained); lists become tuples,
    unknown keys are dropped, fields not recorded come from `base` (default PipelineConfig()).
    """
    known = set(PipelineConfig.__dataclass_fields__)
    stored = meta.get("pipeline") or (meta.get("config") or {}).get("pipeline") or {}
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in stored.items() if k in known}
    fields.update(overrides)
    return PipelineConfig(**fields) if base is None else replace(base, **fields)


def pipeline_from_metadata(meta: dict, size: int) -> PipelineConfig:
    """The pretraining preprocessing (weights.json `config.pipeline`), masking off, at `size`."""
    return recorded_pipeline(meta, masking="none", size=size, augment=False)


def load_pretrained(weights: str | Path):
    """(smp.Unet in eval mode, weights.json metadata, PipelineConfig) of exported pretrained weights."""

    def check(meta: dict) -> None:
        classes = meta.get("classes", 3)
        if is_finetuned(meta):
            raise UserError(f"{weights} is a fine-tuned model ({classes}-channel head): reconstruction needs "
                            "the pretrained 3-channel weights from `tcsmae export`")
        if classes != 3:
            raise UserError(f"{weights} has a {classes}-channel head: reconstruction needs the "
                            "pretrained 3-channel weights from `tcsmae export`, not a fine-tuned model")

    state, meta = read_exported(weights, PRETRAINED, check=check)
    return _unet(state, meta, 3), meta, recorded_pipeline(meta, augment=False)


def load_finetuned(weights: str | Path):
    """(model in eval mode, finetuned.json metadata) from `tcsmae finetune`'s export."""

    def check(meta: dict) -> None:
        if not is_finetuned(meta):
            raise UserError(f"{Path(weights).with_suffix('.json')} is not fine-tuned model metadata (format "
                            f"{meta.get('format')!r}); pretrained weights.pt cannot segment: fine-tune them "
                            "first with `tcsmae finetune`")

    state, meta = read_exported(weights, FINETUNED, check=check)
    return _unet(state, meta, meta["classes"]), meta


def weights_metadata(init: str) -> dict:
    """weights.json beside an exported weights.pt given as --init ({} for scratch)."""
    if init == "scratch":
        return {}
    return read_metadata(init, PRETRAINED, "--init")


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
