"""Training checkpoints: atomic, and loadable with torch.load(weights_only=True).

A checkpoint is a plain dict of tensors, lists, dicts, strings and numbers, written through
a temporary file so that a crash mid-write leaves the previous one intact (`save_checkpoint`,
also used by fine-tuning). `load_checkpoint` reads a pretraining checkpoint (format
"tcsmae-pretrain"; its entries are listed there, built by
tcsmae.pretrain.engine.checkpoint_payload); `capture_rng_state` and `restore_rng_state`
carry every RNG across a resume.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from tcsmae.atomic_files import readable_by_all
from tcsmae.errors import UserError

FORMAT = "tcsmae-pretrain"
VERSION = 1


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    """Write `payload` to `path` atomically (temporary file in the same folder, then os.replace):
    a crash mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        readable_by_all(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict:
    """A pretraining checkpoint written by `save_checkpoint`, on the CPU, with weights_only=True.

    Its entries:

        format            "tcsmae-pretrain"     version   1
        model             TCSMAE state dict (unet.* = smp.Unet keys, projections.*, temperature.*)
        optimizer, scheduler, scaler            their state dicts
        temperature       float, current NT-Xent temperature (None without one)
        epoch, step       position to continue from: `step` global steps done; the next batch
        data_position     {"epoch": e, "step": s}: batch s of epoch e is the next one to train on
        rng               one dict per rank: torch CPU/CUDA, NumPy and Python RNG states
        config            asdict(TrainConfig) with tuples as lists
        input_size        training side in pixels (MEP sizes depend on it; resume refuses another)
        pretraining_cases {"salt", "series_digests", "patient_digests", "n_cases", "store"}
        versions          {"tcsmae", "torch", "smp"}
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: pass a file such as RUN/checkpoints/last.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, foreign pickle
        raise UserError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); "
                        "pass a checkpoint written by `tcsmae pretrain`") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a tcsmae pretraining checkpoint (no format={FORMAT!r} entry)")
    if ckpt.get("version", 0) > VERSION:
        raise UserError(f"checkpoint {path} has version {ckpt['version']}; this tcsmae reads <= {VERSION}: "
                        "upgrade tcsmae")
    return ckpt


def check_resume_compatible(ckpt: dict, path: str | Path, input_size: int, encoder: str) -> None:
    """Refuse a resume that would change the layer sizes (input size or encoder)."""
    if int(ckpt["input_size"]) != int(input_size):
        raise UserError(
            f"checkpoint {path} was trained at {ckpt['input_size']}x{ckpt['input_size']}, but this run "
            f"asks for {input_size}x{input_size}: the MEP projection sizes depend on the input size. "
            f"Resume with --size {ckpt['input_size']}, or start a new run without --resume."
        )
    stored = ckpt["config"]["model"]["encoder"]
    if stored != encoder:
        raise UserError(f"checkpoint {path} has encoder {stored!r}, this run asks for {encoder!r}: "
                        f"resume with --encoder {stored}, or start a new run")


def capture_rng_state() -> dict:
    """This process's RNG states as tensors/lists (weights_only-safe)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of capture_rng_state."""
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
