"""The ASU paper's measures: every formula against a hand computation, the metric functions on
fixed per-row logs, Model Utility / Forget Efficacy against the official definition, the NLI
plumbing on a tiny local model, and the messages when a scoring model is missing."""

from __future__ import annotations

import importlib
import math
import statistics
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from datasets import Dataset
from omegaconf import OmegaConf
from paper_support import NLI_LABELS, save_nli_model

from asu_simu_plugin import metrics, registry
from asu_simu_plugin.metrics import evaluator, formulas, paper, scorers

ROOT = Path(__file__).resolve().parents[1]


# -- formulas -------------------------------------------------------------------------------------
def test_perturbation_ratio_and_truth_ratio_by_hand():
    # r = exp(mean perturbed NLL - paraphrased NLL) = exp((2 + 3) / 2 - 1)
    assert formulas.perturbation_ratio(1.0, [2.0, 3.0]) == pytest.approx(math.exp(1.5))
    assert formulas.perturbation_ratio(1.0, 1.5) == pytest.approx(math.exp(0.5))
    # forget: 1 - mean(min(r, 1/r)) = 1 - (0.5 + 0.5) / 2; others: mean(max(0, 1 - 1/r))
    assert formulas.truth_ratio([2.0, 0.5], forget=True) == pytest.approx(0.5)
    assert formulas.truth_ratio([2.0, 0.5], forget=False) == pytest.approx((0.5 + 0.0) / 2)
    assert formulas.truth_ratio([4.0], forget=False) == pytest.approx(0.75)
    assert formulas.truth_ratio([1.0, 1.0], forget=True) == pytest.approx(0.0)


def test_token_entropy_by_hand():
    # p = (1/2, 1/4, 1/4): H = 1.5 bits, log2(4) = 2
    assert formulas.token_entropy(["a", "a", "b", "c"]) == pytest.approx(0.75)
    assert formulas.token_entropy(["a", "b", "c", "d"]) == pytest.approx(1.0)
    assert formulas.token_entropy(["a", "a", "a"]) == 0.0
    assert formulas.token_entropy(["a"]) == 0.0 and formulas.token_entropy([]) == 0.0


def test_clipped_cosine_and_entailed_by_hand():
    assert formulas.clipped_cosine([1.0, 0.0], [1.0, 1.0]) == pytest.approx(1 / math.sqrt(2))
    assert formulas.clipped_cosine([3.0, 4.0], [6.0, 8.0]) == pytest.approx(1.0)
    assert formulas.clipped_cosine([1.0, 0.0], [-1.0, 0.5]) == 0.0  # negative: clipped
    assert formulas.clipped_cosine([0.0, 0.0], [1.0, 0.0]) == 0.0
    assert formulas.entailed("entailment", 0.1)
    assert not formulas.entailed("entailment", 0.099)
    assert not formulas.entailed("neutral", 0.9)
    assert formulas.entailed("entailment", 0.05, rouge_floor=0.0)


def test_harmonic_mean_by_hand():
    assert formulas.harmonic_mean([1.0, 2.0, 4.0]) == pytest.approx(3 / (1 + 0.5 + 0.25))
    assert formulas.harmonic_mean([0.5]) == 0.5
    assert formulas.harmonic_mean([0.3, 0.0, 0.9]) == 0.0
    with pytest.raises(ValueError, match="values >= 0"):
        formulas.harmonic_mean([0.5, -0.1])


# -- the metric functions on fixed per-row logs ---------------------------------------------------
class WordTokenizer:
    def tokenize(self, text):
        return text.split()


def rouge_rows(*rows):
    """A harness `rouge` result: (generation, ground_truth, rougeL_recall) per row."""
    return {
        str(i): {"generation": g, "ground_truth": t, "rougeL_recall": r}
        for i, (g, t, r) in enumerate(rows)
    }


def test_truth_ratio_metric_reads_the_probability_results():
    correct = {0: {"avg_loss": 1.0}, 1: {"avg_loss": 2.0}, 2: None}
    wrong = {0: {"avg_loss": [1.5, 2.5]}, 1: {"avg_loss": [1.0, 1.0]}, 2: {"avg_loss": [1.0]}}
    pre = {"correct": {"value_by_index": correct}, "wrong": {"value_by_index": wrong}}
    r0, r1 = math.exp(2.0 - 1.0), math.exp(1.0 - 2.0)  # row 2 has no correct value: skipped
    other = paper.truth_ratio(None, pre_compute=pre, forget=False)
    assert other["agg_value"] == pytest.approx((1 - 1 / r0 + 0.0) / 2)
    forget = paper.truth_ratio(None, pre_compute=pre, forget=True)
    assert forget["agg_value"] == pytest.approx(1 - (1 / r0 + r1) / 2)
    assert list(forget["value_by_index"]) == [0, 1]


