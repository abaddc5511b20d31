"""Scores of a continual run, read back from its step folders: one CSV row per step × task, a
markdown summary and a PNG of the curves (the shape of the ASU paper's Figures 3 and 5: model
utility and forgetting after each unlearned task).

Each step's `src/eval.py` scores the whole forget split, so every task is scored after every
step. A task's scores are the harness's own per-row values (`TOFU_EVAL.json`'s
`value_by_index`) aggregated over that task's rows as the harness aggregates them over the split
(`HARNESS_SCORES`); its forget_quality is the harness's KS test between those rows' truth
ratios and the retain model's on the same rows. Over all rows these equal the harness's
`TOFU_SUMMARY.json` values. The ASU paper's Forget Efficacy per task uses the same formulas as
`eval=asu_paper` (`asu_simu_plugin.metrics.formulas`) on that evaluator's per-row values.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from asu_simu_plugin.metrics import formulas

STEP_FILE = "step.json"
TOFU_EVAL, TOFU_SUMMARY = "TOFU_EVAL.json", "TOFU_SUMMARY.json"
PAPER_EVAL, PAPER_SUMMARY = "ASU_PAPER_EVAL.json", "ASU_PAPER_SUMMARY.json"


def _mean(values):
    return math.fsum(values) / len(values)


def _closer_to_1(values):  # the harness's forget truth-ratio aggregate (closer_to_1_better)
    return _mean([min(v, 1 / (v + 1e-10)) for v in values])


# column: (metric in TOFU_EVAL.json, per-row field, aggregate), as the harness's TOFU metrics
HARNESS_SCORES = {
    "forget_Q_A_Prob": ("forget_Q_A_Prob", "prob", _mean),
    "forget_Q_A_ROUGE": ("forget_Q_A_ROUGE", "rougeL_recall", _mean),
    "forget_truth_ratio": ("forget_truth_ratio", "score", _closer_to_1),
    "extraction_strength": ("extraction_strength", "score", _mean),
}
# the paper's Forget Efficacy terms: (metric in ASU_PAPER_EVAL.json, per-row field, complement?)
PAPER_TERMS = {
    "forget_ROUGE": ("rougeL_recall", True),
    "forget_Probability": ("prob", True),
    "forget_Truth_Ratio": ("ratio", True),
    "forget_Entailment_Score": ("entailed", True),
    "forget_Token_Entropy": ("token_entropy", False),
}
STEP_SCORES = {  # the model's, not a task's: (summary file, key)
    "model_utility": (TOFU_SUMMARY, "model_utility"),
    "paper_model_utility": (PAPER_SUMMARY, "paper_model_utility"),
}
COLUMNS = [
    "step",
    "task",
    "status",
    "rows",
    "forget_quality",
    *HARNESS_SCORES,
    "paper_forget_efficacy",
    *STEP_SCORES,
]


def read_json(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _values(metric: dict | None, rows, field) -> list[float] | None:
    """The per-row values of `rows` (positions) present in a metric's value_by_index."""
    by_index = (metric or {}).get("value_by_index") or {}
    values = [by_index.get(str(i), {}).get(field) for i in rows]
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return values or None


def forget_quality(evals: dict, retain_evals: dict | None, rows) -> float | None:
    """The harness's forget_quality (ks_test) restricted to `rows`: KS p-value between the
    model's and the retain model's forget truth ratios on those rows."""
    if retain_evals is None:
        return None
    from scipy.stats import ks_2samp

    ours = _values(evals.get("forget_truth_ratio"), rows, "score")
    theirs = _values(retain_evals.get("forget_truth_ratio"), rows, "score")
    if not ours or not theirs:
        return None
    return float(ks_2samp(ours, theirs).pvalue)


