"""The LUME-mini pipeline's own pieces: its arguments, the data folder it writes (members and
held-out non-members per task), the harness overrides and the means it adds to the summary."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from benchmark_support import fake_harness

from asu_simu_plugin.lume import data as lume_data
from asu_simu_plugin.lume import formulas
from benchmarks.lume_mini import run

ROOT = Path(__file__).resolve().parents[1]
LUME_DIR = ROOT.parent / "shared" / "data" / "lume"
needs_data = pytest.mark.skipif(not LUME_DIR.is_dir(), reason=f"no LUME copy at {LUME_DIR}")


def base_args(tmp_path, data=LUME_DIR):
    harness = ["--harness", str(fake_harness(tmp_path))]
    return ["--data", str(data), "--work", str(tmp_path / "w"), "--device", "cpu", *harness]


@needs_data
def test_arguments_one_grid_for_every_method(tmp_path):
    args = run.parse_args(base_args(tmp_path))
    assert args.rows == ["SOGradDiff", "SIMU", "GradDiff", "NPO", "ASU"]
    assert all(args.rates[r] == [5e-5, 1e-4, 2e-4] for r in args.rows)
    assert (args.documents, args.nonmember_documents, args.max_new_tokens) == (2, 2, 32)


def test_missing_files_stop_at_the_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run.parse_args(base_args(tmp_path, data=tmp_path / "none"))
    assert "forget.jsonl not found" in capsys.readouterr().err


@needs_data
def test_data_stage_writes_members_and_held_out_documents(tmp_path):
    args = run.parse_args([*base_args(tmp_path), "--documents", "2", "--nonmember-documents", "1"])
    counts = run.Pipeline(args).build_data()
    # per file: 2 member documents a task (Task2 has 5 questions a document), 1 held out
    assert counts == {
        "forget_members": 2 * 2 + 2 * 6 + 2 * 2,
        "forget_nonmembers": 2 + 6 + 2,
        "retain_members": 20,
        "retain_nonmembers": 10,
    }
    written = lume_data.read_rows(tmp_path / "w" / "data" / "data" / "lume", "forget")
    held = [formulas.held_out(formulas.document_id(r["id"]), run.HOLDOUT_FRACTION) for r in written]
    assert Counter(held) == {False: 20, True: 10}
    assert set(
        json.loads(
            (tmp_path / "w" / "data" / "data" / "lume" / "forget.jsonl").read_text().splitlines()[0]
        )
    ) == set(lume_data.KEYS)


@needs_data
def test_overrides_point_the_experiments_at_the_mini_files(tmp_path):
    pipe = run.Pipeline(run.parse_args(base_args(tmp_path)))
    evaluation = pipe.eval_overrides(tmp_path / "m", "x", True)
    assert "experiment=eval/lume/default" in evaluation
    assert "++lume_documents_per_task=null" in evaluation and "++lume_members=true" in evaluation
    assert "eval.lume.max_new_tokens=32" in evaluation
    assert "data.forget.LUME_forget.args.max_length=128" in pipe.unlearn_data_overrides()
    assert pipe.equal_forgetting == [("SIMU", "SOGradDiff")]


def test_summary_means_over_tasks():
    summary = {
        f"{s}_{t}_{m}": 0.0
        for s in formulas.SPLITS
        for t in formulas.TASKS
        for m in ("regurgitation", "knowledge")
    }
    summary.update(forget_Task1_regurgitation=0.3, forget_Task2_regurgitation=0.6)
    out = run.with_means(summary)
    assert out["forget_regurgitation"] == pytest.approx(0.3)
    assert out["retain_knowledge"] == 0.0
    del summary["retain_Task3_knowledge"]
    assert run.with_means(summary)["retain_knowledge"] is None
