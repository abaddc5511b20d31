"""LUME: the rows of the shared public files, the definitions against hand computations, the
metric functions on hand-made generations, and the configs (no harness needed)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import yaml
from datasets import Dataset

from asu_simu_plugin.lume import data, formulas
from asu_simu_plugin.metrics import lume as lume_metrics
from asu_simu_plugin.metrics import paper

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(__import__("os").environ.get("ASU_SIMU_SHARED", ROOT.parent / "shared"))
LUME_DIR = SHARED / "data" / "lume"
needs_data = pytest.mark.skipif(not LUME_DIR.is_dir(), reason=f"no LUME copy at {LUME_DIR}")

# (task, kind) -> rows, as the data README and the files' own ids give them
COUNTS = {
    "forget": {
        ("Task1", "completion"): 243, ("Task1", "qa"): 243,
        ("Task2", "completion"): 250, ("Task2", "qa"): 1250,
        ("Task3", "completion"): 373, ("Task3", "qa"): 373,
    },
    "retain": {
        ("Task1", "completion"): 246, ("Task1", "qa"): 246,
        ("Task2", "completion"): 250, ("Task2", "qa"): 1250,
        ("Task3", "completion"): 371, ("Task3", "qa"): 371,
    },
}  # fmt: skip


def counts(rows):
    return dict(Counter((row["task"], row["kind"]) for row in rows))


# -- rows ---------------------------------------------------------------------------------------
@needs_data
@pytest.mark.parametrize("split", ["forget", "retain"])
def test_rows_per_task_and_kind(split):
    rows = data.read_rows(LUME_DIR, split)
    assert counts(rows) == COUNTS[split]
    for task in formulas.TASKS:
        for kind in formulas.KINDS:
            chosen = data.select(rows, tasks=[task], kinds=kind)
            assert len(chosen) == COUNTS[split][(task, kind)]


@needs_data
def test_held_out_documents_are_whole_disjoint_and_stable():
    rows = data.read_rows(LUME_DIR, "forget")
    members = data.select(rows, members=True, holdout_fraction=0.1)
    held = data.select(rows, members=False, holdout_fraction=0.1)
    assert len(members) + len(held) == len(rows)
    assert counts(held) == {
        ("Task1", "completion"): 25, ("Task1", "qa"): 25,
        ("Task2", "completion"): 17, ("Task2", "qa"): 85,
        ("Task3", "completion"): 48, ("Task3", "qa"): 48,
    }  # fmt: skip
    held_docs = {formulas.document_id(r["id"]) for r in held}
    assert held_docs.isdisjoint(formulas.document_id(r["id"]) for r in members)
    # a document's fate does not depend on what else is selected
    only_task2 = data.select(rows, tasks=["Task2"], members=False, holdout_fraction=0.1)
    assert only_task2 == [r for r in held if r["task"] == "Task2"]


@needs_data
def test_documents_per_task_keeps_whole_documents_in_file_order():
    rows = data.read_rows(LUME_DIR, "retain")
    first = data.select(rows, documents_per_task=2)
    # two documents per task: Task2 biographies have five questions each
    assert counts(first) == {
        ("Task1", "completion"): 2, ("Task1", "qa"): 2,
        ("Task2", "completion"): 2, ("Task2", "qa"): 10,
        ("Task3", "completion"): 2, ("Task3", "qa"): 2,
    }  # fmt: skip
    task1 = [r for r in rows if r["task"] == "Task1"][:4]
    assert [r for r in first if r["task"] == "Task1"] == task1


def test_missing_files_name_the_fix(tmp_path):
    with pytest.raises(data.LUMEDataError) as error:
        data.read_rows(tmp_path / "lume", "forget")
    message = str(error.value)
    assert "\n" not in message
    assert "forget.jsonl" in message and "lume-llm-unlearning" in message
    assert "lume_data_dir" in message


def test_bad_rows_and_selections_are_refused(tmp_path):
    (tmp_path / "forget.jsonl").write_text(
        '{"id": "x1", "input": "a", "output": "b", "task": "Task1"}\n'
    )
    with pytest.raises(data.LUMEDataError, match="neither in sc<n> nor in qa<n>"):
        data.read_rows(tmp_path, "forget")
    rows = [{"id": "dsc1", "input": "a", "output": "b", "task": "Task1", "kind": "completion"}]
    with pytest.raises(data.LUMEDataError, match="tasks must be among"):
        data.select(rows, tasks=["Task4"])
    with pytest.raises(data.LUMEDataError, match="holdout_fraction > 0"):
        data.select(rows, members=True)


# -- definitions --------------------------------------------------------------------------------
def test_row_kind_and_document():
    assert formulas.row_kind('"8f24"sc1') == "completion"
    assert formulas.row_kind('"8f24"qa4') == "qa"
    assert formulas.document_id('"8f24"qa4') == '"8f24"'
    with pytest.raises(ValueError):
        formulas.row_kind("8f24")


@pytest.mark.parametrize(
    ("generation", "reference", "expected"),
    [
        (" Madera\n", "madera", 1.0),
        ("Madera.", "Madera", 0.0),
        ("", "x", 0.0),
        ("555-0100", " 555-0100 ", 1.0),
    ],
)
def test_exact_match(generation, reference, expected):
    assert formulas.exact_match(generation, reference) == expected


@pytest.mark.parametrize(
    ("auc", "score"), [(0.5, 1.0), (0.75, 0.5), (0.1, 0.2), (1.0, 0.0), (0.0, 0.0)]
)
def test_mia_score(auc, score):
    assert formulas.mia_score(auc) == pytest.approx(score)


def test_final_score_is_the_mean_of_three():
    assert formulas.final_score(0.6, 0.9, 0.3) == pytest.approx(0.6)


def test_task_aggregate_is_the_harmonic_mean_with_forget_inverted():
    """The 12 per-task values through the configured metric (paper_hmean with the forget names
    complemented), against the hand computation 12 / Σ 1/x."""
    config = yaml.safe_load((ROOT / "configs/eval/lume.yaml").read_text())["metrics"]
    aggregate = config["task_aggregate"]
    values = dict(
        zip(
            aggregate["pre_compute"],
            [0.2, 0.1, 0.3, 0.0, 0.6, 0.5] + [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
            strict=True,
        )
    )
    terms = [1 - v for v in list(values.values())[:6]] + list(values.values())[6:]
    expected = 12 / sum(1 / t for t in terms)
    pre = {name: {"agg_value": value} for name, value in values.items()}
    result = paper.hmean(None, pre_compute=pre, complement=aggregate["complement"])
    assert result["agg_value"] == pytest.approx(expected)
    assert result["agg_value"] == pytest.approx(0.623505, abs=1e-6)  # 12 / 19.246032
    pre["retain_Task1_regurgitation"]["agg_value"] = 0.0  # one zero term: 0, as the official
    assert paper.hmean(None, pre_compute=pre, complement=aggregate["complement"])["agg_value"] == 0


def test_knowledge_metric_compares_with_the_raw_output():
    rows = Dataset.from_list(
        [
            {"index": 0, "output": "Madera"},
            {"index": 1, "output": "555-0100"},
            {"index": 2, "output": "Lisbon"},
        ]
    )
    generations = {
        "0": {"generation": "madera", "ground_truth": "Madera"},
        "1": {"generation": "555 0100", "ground_truth": "555-0100"},
        "2": {"generation": "Lisbon", "ground_truth": "Lisbon"},
    }
    result = lume_metrics.knowledge(
        None,
        pre_compute={"generations": {"value_by_index": generations}},
        data=type("D", (), {"data": rows})(),
    )
    assert result["agg_value"] == pytest.approx(2 / 3)
    assert [e["exact_match"] for e in result["value_by_index"].values()] == [1.0, 0.0, 1.0]


def test_mia_score_metric_reads_the_harness_auc():
    result = lume_metrics.mia_score(None, pre_compute={"auc": {"agg_value": 0.8, "auc": 0.8}})
    assert result == {"agg_value": pytest.approx(0.4), "auc": 0.8}
    with pytest.raises(ValueError, match="access_key: auc"):
        lume_metrics.mia_score(None, pre_compute={})


# -- configs ------------------------------------------------------------------------------------
def test_eval_config_scores_each_task_split_and_kind_once():
    metrics = yaml.safe_load((ROOT / "configs/eval/lume.yaml").read_text())["metrics"]
    per_task = [
        f"{s}_{t}_{m}"
        for s in formulas.SPLITS
        for t in formulas.TASKS
        for m in ("regurgitation", "knowledge")
    ]
    assert list(metrics) == [*per_task, "mia_auc", "mia_score", "task_aggregate"]
    for name in per_task:
        split, task, measure = name.split("_")
        entry = metrics[name]
        args = (entry if measure == "regurgitation" else next(iter(entry["pre_compute"].values())))[
            "datasets"
        ]["LUME"]["args"]
        assert (args["split"], args["tasks"], args["predict_with_generate"]) == (
            split,
            [task],
            True,
        )
        assert args["kinds"] == ["completion" if measure == "regurgitation" else "qa"]
    assert metrics["task_aggregate"]["complement"] == per_task[:6]
    mia = metrics["mia_auc"]["datasets"]
    assert (
        mia["LUME_members"]["args"]["loss_on"]
        == mia["LUME_nonmembers"]["args"]["loss_on"]
        == "document"
    )
    assert mia["LUME_nonmembers"]["args"]["members"] is False


def test_experiments_exist_for_every_compared_method():
    folder = ROOT / "configs/experiment/unlearn/lume"
    assert {p.stem for p in folder.glob("*.yaml")} == {
        "default",
        "simu",
        "sograddiff",
        "graddiff",
        "npo",
        "asu",
    }
    simu = yaml.safe_load((folder / "simu.yaml").read_text())
    assert simu["trainer"]["method_args"] == {"steps": 5, "threshold": 0.3, "mode": "dual"}


def test_harmonic_mean_of_official_terms_matches_statistics():
    import statistics

    terms = [0.25, 0.5, 0.75, 0.9]
    assert math.isclose(paper.formulas.harmonic_mean(terms), statistics.harmonic_mean(terms))