def paper_forget_efficacy(paper_evals: dict | None, rows) -> float | None:
    """The paper's Forget Efficacy on `rows`: the harmonic mean of the forget terms the
    evaluator computed (a term left out there, e.g. entailment without an NLI model, is left
    out here too); None without the paper's evaluation or without those rows."""
    if not paper_evals:
        return None
    terms = []
    for name, (field, complement) in PAPER_TERMS.items():
        values = _values(paper_evals.get(name), rows, field)
        if values is None:
            continue
        if name == "forget_Truth_Ratio":
            value = formulas.truth_ratio(values, forget=True)
        else:
            value = formulas.mean(values)
        terms.append(1.0 - value if complement else value)
    return formulas.harmonic_mean(terms) if terms else None


def task_scores(eval_dir: Path, rows, retain_evals: dict | None) -> dict:
    """One task's scores from one evaluation folder."""
    eval_dir = Path(eval_dir)
    evals = read_json(eval_dir / TOFU_EVAL)
    paper = read_json(eval_dir / PAPER_EVAL) if (eval_dir / PAPER_EVAL).is_file() else None
    out = {"rows": len(rows), "forget_quality": forget_quality(evals, retain_evals, rows)}
    for column, (metric, field, aggregate) in HARNESS_SCORES.items():
        values = _values(evals.get(metric), rows, field)
        out[column] = None if values is None else float(aggregate(values))
    out["paper_forget_efficacy"] = paper_forget_efficacy(paper, rows)
    return out


def step_scores(eval_dir: Path) -> dict:
    out = {}
    for column, (file, key) in STEP_SCORES.items():
        path = Path(eval_dir) / file
        out[column] = read_json(path).get(key) if path.is_file() else None
    return out


def status(step: int, task: int) -> str:
    if step == 0:
        return "start"
    return "current" if task == step else "earlier" if task < step else "pending"


def collect(work: Path, tasks: list[dict], retain_logs: Path | None) -> list[dict]:
    """One row per finished step × task (`tasks`: tasks.json's entries), steps in order;
    a step without its marker ends the list (later ones cannot be finished)."""
    work = Path(work)
    retain_evals = read_json(retain_logs) if retain_logs else None
    out = []
    for step in range(len(tasks) + 1):
        folder = step_folder(work, step)
        if not (folder / STEP_FILE).is_file():
            break
        model = step_scores(folder / "eval")
        for task in tasks:
            scores = task_scores(folder / "eval", task["rows"], retain_evals)
            row = {"step": step, "task": task["task"], "status": status(step, task["task"])}
            out.append({**row, **scores, **model})
    return out


def step_folder(work: Path, step: int) -> Path:
    return Path(work) / f"step_{step:02d}"


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})


def relapses(rows: list[dict], key: str = "forget_Q_A_Prob") -> list[dict]:
    """Per task: its `key` right after its own step and the highest later value (does a
    forgotten entity come back?)."""
    out = []
    tasks = sorted({r["task"] for r in rows})
    for task in tasks:
        own = [r for r in rows if r["task"] == task and r["step"] == task]
        later = [r for r in rows if r["task"] == task and r["step"] > task and r[key] is not None]
        if not own or own[0][key] is None:
            continue
        worst = max(later, key=lambda r: r[key]) if later else None
        out.append(
            {
                "task": task,
                "own_step": own[0][key],
                "highest_later": None if worst is None else worst[key],
                "at_step": None if worst is None else worst["step"],
            }
        )
    return out


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-3 and value else f"{value:.3f}"
    return str(value)


