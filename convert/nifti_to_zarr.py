"""NIfTI -> tcsmae store: `tcsmae convert-nifti` (also `python convert/nifti_to_zarr.py`).

Each source, a NIfTI image or a TotalSegmentator case folder (ct.nii.gz + segmentations/),
becomes one case, reoriented into the store's layout without resampling
(tcsmae.store.geometry); a label map must lie on its image's grid. Sources, re-runs,
--overwrite and exit codes: docs/store-format.md, "Converters".
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from tcsmae.convert.manifest import NIFTI_SUFFIXES, read_manifest
from tcsmae.errors import UserError, script_main
from tcsmae.store.format import check_case_id, storage_dtype
from tcsmae.store.geometry import grid_mismatch, nifti_to_store_grid
from tcsmae.store.repair import conversion_arguments
from tcsmae.store.writer import StoreWriter

HELP = "convert NIfTI CT volumes (and label maps, or TotalSegmentator case folders) into a tcsmae store"

TOTALSEG_IMAGE = "ct.nii.gz"
TOTALSEG_MASKS = "segmentations"
NONFINITE_HU = -1024.0
"""HU given to NaN/inf voxels of a float NIfTI (air, as for DICOM padding)."""


@lru_cache(maxsize=4)
def totalsegmentator_ids(table: Path | None = None) -> dict[str, int]:
    """Structure name -> label id of TotalSegmentator's 'total' task.

    table: a JSON file of id -> name (as `--structure-ids` gives it); None = the installed
    `totalsegmentator` package's own table (map_to_binary.class_map['total']). UserError
    when neither is available or the file is not such a table."""
    if table is None:
        try:
            from totalsegmentator.map_to_binary import class_map
        except ImportError:
            raise UserError(
                f"combining TotalSegmentator {TOTALSEG_MASKS}/ masks needs its structure ids (name -> id of the "
                "'total' task): pass --structure-ids FILE.json (id -> name) or install the totalsegmentator "
                "package (pip install totalsegmentator), whose table is used then") from None
        return {name: int(i) for i, name in class_map["total"].items()}
    try:
        raw = json.loads(Path(table).read_text())
        ids = {str(name): int(i) for i, name in raw.items()}
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise UserError(f"--structure-ids {table}: not a JSON object of label id -> structure name "
                        f"({type(exc).__name__}: {exc}); give TotalSegmentator's 'total' table") from None
    if not ids or not all(0 < i < 256 for i in ids.values()):
        raise UserError(f"--structure-ids {table}: ids must be 1..255 (stored as uint8); give TotalSegmentator's "
                        "'total' table")
    return ids


def nifti_stem(path: Path) -> str:
    """File name without .nii.gz / .nii."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def is_totalseg_folder(path: Path) -> bool:
    return path.is_dir() and (path / TOTALSEG_IMAGE).is_file()


@dataclass(frozen=True)
class NiftiSource:
    """One case to convert."""

    image: Path
    """The NIfTI CT volume (HU after scl_slope/scl_inter)."""
    labels: Path | None
    """A NIfTI label map on the image's grid, or None."""
    mask_folder: Path | None
    """TotalSegmentator `segmentations/` folder of per-structure masks, or None."""
    case_id: str
    patient_id: str
    conversion: dict = field(default_factory=dict, compare=False)
    """The arguments that convert it (tcsmae.store.repair.conversion_arguments), recorded for repairs."""
    structure_ids: Path | None = None
    """--structure-ids: id -> name JSON for the masks' ids (None: the totalsegmentator package's)."""

    def files(self) -> list[Path]:
        """Every file whose bytes define the case (for the source digest)."""
        out = [self.image]
        if self.labels is not None:
            out.append(self.labels)
        if self.mask_folder is not None:
            out += sorted(self.mask_folder.glob("*.nii*"))
            if self.structure_ids is not None:
                out.append(self.structure_ids)
        return out


