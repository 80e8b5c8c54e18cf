"""Atomic file writes: a temporary file in the same folder, then os.replace.

A reader (or a crash) never sees half a file: either the old content or the new one.
Used for every JSON, Markdown and picture the commands write. (Checkpoints use
tcsmae.checkpoint, the store's index tcsmae/store/format.py: same idea, own formats.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _tmp_for(path: Path, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")


def readable_by_all(path: str | os.PathLike) -> None:
    """Give a file made by mkstemp (mode 0600) the usual mode: 0666 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically; creates the parent folder. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_for(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | os.PathLike, data, indent: int = 1, allow_nan: bool = True) -> Path:
    """Write `data` as JSON (plus a final newline) to `path` atomically."""
    return write_text_atomic(path, json.dumps(data, indent=indent, allow_nan=allow_nan) + "\n")


def save_figure(fig, path: str | os.PathLike, dpi: int | None = None) -> Path:
    """Save a matplotlib figure atomically (format from the suffix of `path`) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_for(path, path.suffix)  # keep the suffix: matplotlib picks the format by it
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