def markdown(rows: list[dict], title: str, notes: list[str] = ()) -> str:
    """Per step: model utility, the current task's forgetting, the earlier tasks' (mean), and per
    task whether it came back after its own step."""
    lines = [f"# {title}", "", *[f"{n}\n" for n in notes]]
    lines += [
        "| step | model_utility | paper Model Utility | current task: forget prob. | "
        "forget_quality | paper Forget Efficacy | earlier tasks: mean forget prob. | "
        "mean forget_quality | tasks not yet unlearned: mean forget prob. |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for step in sorted({r["step"] for r in rows}):
        at = [r for r in rows if r["step"] == step]
        current = next((r for r in at if r["status"] == "current"), {})
        earlier = [r for r in at if r["status"] == "earlier"]
        pending = [r for r in at if r["status"] in ("pending", "start")]
        first = at[0]
        lines.append(
            "| "
            + " | ".join(
                _fmt(v)
                for v in (
                    step,
                    first["model_utility"],
                    first["paper_model_utility"],
                    current.get("forget_Q_A_Prob"),
                    current.get("forget_quality"),
                    current.get("paper_forget_efficacy"),
                    _mean_of(earlier, "forget_Q_A_Prob"),
                    _mean_of(earlier, "forget_quality"),
                    _mean_of(pending, "forget_Q_A_Prob"),
                )
            )
            + " |"
        )
    back = relapses(rows)
    if back:
        lines += [
            "",
            "Does a forgotten task come back? Forget probability right after its own step and "
            "its highest value at a later step:",
            "",
            "| task | after its step | highest later | at step |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {b['task']} | {_fmt(b['own_step'])} | {_fmt(b['highest_later'])} | "
            f"{_fmt(b['at_step'])} |"
            for b in back
        ]
    return "\n".join(lines) + "\n"


def _mean_of(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return _mean(values) if values else None


def plot(runs: dict[str, list[dict]], path: Path, title: str) -> None:
    """Three panels over the steps: model utility (and the paper's, if scored); the forget
    probability of each task (one line per task, or per run the mean over unlearned tasks when
    several runs are drawn); forget_quality likewise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    colors = plt.get_cmap("tab10")
    for i, (name, rows) in enumerate(runs.items()):
        steps = sorted({r["step"] for r in rows})
        first = {s: next(r for r in rows if r["step"] == s) for s in steps}
        for key, style in (("model_utility", "-"), ("paper_model_utility", ":")):
            ys = [first[s][key] for s in steps]
            if any(y is not None for y in ys):
                label = f"{name} {key}" if len(runs) > 1 else key
                axes[0].plot(steps, _none_to_nan(ys), style, marker="o", color=colors(i % 10),
                             label=label)  # fmt: skip
        for ax, key in ((axes[1], "forget_Q_A_Prob"), (axes[2], "forget_quality")):
            if len(runs) == 1:
                for j, task in enumerate(sorted({r["task"] for r in rows})):
                    ys = [next(r[key] for r in rows if r["step"] == s and r["task"] == task)
                          for s in steps]  # fmt: skip
                    ax.plot(steps, _none_to_nan(ys), marker=".", color=colors(j % 10),
                            label=f"task {task}")  # fmt: skip
                    if task in steps:  # its own step
                        own = ys[steps.index(task)]
                        ax.plot([task], _none_to_nan([own]), "o", ms=9, mfc="none",
                                color=colors(j % 10))  # fmt: skip
            else:
                ys = [_mean_of([r for r in rows if r["step"] == s and r["task"] <= s], key)
                      for s in steps]  # fmt: skip
                ax.plot(steps, _none_to_nan(ys), marker="o", color=colors(i % 10), label=name)
    axes[0].set_ylabel("model utility")
    axes[1].set_ylabel("forget probability" + (" (unlearned tasks, mean)" if len(runs) > 1 else ""))
    axes[2].set_ylabel("forget_quality (KS p-value, log)")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("step (tasks unlearned)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _none_to_nan(values):
    return [math.nan if v is None else v for v in values]


def write_report(work: Path, title: str, retain_logs: Path | None, notes=()) -> dict:
    """continual.csv, continual.md and continual.png in `work` from its finished steps."""
    work = Path(work)
    tasks = read_json(work / "tasks.json")["tasks"]
    rows = collect(work, tasks, retain_logs)
    paths = {ext: work / f"continual.{ext}" for ext in ("csv", "md", "png")}
    write_csv(rows, paths["csv"])
    paths["md"].write_text(markdown(rows, title, notes), encoding="utf-8")
    if rows:
        plot({title: rows}, paths["png"], title)
    return {"rows": rows, **{k: str(v) for k, v in paths.items()}}
