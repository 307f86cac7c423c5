"""The ``qbackend`` command (also ``python -m qbackend``).

    qbackend demo [--quick] [--no-compile] [--presets nf4,int8] [--json]
    qbackend inspect MODEL_DIR_OR_FILE [--preset nf4|fp4|int4|int8|w8a8] [--plot FILE] [--json]
    qbackend bench [--quick] [--benchmarks DIR] [--results FILE] [--json]

Tables and progress go to the terminal (progress on stderr); ``--json`` prints one JSON document
on stdout instead. Errors the user can fix print one line and exit with status 2.

One module per command (:mod:`.demo_command`, :mod:`.inspect_command`, :mod:`.bench`); what
``inspect`` computes is in :mod:`.inspect`, the machine description of benchmark runs in
:mod:`.machine`, shared terminal output in :mod:`.common`.
"""

from .common import EXIT_USAGE, CLIError
from .main import build_parser, main

__all__ = ["EXIT_USAGE", "CLIError", "build_parser", "main"]
