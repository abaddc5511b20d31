"""LUME in the real harness: the dataset handler's loss mask, `eval/lume/default` on a tiny model
(the shared public files linked where the harness reads them) and one SIMU step on LUME."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from harness_support import (
    CPU_TRAIN_OVERRIDES,
    harness_paths,
    model_overrides,
    run_harness,
    save_tiny_harness_model,
)

from asu_simu_plugin.lume import formulas

pytestmark = pytest.mark.harness

ROOT = Path(__file__).resolve().parent.parent
LUME_DIR = Path(os.environ.get("ASU_SIMU_SHARED", ROOT.parent / "shared")) / "data" / "lume"
CPU_EVAL = [
    "~model.model_args.attn_implementation",
    "model.model_args.torch_dtype=float32",
    "model.model_args.device_map=cpu",
]
# One document per task and file: forget 1+1, 1+5, 1+1 rows (completion + questions).
SMALL = ["lume_documents_per_task=1"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_harness_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def workdir(tmp_path):
    """A working directory where the harness finds LUME at data/lume (the shared copy)."""
    if not LUME_DIR.is_dir():
        pytest.skip(f"no LUME copy at {LUME_DIR}")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "lume").symlink_to(LUME_DIR)
    return tmp_path


MASK_SCRIPT = """
import json, sys
from transformers import AutoTokenizer
sys.path.insert(0, sys.argv[3])  # the harness's src/: its data package only (no deepspeed import)
from data.pretraining import CompletionDataset
from asu_simu_plugin.lume.data import LUMEDatasetMixin
LUMEDataset = type("LUMEDataset", (LUMEDatasetMixin, CompletionDataset), {})
tok = AutoTokenizer.from_pretrained(sys.argv[1])
out = {}
for loss_on in ("output", "document"):
    ds = LUMEDataset(tokenizer=tok, data_dir=sys.argv[2], split="forget",
                             documents_per_task=1, loss_on=loss_on, append_eos=loss_on == "output")
    row, item = ds.data[1], ds[1]
    prefix = tok(row["input"])["input_ids"] if loss_on == "output" else tok("")["input_ids"]
    whole = tok(row["input"] + row["output"])["input_ids"]
    labels = item["labels"].tolist()
    out[loss_on] = {
        "rows": len(ds), "kind": row["kind"], "masked": labels.count(-100), "prefix": max(len(prefix), 1),
        "targets_are_the_rest": labels[max(len(prefix), 1):] == (whole + [tok.eos_token_id])[max(len(prefix), 1):len(labels)],
        "ends_with_eos": item["input_ids"].tolist()[-1] == tok.eos_token_id,
        "length": len(labels), "whole": len(whole),
    }
print(json.dumps(out))
"""


def test_dataset_puts_the_loss_on_output(tiny_model):
    if not LUME_DIR.is_dir():
        pytest.skip(f"no LUME copy at {LUME_DIR}")
    checkout, python = harness_paths()
    result = subprocess.run(
        [python, "-c", MASK_SCRIPT, str(tiny_model), str(LUME_DIR), str(checkout / "src")],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    out = json.loads(result.stdout.strip().splitlines()[-1])
    answer, document = out["output"], out["document"]
    assert answer["rows"] == document["rows"] == 10
    assert answer["kind"] == "qa"  # row 1: the first document's question
    assert answer["masked"] == answer["prefix"] > 1  # exactly the input's tokens
    assert answer["targets_are_the_rest"] and answer["ends_with_eos"]
    assert answer["length"] == answer["whole"] + 1  # input + output + end-of-text
    assert document["masked"] == 1 and document["length"] == document["whole"]
    assert document["targets_are_the_rest"] and not document["ends_with_eos"]


# lm_eval's MMLU needs the hub: this stands in for `lm_eval.simple_evaluate` (imported by the
# harness's LMEvalEvaluator), records what it was asked and answers in lm_eval's result format.
FAKE_LM_EVAL = """
import json, os
import lm_eval

