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
        "ASU / SIMU / Sophia unlearning without the harness",
    ),
    "tau-sweep": ("asu_simu_plugin.tau_sweep", "how the attention temperature affects a model"),
    "neurons": ("asu_simu_plugin.cli.neurons", "SIMU critical-neuron masks for several thresholds"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    top = argparse.ArgumentParser(prog="asu-simu", description=__doc__)
    top.add_argument(
        "command",
        choices=sorted(SUBCOMMANDS),
        metavar="COMMAND",
        help=", ".join(f"{k}: {v[1]}" for k, v in SUBCOMMANDS.items()),
    )
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    command = top.parse_args(argv[:1]).command
    module_name, help_text = SUBCOMMANDS[command]
    # Import only the chosen subcommand: each pulls in its own heavy dependencies.
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"asu-simu {command}", description=help_text)
    module.add_arguments(parser)
    code = int(module.run(parser.parse_args(argv[1:])) or 0)
    # Only after success: a failing rank must exit (torchrun then stops the others), not wait
    # at the closing barrier for ranks that never arrive.
    from asu_simu_plugin.runner import close_distributed

    close_distributed()
    return code


if __name__ == "__main__":
    sys.exit(main())
