"""Continual-mini's own pieces: its arguments and rates, the cut data, the driver settings each
row gets, and the combined reading (no harness run)."""

from __future__ import annotations

import json

import pytest
from benchmark_support import fake_harness

from benchmarks.continual_mini import run
from benchmarks.mini.report import busy_seconds


@pytest.fixture
def tofu(tmp_path):
    folder = tmp_path / "data" / "locuslab" / "TOFU"
    folder.mkdir(parents=True)
    for name in ("forget10", "forget10_perturbed", "holdout10"):
        lines = [json.dumps({"question": f"{name} {i}", "answer": "a"}) for i in range(100)]
        (folder / f"{name}.json").write_text("\n".join(lines) + "\n")
    return tmp_path / "data"


def args_for(tmp_path, tofu, *extra):
    harness = tmp_path / "ou" if (tmp_path / "ou").is_dir() else fake_harness(tmp_path)
    return run.parse_args(
        ["--data", str(tofu), "--work", str(tmp_path / "w"), "--harness", str(harness),
         "--device", "cpu", *extra]
    )  # fmt: skip


def test_rows_run_at_tofu_minis_selected_rates(tmp_path, tofu):
    args = args_for(tmp_path, tofu)
    assert args.rows == ["ASU", "NPO", "GradDiff"] and args.forget_split == "forget10"
    assert args.rates == {"ASU": [2e-4], "NPO": [5e-5], "GradDiff": [5e-5]}
    args = args_for(tmp_path, tofu, "--methods", "ASU", "IDK_AP", "--lr", "ASU=1e-4")
    assert args.rates == {"ASU": [1e-4], "IDK_AP": [1e-4]}


def test_forget_sets_cut_to_the_continual_authors(tmp_path, tofu):
    pipeline = run.Pipeline(args_for(tmp_path, tofu, "--tasks", "2", "--authors-per-task", "2"))
    assert len(pipeline.source_rows("forget10")) == 80
    assert len(pipeline.source_rows("holdout10")) == 80
    assert pipeline.source_rows("forget10_perturbed", 5)[-1].startswith('{"question": "forget10_')
    pipeline = run.Pipeline(args_for(tmp_path, tofu, "--tasks", "6"))
    with pytest.raises(SystemExit, match="fewer than --tasks x --authors-per-task"):
        pipeline.source_rows("forget10")


def test_each_row_drives_the_harness_with_tofu_minis_settings(tmp_path, tofu):
    pipeline = run.Pipeline(args_for(tmp_path, tofu, "--reference", "original"))
    s = pipeline.continual_settings("NPO")
    assert (s.tasks, s.entity_size, s.retain_split, s.reference) == (
        3,
        20,
        "retain_mini",
        "original",
    )
    assert s.start_eval == pipeline.work / "evals" / "target"  # step 0 = eval_target
    assert s.retain_logs == pipeline.retain_logs
    assert (
        "trainer=NPO" in s.train_overrides
        and "trainer.args.learning_rate=5e-05" in s.train_overrides
    )
    assert "eval=[tofu,asu_paper]" in s.eval_overrides
    assert not [o for o in s.eval_overrides if o.split("=")[0] in run.DRIVER_EVAL_KEYS]
    assert not [o for o in s.eval_overrides if o.lstrip("+").startswith("model.")]


def test_harness_step_eval_leaves_out_the_paper_evaluator_and_privacy_metrics(tmp_path, tofu):
    pipeline = run.Pipeline(args_for(tmp_path, tofu, "--step-eval", "harness"))
    s = pipeline.continual_settings("ASU")
    assert not [o for o in s.eval_overrides if "asu_paper" in o]
    assert s.eval_overrides[-2:] == run.HARNESS_ONLY
    full = run.Pipeline(args_for(tmp_path, tofu)).continual_settings("ASU").eval_overrides
    assert set(full) - set(s.eval_overrides) == set(pipeline.paper_eval_overrides())


def test_final_reading_names_the_task_that_came_back():
    def row(step, task, prob, utility):
        return {"step": step, "task": task, "forget_Q_A_Prob": prob, "model_utility": utility}

    rows = [
        row(0, 1, 0.9, 0.4), row(0, 2, 0.7, 0.4),
        row(1, 1, 0.1, 0.38), row(1, 2, 0.7, 0.38),
        row(2, 1, 0.3, 0.35), row(2, 2, 0.05, 0.35),
    ]  # fmt: skip
    reading = run.final_reading(rows)
    assert reading["forget_prob_start"] == pytest.approx(0.8)
    assert reading["forget_prob_unlearned"] == pytest.approx(0.175)
    assert reading["largest_rise"] == pytest.approx(0.2) and reading["largest_rise_task"] == 1
    assert (reading["utility_start"], reading["utility_last"]) == (0.4, 0.35)


def test_the_report_states_machine_sizes_rates_reference_and_run_time(tmp_path, tofu):
    args = args_for(tmp_path, tofu, "--methods", "NPO", "--reference", "original")
    rows = [
        {
            "step": s,
            "task": t,
            "status": st,
            "forget_Q_A_Prob": p,
            "model_utility": 0.4,
            "paper_model_utility": 0.3,
        }
        for s, t, st, p in [(0, 1, "start", 0.9), (1, 1, "current", 0.2)]
    ]
    result = {
        "date": "2026-12-04T00:00:00+00:00",
        "machine": {"cpu": "CPU X", "cpu_cores": 2, "device": "cpu"},
        "versions": {"torch": "2.13.0", "datasets": None},
        "settings": {
            "data_rows": {"forget10": 60},
            "finetune": {"epochs": 5, "learning_rate": 1e-4},
            "unlearn": {"epochs": 5, "learning_rates": {"NPO": [5e-5]}},
            "per_device_batch_size": 8,
        },
        "total_seconds": 5400,
    }
    text = run.combined_markdown({"NPO": rows}, "T", args, result, ["A note."])
    header = text.split("| row |")[0]
    for part in ("CPU X, 2 cores, device cpu; torch 2.13.0.", "forget10 60", "NPO 5e-05",
                 "teacher: the target;", "Total wall time 90 min.", "A note."):  # fmt: skip
        assert part in header
    assert "| NPO | 1 | 0.400 → 0.400 | 0.900 → 0.200 |" in text


def test_run_time_counts_overlapping_stages_once():
    def marker(finished, seconds):
        return {"finished": f"2026-12-04T10:{finished}:00+00:00", "seconds": seconds}

    # 10:00-10:10, then two rows in parallel 10:10-10:30 and 10:12-10:40, then a gap
    stages = [marker("10", 600), marker("30", 1200), marker("40", 1680), marker("50", 300)]
    assert busy_seconds(stages) == 600 + 1800 + 300
