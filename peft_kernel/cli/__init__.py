"""The ``peft-kernel`` command line.

One module per command (``finetune``, ``merge``, ``inspect``, ``plugins``), each with
``add_parser(subparsers)`` and ``run(args) -> int``. Methods are found through the plugin
registry only; transformers and accelerate are imported inside the commands that use them.

Errors in the user's input print one line on stderr and exit with status 2. Set
``PEFT_KERNEL_DEBUG=1`` to get the full traceback of any error instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from . import finetune, inspect, merge, plugins
from ._common import ENV_DEBUG, CLIError

__all__ = ["CLIError", "build_parser", "main"]

COMMANDS = (finetune, merge, inspect, plugins)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-kernel", description="Parameter-efficient fine-tuning, plugin-based.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _one_line_warnings(message, category, filename, lineno, file=None, line=None) -> None:
    stream = file if file is not None else sys.stderr
    try:
        stream.write(f"warning: {' '.join(str(message).split())}\n")
    except (OSError, ValueError):
        pass


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    debug = os.environ.get(ENV_DEBUG) == "1"
    if not debug:
        warnings.showwarning = _one_line_warnings
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print(f"peft-kernel {args.command}: interrupted", file=sys.stderr)
        return 130
    except CLIError as exc:
        if debug:
            raise
        print(f"peft-kernel {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except Exception as exc:  # anything else still gets one line, not a traceback
        if debug:
            raise
        text = " ".join(str(exc).split()) or "(no message)"
        print(f"peft-kernel {args.command}: error: {type(exc).__name__}: {text} "
              f"(set {ENV_DEBUG}=1 for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
