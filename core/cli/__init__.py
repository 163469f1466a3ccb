"""The ``moerun`` command line: `parser` (arguments and their values), `info` (the commands
that read: backends, models, plugins, predict, compare, report), `measure` (`moerun`
itself and `moerun study`) and `routing` (`moerun routing record` and `show`).

``moerun`` alone runs the default study: the `small-moe` preset and its dense twins (active,
total and iso-memory) on every available backend. Errors print one line and exit with code 2 (``--debug`` for the
traceback); a study in which some point failed exits with code 1.
"""

from __future__ import annotations

import sys
from typing import Sequence

from ..errors import MoerunError
from .parser import build_parser

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        from ..manager import get_plugin_manager

        plugins = get_plugin_manager()
        args = build_parser().parse_args(argv)
        from .info import cmd_backends, cmd_compare, cmd_dispatch, cmd_explain, cmd_models, cmd_plugins, cmd_predict, cmd_report
        from .measure import cmd_run, cmd_study
        from .routing import cmd_routing

        commands = {"backends": cmd_backends, "models": cmd_models, "plugins": cmd_plugins, "report": cmd_report,
                    "compare": cmd_compare, "predict": cmd_predict, "study": cmd_study, "explain": cmd_explain,
                    "dispatch": cmd_dispatch,
                    "routing": cmd_routing}
        return commands.get(args.command, cmd_run)(plugins, args)
    except MoerunError as exc:
        if debug:
            raise
        print(f"moerun: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moerun: interrupted; finished points are saved, rerun with the same --output to resume",
              file=sys.stderr)
        return 130
