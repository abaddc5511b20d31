"""TOFU-mini's ASU-paper columns (Model Utility, Forget Efficacy, labelled with what they leave
out) and rows (the paper's ME+GD and IDK+AP baselines)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from test_benchmarks import fake_tree

from benchmarks.tofu_mini import run


def test_paper_columns_say_what_they_leave_out():
    titles = [t for t, _, _ in run.paper_columns(None, None)]
    assert titles == [
        "paper Model Utility (no entailment, no cosine)",
        "paper Forget Efficacy (no entailment, no cosine)",
    ]
    assert run.paper_columns(None, "minilm")[0][0] == "paper Model Utility (no entailment)"
    assert run.paper_columns("nli", "minilm")[1] == (
        "paper Forget Efficacy",
        "paper_forget_efficacy",
        True,
    )


def test_every_evaluation_adds_the_paper_evaluator_and_the_baseline_rows_run(tmp_path):
    args = run.parse_args([*fake_tree(tmp_path), "--device", "cpu"])
    assert args.rows[-2:] == ["ME_GD", "IDK_AP"]
    assert args.rates["ME_GD"] == args.rates["NPO"]  # the same grid and rule as every row
    pipeline = run.Pipeline(args)
    overrides = pipeline.eval_overrides(tmp_path / "m", "x", False)
    assert "eval=[tofu,asu_paper]" in overrides
    assert "eval.asu_paper.nli_model=null" in overrides
    assert "eval.asu_paper.embedding_model=null" in overrides
    assert "eval.asu_paper.max_new_tokens=48" in overrides
    assert [t for t, _, _ in pipeline.columns][-1].endswith("(no entailment, no cosine)")
    experiment, extra, _ = run.METHODS["IDK_AP"]
    assert experiment == "unlearn/tofu/default"
    assert "trainer=IDK" in extra and "trainer.method_args.retain_loss_type=AP" in extra
    assert "data/datasets@data.retain=TOFU_QA_retain_idk" in extra


def test_summary_merges_the_paper_values_and_the_notes_name_the_scorers(tmp_path):
    args = run.parse_args(
        [*fake_tree(tmp_path), "--device", "cpu", "--embedding-model", "/m/minilm"]
    )
    pipeline = run.Pipeline(args)
    evals = pipeline.work / "evals" / "target"
    evals.mkdir(parents=True)
    (evals / "TOFU_SUMMARY.json").write_text(json.dumps({"model_utility": 0.4}))
    assert pipeline.summary("target") == {"model_utility": 0.4}  # an older run: no paper values
    paper = {"paper_model_utility": 0.3, "paper_forget_efficacy": 0.6}
    (evals / "ASU_PAPER_SUMMARY.json").write_text(json.dumps(paper))
    assert pipeline.summary("target") == {"model_utility": 0.4, **paper}
    overrides = pipeline.eval_overrides(tmp_path / "m", "x", False)
    assert "eval.asu_paper.embedding_model=/m/minilm" in overrides
    (note,) = pipeline.notes(
        {"settings": {"paper": {"nli_model": None, "embedding_model": "/m/minilm"}}}
    )
    assert "scored with embedding_model minilm (a stand-in for the paper's paraphrase-" in note
    assert "leave out the entailment score (nli_model none)" in note
    assert "not the paper's numbers" in note
    # the paper's two models (local copies): named, and the values are the paper's measures
    paper = {
        "nli_model": "/m/deberta-v3-base-tasksource-nli",
        "embedding_model": "/x/paraphrase-MiniLM-L6-v2",
    }
    (note,) = pipeline.notes({"settings": {"paper": paper}})
    assert note.endswith(
        "scored with nli_model deberta-v3-base-tasksource-nli, "
        "embedding_model paraphrase-MiniLM-L6-v2."
    )
    # a stand-in alone makes them other numbers than the paper's
    paper["embedding_model"] = "/m/wordllama-l2_supercat_256"
    (note,) = pipeline.notes({"settings": {"paper": paper}})
    assert note.endswith(
        "embedding_model wordllama-l2_supercat_256 (a stand-in for the paper's "
        "paraphrase-MiniLM-L6-v2), so they are not the paper's numbers."
    )


def test_idk_rows_read_the_refusals_by_absolute_path(tmp_path):
    """The harness runs in the data folder, where its `./data/idk.jsonl` does not exist: the IDK
    row's forget and retain datasets get the file's path; without one, a one-line error."""
    args = run.parse_args([*fake_tree(tmp_path), "--device", "cpu", "--methods", "IDK_AP"])
    pipeline = run.Pipeline(args)
    idk_run = pipeline.runs_of("IDK_AP")[0]
    with pytest.raises(SystemExit, match=r"the IDK rows need the harness's refusals file"):
        pipeline.unlearn_overrides(idk_run)
    refusals = args.data / "idk.jsonl"
    refusals.write_text('"I don\'t know."\n')
    overrides = pipeline.unlearn_overrides(idk_run)
    assert overrides[-2:] == [
        f"data.forget.TOFU_QA_forget_idk.args.idk_path={refusals.resolve()}",
        f"data.retain.TOFU_QA_retain_idk.args.idk_path={refusals.resolve()}",
    ]
    asu = pipeline.unlearn_overrides(replace(idk_run, row="ASU"))
    assert not any("idk_path" in o for o in asu)