def make_source(source: Path, labels: Path | None = None, case_id: str | None = None,
                patient_id: str | None = None, structure_ids: Path | None = None) -> NiftiSource:
    """Resolve a command-line/manifest source into a NiftiSource (UserError when unusable)."""

    source = Path(source)
    if not source.exists():
        raise UserError(f"source {source} does not exist; give a .nii/.nii.gz file or a folder holding {TOTALSEG_IMAGE}")
    mask_folder = None
    if source.is_dir():
        if not is_totalseg_folder(source):
            raise UserError(f"folder {source} holds no {TOTALSEG_IMAGE}: a NIfTI source is a .nii(.gz) file or a "
                            f"TotalSegmentator case folder ({TOTALSEG_IMAGE} + {TOTALSEG_MASKS}/); DICOM folders "
                            "go to `tcsmae convert`")
        image = source / TOTALSEG_IMAGE
        if (source / TOTALSEG_MASKS).is_dir():
            mask_folder = source / TOTALSEG_MASKS
            if labels is not None:
                raise UserError(f"{source} is a TotalSegmentator folder with {TOTALSEG_MASKS}/ and --labels "
                                f"{labels} was given too: use one or the other")
        default_id = source.resolve().name
    else:
        if not source.name.endswith(NIFTI_SUFFIXES):
            raise UserError(f"source {source} is not a NIfTI file (.nii or .nii.gz)")
        image = source
        default_id = nifti_stem(source)
    if labels is not None and not Path(labels).is_file():
        raise UserError(f"labels {labels} does not exist")
    cid = case_id or default_id
    try:
        check_case_id(cid)
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None

    if mask_folder is not None:
        totalsegmentator_ids(structure_ids)  # fail before any work when no table can be had
    table = None if mask_folder is None or structure_ids is None else Path(structure_ids)
    conversion = conversion_arguments("convert-nifti", [source], labels, case_id, patient_id)
    if table is not None:
        conversion["structure_ids"] = str(table.resolve())
    return NiftiSource(image, None if labels is None else Path(labels), mask_folder, cid, patient_id or "",
                       conversion, table)


def source_digest(src: NiftiSource) -> str:
    """sha256 over (relative name, bytes) of every source file: changes when any input changes."""
    h = hashlib.sha256()
    for f in src.files():
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _load(path: Path):
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for bad files
        raise UserError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    if not (len(img.shape) == 3 or (len(img.shape) == 4 and img.shape[3] == 1)):
        raise UserError(f"{path}: expected a 3-D volume, got shape {img.shape}")
    return img


def read_image(path: Path):
    """HU volume of a NIfTI file in the store layout.

    Returns (hu (Z, Y, X) int16 if the values are exact integers in range else float32,
    Hounsfield units; Geometry).
    """

    img = _load(path)
    try:
        hu, geom = nifti_to_store_grid(img)
    except (OSError, EOFError, ValueError) as exc:  # truncated gzip, bad data
        raise UserError(f"{path}: cannot read the voxel data ({type(exc).__name__}: {exc})") from None
    dtype = storage_dtype(hu)
    return (hu if hu.dtype == dtype else hu.astype(dtype)), geom


def read_label_map(path: Path, shape: tuple[int, int, int], geom) -> np.ndarray:
    """A NIfTI label map brought onto the image grid (exact reorientation, no resampling).

    shape, geom: the image's (Z, Y, X) shape and Geometry. UserError when the label map is on
    another grid or holds non-integer values. Returns (Z, Y, X) int64 label ids.
    """

    img = _load(path)
    try:
        lab, lgeom = nifti_to_store_grid(img)
    except (OSError, EOFError, ValueError) as exc:
        raise UserError(f"{path}: cannot read the voxel data ({type(exc).__name__}: {exc})") from None
    why = grid_mismatch(shape, geom, lab.shape, lgeom)
    if why is not None:
        raise UserError(f"label map {path} is not on its image's grid ({why}); labels are never resampled: "
                        "give the label map made for this image")
    if not np.issubdtype(lab.dtype, np.integer):
        if not np.all(np.isfinite(lab)) or not np.array_equal(lab, np.rint(lab)):
            raise UserError(f"label map {path} holds non-integer values (dtype {lab.dtype}); give an integer label map")
    if lab.size and lab.min() < 0:
        raise UserError(f"label map {path} holds negative ids (min {lab.min()}); label ids must be >= 0")
    return lab.astype(np.int64)


