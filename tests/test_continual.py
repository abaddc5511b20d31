"""Continual unlearning (`asu_simu_plugin.continual`): the task cut, each step's retain set, the
driver's checks, resume and settings hash (over a stand-in harness whose src/train.py and
src/eval.py are tiny scripts), and the CSV / markdown / PNG from hand-made step folders."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from asu_simu_plugin.cli import main as cli_main
from asu_simu_plugin.continual import driver, report, tasks
from asu_simu_plugin.continual.tasks import TaskError, cut_tasks, retained_forget_rows


def rows(n, **extra):
    return [{"question": f"q{i}", "answer": f"a{i}", **extra} for i in range(n)]


# -- the cut and the bookkeeping -------------------------------------------------------------------
def test_cut_along_entities_first_tasks_one_entity_larger():
    cut = cut_tasks(rows(200), 3, entity_size=20)  # 10 entities -> 4, 3, 3
    assert [(t.rows[0], t.rows[-1], len(t.rows)) for t in cut] == [
        (0, 79, 80),
        (80, 139, 60),
        (140, 199, 60),
    ]
    assert cut[0].entities == ("entity 1", "entity 2", "entity 3", "entity 4")
    assert cut[2].entities == ("entity 8", "entity 9", "entity 10")
    assert tasks.describe(cut, 5)[0] == (
        "task 1: entity 1 .. 4 (4 entities, rows 0-79, 80 rows); step 1 retains 5 retain + 120 "
        "forget rows"
    )


def test_cut_by_task_id_column_in_numeric_order():
    data = [{"question": str(i), "task_id": t} for i, t in enumerate([10, 2, 2, 10, 1])]
    cut = cut_tasks(data, None)
    assert [t.rows for t in cut] == [(4,), (1, 2), (0, 3)]
    assert [t.entities for t in cut] == [("task_id 1",), ("task_id 2",), ("task_id 10",)]


@pytest.mark.parametrize(
    "data, n, match",
    [
        (rows(40), 3, "--tasks 3 is more than the 2 entities"),
        (rows(30), 1, "not a multiple of --entity-size 20"),
        ([], 1, "has no rows"),
        ([{"task_id": 1}, {"task_id": 2}], 3, "defines 2 tasks"),
        ([{"task_id": 1}, {"question": "q"}], None, "row 1 has no 'task_id'"),
        (rows(40), None, "use a number of tasks"),
    ],
)
def test_bad_cuts_are_one_line_errors(data, n, match):
    with pytest.raises(TaskError, match=match) as info:
        cut_tasks(data, n)
    assert "\n" not in str(info.value)


def test_retain_rows_are_the_forget_rows_not_yet_unlearned():
    cut = cut_tasks(rows(6), 3, entity_size=2)
    assert retained_forget_rows(cut, 1) == [2, 3, 4, 5]
    assert retained_forget_rows(cut, 2) == [4, 5]
    assert retained_forget_rows(cut, 3) == []


def write_tofu(folder: Path, n_forget=6, n_retain=3, perturbed=True) -> Path:
    tofu = folder / "locuslab" / "TOFU"
    tofu.mkdir(parents=True)
    splits = {
        "forget01": [{"question": f"f{i}", "answer": f"fa{i}"} for i in range(n_forget)],
        "retain99": [{"question": f"r{i}", "answer": f"ra{i}"} for i in range(n_retain)],
        "holdout01": [{"question": f"h{i}", "answer": "h"} for i in range(n_forget)],
    }
    if perturbed:
        splits["forget01_perturbed"] = splits["forget01"]
    for name, records in splits.items():
        (tofu / f"{name}.json").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_data_folder_holds_each_steps_sets(tmp_path):
    source = write_tofu(tmp_path / "src")
    cut = cut_tasks(rows(6), 3, entity_size=2)
    counts = tasks.write_data_folder(source, tmp_path / "out", "forget01", "retain99", cut)
    tofu = tmp_path / "out" / "locuslab" / "TOFU"

    def questions(name):
        return [json.loads(line)["question"] for line in (tofu / f"{name}.json").open()]

    assert questions("forget_step2") == ["f2", "f3"]
    assert questions("retain_step1") == ["r0", "r1", "r2", "f2", "f3", "f4", "f5"]
    assert questions("retain_step3") == ["r0", "r1", "r2"]
    assert counts == {
        "forget_step1": 2, "retain_step1": 7, "forget_step2": 2, "retain_step2": 5,
        "forget_step3": 2, "retain_step3": 3,
    }  # fmt: skip
    assert (tofu / "forget01.json").is_symlink()
    header = (tofu / "README.md").read_text()
    assert "- config_name: retain_step2\n  data_files: retain_step2.json" in header


# -- the driver over a stand-in harness -------------------------------------------------------------
FAKE_SCRIPT = """
import json, os, sys
from pathlib import Path
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a and not a.startswith("-"))
calls = Path(os.environ["FAKE_CALLS"])
with calls.open("a") as fh:
    fh.write(json.dumps({"script": Path(sys.argv[0]).name, "args": args,
                         "reference": os.environ.get("ASU_SIMU_REFERENCE_MODEL")}) + "\\n")
