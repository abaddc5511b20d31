"""The τ sweep: NLL split, attention entropy, the one measurement, rule and CSV, the CLI."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import transformers
from conftest import tiny_causal_lm

from asu_simu_plugin.attention import attention_temperature
from asu_simu_plugin.cli import main
from asu_simu_plugin.data import PadCollator, QADataset
from asu_simu_plugin.diagnostics import token_nll
from asu_simu_plugin.methods.asu import collapse, temperature
from asu_simu_plugin.methods.asu.sweep import format_table, plot_grid, tau_sweep
from asu_simu_plugin.methods.asu.temperature import (
    GRID_FIELDS,
    choose_temperature,
    write_grid_csv,
)
from asu_simu_plugin.methods.asu.tokens import function_token_ids, is_function_token


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


def row(tau, content, function, end=0.01, **more):
    return {
        "tau": tau,
        "layers": "all",
        "content_nll": content,
        "function_nll": function,
        "end_probability": end,
        **more,
    }


def test_the_diagnostic_grid_is_chosen_by_the_one_rule():
    # One layer set, a sharpening τ < 1 and no baseline first: choose_temperature as for auto.
    rows = [
        row(0.5, 0.1, 0.1),
        row(3, 3.0, 1.0),  # function +0.8 > 0.5: not admissible
        row(1, 0.5, 0.2),
        row(1.5, 1.0, 0.3),  # separation 0.5 - 0.1 = 0.4
        row(2, 1.6, 0.5),  # separation 1.1 - 0.3 = 0.8: chosen
        row(2.5, 2.5, 0.6, end=0.2),  # separation 1.6, but P(end) 0.2 > 0.1
    ]
    chosen, reason = choose_temperature(rows)
    assert chosen["tau"] == 2
    assert reason == (
        "largest content-minus-function NLL rise among settings with function-token NLL rise "
        "<= 0.5 and P(end) <= 0.1: content +1.10 nats, function +0.30, P(end) 0.010"
    )
    assert [r["admissible"] for r in rows] == [False, False, False, True, True, False]
    assert [r["chosen"] for r in rows] == [False, False, False, False, True, False]
    chosen, _ = choose_temperature(rows, temperature.AutoTemperatureConfig(function_budget=1.0))
    assert chosen["tau"] == 3  # separation 2.5 - 0.8 = 1.7
    with pytest.raises(ValueError, match="no τ = 1 row"):
        choose_temperature([row(2, 1, 1)])
    with pytest.raises(ValueError, match="no τ > 1"):
        choose_temperature([row(1, 1, 1), row(0.5, 1, 1)])


def test_content_rise_is_gone():
    with pytest.raises(ValueError, match="tau_sweep: .*content_rise.*known keys: sample"):
        temperature.settings_of(temperature.AutoTemperatureConfig, {"content_rise": 1}, "tau_sweep")


def test_one_csv_writer_for_both_grids(tmp_path):
    measured = {"content_tokens": 3, "function_tokens": 4, "layer_ids": [0, 1]}
    diagnostic = [
        row(1, 0.5, 0.2, attention_entropy=2.0, **measured),
        row(2, 1.6, 0.5, attention_entropy=2.5, **measured),
    ]
    choose_temperature(diagnostic)
    written = write_grid_csv(diagnostic, tmp_path / "a" / "s.csv")
    rows = list(csv.DictReader(written.open()))
    assert list(rows[0]) == list(GRID_FIELDS)  # every field, attention entropy included
    assert [float(r["content_nll"]) for r in rows] == [0.5, 1.6]
    assert [float(r["attention_entropy"]) for r in rows] == [2.0, 2.5]
    assert [r["chosen"] for r in rows] == ["False", "True"]
    auto = [row(1, 0.5, 0.2, **measured), row(2, 1.6, 0.5, **measured)]
    choose_temperature(auto)
    rows = list(csv.DictReader(write_grid_csv(auto, tmp_path / "b.csv").open()))
    assert list(rows[0]) == [f for f in GRID_FIELDS if f != "attention_entropy"]
    for index, grid in enumerate((diagnostic, auto)):
        chosen = next(r for r in grid if r["chosen"])
        png = plot_grid(grid, tmp_path / f"{index}.png", chosen)
        assert png.read_bytes()[:4] == b"\x89PNG"
    table = format_table(diagnostic).splitlines()
    assert table[0].split() == ["tau", "layers", "content", "NLL", "function", "NLL", "P(end)",
                                "attn", "entropy"]  # fmt: skip
    assert table[2].split() == ["2", "all", "1.600", "0.500", "0.010", "2.500", "*"]


def test_both_routes_measure_with_the_one_function(
    peaked_model, toy_tokenizer, toy_authors, monkeypatch
):
    rows = toy_authors[0].qa_pairs() + toy_authors[1].qa_pairs()
    calls = []
    measure = temperature.measure_teacher

    def spy(*args, **kwargs):
        calls.append(args[7] if len(args) > 7 else kwargs.get("attention_entropy", False))
        return measure(*args, **kwargs)

    monkeypatch.setattr(temperature, "measure_teacher", spy)
    swept = tau_sweep(peaked_model, toy_tokenizer, rows, [1, 2.5], [0, 2], progress=False)
    dataset = QADataset(rows, toy_tokenizer)
    settings = {"sample": len(dataset), "taus": [2.5], "progress": False}
    _, _, record = temperature.auto_temperature(
        peaked_model, dataset, toy_tokenizer, "auto", [0, 2], settings
    )
    assert calls == [True, True, False, False]  # entropy only for the diagnostic
    # the same rows (all, in order): the same numbers at τ 1 and at (2.5, layers 0 and 2)
    assert [(r["tau"], r["layers"]) for r in record["rows"]] == [(1.0, "all"), (2.5, "0,2")]
    for got, expected in zip(swept, record["rows"], strict=True):
        for key in ("content_nll", "function_nll", "end_probability"):
            assert got[key] == pytest.approx(expected[key], rel=1e-6)
        assert (got["content_tokens"], got["function_tokens"]) == (
            expected["content_tokens"],
            expected["function_tokens"],
        )
    assert swept[1]["content_nll"] != swept[0]["content_nll"]  # τ did change something


def test_tau_sweep_restores_train_mode_and_attention_after_an_error(toy_tokenizer, toy_authors):
    model = tiny_causal_lm("llama", attn_implementation="sdpa")
    model.train()
    attn = model.model.layers[0].self_attn

    def hooks_and_scaling():
        # the temperature's two routes: `scaling` (transformers >= 4.48) or query hooks (older;
        # newer transformers leave their own output-recording hooks behind an exception)
        if hasattr(attn, "scaling"):
            return attn.scaling
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())

    model(input_ids=torch.tensor([[1, 2, 3]]))  # transformers' own lazily added hooks
    reference = hooks_and_scaling()

    def fail(*_):
        raise RuntimeError("boom inside the sweep")

    handle = model.model.layers[2].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom inside the sweep"):
        tau_sweep(model, toy_tokenizer, toy_authors[0].qa_pairs(), [3], progress=False)
    handle.remove()
    assert sum(m.training for m in model.modules()) == len(list(model.modules()))
    assert model.config._attn_implementation == "sdpa"
    assert hooks_and_scaling() == reference  # temperature removed


def saved_model(tmp_path, model, tokenizer):
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def test_cli_writes_csv_and_png_and_reports_the_rules_choice(
    tmp_path, peaked_model, toy_tokenizer, toy_authors, capsys
):
    model_dir = saved_model(tmp_path, peaked_model, toy_tokenizer)
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps(qa) for qa in toy_authors[0].qa_pairs()))
    out = tmp_path / "sweep"
    args = ["tau-sweep", "--model", str(model_dir), "--data", str(data), "--out", str(out)]
    assert main([*args, "--taus", "2,3", "--max-end-probability", "0.5", "--quiet"]) == 0
    rows = list(csv.DictReader((out / "tau_sweep.csv").open()))
    assert list(rows[0]) == list(GRID_FIELDS)
    assert [float(r["tau"]) for r in rows] == [1.0, 2.0, 3.0]  # τ = 1 is always added
    assert {r["layers"] for r in rows} == {"all"}
    assert (out / "tau_sweep.png").read_bytes()[:4] == b"\x89PNG"
    # The printed choice is the rule's on the written numbers.
    keys = ("tau", "content_nll", "function_nll", "end_probability")
    grid = [{k: float(r[k]) for k in keys} for r in rows]
    config = temperature.AutoTemperatureConfig(max_end_probability=0.5)
    chosen, reason = choose_temperature(grid, config)
    assert [r["chosen"] for r in rows] == [str(r["chosen"]) for r in grid]
    assert f"chosen: temperature {chosen['tau']:g}, layers all ({reason})" in (
        capsys.readouterr().out
    )


def test_cli_taus_without_one_above_1_is_a_usage_error_before_loading(
    tmp_path, peaked_model, toy_tokenizer, toy_authors, capsys, monkeypatch
):
    model_dir = saved_model(tmp_path, peaked_model, toy_tokenizer)
    capsys.readouterr()  # the saving's progress bar

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before --taus was checked")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", refuse)
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps(qa) for qa in toy_authors[0].qa_pairs()))
    args = ["tau-sweep", "--model", str(model_dir), "--data", str(data)]
    for taus, more in (("1", []), ("0.5,1", []), ("1", ["--layers", "auto"])):
        assert main([*args, "--out", str(tmp_path / "o"), "--taus", taus, *more]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"asu-simu tau-sweep: error: --taus {taus} has no value > 1: the rule compares "
            "tempered settings (τ > 1) with τ = 1, which is always measured; give e.g. "
            "--taus 1.5,2,2.3,3"
        ]
    assert not (tmp_path / "o").exists()
    assert main([*args, "--taus", "2", "--content-rise", "1"]) == 2  # the flag is gone
    assert "unrecognized arguments: --content-rise 1" in capsys.readouterr().err


def test_cli_keys_layers_and_max_examples(
    tmp_path, peaked_model, toy_tokenizer, toy_authors, capsys
):
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
    assert main(["tau-sweep", *common, *keys, "--taus", "1,4", "--layers", "0,1", "--quiet",
                 "--max-examples", "2"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "content NLL" in printed and "tau" in printed and "attn entropy" in printed
    rows = list(csv.DictReader((tmp_path / "o" / "tau_sweep.csv").open()))
    assert [float(r["tau"]) for r in rows] == [1.0, 4.0]
    assert [r["layers"] for r in rows] == ["0-1", "0-1"]


def test_cli_layers_auto_runs_the_joint_pass(
    tmp_path, peaked_model, toy_tokenizer, toy_authors, capsys
):
    model_dir = tmp_path / "model"
    peaked_model.save_pretrained(model_dir)
    toy_tokenizer.save_pretrained(model_dir)
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps(qa) for qa in toy_authors[0].qa_pairs()))
    out = tmp_path / "auto"
    args = ["tau-sweep", "--model", str(model_dir), "--data", str(data), "--out", str(out)]
    assert main([*args, "--taus", "1,2,4", "--layers", "auto", "--quiet"]) == 0
    chosen = json.loads((out / "asu_temperature.json").read_text())
    assert f"chosen: temperature {chosen['temperature']:g}" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "asu_tau_sweep.csv").open()))
    # baseline + 2 taus x (all, thirds 0 | 1 | 2); quarters of 3 layers add no new block
    assert len(rows) == 1 + 2 * 4 and sum(r["chosen"] == "True" for r in rows) == 1


# -- temperature: auto / layers: auto, collapse guard ----------------------------------------------
def forget_items(toy_tokenizer, toy_authors, n=2):
    rows = [qa for author in toy_authors[:n] for qa in author.qa_pairs()]
    return QADataset(rows, toy_tokenizer)


def test_measure_teacher_against_an_explicit_computation(peaked_model, toy_tokenizer, toy_authors):
    dataset = forget_items(toy_tokenizer, toy_authors)
    items = temperature.sample_items(dataset, 6, seed=3)
    assert len(items) == 6
    eos = toy_tokenizer.eos_token_id
    answers = torch.cat([i["labels"][i["labels"] != -100] for i in items])
    function = function_token_ids(toy_tokenizer, answers.tolist())
    got = temperature.measure_teacher(
        peaked_model, items, 2.5, [1], function.tolist(), [eos], batch_size=4
    )
    # By hand, one example at a time (no padding): P(eos) where the first answer token is
    # predicted, and the NLL of each answer token split by the function-token rule.
    ends, sums, counts = [], {True: 0.0, False: 0.0}, {True: 0, False: 0}
    with torch.no_grad(), attention_temperature(peaked_model, 2.5, [1]):
        for item in items:
            logits = peaked_model(input_ids=item["input_ids"][None]).logits[0]
            labels = item["labels"]
            first = int(torch.nonzero(labels != -100)[0])
            ends.append(torch.softmax(logits[first - 1], -1)[eos].item())
            for t in range(first, len(labels)):
                nll = -torch.log_softmax(logits[t - 1], -1)[labels[t]].item()
                is_function = int(labels[t]) in set(function.tolist())
                sums[is_function] += nll
                counts[is_function] += 1
    assert got["end_probability"] == pytest.approx(sum(ends) / len(ends), rel=1e-5)
    assert got["content_tokens"] == counts[False] and got["function_tokens"] == counts[True]
    assert got["content_nll"] == pytest.approx(sums[False] / counts[False], rel=1e-5)
    assert got["function_nll"] == pytest.approx(sums[True] / counts[True], rel=1e-5)


def test_layer_blocks():
    blocks = temperature.layer_blocks(30, (3, 4))
    labels = [temperature.layers_label(b, 30) for b in blocks]
    assert labels == ["all", "0-9", "10-19", "20-29", "0-7", "8-14", "15-21", "22-29"]
    assert temperature.layer_blocks(3, (4,)) == [[0, 1, 2], [0], [1], [2]]
    assert temperature.layers_label([0, 2], 3) == "0,2"


def grid_row(tau, layers, content, function, end, size=1):
    return {
        "tau": tau,
        "layers": layers,
        "layer_ids": list(range(size)),
        "content_nll": content,
        "function_nll": function,
        "end_probability": end,
    }


def test_choose_temperature_rule():
    config = temperature.AutoTemperatureConfig(function_budget=0.5, max_end_probability=0.1)
    rows = [
        grid_row(1.0, "all", 1.0, 2.0, 0.01, 4),
        grid_row(2.3, "all", 3.5, 2.9, 0.93, 4),  # forgets most, but ends the answer: out
        grid_row(1.5, "all", 1.6, 2.3, 0.05, 4),  # separation 0.6 - 0.3 = 0.3
        grid_row(2.3, "0-1", 1.9, 2.2, 0.01, 2),  # separation 0.9 - 0.2 = 0.7: the winner
        grid_row(3.0, "0-1", 2.8, 2.6, 0.02, 2),  # function +0.6 > budget: out
        grid_row(2.0, "2-3", 1.8, 2.1, 0.01, 2),  # separation 0.8 - 0.1 = 0.7: tie, smaller τ
    ]
    chosen, reason = temperature.choose_temperature(rows, config)
    assert (chosen["tau"], chosen["layers"]) == (2.0, "2-3")
    assert "content +0.80 nats, function +0.10, P(end) 0.010" in reason
    assert [r["admissible"] for r in rows] == [False, False, True, True, False, True]
    assert [r["chosen"] for r in rows] == [False] * 5 + [True]
    # Nothing admissible: the least violating setting, and the reason says so.
    rows = [
        grid_row(1.0, "all", 1.0, 2.0, 0.0),
        grid_row(2.0, "all", 2.0, 2.75, 0.3),  # max(0.75/0.5, 0.3/0.1) = 3
        grid_row(4.0, "all", 3.0, 3.0, 0.12),  # max(1/0.5, 1.2) = 2: least violating
    ]
    chosen, reason = temperature.choose_temperature(rows, config)
    assert chosen["tau"] == 4.0 and reason.startswith("no setting keeps")


def test_auto_temperature_searches_only_what_is_auto(
    peaked_model, toy_tokenizer, toy_authors, tmp_path
):
    dataset = forget_items(toy_tokenizer, toy_authors)
    settings = {"sample": 4, "layer_parts": [3], "progress": False}
    tau, layers, record = temperature.auto_temperature(
        peaked_model,
        dataset,
        toy_tokenizer,
        temperature=2.0,
        layers="auto",
        settings=settings,
        output_dir=tmp_path,
    )
    assert tau == 2.0 and record["searched"] == ["layers"]
    assert [(r["tau"], r["layers"]) for r in record["rows"]] == [
        (1.0, "all"),
        (2.0, "all"),
        (2.0, "0"),
        (2.0, "1"),
        (2.0, "2"),
    ]
    chosen = next(r for r in record["rows"] if r["chosen"])
    assert layers == (None if chosen["layers"] == "all" else [int(chosen["layers"])])
    assert json.loads((tmp_path / "asu_temperature.json").read_text())["layers"] == layers
    tau, layers, record = temperature.auto_temperature(
        peaked_model,
        dataset,
        toy_tokenizer,
        temperature="auto",
        layers=[0, 1],
        settings={**settings, "taus": [1.5, 3]},
    )
    assert layers == [0, 1] and tau in (1.5, 3.0) and record["searched"] == ["temperature"]
    assert {r["layers"] for r in record["rows"]} == {"all", "0-1"}
    with pytest.raises(ValueError, match="needs a temperature > 1"):
        temperature.auto_temperature(peaked_model, dataset, toy_tokenizer, 1.0, "auto", settings)


def test_collapse_check_against_explicit_greedy_answers(toy_tokenizer, toy_authors):
    model = tiny_causal_lm("llama", vocab_size=len(toy_tokenizer))
    eos = toy_tokenizer.eos_token_id
    head = torch.nn.Linear(32, len(toy_tokenizer), bias=True)
    with torch.no_grad():  # eos favoured enough to end some answers at once (6 of 8), not all
        head.weight.copy_(model.lm_head.weight * 30)
        head.bias.zero_()
        head.bias[eos] = 13.0
    model.lm_head = head
    dataset = forget_items(toy_tokenizer, toy_authors, n=3)
    stats = collapse.collapse_check(
        model, dataset, 3.0, [0, 2], toy_tokenizer, {"sample": 8, "max_new_tokens": 4}
    )
    items = temperature.sample_items(dataset, 8)
    ends, empty = [], 0
    with torch.no_grad(), attention_temperature(model, 3.0, [0, 2]):
        for item in items:
            first = int(torch.nonzero(item["labels"] != -100)[0])
            ids = item["input_ids"][:first]
            ends.append(torch.softmax(model(input_ids=ids[None]).logits[0, -1], -1)[eos].item())
            answer = []
            for _ in range(4):  # greedy without a cache, stopping at the end token
                token = int(model(input_ids=ids[None]).logits[0, -1].argmax())
                if token == eos:
                    break
                answer.append(token)
                ids = torch.cat([ids, torch.tensor([token])])
            empty += not toy_tokenizer.decode(answer, skip_special_tokens=True).strip()
    assert stats["end_probability"] == pytest.approx(sum(ends) / 8, rel=1e-5)
    assert (stats["empty_answers"], stats["sample"]) == (empty, 8)
    assert stats["empty_share"] == empty / 8
    assert 0 < empty < 8 and 0.1 < stats["end_probability"] < 0.9  # the check can tell
    assert stats["layers"] == "0,2"
    low = {"max_end_probability": 1e-9, "max_empty_share": 0.99}
    message = collapse.collapse_warning(stats, low)
    assert message and f"{stats['end_probability']:.2f} of its first answer token" in message
    assert f"{empty}/8 sampled forget questions" in message
    assert (
        collapse.collapse_warning(stats, {"max_end_probability": 1.0, "max_empty_share": 1.0})
        is None
    )