def test_token_entropy_metric_uses_the_model_tokenizer():
    pre = {"generations": {"value_by_index": rouge_rows(("a a b c", "x", 0), ("d", "x", 0))}}
    result = paper.token_entropy(None, pre_compute=pre, tokenizer=WordTokenizer())
    assert result["value_by_index"]["0"]["token_entropy"] == pytest.approx(0.75)
    assert result["agg_value"] == pytest.approx((0.75 + 0.0) / 2)


def test_cosine_metric_scores_each_answer_against_its_row_reference(monkeypatch):
    vectors = {"ans one": [1.0, 0.0], "long ref": [1.0, 1.0], "ans two": [0.0, 1.0], "B": [-1, 0]}
    calls = []

    def fake_embeddings(path, texts, device=None, batch_size=32):
        import torch

        calls.append((path, list(texts)))
        return torch.tensor([vectors[t] for t in texts], dtype=torch.float32)

    monkeypatch.setattr(scorers, "embeddings", fake_embeddings)
    data = type("QA", (), {"data": Dataset.from_list([
        {"answer": "short", "original_answer": "long ref"},
        {"answer": "short", "original_answer": "B"},
    ])})()  # fmt: skip
    pre = {"generations": {"value_by_index": rouge_rows(("ans one", "x", 0), ("ans two", "x", 0))}}
    result = paper.cosine_similarity(
        None,
        pre_compute=pre,
        data=data,
        embedding_model="emb",
        reference_key=["original_answer", "answer"],
        device="cpu",
    )
    assert calls == [("emb", ["ans one", "ans two"]), ("emb", ["long ref", "B"])]
    assert result["value_by_index"]["0"]["cosine_similarity"] == pytest.approx(1 / math.sqrt(2))
    assert result["value_by_index"]["1"]["cosine_similarity"] == 0.0  # cos -> clipped at 0
    assert result["agg_value"] == pytest.approx(1 / math.sqrt(2) / 2)
    assert result["reference"] == "original_answer"
    # the hub's TOFU real_authors has no original_answer: the first key the rows have is used
    data.data = data.data.remove_columns("original_answer")
    with pytest.raises(KeyError):  # "short" has no vector here: proves `answer` was read
        paper.cosine_similarity(None, pre_compute=pre, data=data, embedding_model="emb",
                                reference_key=["original_answer", "answer"])  # fmt: skip


@pytest.mark.parametrize(
    ("direction", "premises"),
    [("answer_to_reference", ["gen0", "gen2"]), ("reference_to_answer", ["ref0", "ref2"])],
)
def test_entailment_metric_direction_and_rouge_floor(monkeypatch, direction, premises):
    asked = []

    def fake_labels(path, first, second, device=None, batch_size=30):
        asked.append((list(first), list(second)))
        return ["entailment", "neutral"]

    monkeypatch.setattr(scorers, "nli_labels", fake_labels)
    rows = rouge_rows(("gen0", "ref0", 0.5), ("gen1", "ref1", 0.05), ("gen2", "ref2", 0.1))
    result = paper.entailment_score(
        None, pre_compute={"generations": {"value_by_index": rows}}, nli_model="nli",
        direction=direction, reference_key=None, device="cpu",
    )  # fmt: skip
    others = ["ref0", "ref2"] if premises[0] == "gen0" else ["gen0", "gen2"]
    assert asked == [(premises, others)]  # row 1 is below the ROUGE floor: never asked
    labels = {i: e["label"] for i, e in result["value_by_index"].items()}
    assert labels == {"0": "entailment", "1": "none", "2": "neutral"}
    assert result["agg_value"] == pytest.approx(1 / 3)


