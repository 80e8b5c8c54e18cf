"""`tcsmae phantom`: write synthetic chest CT series (DICOM, NIfTI label maps, manifest.csv)."""

from __future__ import annotations

from pathlib import Path

from tcsmae.phantom.anatomy import PhantomConfig
from tcsmae.phantom.dicom import write_phantom
from tcsmae.settings import add_flags, apply_settings, flag_overrides

HELP = "write synthetic chest CT series (DICOM + NIfTI labels + manifest.csv), the embedded default data"


def add_arguments(parser) -> None:
    parser.add_argument("-o", "--output", "--out", dest="out", required=True, type=Path, help="output folder")
    add_flags(parser, PhantomConfig)
    parser.add_argument("--overwrite", action="store_true", help="replace a phantom already in the output folder")


def run(args) -> int:
    cfg = apply_settings(PhantomConfig(), flag_overrides(args, PhantomConfig), "command-line flags")
    cases = write_phantom(cfg, args.out, overwrite=args.overwrite)
    print(f"{'case':<14}{'patient':<18}{'slices':>7}{'size':>10}{'contrast':>10}{'lesions':>9}{'masses':>8}")
    for c in cases:
        print(f"{c.case_id:<14}{c.patient_id:<18}{cfg.slices:>7}{cfg.size:>5}x{cfg.size:<4}"
              f"{c.contrast_hu:>10.0f}{c.n_lesions:>9}{c.n_masses:>8}")
    print(f"wrote {len(cases)} series to {args.out / 'dicom'}, labels to {args.out / 'labels'}, "
          f"manifest {args.out / 'manifest.csv'}")
    return 0
