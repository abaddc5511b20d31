"""`asu-simu`: the plugin's command line (demo, standalone unlearning, diagnostics).

Errors are one line on stderr: exit status 2 for bad usage (arguments, input files, the output
folder: all checked before a model is loaded), 1 for a failure while running. `--debug` (or
ASU_SIMU_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

from asu_simu_plugin import __version__

DEBUG_ENV = "ASU_SIMU_DEBUG"

# subcommand -> (module with add_arguments(parser) and run(args), one-line help)
SUBCOMMANDS = {
    "demo": ("asu_simu_plugin.cli.demo", "unlearn a fictitious author from a tiny model (offline)"),
    "unlearn": (
        "asu_simu_plugin.cli.unlearn",
        "ASU / SIMU / Sophia unlearning without the harness",
    ),
    "tau-sweep": ("asu_simu_plugin.cli.tau_sweep", "how the attention temperature affects a model"),
    "neurons": ("asu_simu_plugin.cli.neurons", "SIMU critical-neuron masks for several thresholds"),
    "continual": ("asu_simu_plugin.cli.continual", "continual unlearning through the harness"),
}


class UsageError(Exception):
    """Bad usage: a wrong argument, input file or output folder (exit status 2)."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's layout and shows every optional flag's default."""

    def _get_help_string(self, action):
        if action.required:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Usage errors become `UsageError` (one line), not argparse's usage block + exit."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


@contextlib.contextmanager
def usage_checks():
    """Errors raised inside (checks of arguments, inputs, outputs) are usage errors."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, TypeError, LookupError, OSError) as error:
        raise UsageError(one_line(error)) from error


def one_line(error: BaseException) -> str:
    if isinstance(error, KeyError) and error.args and isinstance(error.args[0], str):
        text = error.args[0]  # str(KeyError) would quote the message
    else:
        text = str(error)
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first or type(error).__name__


def debug_requested(argv) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    prog = "asu-simu"
    try:
        if argv and argv[0] in SUBCOMMANDS:
            prog = f"asu-simu {argv[0]}"
        return _main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if debug:
            raise
        usage = isinstance(error, (UsageError, *_usage_error_types()))
        hint = "" if usage else f" (--debug or {DEBUG_ENV}=1 shows the traceback)"
        print(f"{prog}: error: {one_line(error)}{hint}", file=sys.stderr)
        return 2 if usage else 1


def _usage_error_types() -> list[type]:
    """Errors about what the user asked for, wherever raised (loaded modules only: no imports)."""
    names = [
        ("asu_simu_plugin.output", "OutputError"),
        ("asu_simu_plugin.arguments", "MethodArgumentError"),
        ("asu_simu_plugin.data", "DataFormatError"),
    ]
    return [getattr(sys.modules[m], n) for m, n in names if m in sys.modules]


def _top_parser() -> Parser:
    top = Parser(
        prog="asu-simu",
        description=__doc__,
        epilog="`asu-simu COMMAND --help` lists the flags of a command.",
    )
    top.add_argument(
        "command",
        choices=sorted(SUBCOMMANDS),
        metavar="COMMAND",
        help="; ".join(f"{k}: {v[1]}" for k, v in SUBCOMMANDS.items()),
    )
    top.add_argument("--version", action="version", version=f"asu-simu {__version__}")
    top.add_argument(
        "--debug",
        action="store_true",
        help=f"show the traceback of an error (also: {DEBUG_ENV}=1); any position",
    )
    return top


def _main(argv) -> int:
    top = _top_parser()
    if not argv or argv[0] not in SUBCOMMANDS:
        if not argv:
            top.print_help(sys.stderr)
            return 2
        top.parse_args(argv[:1])  # --help, --version, or an unknown command (usage error)
        return 2
    command = argv[0]
    module_name, help_text = SUBCOMMANDS[command]
    # Import only the chosen subcommand: each pulls in its own heavy dependencies.
    module = importlib.import_module(module_name)
    parser = Parser(
        prog=f"asu-simu {command}",
        description=module.__doc__ or help_text,
        epilog=getattr(module, "EPILOG", None),
    )
    module.add_arguments(parser)
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the traceback of an error (also: {DEBUG_ENV}=1)",
    )
    args = parser.parse_args(argv[1:])
    code = int(module.run(args) or 0)
    # Only after success: a failing rank must exit (torchrun then stops the others), not wait
    # at the closing barrier for ranks that never arrive.
    from asu_simu_plugin.guards import close_distributed

    close_distributed()
    return code


if __name__ == "__main__":
    sys.exit(main())
