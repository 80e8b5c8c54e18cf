"""The `tcsmae` console command: one subcommand per module (the COMMANDS table).

Each subcommand's module defines `HELP: str` (one line for `tcsmae --help`),
`add_arguments(parser) -> None` (fills an argparse sub-parser) and `run(args) -> int` (does
the work, returns the exit code). A subcommand imports only its own module, and those
modules keep heavy imports (torch, DALI) inside functions, not at module top, so that
`tcsmae --help` and the data-side commands do not pay for importing them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from tcsmae.errors import run_command

# subcommand -> module. Order is the order shown in --help.
COMMANDS: dict[str, str] = {
    "phantom": "tcsmae.phantom.command",
    "convert": "tcsmae.convert.dicom_to_zarr",
    "convert-nifti": "tcsmae.convert.nifti_to_zarr",
    "info": "tcsmae.store.info",
    "preview": "tcsmae.pipelines.preview",
    "pretrain": "tcsmae.pretrain.command",
    "export": "tcsmae.pretrain.export",
    "finetune": "tcsmae.finetune.command",
    "predict": "tcsmae.finetune.predict",
    "report": "tcsmae.finetune.report",
    "recon-ssim": "tcsmae.pretrain.recon_ssim",
    "visualize": "tcsmae.finetune.visualize",
    "bench": "tcsmae.bench",
    "ablate": "tcsmae.ablate.command",
}


def _own_dirs() -> tuple[str, ...]:
    """Folders of tcsmae's three packages (convert/ and pipelines/ may live apart, editable),
    found without importing them."""
    return tuple(os.path.abspath(folder) + os.sep
                 for name in ("tcsmae", "tcsmae.convert", "tcsmae.pipelines")
                 for folder in importlib.util.find_spec(name).submodule_search_locations)


def _load(name: str):
    return importlib.import_module(COMMANDS[name])


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with `only`, just that subcommand gets its arguments (lazy import)."""
    parser = argparse.ArgumentParser(
        prog="tcsmae",
        description="TCS-MAE: self-supervised segmentation pretraining on chest CT.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, add_help=False)
            continue
        try:
            module = _load(name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("tcsmae"):
                continue  # subcommand not built yet in this checkout
            raise
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    only = first if first in COMMANDS else None
    parser = build_parser(only)
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    import warnings

    def show_warning(message, category, filename, lineno, file=None, line=None):
        # users see the message, not a source line; library deprecation noise keeps its origin
        text = (f"tcsmae {args.command}: warning: {message}" if issubclass(category, UserWarning)
                and os.path.abspath(filename).startswith(own) else
                warnings.formatwarning(message, category, filename, lineno, line).rstrip())
        print(text, file=file or sys.stderr)

    own = _own_dirs()
    previous = warnings.showwarning
    if previous is getattr(warnings, "_showwarning_orig", previous):  # not when a test records them
        warnings.showwarning = show_warning
    try:
        return run_command(args._run, args, f"tcsmae {args.command}")
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":
    sys.exit(main())
