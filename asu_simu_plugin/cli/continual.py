"""`asu-simu continual`: unlearn a forget split task after task through the harness, and score
every earlier task again after each step.

    asu-simu continual --harness OPEN_UNLEARNING_DIR --model TARGET --work runs/continual \\
        --forget-split forget10 --retain-split retain90 --tasks 10 --trainer NPO \\
        [--reference previous|original] [--retain-logs RETAIN_TOFU_EVAL.json] \\
        [--train-override KEY=VALUE ...] [--eval-override KEY=VALUE ...]

Step k runs the harness's `src/train.py` on task k from step k-1's saved model, with the retain
split plus the forget rows of tasks k+1..K as its retain set, then `src/eval.py` on every task.
Results in --work: continual.csv (one row per step x task), continual.md, continual.png; each
step's model, logs and scores in step_NN/. A rerun skips finished steps. docs/continual.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from asu_simu_plugin.cli import UsageError
from asu_simu_plugin.cli.checks import positive_int


def add_arguments(parser) -> None:
    parser.add_argument(
        "--harness",
        type=Path,
        default=os.environ.get("OPEN_UNLEARNING_SRC"),
        help="open-unlearning checkout (default: $OPEN_UNLEARNING_SRC)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="folder holding locuslab/TOFU/ as JSON lines (default: --harness)",
    )
    parser.add_argument("--model", required=True, type=Path, help="the starting model folder")
    parser.add_argument("--work", required=True, type=Path, help="step folders and the report")
    parser.add_argument("--forget-split", default="forget10", help="the split cut into tasks")
    parser.add_argument("--retain-split", default="retain90", help="every step's retain rows")
    parser.add_argument("--holdout-split", default=None, help="default: the forget split's")
    parser.add_argument(
        "--tasks",
        type=positive_int,
        default=None,
        help="number of tasks (whole entities each); default: one per task_id value",
    )
    parser.add_argument(
        "--entity-size", type=positive_int, default=20, help="rows per entity (TOFU: per author)"
    )
    parser.add_argument("--task-key", default="task_id", help="a column that names the tasks")
    parser.add_argument("--experiment", default="unlearn/tofu/default", help="harness experiment")
    parser.add_argument(
        "--trainer", default=None, help="harness trainer config (default: the experiment's)"
    )
    parser.add_argument(
        "--model-config", default="Llama-3.2-1B-Instruct", help="harness model config"
    )
    parser.add_argument(
        "--reference",
        choices=["previous", "original"],
        default="previous",
        help="the frozen reference / ASU teacher of step k: step k-1's model (as the official "
        "continual scripts run) or the starting model",
    )
    parser.add_argument(
        "--retain-logs", type=Path, default=None, help="the retain model's TOFU_EVAL.json"
    )
    parser.add_argument(
        "--start-eval",
        type=Path,
        default=None,
        help="the starting model's evaluation folder, made with the same evaluation (step 0)",
    )
    parser.add_argument(
        "--train-override", action="append", default=[], metavar="KEY=VALUE", help="src/train.py"
    )
    parser.add_argument(
        "--eval-override", action="append", default=[], metavar="KEY=VALUE", help="src/eval.py"
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="cpu adds the harness's CPU settings (float32, no bf16)",
    )
    parser.add_argument(
        "--python", default=os.environ.get("HARNESS_PY") or sys.executable, help="harness Python"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start again in a --work that holds a run with other settings",
    )


def run(args) -> int:
    from asu_simu_plugin.continual.driver import ContinualError, Driver, Settings, plan

    if args.harness is None:
        raise UsageError("no harness: pass --harness DIR or set OPEN_UNLEARNING_SRC")
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = Settings(
        harness=args.harness,
        data=args.data or args.harness,
        model=args.model,
        work=args.work,
        tasks=args.tasks,
        forget_split=args.forget_split,
        retain_split=args.retain_split,
        holdout_split=args.holdout_split,
        entity_size=args.entity_size,
        task_key=args.task_key,
        experiment=args.experiment,
        trainer=args.trainer,
        model_config=args.model_config,
        train_overrides=args.train_override,
        eval_overrides=args.eval_override,
        reference=args.reference,
        retain_logs=args.retain_logs,
        start_eval=args.start_eval,
        device=device,
        python=args.python,
        overwrite=args.overwrite,
    )
    try:
        checked = plan(settings)
    except ContinualError as error:
        raise UsageError(str(error)) from None
    result = Driver(checked).run()
    print(f"report: {result['md']} (+ {Path(result['csv']).name}, {Path(result['png']).name})")
    return 0
