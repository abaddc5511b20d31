"""The command-line options every mini benchmark shares: where, how hard, which rows (methods
and --variant rows), their learning rates and seeds, and the device."""

from __future__ import annotations

import os
from pathlib import Path

# the common learning-rate grid, unless a benchmark sets its own (`p.set_defaults(grid=...)`)
DEFAULT_GRID = "5e-5,1e-4,2e-4"
HARNESS_FINETUNE_LR = 1e-5  # configs/experiment/finetune/tofu/default.yaml


def add_run_arguments(p, methods, defaults=None, headline=(), curves=None):
    """The options every mini benchmark shares: where, how hard, which methods, which device."""
    defaults = methods if defaults is None else defaults
    curves = curves or {}
    p.add_argument("--work", required=True, type=Path, help="models, logs, evals, stage markers")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    p.add_argument("--harness", type=Path, default=os.environ.get("OPEN_UNLEARNING_SRC"))
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8, help="per device, forget and retain each")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument(
        "--simu-ig-steps",
        type=int,
        default=5,
        help="SIMU's integrated-gradients steps (the paper's m = 5; per-answer-token attribution\n"
        "costs answer tokens x layers x steps single-token passes, see benchmarks/perf)",
    )
    p.add_argument("--methods", nargs="+", default=list(defaults), choices=list(methods))
    p.add_argument(
        "--grid",
        default=DEFAULT_GRID,
        help="learning rates every row runs at (seed 0) before one is kept by the selection rule;\n"
        "'default': each method's own rate (scaled by --finetune-lr / 1e-5), no grid",
    )
    p.add_argument(
        "--utility-floor",
        type=float,
        default=0.9,
        help="selection rule: the rate that forgets most (by the forget score) among those keeping\n"
        "utility >= this x the target's (none: the rate with the highest utility)",
    )
    p.add_argument("--seeds", default="0,1,2", help="seeds of the --headline rows")
    p.add_argument(
        "--headline",
        nargs="*",
        default=None,
        help="rows run at every seed at their selected rate (the others: the first seed only);\n"
        f"default: those of {', '.join(headline)} that run",
    )
    p.set_defaults(headline_rows=list(headline))
    p.add_argument(
        "--curve",
        action="append",
        default=[],
        metavar="ROW=LR[,LR]",
        help="extra rates (first seed) drawing ROW's utility-vs-forgetting curve for the\n"
        "equal-forgetting comparison, never selected; 'ROW=' for none. Default: "
        + (
            "; ".join(f"{r}={','.join(f'{v:g}' for v in lrs)}" for r, lrs in curves.items())
            or "none"
        ),
    )
    p.set_defaults(default_curves=dict(curves))
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=VALUE")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=METHOD:OVERRIDE[,OVERRIDE]",
        help="an extra row: METHOD with harness overrides, e.g.\n"
        "ASU_tau1.5=ASU:trainer.method_args.temperature=1.5",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop every finetune and unlearning run after this many steps (smoke checks)",
    )
    p.add_argument(
        "--no-teachers",
        dest="teachers",
        action="store_false",
        help="do not score an ASU row's forget-teacher (one evaluation per ASU row saved)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--redo", action="append", default=[], metavar="STAGE")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="write the report of what has finished (rows whose grid is done) and stop",
    )


def finish_run_arguments(p, args, methods):
    """Check the harness; rows (--methods, --variant), their rates (--grid, --lr), seeds, device."""
    if args.harness is None or not (Path(args.harness) / "src" / "train.py").is_file():
        p.error(
            "the harness was not found: set OPEN_UNLEARNING_SRC to an open-unlearning checkout "
            "(or pass --harness DIR); one is made by shared/tools/harness-env DEST"
        )
    args.harness = Path(args.harness).resolve()
    args.work = args.work.resolve()
    args.variants = {}
    for item in args.variant:
        name, _, rest = item.partition("=")
        method, _, overrides = rest.partition(":")
        if not name or method not in methods or name in methods:
            p.error(
                f"--variant {item}: use NEW_NAME=METHOD:override,... with METHOD in {list(methods)}"
            )
        args.variants[name] = (method, [o for o in overrides.split(",") if o])
    args.rows = [*args.methods, *args.variants]
    scale = args.finetune_lr / HARNESS_FINETUNE_LR
    default_rate = {m: lr * scale for m, (_, _, lr) in methods.items()}
    if args.grid.strip() == "default":
        args.rates = {r: [default_rate[args.variants.get(r, (r,))[0]]] for r in args.rows}
    else:
        grid = number_list(p, "--grid", args.grid, float)
        if any(lr <= 0 for lr in grid):
            p.error(f"--grid {args.grid}: learning rates must be > 0")
        args.rates = {r: grid for r in args.rows}
    for item in args.lr:
        method, _, value = item.partition("=")
        if method not in args.rows:
            p.error(f"--lr {item}: {method!r} is not a row; rows: {', '.join(args.rows)}")
        rates = number_list(p, "--lr", value, float)
        if len(rates) != 1:
            p.error(f"--lr {item}: one rate per row (a grid for all rows is --grid)")
        args.rates[method] = rates
    args.given_rates = sorted({item.partition("=")[0] for item in args.lr})
    args.seeds = number_list(p, "--seeds", args.seeds, int)
    args.curves = {r: lrs for r, lrs in args.default_curves.items() if r in args.rows}
    for item in args.curve:
        row, _, values = item.partition("=")
        if row not in args.rows:
            p.error(f"--curve {item}: {row!r} is not a row; rows: {', '.join(args.rows)}")
        args.curves[row] = number_list(p, "--curve", values, float) if values.strip() else []
    args.curves = {
        row: [lr for lr in lrs if lr not in args.rates[row]] for row, lrs in args.curves.items()
    }
    if args.headline is None:
        args.headline = [row for row in args.headline_rows if row in args.rows]
    unknown = set(args.headline) - set(args.rows)
    if unknown:
        p.error(f"--headline {' '.join(sorted(unknown))}: not among the rows {args.rows}")
    if not 0 < args.utility_floor <= 1:
        p.error(f"--utility-floor {args.utility_floor}: use a share in (0, 1], e.g. 0.9")
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def number_list(p, option, text, kind):
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or len(set(values)) != len(values):
        p.error(f"{option} {text!r}: use distinct comma-separated numbers, e.g. {DEFAULT_GRID}")
    return values
