"""The ``reshuffle`` command line: ``reshuffle <command> --help`` for each command."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from reshuffle import __version__
from reshuffle.commands import compare, plan, report, run, simulate, slurm, verify
from reshuffle.config import ConfigWarning
from reshuffle.errors import ReshuffleError

COMMANDS = (run, compare, report, slurm, plan, simulate, verify)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reshuffle",
        description="Data shuffling strategies for data-parallel training, made real and comparable.",
    )
    parser.add_argument("--version", action="version", version=f"reshuffle {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``reshuffle`` console script; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come before or after options (argparse stops collecting
    # positionals at the first option); anything else unknown is an error.
    unknown = [token for token in extra if "=" not in token or token.startswith("-")]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return int(args.run(args) or 0)
    except (ReshuffleError, ValueError, FileNotFoundError, ImportError) as error:
        # Bad input: one clear line, no traceback. Anything else is a bug and keeps its traceback.
        print(f"reshuffle: error: {error}", file=sys.stderr)
        return 2


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A setting without effect is one line, as errors are; other warnings keep Python's format."""
    if issubclass(category, ConfigWarning):
        print(f"reshuffle: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


if __name__ == "__main__":
    sys.exit(main())
