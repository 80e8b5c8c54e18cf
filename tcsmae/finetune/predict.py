"""`tcsmae predict`: label maps from a fine-tuned model, as NIfTI in each case's original geometry.

    tcsmae predict --weights DIR/fold_0/finetuned.pt (--data STORE.zarr | --dicom DIR | --nifti FILE) -o OUT

finetuned.json beside the weights (written by `tcsmae finetune`) names the encoder, the
head (sigmoid or softmax), the classes and the preprocessing. DICOM folders and NIfTI
files are first converted into a temporary store with the package's converters, so the
model sees exactly what fine-tuning saw. Each case is segmented slice by slice
(tcsmae.inference), the result brought back to the stored grid and written with
convert/orientation.py's `store_to_nifti`: for a NIfTI source the output has the source's
own voxel layout and affine; for DICOM the nearest RAS layout with the series' geometry.

Output: OUT/<case_id>.nii.gz, uint8 class indices (0 = background, i = the i-th class),
and OUT/classes.json mapping index -> class name and the stored label ids it stands for.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tcsmae.atomic_files import write_json_atomic
from tcsmae.convert.dicom_to_zarr import main as convert_dicom
from tcsmae.convert.nifti_to_zarr import convert_sources, make_source
from tcsmae.device import resolve_device
from tcsmae.errors import UserError
from tcsmae.finetune.inference import segment_volume
from tcsmae.pipelines.config import PipelineConfig
from tcsmae.store.geometry import store_to_nifti
from tcsmae.store.reader import open_store
from tcsmae.weights import load_finetuned

HELP = "segment cases with a fine-tuned model; NIfTI label maps in each case's original geometry"


def _pipeline(meta: dict):

    known = set(PipelineConfig.__dataclass_fields__)
    stored = {k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["pipeline"].items() if k in known}
    return PipelineConfig(**stored)


def _convert_to_store(dicom: Path | None, nifti: Path | None, tmp: Path) -> Path:
    """Convert a DICOM folder or a NIfTI file into a temporary store; returns its path."""
    store = tmp / "input.zarr"
    if dicom is not None:

        code = convert_dicom([str(dicom), "-o", str(store), "--workers", "1"])
        if code not in (0, 3):
            raise UserError(f"--dicom {dicom}: no CT series could be converted from it (the converter says why above); "
                            "check the folder holds DICOM CT slices")
    else:

        result = convert_sources([make_source(nifti)], store, progress=False)
        if result["failed"]:
            raise UserError(f"--nifti {nifti}: {result['failed'][0][1]}")
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
    cfg = _pipeline(meta)
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
