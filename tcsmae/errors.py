"""The one exception type for user mistakes.

Raise `UserError` for anything the user can fix (a bad file, a wrong flag, an incomplete
store). Its message names the file, the value and the fix; the CLI prints it without a
traceback and exits with `exit_code`. `assert` is only for internal invariants.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the input or the command line; message says what and how to fix it."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def run_command(run, args, prog: str) -> int:
    """Call a subcommand's `run(args)`; a UserError becomes one line on stderr and its exit code."""
    import sys

    try:
        return int(run(args) or 0)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def script_main(module_name: str, prog: str, argv: list[str] | None = None) -> int:
    """Entry of `python convert/X.py ...`: the installed module's HELP, add_arguments and run
    (installed, so that worker processes can unpickle its functions)."""
    import argparse
    import importlib

    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=prog, description=module.HELP)
    module.add_arguments(parser)
    return run_command(module.run, parser.parse_args(argv), prog)