def test_a_scorer_set_to_null_is_left_out_and_the_aggregate_says_so():
    pre = {"generations": {"value_by_index": rouge_rows(("a", "b", 1.0))}}
    assert paper.entailment_score(None, pre_compute=pre, nli_model=None) == {
        "agg_value": None,
        "left_out": "nli_model is null",
    }
    assert paper.cosine_similarity(None, pre_compute=pre, embedding_model=None)["agg_value"] is None
    result = paper.hmean(
        None,
        pre_compute={"a": {"agg_value": 0.5}, "b": {"agg_value": None}, "c": {"agg_value": 0.2}},
        complement=["c"],
    )
    assert result["left_out"] == ["b"] and result["terms"] == {"a": 0.5, "c": 0.8}
    assert result["agg_value"] == pytest.approx(2 / (1 / 0.5 + 1 / 0.8))
    with pytest.raises(ValueError, match="not pre-computed"):
        paper.hmean(None, pre_compute={"a": {"agg_value": 0.5}}, complement=["z"])


# -- Model Utility and Forget Efficacy against the official definition ----------------------------
# Fixed per-row logs in the official format (one dict per eval file, rows in lists).
OFFICIAL_LOGS = {
    "eval_log.json": {  # retain
        "avg_gt_loss": [0.2, 0.9, 1.4], "avg_paraphrased_loss": [0.5, 1.0, 0.3],
        "average_perturb_loss": [[1.0, 1.4], [0.8, 1.6], [2.0, 2.2]],
        "rougeL_recall": [0.9, 0.4, 0.05], "token_entropy": [0.8, 0.9, 0.7],
        "cosine_similarity": [0.9, 0.6, 0.3], "entailment_labels": ["entailment", "neutral", "none"],
    },
    "eval_real_author_wo_options.json": {
        "avg_gt_loss": [0.3, 1.1], "avg_paraphrased_loss": [0.3, 1.1],
        "average_perturb_loss": [[1.2, 0.9, 1.5], [1.0, 0.7, 2.1]],
        "rougeL_recall": [1.0, 0.5], "token_entropy": [0.6, 1.0],
        "cosine_similarity": [0.7, 0.8], "entailment_labels": ["entailment", "entailment"],
    },
    "eval_real_world_wo_options.json": {
        "avg_gt_loss": [0.6, 0.4], "avg_paraphrased_loss": [0.6, 0.4],
        "average_perturb_loss": [[0.9, 1.3, 0.2], [1.9, 0.5, 1.0]],
        "rougeL_recall": [0.3, 0.8], "token_entropy": [0.9, 0.5],
        "cosine_similarity": [0.4, 0.95], "entailment_labels": ["contradiction", "entailment"],
    },
    "eval_log_forget.json": {
        "avg_gt_loss": [2.5, 0.7, 3.1], "avg_paraphrased_loss": [2.0, 1.2, 2.8],
        "average_perturb_loss": [[2.2, 2.6], [1.1, 1.0], [3.5, 2.9]],
        "rougeL_recall": [0.2, 0.6, 0.0], "token_entropy": [0.95, 0.4, 0.85],
        "cosine_similarity": [0.5, 0.8, 0.2], "entailment_labels": ["neutral", "entailment", "none"],
    },
}  # fmt: skip


def official_results(logs):
    """The official `get_eval_results`, written again from its definition (plain Python)."""
    out = {}
    for name, log in logs.items():
        true_nll = log["avg_gt_loss"]
        if "eval_log" in name:
            prob = statistics.fmean(math.exp(-x) for x in true_nll)
        else:
            prob = statistics.fmean(
                math.exp(-t) / (math.exp(-t) + sum(math.exp(-p) for p in ps))
                for t, ps in zip(true_nll, log["average_perturb_loss"], strict=True)
            )
        ratios = [
            math.exp(statistics.fmean(ps) - para)
            for para, ps in zip(
                log["avg_paraphrased_loss"], log["average_perturb_loss"], strict=True
            )
        ]
        if "forget" in name:
            truth = 1 - statistics.fmean(min(r, 1 / r) for r in ratios)
        else:
            truth = statistics.fmean(max(0, 1 - 1 / r) for r in ratios)
        entail = sum(label == "entailment" for label in log["entailment_labels"])
        out[name] = {
            "ROUGE": statistics.fmean(log["rougeL_recall"]), "Probability": prob,
            "Truth Ratio": truth, "Token Entropy": statistics.fmean(log["token_entropy"]),
            "Cosine Similarity": statistics.fmean(log["cosine_similarity"]),
            "Entailment Score": entail / len(log["entailment_labels"]),
        }  # fmt: skip
    utility = [v for n, r in out.items() if "forget" not in n for v in r.values()]
    forget = out["eval_log_forget.json"]
    efficacy = [1 - forget[k] for k in ("ROUGE", "Probability", "Truth Ratio", "Entailment Score")]
    efficacy.append(forget["Token Entropy"])
    return statistics.harmonic_mean(utility), statistics.harmonic_mean(efficacy)


