"""The ASU paper's evaluation and baselines in the real harness: `src/eval.py` with tiny local
NLI and sentence-embedding models built here, and one training step of each baseline trainer
through `src/train.py`."""

from __future__ import annotations

import json
import os
import re
import statistics
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

pytestmark = pytest.mark.harness

SPLITS = ("retain", "real_authors", "world_facts", "forget")
CPU_EVAL = [
    "~model.model_args.attn_implementation",
    "model.model_args.torch_dtype=float32",
    "model.model_args.device_map=cpu",
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_harness_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def scorer_models(tmp_path_factory):
    """The tiny NLI and embedding models, written by the harness's own transformers."""
    _, python = harness_paths()
    out = tmp_path_factory.mktemp("scorers")
    script = Path(__file__).with_name("paper_support.py")
    subprocess.run([python, str(script), str(out)], check=True, timeout=600)
    return out / "nli", out / "embedding"


def paper_eval_args(model_dir, out, *overrides):
    return [
        "experiment=eval/tofu/asu_paper",
        "forget_split=forget01",
        f"task_name={out.name}",
        *model_overrides(model_dir),
        *CPU_EVAL,
        f"paths.output_dir={out}",
        "eval.asu_paper.batch_size=4",
        *overrides,
    ]


# What the official code does with the same answers: its `text-classification` pipeline on
# (text, text_pair) in the official direction, and sentence-transformers embeddings compared
# one pair at a time (sklearn's cosine there; numpy here), clipped at 0.
OFFICIAL_SCORING = """
import json, sys
import numpy as np
from datasets import load_dataset
from sentence_transformers import SentenceTransformer
from transformers import pipeline
logs, nli, emb, rows = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3], int(sys.argv[4])
pipe, encoder = pipeline("text-classification", model=nli, device="cpu"), SentenceTransformer(emb)
names = {"retain": "retain_perturbed", "real_authors": "real_authors_perturbed",
         "world_facts": "world_facts_perturbed", "forget": "forget01_perturbed"}
out = {}
for split, name in names.items():
    data = load_dataset("locuslab/TOFU", name=name, split=f"train[:{rows}]")
    answers = logs[f"{split}_ROUGE"]["value_by_index"]
    labels, cosines = {}, {}
    for idx, entry in answers.items():
        row = data[int(idx)]
        long = row.get("original_answer") or row["answer"]
        entail_ref = long if split in ("real_authors", "world_facts") else entry["ground_truth"]
        cos_ref = long if split in ("real_authors", "world_facts") else row["answer"]
        gen = entry["generation"]
        pair = {"text": gen, "text_pair": entail_ref} if split == "forget" else {"text": entail_ref, "text_pair": gen}
        labels[idx] = pipe([pair])[0]["label"]
        a, b = encoder.encode(gen), encoder.encode(cos_ref)
        cosines[idx] = max(0.0, float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))))
    out[split] = {"labels": labels, "cosines": cosines}
print(json.dumps(out))
"""


def test_paper_eval_scores_every_split_with_the_local_scorers(tiny_model, scorer_models, tmp_path):
    nli, embedding = scorer_models
    out = tmp_path / "paper"
    checkout, python = harness_paths()
    run_harness(
        "eval.py",
        paper_eval_args(
            tiny_model,
            out,
            "eval.asu_paper.rows=3",
            f"eval.asu_paper.nli_model={nli}",
            f"eval.asu_paper.embedding_model={embedding}",
            "eval.asu_paper.rouge_floor=0.0",  # a random model never reaches 0.1: ask the NLI
        ),
    )
    summary = json.loads((out / "ASU_PAPER_SUMMARY.json").read_text())
    logs = json.loads((out / "ASU_PAPER_EVAL.json").read_text())
    per_split = [f"{s}_{m}" for s in SPLITS for m in (
        "ROUGE", "Probability", "Truth_Ratio", "Token_Entropy", "Cosine_Similarity",
        "Entailment_Score")]  # fmt: skip
    assert set(per_split) <= set(summary)
    official = json.loads(
        subprocess.check_output(
            [
                python,
                "-c",
                OFFICIAL_SCORING,
                str(out / "ASU_PAPER_EVAL.json"),
                str(nli),
                str(embedding),
                "3",
            ],
            cwd=checkout,
            text=True,
            timeout=600,
        )  # fmt: skip
    )
    asked = 0
    for split in SPLITS:
        entail = logs[f"{split}_Entailment_Score"]["value_by_index"]
        assert {i: e["label"] for i, e in entail.items()} == official[split]["labels"]
        asked += len(entail)
        cosine = logs[f"{split}_Cosine_Similarity"]["value_by_index"]
        for idx, value in official[split]["cosines"].items():
            assert cosine[idx]["cosine_similarity"] == pytest.approx(value, abs=1e-5)
        assert summary[f"{split}_Entailment_Score"] == pytest.approx(
            statistics.fmean(label == "entailment" for label in official[split]["labels"].values())
        )
    assert asked == 12
    utility = [summary[f"{s}_{m}"] for s in SPLITS[:3] for m in (
        "ROUGE", "Probability", "Truth_Ratio", "Token_Entropy", "Cosine_Similarity",
        "Entailment_Score")]  # fmt: skip
    assert summary["paper_model_utility"] == pytest.approx(statistics.harmonic_mean(utility))
    efficacy = [1 - summary[f"forget_{m}"] for m in (
        "ROUGE", "Probability", "Truth_Ratio", "Entailment_Score")]  # fmt: skip
    efficacy.append(summary["forget_Token_Entropy"])
    assert summary["paper_forget_efficacy"] == pytest.approx(statistics.harmonic_mean(efficacy))


def test_without_the_scorers_the_aggregates_leave_them_out_and_say_so(tiny_model, tmp_path):
    out = tmp_path / "no_scorers"
    run_harness(
        "eval.py",
        paper_eval_args(
            tiny_model,
            out,
            "eval.asu_paper.rows=2",
            "eval.asu_paper.nli_model=null",
            "eval.asu_paper.embedding_model=null",
        ),
    )
    logs = json.loads((out / "ASU_PAPER_EVAL.json").read_text())
    utility = logs["paper_model_utility"]
    assert sorted(utility["left_out"]) == sorted(
        f"{s}_{m}" for s in SPLITS[:3] for m in ("Cosine_Similarity", "Entailment_Score")
    )
    assert len(utility["terms"]) == 12
    assert logs["paper_forget_efficacy"]["left_out"] == ["forget_Entailment_Score"]


def test_a_missing_scoring_model_stops_the_run_before_generating(tiny_model, tmp_path):
    checkout, python = harness_paths()
    out = tmp_path / "missing"
    missing = tmp_path / "no-nli-here"
    result = subprocess.run(
        [python, "src/eval.py", *paper_eval_args(tiny_model, out, f"eval.asu_paper.nli_model={missing}",
                                                 "eval.asu_paper.embedding_model=null")],
        cwd=checkout, capture_output=True, text=True, timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"NLI model '{missing}'" in log
    assert "Set eval.asu_paper.nli_model=/path/to/a/local/copy" in log
    assert "Calculating" not in log  # no metric ran: nothing was generated or scored
    assert not (out / "ASU_PAPER_EVAL.json").exists()


def both_evaluators(model_dir, out, reuse):
    """`eval=[tofu,asu_paper]` as TOFU-mini runs it: the same batch size and answer length."""
    generated = ["forget_Q_A_ROUGE"] + [
        f"model_utility.pre_compute.{s}_Q_A_ROUGE" for s in ("retain", "ra", "wf")
    ]
    return [
        "experiment=eval/tofu/default",
        "forget_split=forget01",
        "holdout_split=holdout01",
        "eval=[tofu,asu_paper]",
        f"task_name={out.name}",
        *model_overrides(model_dir),
        *CPU_EVAL,
        f"paths.output_dir={out}",
        "~eval.tofu.metrics.privleak",
        "~eval.tofu.metrics.extraction_strength",
        "eval.tofu.batch_size=8",
        *[f"eval.tofu.metrics.{m}.generation_args.max_new_tokens=4" for m in generated],
        "eval.asu_paper.forget_split=forget01",
        "eval.asu_paper.rows=200",  # the paper's 300 would end retain in a batch of 4
        "eval.asu_paper.batch_size=8",
        "eval.asu_paper.max_new_tokens=4",
        "eval.asu_paper.nli_model=null",
        "eval.asu_paper.embedding_model=null",
        f"eval.asu_paper.reuse_scores={str(reuse).lower()}",
    ]


def test_the_paper_evaluator_reuses_tofu_scores_and_gets_the_same_values(tiny_model, tmp_path):
    """With reuse on, the paper's evaluator takes the probabilities and greedy answers the TOFU
    evaluator computed on the same batches; every value equals the run that recomputes them."""
    runs = {}
    for reuse in (True, False):
        out = tmp_path / f"reuse_{reuse}"
        result = run_harness("eval.py", both_evaluators(tiny_model, out, reuse))
        log = result.stdout + result.stderr
        files = ("TOFU_SUMMARY.json", "ASU_PAPER_SUMMARY.json", "ASU_PAPER_EVAL.json")
        runs[reuse] = log, [json.loads((out / f).read_text()) for f in files]
    log, (tofu, paper, paper_logs) = runs[True]
    reused = re.search(r"ASU_PAPER: (\d+) of (\d+) scored batches reused", log)
    assert reused, log[-3000:]
    hits, calls = map(int, reused.groups())
    # retain (first 200 of 400 rows), real authors, world facts and forget01 in batches of 8:
    # answers, paraphrases and perturbed answers scored, and answers generated, by both
    assert calls > 100 and hits == calls
    assert "scored batches reused" not in runs[False][0]
    assert tofu == runs[False][1][0]
    assert paper == runs[False][1][1]  # exactly: a reused batch is the recomputed value
    for name, entry in paper_logs.items():
        assert entry.get("value_by_index") == runs[False][1][2][name].get("value_by_index"), name


# One step of each baseline (and of ASU_KL) with its paper preset, scorers off (no eval runs).
PRESET_LOSSES = {
    "ME_GD": ("me/forget_loss", "me/retain_loss"),
    "IDK_AP": ("idk/forget_loss", "idk/retain_loss"),
    "LLMU": ("llmu/forget_nll", "llmu/mismatch_loss", "llmu/retain_loss"),
    "ASU_KL": ("asu/forget_loss", "asu/retain_loss"),
}


@pytest.mark.parametrize("preset", list(PRESET_LOSSES))
def test_paper_presets_train_one_step(tiny_model, tmp_path, preset):
    out = tmp_path / preset
    result = run_harness(
        "train.py",
        [
            "--config-name=unlearn.yaml",
            f"experiment=unlearn/tofu/paper/{preset}",
            f"task_name={out.name}",
            *model_overrides(tiny_model),
            *CPU_TRAIN_OVERRIDES,
            "+trainer.args.max_steps=1",
            "trainer.args.logging_steps=1",
            f"paths.output_dir={out}",
            "eval.asu_paper.nli_model=null",
            "eval.asu_paper.embedding_model=null",
        ],
    )
    handler = preset.split("_")[0]
    assert f"{handler} Trainer loaded" in result.stdout + result.stderr
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 1
    logged = state["log_history"][0]
    for key in PRESET_LOSSES[preset]:
        assert logged[key] == logged[key] and abs(logged[key]) < 1e4  # finite
    assert (out / "model.safetensors").is_file()
