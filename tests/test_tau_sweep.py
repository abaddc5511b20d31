"""The τ sweep: NLL split, attention entropy, the recommendation rule, the CLI."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from conftest import tiny_causal_lm

from asu_simu_plugin import tau_sweep as sweep_module
from asu_simu_plugin.cli import main
from asu_simu_plugin.data import PadCollator, QADataset
from asu_simu_plugin.diagnostics import token_nll
from asu_simu_plugin.tau_sweep import (
    function_token_ids,
    is_function_token,
    plot_sweep,
    recommend_tau,
    tau_sweep,
    write_sweep_csv,
)


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


def test_entropy_at_huge_tau_is_that_of_uniform_attention(peaked_model, toy_tokenizer, toy_authors):
    rows = toy_authors[3].qa_pairs()[:2]
    (result,) = tau_sweep(peaked_model, toy_tokenizer, rows, [1e6], progress=False)
    # uniform attention over a causal prefix of n tokens has entropy log n; the query positions
    # are those whose next token is an answer token (labels shifted by one)
    logs = []
    for item in QADataset(rows, toy_tokenizer):
        positions = (item["labels"][1:] != -100).nonzero().flatten()
        logs += [math.log(int(p) + 1) for p in positions]
    assert result["attention_entropy"] == pytest.approx(sum(logs) / len(logs), abs=1e-4)


def test_sdpa_model_is_measured_like_the_eager_one(toy_tokenizer, toy_authors):
    rows = toy_authors[4].qa_pairs()
    eager = tiny_causal_lm("llama", attn_implementation="eager")
    sdpa = tiny_causal_lm("llama", attn_implementation="sdpa")
    kwargs = dict(taus=[1, 3], layers=[0, 2], progress=False)
    expected = tau_sweep(eager, toy_tokenizer, rows, **kwargs)
    got = tau_sweep(sdpa, toy_tokenizer, rows, **kwargs)
    for e, g in zip(expected, got, strict=True):
        assert g["attention_entropy"] == pytest.approx(e["attention_entropy"], rel=1e-5)
        assert g["content_nll"] == pytest.approx(e["content_nll"], rel=1e-5)
    assert sdpa.config._attn_implementation == "sdpa"  # switched back afterwards


def test_only_the_chosen_layers_are_tempered(peaked_model, toy_tokenizer, toy_authors):
    rows = toy_authors[5].qa_pairs()
    base, hot = tau_sweep(peaked_model, toy_tokenizer, rows, [1, 5], layers=[1], progress=False)
    assert hot["content_nll"] != base["content_nll"]
    with pytest.raises(ValueError, match="layer"):
        tau_sweep(peaked_model, toy_tokenizer, rows, [2], layers=[7], progress=False)


def test_function_tokens(toy_tokenizer):
    assert is_function_token(" the") and is_function_token(".") and is_function_token(" ")
    assert is_function_token(" Was") and is_function_token("?\n")
    assert not is_function_token(" Lisbon") and not is_function_token("Ivanova")
    ids = toy_tokenizer(" the Lisbon.", add_special_tokens=False)["input_ids"]
    eos = toy_tokenizer.eos_token_id
    chosen = function_token_ids(toy_tokenizer, [*ids, eos, eos]).tolist()
    assert eos in chosen and toy_tokenizer.convert_tokens_to_ids("Ġthe") in chosen
    assert not any("Lis" in toy_tokenizer.decode([i]) for i in chosen)


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
    # order does not matter; the fallback picks the largest content-minus-function rise
    shuffled = [row(4, 1.2, 0.6), row(1, 0.5, 0.2), row(2, 0.9, 0.25), row(3, 1.3, 0.5)]
    tau, reason = recommend_tau(shuffled)  # rises (content, function): 2 (.4, .05), 3 (.8, .3)
    assert tau == 3 and "separates" in reason
    assert recommend_tau(shuffled, content_rise=0.35)[0] == 2
    assert recommend_tau(shuffled, content_rise=0.6, function_budget=0.2)[0] == 2


def test_csv_and_png(tmp_path):
    results = [
        {**row(1, 0.5, 0.2), "attention_entropy": 2.0, "content_tokens": 3, "function_tokens": 4},
        {**row(2, 1.6, 0.5), "attention_entropy": 2.5, "content_tokens": 3, "function_tokens": 4},
    ]
    rows = list(csv.DictReader(write_sweep_csv(results, tmp_path / "a" / "s.csv").open()))
    assert [float(r["content_nll"]) for r in rows] == [0.5, 1.6]
    assert list(rows[0]) == list(sweep_module.FIELDS)
    png = plot_sweep(results, tmp_path / "b" / "s.png", recommended=2)
    assert png.read_bytes()[:4] == b"\x89PNG"


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


def test_module_main_and_its_errors(tmp_path, peaked_model, toy_tokenizer, toy_authors, capsys):
    model_dir = tmp_path / "model"
    peaked_model.save_pretrained(model_dir)
    toy_tokenizer.save_pretrained(model_dir)
    data = tmp_path / "qa.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"q": qa["question"], "a": qa["answer"]}) for qa in toy_authors[1].qa_pairs()
        )
    )
    common = ["--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "o")]
    keys = ["--question-key", "q", "--answer-key", "a"]
    assert sweep_module.main([*common, *keys, "--taus", "1,4", "--layers", "0,1", "--quiet",
                              "--max-examples", "2"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "recommended tau" in printed and "content NLL" in printed
    rows = list(csv.DictReader((tmp_path / "o" / "tau_sweep.csv").open()))
    assert [float(r["tau"]) for r in rows] == [1.0, 4.0]
    with pytest.raises(ValueError, match="--taus"):
        sweep_module.main([*common, *keys, "--taus", "1,two"])
    with pytest.raises(ValueError, match="> 0"):
        sweep_module.main([*common, *keys, "--taus", "0,2"])
    with pytest.raises(KeyError, match="lacks"):
        sweep_module.main([*common, "--taus", "2"])  # the default keys are not in this file