def combine_totalseg_masks(folder: Path, shape: tuple[int, int, int], geom,
                           structure_ids: Path | None = None) -> tuple[np.ndarray, list[str]]:
    """One label map from TotalSegmentator's per-structure masks.

    folder: `segmentations/` with `<structure>.nii.gz` binary masks on the image grid.
    structure_ids: the id table (see totalsegmentator_ids).
    Returns (labels (Z, Y, X) uint8 with the table's ids, warnings).
    Voxels claimed by several masks get the higher id (files are applied in id order).
    """
    ids = totalsegmentator_ids(structure_ids)
    files = sorted(p for p in folder.iterdir() if p.name.endswith(NIFTI_SUFFIXES))
    known = sorted((ids[nifti_stem(p)], p) for p in files if nifti_stem(p) in ids)
    unknown = [p.name for p in files if nifti_stem(p) not in ids]
    out = np.zeros(shape, np.uint8)
    overlap = 0
    for label_id, path in known:
        mask = read_label_map(path, shape, geom) > 0
        overlap += int(np.count_nonzero(mask & (out > 0)))
        out[mask] = label_id
    warnings = []
    if unknown:
        warnings.append(f"{len(unknown)} mask file(s) in {folder.name}/ with names not in the TotalSegmentator "
                        f"'total' table were skipped: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    if overlap:
        warnings.append(f"{overlap} voxels lie in more than one mask; the higher label id was kept")
    if not known:
        warnings.append(f"no known structure masks in {folder}; the label map is empty")
    return out, warnings


def case_arrays(src: NiftiSource, source_sha256: str) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Read one case: (hu (Z, Y, X), labels (Z, Y, X) or None, store attributes).

    source_sha256: source_digest(src), computed once by the caller (it hashes every file)."""
    hu, geom = read_image(src.image)
    warnings = list(geom.warnings)
    if hu.dtype.kind == "f":
        bad = ~np.isfinite(hu)
        if bad.any():  # NaN/inf would poison every window and loss downstream
            hu[bad] = NONFINITE_HU
            warnings.append(f"{int(bad.sum())} non-finite voxels (NaN/inf) in {src.image.name} set to {NONFINITE_HU:g} HU")
    labels = None
    if src.labels is not None:
        labels = read_label_map(src.labels, hu.shape, geom)
    elif src.mask_folder is not None:
        labels, w = combine_totalseg_masks(src.mask_folder, hu.shape, geom, src.structure_ids)
        warnings += w
    if hu.size and (hu.min() < -1200 or hu.max() > 4000):
        warnings.append(f"HU range {hu.min():.0f}..{hu.max():.0f} is implausible for CT: is {src.image.name} "
                        "in Hounsfield units?")
    attrs = geom.to_attrs()
    attrs.update({
        "patient_id": src.patient_id,
        "study_uid": "",
        "series_uid": "",
        "source_sha256": source_sha256,
        "warnings": warnings,
        "source_format": "nifti",
        "source_files": len(src.files()),
        "source_first_file": str(src.image),
    })
    if src.labels is not None:
        attrs["labels_source"] = str(src.labels)
    if src.mask_folder is not None:
        attrs["labels_source"] = str(src.mask_folder)
        attrs["label_table"] = "totalsegmentator-total"
    return hu, labels, attrs


def convert_sources(sources: list[NiftiSource], out: Path, codec: str = "zstd", overwrite: bool = False,
                    progress: bool = True) -> dict[str, list]:
    """Convert each source into the store at `out`, one case each.

    Returns {"converted": [case_id], "skipped": [(case_id, why)], "failed": [(case_id, why)]}.
    A failing case (bad file, label map on another grid) does not stop the others.
    """
    from tqdm import tqdm

    result: dict[str, list] = {"converted": [], "skipped": [], "failed": []}
    seen: dict[str, Path] = {}
    no_bar = None if progress else True  # None: a bar on a terminal only, none in logs (as `tcsmae convert`)
    with StoreWriter(out, codec=codec, discard_if_empty=True) as writer:
        for src in tqdm(sources, desc="convert-nifti", unit="case", disable=no_bar):
            if src.case_id in seen:
                result["failed"].append((src.case_id, f"{src.image}: case id also used by {seen[src.case_id]}; "
                                                      "give distinct --case-id / manifest case_id"))
                continue
            seen[src.case_id] = src.image
            try:
                digest = source_digest(src)
                existing = writer.source_sha256(src.case_id)
                if existing is not None and not overwrite:
                    if existing != digest:
                        raise UserError(f"case {src.case_id} is already in {out} from another source; pass "
                                        "--overwrite to replace it, or choose another --case-id")
                    damage = writer.damage_report(src.case_id)
                    if damage:
                        raise UserError(f"case {src.case_id} is {damage}")
                    result["skipped"].append((src.case_id, "up to date (same source digest)"))
                    continue
                hu, labels, attrs = case_arrays(src, digest)  # decoded before the case is replaced
                if src.conversion:
                    attrs["conversion"] = dict(src.conversion, codec=codec)
                writer.write_case(src.case_id, hu, attrs, labels=labels, source=str(src.image))
                result["converted"].append(src.case_id)
            except UserError as exc:
                result["failed"].append((src.case_id, str(exc)))
            except MemoryError:
                result["failed"].append((src.case_id, f"{src.image}: out of memory reading the volume"))
    return result


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    parser.add_argument("sources", nargs="*", type=Path,
                        help="NIfTI image files or TotalSegmentator case folders (ct.nii.gz + segmentations/)")
    parser.add_argument("-o", "--output", "--out", dest="out", required=True, type=Path,
                        help="output store OUT.zarr (created or extended)")
    parser.add_argument("--labels", type=Path, help="NIfTI label map on the image's grid (one source only)")
    parser.add_argument("--case-id", help="case id (one source only; default: file name without .nii.gz, or folder name)")
    parser.add_argument("--patient-id", help="patient id to record (one source only; folds split by patient)")
    parser.add_argument("--manifest", type=Path, help="CSV with columns source, labels, case_id, patient_id")
    parser.add_argument("--structure-ids", type=Path, metavar="FILE.json",
                        help="TotalSegmentator's label id -> structure name table ('total' task) for case folders "
                             "with segmentations/ (default: the installed totalsegmentator package's)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild cases already in the store")
    parser.add_argument("--codec", choices=("zstd", "lz4", "none"), default="zstd",
                        help="chunk compression (default zstd; lz4 is what GPU decompression reads)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _sources_from_args(args) -> list[NiftiSource]:
    single_only = [name for name in ("labels", "case_id", "patient_id") if getattr(args, name)]
    if args.manifest is not None:
        if args.sources or single_only:
            raise UserError("--manifest lists the sources: do not also give sources, --labels, --case-id or --patient-id")

        return [make_source(r.source, r.labels, r.case_id, r.patient_id, args.structure_ids)
                for r in read_manifest(args.manifest)]
    if not args.sources:
        raise UserError("nothing to convert: give NIfTI files / case folders, or --manifest FILE.csv")
    if single_only and len(args.sources) != 1:
        raise UserError(f"--{single_only[0].replace('_', '-')} applies to one source, but {len(args.sources)} were "
                        "given; use --manifest for several")
    return [make_source(s, args.labels, args.case_id, args.patient_id, args.structure_ids) for s in args.sources]


def run(args) -> int:
    sources = _sources_from_args(args)
    result = convert_sources(sources, args.out, codec=args.codec, overwrite=args.overwrite,
                             progress=not args.no_progress)
    print(f"{'case':<30} status")
    for cid in result["converted"]:
        print(f"{cid:<30} converted")
    for cid, why in result["skipped"]:
        print(f"{cid:<30} skipped: {why}")
    for cid, why in result["failed"]:
        print(f"{cid:<30} FAILED: {why}")
    n_ok = len(result["converted"]) + len(result["skipped"])
    not_created = "" if args.out.exists() else " (not created: nothing converted)"
    print(f"{len(result['converted'])} converted, {len(result['skipped'])} up to date, "
          f"{len(result['failed'])} failed -> {args.out}{not_created}")
    if not result["failed"]:
        return 0
    return 3 if n_ok else 1


if __name__ == "__main__":
    sys.exit(script_main("tcsmae.convert.nifti_to_zarr", "nifti_to_zarr.py"))
