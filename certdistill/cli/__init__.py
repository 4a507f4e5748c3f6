"""Command-line interface: ``certdistill demo | train | distill | certify | report | verify |
export``.

Run ``certdistill <command> --help`` (or ``python -m certdistill <command> --help``) for the
options of each command. Errors in arguments or data are reported as one line on stderr,
``certdistill: error: ...``, with exit status 2 (arguments) or 1 (files, data, models);
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from certdistill.cli._args import ArgumentParser, CLIError, UsageError, positive_int

__all__ = ["CLIError", "build_parser", "main"]

#: Errors that come from the user's arguments, files or data (the library raises ValueError or
#: TypeError for bad inputs, OSError for files); anything else is a bug and keeps its traceback.
USER_ERRORS = (CLIError, ValueError, TypeError, OSError)


def build_parser() -> ArgumentParser:
    """The argument parser of the ``certdistill`` command.

    Returns
    -------
    ArgumentParser
    """
    from certdistill._version import __version__
    from certdistill.cli._certify import add_certify_parser, add_report_parser
    from certdistill.cli._demo import add_demo_parser
    from certdistill.cli._train import add_distill_parser, add_train_parser
    from certdistill.cli._verify import add_export_parser, add_verify_parser

    parser = ArgumentParser(
        prog="certdistill",
        description="Certified robustness and certified distillation: train, distil, certify "
        "and compare networks that are provably robust in an L-infinity ball.",
        epilog="Run 'certdistill <command> --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"certdistill {__version__}")
    common = ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    common.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="CPU threads of torch (default 1: the networks are small, so more "
        "threads gain little, and on a busy machine they can slow training "
        "down many times)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    for add in (
        add_demo_parser,
        add_train_parser,
        add_distill_parser,
        add_certify_parser,
        add_report_parser,
        add_verify_parser,
        add_export_parser,
    ):
        add(commands, [common])
    return parser


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Parameters
    ----------
    argv : sequence of str or None, default=None
        Arguments without the program name; ``None`` reads ``sys.argv[1:]``.

    Returns
    -------
    int
        Exit status: 0 on success, 1 for an error in files, data or models, 2 for an error in
        the arguments, 130 when interrupted.
    """
    try:
        args = build_parser().parse_args(None if argv is None else list(argv))
    except SystemExit as exit_:  # --help, --version, or an argument error already reported
        return exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    # Set here rather than left to OMP_NUM_THREADS: with two threads on a loaded 2-core machine
    # the demo's small MLP trained 20 times slower than with one. Restored for in-process callers.
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("certdistill: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        if args.debug:
            raise
        print(f"certdistill: error: {_one_line(error)}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1
    finally:
        torch.set_num_threads(threads)