SPLITS = {
    "retain": "eval_log.json",
    "real_authors": "eval_real_author_wo_options.json",
    "world_facts": "eval_real_world_wo_options.json",
    "forget": "eval_log_forget.json",
}


def harness_results(split, log):
    """The same rows as the harness's metrics would log them, then our metric functions."""
    rows = range(len(log["rougeL_recall"]))

    def probability(losses):
        """A harness `probability` result (per-row lists for the perturbed answers)."""
        if isinstance(losses[0], list):
            by_index = {i: {"avg_loss": losses[i], "prob": [math.exp(-x) for x in losses[i]]}
                        for i in rows}  # fmt: skip
            return {"value_by_index": by_index}
        by_index = {i: {"avg_loss": losses[i], "prob": math.exp(-losses[i])} for i in rows}
        return {"agg_value": statistics.fmean(math.exp(-x) for x in losses),
                "value_by_index": by_index}  # fmt: skip

    correct, wrong = probability(log["avg_gt_loss"]), probability(log["average_perturb_loss"])
    if split in ("real_authors", "world_facts"):  # the harness's probability_w_options
        p = [
            c["prob"] / (c["prob"] + sum(w["prob"]))
            for c, w in zip(correct["value_by_index"].values(), wrong["value_by_index"].values(), strict=True)
        ]  # fmt: skip
        prob = {"agg_value": statistics.fmean(p)}
    else:
        prob = correct
    para = probability(log["avg_paraphrased_loss"])
    tr = paper.truth_ratio(
        None, pre_compute={"correct": para, "wrong": wrong}, forget=split == "forget"
    )
    labels = log["entailment_labels"]
    return {
        f"{split}_ROUGE": {"agg_value": statistics.fmean(log["rougeL_recall"])},
        f"{split}_Probability": prob,
        f"{split}_Truth_Ratio": tr,
        f"{split}_Token_Entropy": {"agg_value": statistics.fmean(log["token_entropy"])},
        f"{split}_Cosine_Similarity": {"agg_value": statistics.fmean(log["cosine_similarity"])},
        f"{split}_Entailment_Score": {
            "agg_value": statistics.fmean(label == "entailment" for label in labels)
        },
    }


def shipped_eval_config():
    return yaml.safe_load((ROOT / "configs" / "eval" / "asu_paper.yaml").read_text())


def test_model_utility_and_forget_efficacy_match_the_official_definition():
    utility, efficacy = official_results(OFFICIAL_LOGS)
    results = {}
    for split, name in SPLITS.items():
        results |= harness_results(split, OFFICIAL_LOGS[name])
    config = shipped_eval_config()["metrics"]
    aggregates = {}
    for metric in ("paper_model_utility", "paper_forget_efficacy"):
        names = config[metric]["pre_compute"]
        pre = {n: results[n] for n in names}
        aggregates[metric] = paper.hmean(
            None, pre_compute=pre, complement=config[metric].get("complement")
        )
    assert len(aggregates["paper_model_utility"]["terms"]) == 18
    assert aggregates["paper_model_utility"]["agg_value"] == pytest.approx(utility, rel=1e-12)
    assert len(aggregates["paper_forget_efficacy"]["terms"]) == 5  # cosine left out by design
    assert aggregates["paper_forget_efficacy"]["agg_value"] == pytest.approx(efficacy, rel=1e-12)
    assert 0 < utility < 1 and 0 < efficacy < 1


