"""`asu-simu`: the plugin's command line (demo, standalone unlearning, diagnostics)."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module with add_arguments(parser) and run(args), one-line help)
SUBCOMMANDS = {
    "demo": ("asu_simu_plugin.cli.demo", "unlearn a fictitious author from a tiny model (offline)"),
    "unlearn": (
        "asu_simu_plugin.cli.unlearn",
        "run ASU / SIMU / Sophia unlearning without the harness",
    ),
    "tau-sweep": ("asu_simu_plugin.tau_sweep", "measure how attention temperature affects a model"),
    "neurons": ("asu_simu_plugin.cli.neurons", "SIMU critical-neuron masks for several thresholds"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asu-simu", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(module=module)
        importlib.import_module(module).add_arguments(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    result = importlib.import_module(args.module).run(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