def simple_evaluate(model, tasks, task_manager=None, **kwargs):
    with open(os.environ["FAKE_LM_EVAL_CALL"], "w") as f:
        json.dump({"tasks": tasks, "model": type(model).__name__}, f)
    group = {"alias": "mmlu", "acc,none": 0.25, "acc_stderr,none": 0.01}
    return {"groups": {"mmlu": group}, "results": {"mmlu": group}, "samples": {"mmlu": []}}

lm_eval.simple_evaluate = simple_evaluate
"""


def test_eval_lume_default_scores_every_task_and_split(tiny_model, workdir):
    """With `mmlu` set, the harness's lm_eval evaluator runs after LUME's metrics (lm_eval's
    evaluation itself faked) and final_score is the mean of the three."""
    out = workdir / "eval"
    fake = workdir / "fake_lm_eval"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(FAKE_LM_EVAL)
    call = workdir / "lm_eval_call.json"
    run_harness(
        "eval.py",
        [
            "experiment=eval/lume/default",
            f"task_name={out.name}",
            *model_overrides(tiny_model, config="OLMo-1B-SemEval25"),
            *CPU_EVAL,
            f"paths.output_dir={out}",
            *SMALL,
            "eval.lume.nonmember_documents_per_task=1",
            "eval.lume.max_new_tokens=4",
            "eval.lume.batch_size=8",
            f"eval.lume.mmlu={{tasks: [mmlu], overwrite: false, output_dir: '{out}'}}",
        ],
        cwd=workdir,
        env={
            "PYTHONPATH": os.pathsep.join(filter(None, [str(fake), os.environ.get("PYTHONPATH")])),
            "FAKE_LM_EVAL_CALL": str(call),
        },
    )
    assert json.loads(call.read_text()) == {"tasks": ["mmlu"], "model": "HFLM"}
    summary = json.loads((out / "LUME_SUMMARY.json").read_text())
    logs = json.loads((out / "LUME_EVAL.json").read_text())
    names = [
        f"{s}_{t}_{m}"
        for s in formulas.SPLITS
        for t in formulas.TASKS
        for m in ("regurgitation", "knowledge")
    ]
    mmlu = {"mmlu/acc", "mmlu/acc_stderr", "final_score"}
    assert set(summary) == {*names, "mia_auc", "mia_score", "task_aggregate", *mmlu}
    assert len(logs["forget_Task2_knowledge"]["value_by_index"]) == 5
    assert len(logs["retain_Task1_regurgitation"]["value_by_index"]) == 1
    assert len(logs["mia_auc"]["forget"]["value_by_index"]) == 10
    assert len(logs["mia_auc"]["holdout"]["value_by_index"]) == 20  # held-out documents, both files
    assert summary["mia_score"] == pytest.approx(formulas.mia_score(summary["mia_auc"]))
    terms = [1 - summary[n] if n.startswith("forget") else summary[n] for n in names]
    expected = 0.0 if 0 in terms else len(terms) / sum(1 / t for t in terms)
    assert summary["task_aggregate"] == pytest.approx(expected)
    assert summary["mmlu/acc"] == 0.25
    assert summary["final_score"] == pytest.approx(
        (summary["task_aggregate"] + summary["mia_score"] + 0.25) / 3
    )


def test_simu_trains_one_step_on_lume(tiny_model, workdir):
    out = workdir / "simu"
    overrides = [
        o for o in CPU_TRAIN_OVERRIDES if not o.startswith(("forget_split", "retain_split"))
    ]
    run_harness(
        "train.py",
        [
            "--config-name=unlearn.yaml",
            "experiment=unlearn/lume/simu",
            f"task_name={out.name}",
            *model_overrides(tiny_model, config="OLMo-1B-SemEval25"),
            *overrides,
            *SMALL,
            "+trainer.args.max_steps=1",
            "data.forget.LUME_forget.args.max_length=32",
            "data.retain.LUME_retain.args.max_length=32",
            f"paths.output_dir={out}",
        ],
        cwd=workdir,
    )
    assert (out / "simu_masks.safetensors").is_file()  # attribution ran on LUME rows
