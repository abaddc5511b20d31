"""The τ sweep: NLL split, attention entropy, the recommendation rule, the CLI."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import tiny_causal_lm

from asu_simu_plugin.cli import main
from asu_simu_plugin.data import PadCollator, QADataset
from asu_simu_plugin.diagnostics import token_nll
from asu_simu_plugin.tau_sweep import is_function_token, recommend_tau, tau_sweep


@pytest.fixture
def peaked_model():
    model = tiny_causal_lm("llama")
    with torch.no_grad():  # peaked attention so that τ matters
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
    return model


def test_tau_one_is_the_plain_models_nll_and_the_split_adds_up(
    peaked_model, toy_tokenizer, toy_authors
):
    rows = toy_authors[0].qa_pairs() + toy_authors[1].qa_pairs()
    (base,) = tau_sweep(peaked_model, toy_tokenizer, rows, [1.0], batch_size=4, progress=False)
    batch = PadCollator(toy_tokenizer.pad_token_id)(list(QADataset(rows, toy_tokenizer)))
    with torch.no_grad():
        logits = peaked_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    nll = token_nll(logits, batch["labels"])
    answer = batch["labels"][:, 1:] != -100
    total = (
        base["content_nll"] * base["content_tokens"]
        + base["function_nll"] * base["function_tokens"]
    )
    assert base["content_tokens"] + base["function_tokens"] == int(answer.sum())
    assert total == pytest.approx(float(nll[answer].sum()), rel=1e-5)
    assert base["content_tokens"] > 0 and base["function_tokens"] > 0


def test_attention_entropy_rises_with_tau(peaked_model, toy_tokenizer, toy_authors):
    rows = toy_authors[2].qa_pairs()
    results = tau_sweep(peaked_model, toy_tokenizer, rows, [1, 2, 4, 100], progress=False)
    entropies = [r["attention_entropy"] for r in results]
    assert entropies == sorted(entropies) and entropies[-1] > entropies[0] + 0.05


def test_function_tokens():
    assert is_function_token(" the") and is_function_token(".") and is_function_token(" ")
    assert not is_function_token(" Lisbon") and not is_function_token("Ivanova")


def row(tau, content, function):
    return {"tau": tau, "content_nll": content, "function_nll": function}


def test_recommendation_rule():
    results = [row(1, 0.5, 0.2), row(1.5, 1.0, 0.3), row(2, 1.6, 0.5), row(3, 3.0, 1.0)]
    tau, reason = recommend_tau(results)
    assert tau == 2 and "smallest" in reason  # 3 rises more but breaks fluency (+0.8 > 0.5)
    tau, reason = recommend_tau(results, content_rise=5.0)
    assert tau == 2 and "separates" in reason
    assert recommend_tau([row(2, 1, 1)])[0] is None  # no τ = 1 baseline
    assert recommend_tau([row(1, 0, 0), row(2, 3, 2)])[0] is None


def test_cli_writes_csv_and_png(tmp_path, peaked_model, toy_tokenizer, toy_authors):
    model_dir = tmp_path / "model"
    peaked_model.save_pretrained(model_dir)
    toy_tokenizer.save_pretrained(model_dir)
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps(qa) for qa in toy_authors[0].qa_pairs()))
    out = tmp_path / "sweep"
    assert (
        main(
            [
                "tau-sweep",
                "--model",
                str(model_dir),
                "--data",
                str(data),
                "--taus",
                "2,3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader((out / "tau_sweep.csv").open()))
    assert [float(r["tau"]) for r in rows] == [1.0, 2.0, 3.0]  # τ = 1 is always added
    assert (out / "tau_sweep.png").read_bytes()[:4] == b"\x89PNG"
