"""`tcsmae export CKPT -o weights.pt`: pretrained weights as a plain smp.Unet state dict.

weights.pt loads with strict=True (`torch.load(path, weights_only=True)`) into smp.Unet(
encoder_name=meta["encoder"], encoder_weights=None, in_channels=3, classes=3); a sigmoid of
its output is the reconstruction. weights.json beside it (format tcsmae.weights.PRETRAINED_FORMAT)
says how to feed it: channels in order, windows, HU range, 0..1 normalisation, input size,
activation, K and rho, versions, git revision, and salted SHA-256 digests of the pretraining
cases' ids (`pretraining_cases`: {"salt", "series_digests", "patient_digests", "case_digests"},
digest = sha256(salt + id), as tcsmae.finetune.folds reads it) so fine-tuning can refuse overlaps.
"""

from __future__ import annotations

from pathlib import Path

from tcsmae.atomic_files import write_json_atomic
from tcsmae.checkpoint import load_checkpoint, save_checkpoint
from tcsmae.pretrain.model import build_unet
from tcsmae.weights import CHANNELS, PRETRAINED_FORMAT

HELP = "export a pretraining checkpoint as plain smp.Unet weights (weights.pt + weights.json)"


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="pretraining checkpoint, e.g. RUN/checkpoints/last.pt")
    parser.add_argument("-o", "--output", required=True, help="weights file to write, e.g. weights.pt "
                        "(weights.json is written beside it)")


def unet_state_dict(model_state: dict) -> dict:
    """The `unet.*` entries of a TCSMAE state dict with the prefix removed (smp.Unet keys)."""
    return {k[len("unet."):]: v for k, v in model_state.items() if k.startswith("unet.")}


def export_metadata(ckpt: dict) -> dict:
    """What a user needs to feed the exported weights (the content of weights.json)."""
    cfg = ckpt["config"]
    pipe, model = cfg["pipeline"], cfg["model"]
    return {
        "format": PRETRAINED_FORMAT,
        "version": 1,
        "architecture": "segmentation_models_pytorch.Unet",
        "encoder": model["encoder"],
        "in_channels": 3,
        "classes": 3,
        "channels": list(CHANNELS),
        "windows": {
            "lung": {"level": pipe["lung_window"][0], "width": pipe["lung_window"][1]},
            "mediastinal": {"level": pipe["mediastinal_window"][0], "width": pipe["mediastinal_window"][1]},
            "formula": "clip((HU - level + width / 2) / width, 0, 1)",
        },
        "edge": {"rule": "max of Sobel magnitudes of the lung and mediastinal images",
                 "scaling": pipe["edge_scaling"], "clip": pipe["edge_clip"]},
        "hu_range": pipe["hu_range"],
        "normalisation": "each channel in 0..1 as windowed; no mean/std standardisation (trained from scratch)",
        "input_size": int(ckpt["input_size"]),
        "activation": "sigmoid",
        "K": pipe["intervals"],
        "rho": pipe["rho"],
        "masking": pipe["masking"],
        "mep_levels": model["mep_levels"],
        "trained": {"epochs_done": ckpt["epoch"], "steps_done": ckpt["step"], "temperature": ckpt["temperature"]},
        "versions": {k: v for k, v in ckpt.get("versions", {}).items() if k != "git"},
        "git_revision": ckpt.get("versions", {}).get("git"),
        "pretraining_cases": ckpt.get("pretraining_cases") or {},
        "config": cfg,
        "load": (f"smp.Unet(encoder_name={model['encoder']!r}, encoder_weights=None, in_channels=3, classes=3)"
                 ".load_state_dict(torch.load('weights.pt', weights_only=True), strict=True)"),
    }


def export(checkpoint: str | Path, output: str | Path) -> tuple[Path, Path]:
    """Write `output` (state dict) and `output` with suffix .json; returns both paths."""

    ckpt = load_checkpoint(checkpoint)
    state = unet_state_dict(ckpt["model"])
    meta = export_metadata(ckpt)
    unet = build_unet(meta["encoder"])
    unet.load_state_dict(state, strict=True)  # the promise made to users, checked before writing
    output = Path(output)
    save_checkpoint(output, {k: v.detach().clone().contiguous() for k, v in state.items()})
    json_path = write_json_atomic(output.with_suffix(".json"), meta, indent=2)
    return output, json_path


def run(args) -> int:
    weights, meta = export(args.checkpoint, args.output)
    print(f"wrote {weights} and {meta}")
    return 0
