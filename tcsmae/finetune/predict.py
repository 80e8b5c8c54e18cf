"""`tcsmae predict`: label maps from a fine-tuned model, as NIfTI in each case's original geometry.

    tcsmae predict --weights DIR/fold_0/finetuned.pt (--data STORE.zarr | --dicom DIR | --nifti FILE) -o OUT

finetuned.json beside the weights names the encoder, head, classes and preprocessing. DICOM
and NIfTI inputs are converted into a temporary store by `tcsmae convert` / `convert-nifti`
in a child process, so the model sees what fine-tuning saw. Output: OUT/<case_id>.nii.gz in
the source geometry (tcsmae.store.geometry.store_to_nifti), uint8 class indices (0 =
background, i = the i-th class), and OUT/classes.json (index -> name, stored ids).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from tcsmae.atomic_files import write_json_atomic
from tcsmae.device import resolve_device
from tcsmae.errors import UserError
from tcsmae.finetune.inference import segment_volume
from tcsmae.store.geometry import store_to_nifti
from tcsmae.store.reader import open_store
from tcsmae.weights import load_finetuned, recorded_pipeline

HELP = "segment cases with a fine-tuned model; NIfTI label maps in each case's original geometry"

CONVERTED = (0, 3)
"""Converter exit codes that leave a usable store (all converted; some converted, some failed)."""


def _run_converter(argv: list[str]) -> tuple[int, list[str], list[str]]:
    """`python -m tcsmae.cli ARGV` in a child process, its stdout and stderr passed through
    line by line as they come; returns (exit code, stdout lines, stderr lines)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}  # lines as they come
    child = subprocess.Popen([sys.executable, "-m", "tcsmae.cli", *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, encoding="utf-8", errors="replace")
    lines: dict[str, list[str]] = {"out": [], "err": []}

    def pump(stream, sink, key):
        for line in stream:
            lines[key].append(line.rstrip("\n"))
            sink.write(line)
            sink.flush()

    err = threading.Thread(target=pump, args=(child.stderr, sys.stderr, "err"), daemon=True)
    err.start()
    pump(child.stdout, sys.stdout, "out")
    err.join()
    return child.wait(), lines["out"], lines["err"]


def _nifti_failure(nifti: Path, out: list[str], err: list[str], code: int) -> str:
    """The reason `convert-nifti` gives for failing on one source, as predict reports it."""
    prefix = "tcsmae convert-nifti: error: "
    for line in err:
        if line.startswith(prefix):  # refused before converting (e.g. not a NIfTI file)
            return line[len(prefix):]
    for line in out:
        if " FAILED: " in line:
            return f"--nifti {nifti}: {line.split(' FAILED: ', 1)[1]}"
    return f"--nifti {nifti}: the converter failed (exit code {code}; it says why above)"


def _convert_to_store(dicom: Path | None, nifti: Path | None, tmp: Path) -> Path:
    """Convert a DICOM folder or a NIfTI file into a temporary store; returns its path."""
    store = tmp / "input.zarr"
    if dicom is not None:
        code, _, _ = _run_converter(["convert", str(dicom), "-o", str(store), "--workers", "1"])
        if code not in CONVERTED:
            raise UserError(f"--dicom {dicom}: no CT series could be converted from it (the converter says why above); "
                            "check the folder holds DICOM CT slices")
    else:
        code, out, err = _run_converter(["convert-nifti", str(nifti), "-o", str(store), "--no-progress"])
        if code not in CONVERTED:
            raise UserError(_nifti_failure(nifti, out, err, code))
    return store


def predict_store(model, meta: dict, store_path: Path, out: Path, device="cpu", batch_size: int = 16,
                  cases: list[str] | None = None) -> list[Path]:
    """Segment every case (or `cases`) of a store; write OUT/<case>.nii.gz; returns the paths."""
    import nibabel as nib
    import numpy as np
    from tqdm import tqdm

    store = open_store(store_path)
    chosen = cases or store.case_ids
    unknown = [c for c in chosen if c not in store.case_ids]
    if unknown:
        raise UserError(f"{store_path}: no case(s) {unknown}; the store holds {store.case_ids[:10]}")
    out.mkdir(parents=True, exist_ok=True)
    cfg = recorded_pipeline(meta)
    model = model.to(device)
    written = []
    for case_id in tqdm(chosen, desc="predict", unit="case"):
        classes = segment_volume(model, store.read_volume(case_id), cfg, device, batch_size,
                                 threshold=meta.get("threshold", 0.5))
        img = store_to_nifti(classes.astype(np.uint8), store.case_attrs(case_id), dtype=np.uint8)
        path = out / f"{case_id}.nii.gz"
        tmp = out / f".{case_id}.tmp.nii.gz"
        nib.save(img, str(tmp))
        tmp.replace(path)
        written.append(path)
    label_map = meta.get("label_map", {})
    write_json_atomic(out / "classes.json", {
        "0": {"name": "background", "stored_ids": []},
        **{str(i): {"name": name, "stored_ids": label_map.get("classes", {}).get(name, [])}
           for i, name in enumerate(meta["class_names"], start=1)}})
    return written


def add_arguments(parser) -> None:
    parser.add_argument("--weights", required=True, type=Path, help="finetuned.pt from `tcsmae finetune`")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="a tcsmae store (STORE.zarr)")
    src.add_argument("--dicom", type=Path, help="a DICOM folder (converted to a temporary store first)")
    src.add_argument("--nifti", type=Path, help="a NIfTI CT volume (converted to a temporary store first)")
    parser.add_argument("-o", "--out", required=True, type=Path, help="output folder for <case>.nii.gz")
    parser.add_argument("--cases", nargs="+", help="only these case ids (with --data)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=16, help="slices per forward pass")


def run(args) -> int:
    model, meta = load_finetuned(args.weights)
    device = resolve_device(args.device)
    if args.data is not None:
        paths = predict_store(model, meta, args.data, args.out, device, args.batch_size, args.cases)
    else:
        with tempfile.TemporaryDirectory(prefix="tcsmae-predict-") as tmp:
            store = _convert_to_store(args.dicom, args.nifti, Path(tmp))
            paths = predict_store(model, meta, store, args.out, device, args.batch_size)
    print(f"wrote {len(paths)} label map(s) to {args.out} (class names in {args.out / 'classes.json'})")
    return 0