def test_shipped_eval_config_pairs_and_references_as_the_official_code():
    config = shipped_eval_config()
    metrics_cfg = config["metrics"]
    direction = {s: metrics_cfg[f"{s}_Entailment_Score"]["direction"] for s in SPLITS}
    assert direction == {
        "retain": "reference_to_answer",
        "real_authors": "reference_to_answer",
        "world_facts": "reference_to_answer",
        "forget": "answer_to_reference",
    }
    for split in ("real_authors", "world_facts"):
        for kind in ("Cosine_Similarity", "Entailment_Score"):
            assert metrics_cfg[f"{split}_{kind}"]["reference_key"] == ["original_answer", "answer"]
        assert metrics_cfg[f"{split}_Probability"]["handler"] == "probability_w_options"
    assert metrics_cfg["forget_Truth_Ratio"]["forget"] is True
    assert metrics_cfg["retain_Truth_Ratio"]["forget"] is False
    assert (config["rows"], config["max_length"], config["rouge_floor"]) == (300, 200, 0.1)
    assert metrics_cfg["retain_ROUGE"]["generation_args"]["do_sample"] is False
    assert (config["nli_model"], config["embedding_model"]) == (
        scorers.NLI_DEFAULT,
        scorers.EMBEDDING_DEFAULT,
    )
    # every per-split metric runs before the aggregates that reuse it
    order = list(metrics_cfg)
    for aggregate in ("paper_model_utility", "paper_forget_efficacy"):
        for name in metrics_cfg[aggregate]["pre_compute"]:
            assert order.index(name) < order.index(aggregate)


# -- the scoring models ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_nli(tmp_path_factory):
    path = save_nli_model(tmp_path_factory.mktemp("scorers") / "nli")
    yield str(path)
    scorers.nli_model.cache_clear()


def test_nli_labels_match_the_text_classification_pipeline(tiny_nli):
    from transformers import pipeline

    premises = ["the tower is in paris", "william wrote the play", "who was born", "a book"]
    hypotheses = ["paris", "shakespeare wrote romeo and juliet", "the author", "the famous novel"]
    ours = scorers.nli_labels(tiny_nli, premises, hypotheses, batch_size=3)
    pipe = pipeline("text-classification", model=tiny_nli, device="cpu")
    official = [
        r["label"]
        for r in pipe(
            [{"text": p, "text_pair": h} for p, h in zip(premises, hypotheses, strict=True)]
        )
    ]
    assert ours == official
    assert set(ours) <= set(NLI_LABELS.values())
    flipped = scorers.nli_labels(tiny_nli, hypotheses, premises)
    assert flipped != ours  # the order of the pair matters to this model (direction is tested)


def test_a_missing_nli_model_names_the_model_and_the_key(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(scorers.ScorerModelError) as error:
        scorers.nli_model(missing)
    message = str(error.value)
    assert f"NLI model {missing!r}" in message
    assert "eval.asu_paper.nli_model=/path/to/a/local/copy" in message
    assert "eval.asu_paper.nli_model=null" in message
    # through the evaluator's check, the key is the evaluator's own, found in the full config
    cfg = OmegaConf.create({"eval": {"paper_run": {
        "nli_model": missing,
        "metrics": {"x_Entailment": {"handler": "entailment_score", "nli_model": "${eval.paper_run.nli_model}"}},
    }}})  # fmt: skip
    with pytest.raises(scorers.ScorerModelError, match=r"Set eval\.paper_run\.nli_model="):
        evaluator.check_scorer_models(cfg.eval.paper_run)


def test_without_sentence_transformers_the_message_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import fails
    scorers.embedding_model.cache_clear()
    with pytest.raises(scorers.ScorerModelError, match=r'pip install "asu-simu-plugin\[paper\]"'):
        scorers.embedding_model("paraphrase-MiniLM-L6-v2")
    scorers.embedding_model.cache_clear()


def test_the_evaluator_check_skips_scorers_set_to_null_and_loads_the_others(tiny_nli):
    cfg = OmegaConf.create({"metrics": {
        "a": {"handler": "entailment_score", "nli_model": tiny_nli},
        "b": {"handler": "paper_hmean", "pre_compute": {
            "c": {"handler": "cosine_similarity", "embedding_model": None},
            "d": {"handler": "entailment_score", "nli_model": tiny_nli},
        }},
    }})  # fmt: skip
    assert evaluator.scorer_models(cfg.metrics) == {("nli", tiny_nli): "nli_model"}
    assert evaluator.check_scorer_models(cfg) == [tiny_nli]


# -- registration ---------------------------------------------------------------------------------
def test_metric_and_evaluator_entry_points_are_the_registry():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for kind, group in (("metric", "metrics"), ("evaluator", "evaluators")):
        listed = {c.name: c.target for c in registry.components(kind)}
        assert project["entry-points"][f"open_unlearning.{group}"] == listed
    assert set(metrics.METRIC_FUNCTIONS) == {c.name for c in registry.components("metric")}
    for target in metrics.METRIC_FUNCTIONS.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function))
    assert "sentence-transformers" not in " ".join(project["dependencies"])
    assert project["optional-dependencies"]["paper"][0].startswith("sentence-transformers")
