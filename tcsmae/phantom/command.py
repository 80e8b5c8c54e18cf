"""TODO docstring."""

from __future__ import annotations

from pathlib import Path

from tcsmae.phantom.anatomy import PhantomConfig
from tcsmae.phantom.dicom import write_phantom

HELP = "write synthetic chest CT series (DICOM + NIfTI labels + manifest.csv), the embedded default data"


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    parser.add_argument("-o", "--output", "--out", dest="out", required=True, type=Path, help="output folder")
    parser.add_argument("--cases", type=int, default=8, help="number of cases (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", type=int, default=128, help="rows = columns in pixels (default 128; 512 = 0.7 mm pixels)")
    parser.add_argument("--slices", type=int, default=24, help="slices per series (default 24)")
    parser.add_argument("--slice-mm", type=float, default=5.0, help="slice spacing in mm (default 5.0)")
    parser.add_argument("--noise-hu", type=float, default=15.0, help="image noise standard deviation in HU (default 15)")
    parser.add_argument("--overwrite", action="store_true", help="replace a phantom already in the output folder")


def run(args) -> int:
    cfg = PhantomConfig(cases=args.cases, seed=args.seed, size=args.size, slices=args.slices,
                        slice_mm=args.slice_mm, noise_hu=args.noise_hu)
    cases = write_phantom(cfg, args.out, overwrite=args.overwrite)
    print(f"{'case':<14}{'patient':<18}{'slices':>7}{'size':>10}{'contrast':>10}{'lesions':>9}{'masses':>8}")
    for c in cases:
        print(f"{c.case_id:<14}{c.patient_id:<18}{cfg.slices:>7}{cfg.size:>5}x{cfg.size:<4}"
              f"{c.contrast_hu:>10.0f}{c.n_lesions:>9}{c.n_masses:>8}")
    print(f"wrote {len(cases)} series to {args.out / 'dicom'}, labels to {args.out / 'labels'}, "
          f"manifest {args.out / 'manifest.csv'}")
    return 0