out = Path(args["paths.output_dir"])
out.mkdir(parents=True, exist_ok=True)
if Path(sys.argv[0]).name == "train.py":
    (out / "config.json").write_text("{}")
    if os.environ.get("ASU_SIMU_REFERENCE_RECORD"):
        Path(os.environ["ASU_SIMU_REFERENCE_RECORD"]).write_text('{"built": true}')
else:
    n = sum(1 for _ in open("locuslab/TOFU/" + args["forget_split"] + ".json"))
    step = len(calls.read_text().splitlines())
    by_index = {str(i): {"prob": 0.1 * step, "score": 1.0} for i in range(n)}
    evals = {"forget_Q_A_Prob": {"value_by_index": by_index},
             "forget_truth_ratio": {"value_by_index": by_index}}
    (out / "TOFU_EVAL.json").write_text(json.dumps(evals))
    (out / "TOFU_SUMMARY.json").write_text(json.dumps({"model_utility": 0.5}))
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    harness = tmp_path / "harness"
    for script in ("train.py", "eval.py"):
        (harness / "src").mkdir(parents=True, exist_ok=True)
        (harness / "src" / script).write_text(FAKE_SCRIPT)
    for config in ("experiment/unlearn/tofu/default", "model/Tiny", "trainer/GradDiff"):
        path = harness / "configs" / f"{config}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    write_tofu(harness)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))

    def settings(**changes):
        base = dict(
            harness=harness, data=harness, model=model, work=tmp_path / "work", tasks=3,
            forget_split="forget01", retain_split="retain99", entity_size=2,
            model_config="Tiny", trainer="GradDiff", python=sys.executable,
        )  # fmt: skip
        return driver.Settings(**{**base, **changes})

    def read_calls():
        return (
            [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []
        )

    return settings, read_calls


def test_steps_chain_models_and_a_rerun_skips_finished_steps(fake, capsys):
    settings, calls = fake
    result = driver.run(settings(reference="original"))
    made = calls()
    assert [c["script"] for c in made] == ["eval.py"] + ["train.py", "eval.py"] * 3
    trains = [c for c in made if c["script"] == "train.py"]
    work = settings().work.resolve()
    assert [c["args"]["forget_split"] for c in trains] == [f"forget_step{k}" for k in (1, 2, 3)]
    assert [c["args"]["retain_split"] for c in trains] == [f"retain_step{k}" for k in (1, 2, 3)]
    starts = [c["args"]["model.model_args.pretrained_model_name_or_path"] for c in trains]
    assert starts[1:] == [str(work / "step_01" / "model"), str(work / "step_02" / "model")]
    # the original model as reference from step 2 on (step 1 starts from it anyway)
    assert [c["reference"] is not None for c in trains] == [False, True, True]
    out = capsys.readouterr().out
    assert "task 1: entity 1 (1 entity, rows 0-1, 2 rows); step 1 retains 3 retain + 4" in out
    assert "[step 3/3]" in out and "elapsed" in out and "about" in out
    table = list(csv.DictReader(open(result["csv"])))
    assert len(table) == 4 * 3  # steps 0..3 x tasks
    assert [r["status"] for r in table[3:6]] == ["current", "pending", "pending"]
    assert float(table[3]["forget_Q_A_Prob"]) == pytest.approx(0.3)  # 3rd call: step 1's eval

    driver.run(settings(reference="original"))  # everything finished: no harness call
    assert len(calls()) == len(made)


def test_interrupted_step_is_redone_from_scratch(fake):
    settings, calls = fake
    driver.run(settings())
    step2 = settings().work / "step_02"
    (step2 / "step.json").unlink()  # as if killed before the marker was written
    (step2 / "model" / "stale.bin").write_text("half")
    before = len(calls())
    driver.run(settings())
    redone = calls()[before:]
    # step 2 and, from its new model, step 3
    assert [c["args"]["task_name"] for c in redone] == [
        "continual_step2", "continual_eval2", "continual_step3", "continual_eval3",
    ]  # fmt: skip
    assert not (step2 / "model" / "stale.bin").exists()


def test_other_settings_refused_unless_overwrite(fake):
    settings, calls = fake
    driver.run(settings())
    with pytest.raises(driver.ContinualError, match=r"other settings \(train_overrides\)"):
        driver.plan(settings(train_overrides=["trainer.args.learning_rate=1e-3"]))
    before = len(calls())
    driver.run(settings(train_overrides=["trainer.args.learning_rate=1e-3"], overwrite=True))
    assert len(calls()) - before == 7


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"tasks": 4}, "--tasks 4 is more than the 3 entities"),
        ({"trainer": "Nope"}, "knows no trainer config Nope.yaml"),
        ({"harness": Path("/nonexistent")}, "has no src/train.py"),
        ({"reference": "original", "train_overrides": ["model.model_handler=LoRACausalLM"]},
         "--reference original with LoRA"),
        ({"forget_split": "forget05"}, "has no forget05.json"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_before_any_subprocess(fake, changes, match):
    settings, calls = fake
    with pytest.raises(driver.ContinualError, match=match):
        driver.run(settings(**changes))
    assert calls() == []
    assert not settings().work.exists()


def test_user_overrides_replace_the_drivers_defaults():
    merged = driver.merge(["trainer.args.bf16=false", "++trainer.args.warmup_epochs=0"],
                          ["trainer.args.warmup_epochs=1", "x=1"])  # fmt: skip
    assert merged == ["trainer.args.bf16=false", "trainer.args.warmup_epochs=1", "x=1"]


def test_cli_bad_input_is_one_line_exit_2(fake, capsys):
    settings, _ = fake
    s = settings()
    code = cli_main(
        ["continual", "--harness", str(s.harness), "--model", str(s.model), "--work",
         str(s.work), "--forget-split", "forget01", "--retain-split", "retain99", "--tasks", "9",
         "--entity-size", "2", "--model-config", "Tiny", "--device", "cpu"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--tasks 9 is more than the 3 entities" in err


# -- the report from hand-made step folders --------------------------------------------------------
def make_step(work, step, probs, ratios, utility, paper=None):
    folder = work / f"step_{step:02d}"
    (folder / "eval").mkdir(parents=True)
    evals = {
        "forget_Q_A_Prob": {"value_by_index": {str(i): {"prob": p} for i, p in enumerate(probs)}},
        "forget_truth_ratio": {
            "value_by_index": {str(i): {"score": r} for i, r in enumerate(ratios)}
        },
    }
    (folder / "eval" / "TOFU_EVAL.json").write_text(json.dumps(evals))
    (folder / "eval" / "TOFU_SUMMARY.json").write_text(json.dumps({"model_utility": utility}))
    if paper:
        (folder / "eval" / "ASU_PAPER_EVAL.json").write_text(json.dumps(paper))
    (folder / "step.json").write_text("{}")


def test_csv_and_summary_from_hand_made_steps(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    two = [{"task": 1, "rows": [0, 1]}, {"task": 2, "rows": [2, 3]}]
    (work / "tasks.json").write_text(json.dumps({"tasks": two}))
    paper = {
        "forget_ROUGE": {"value_by_index": {"0": {"rougeL_recall": 0.2}, "1": {"rougeL_recall": 0.4}}},
        "forget_Probability": {"value_by_index": {"0": {"prob": 0.5}, "1": {"prob": 0.5}}},
        "forget_Truth_Ratio": {"value_by_index": {"0": {"ratio": 1.0}, "1": {"ratio": 1.0}}},
        "forget_Token_Entropy": {
            "value_by_index": {"0": {"token_entropy": 0.8}, "1": {"token_entropy": 0.8}}
        },
    }  # fmt: skip
    make_step(work, 0, [0.9, 0.7, 0.8, 0.6], [0.5, 0.5, 0.5, 0.5], 0.40)
    make_step(work, 1, [0.1, 0.3, 0.8, 0.6], [2.0, 4.0, 0.5, 0.5], 0.38, paper)
    make_step(work, 2, [0.4, 0.2, 0.05, 0.15], [0.5, 0.5, 2.0, 4.0], 0.35)
    out = report.write_report(work, "hand-made", None)
    table = list(csv.DictReader(open(out["csv"])))
    assert [(r["step"], r["task"], r["status"]) for r in table] == [
        ("0", "1", "start"), ("0", "2", "start"), ("1", "1", "current"), ("1", "2", "pending"),
        ("2", "1", "earlier"), ("2", "2", "current"),
    ]  # fmt: skip
    values = {(int(r["step"]), int(r["task"])): r for r in table}
    assert float(values[1, 1]["forget_Q_A_Prob"]) == pytest.approx(0.2)
    assert float(values[2, 1]["forget_Q_A_Prob"]) == pytest.approx(0.3)
    # the harness's aggregate: mean(min(tr, 1/tr)) = (0.5 + 0.25) / 2
    assert float(values[1, 1]["forget_truth_ratio"]) == pytest.approx(0.375)
    assert values[1, 1]["forget_quality"] == ""  # no retain model's logs
    # paper Forget Efficacy: hmean(1 - 0.3, 1 - 0.5, 1 - 0 (truth ratio of r = 1), 0.8)
    expected = 4 / (1 / 0.7 + 1 / 0.5 + 1 / 1.0 + 1 / 0.8)
    assert float(values[1, 1]["paper_forget_efficacy"]) == pytest.approx(expected)
    assert values[1, 2]["paper_forget_efficacy"] == ""  # rows 2, 3 not in the paper's file
    assert float(values[2, 2]["model_utility"]) == pytest.approx(0.35)
    text = Path(out["md"]).read_text()
    assert "| 1 | 0.200 | 0.300 | 2 |" in text  # task 1 comes back to 0.3 at step 2
    assert Path(out["png"]).stat().st_size > 10_000


def test_per_task_forget_quality_is_the_harness_ks_test_on_those_rows():
    pytest.importorskip("scipy")  # in the harness's requirements, not ours

    def truth_ratios(values):
        by_index = {str(i): {"score": v} for i, v in enumerate(values)}
        return {"forget_truth_ratio": {"value_by_index": by_index}}

    retain = truth_ratios([0.5, 0.5, 0.5, 0.5])
    model = truth_ratios([0.5, 0.5, 2.0, 4.0])
    # identical samples: 1; n = m = 2 fully separated: exact p = 2 / C(4, 2)
    assert report.forget_quality(model, retain, [0, 1]) == pytest.approx(1.0)
    assert report.forget_quality(model, retain, [2, 3]) == pytest.approx(1 / 3)
    assert report.forget_quality(model, None, [0, 1]) is None


def test_report_stops_at_the_first_unfinished_step(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "tasks.json").write_text(json.dumps({"tasks": [{"task": 1, "rows": [0]}]}))
    make_step(work, 0, [0.9], [0.5], 0.4)
    (work / "step_01" / "eval").mkdir(parents=True)  # no step.json: interrupted
    rows = report.collect(work, [{"task": 1, "rows": [0]}], None)
    assert [r["step"] for r in rows] == [0]
