"""The `asu-simu` command line: standalone unlearning and the neuron sweep, end to end."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from cli_support import unlearn
from transformers import AutoModelForCausalLM

from asu_simu_plugin.cli import main
from asu_simu_plugin.methods.simu.masks import load_masks
from asu_simu_plugin.output import RUN_FILE
from asu_simu_plugin.registry import get_method


@pytest.mark.parametrize("method", ["asu", "simu", "sograddiff"])
def test_unlearn_writes_a_plain_model_and_its_run_record(files, tmp_path, method):
    model_dir = files[0]
    out = tmp_path / method
    code = unlearn(files, out, "--set", "gamma=0.5", method=method)
    assert code == 0
    record = json.loads((out / RUN_FILE).read_text())
    # the method's whole argument dataclass is recorded: the given value and every default
    expected = get_method(method).arguments(gamma=0.5).to_dict()
    assert record["method"] == method
    assert record["method_args"] == json.loads(json.dumps(expected))
    assert record["forget_examples"] == 5 and record["retain_examples"] == 10
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    unlearned = AutoModelForCausalLM.from_pretrained(out)
    assert unlearned.state_dict().keys() == original.state_dict().keys()
    assert any(
        not torch.equal(a, b)
        for a, b in zip(
            original.state_dict().values(), unlearned.state_dict().values(), strict=True
        )
    )
    if method == "simu":
        assert (out / "simu_masks.safetensors").is_file()


def test_empty_forget_set_is_refused(files, tmp_path, capsys):
    model_dir, _, retain = files
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    args = ["unlearn", "--method", "asu", "--model", str(model_dir), "--forget", str(empty)]
    code = main([*args, "--retain", str(retain), "--output", str(tmp_path / "o")])
    assert code == 2
    assert "holds no examples" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_neurons_sweep_writes_csv_png_and_a_reusable_mask(files, tmp_path):
    model_dir, forget, _ = files
    out = tmp_path / "neurons"
    assert (
        main(
            [
                "neurons",
                "--model",
                str(model_dir),
                "--data",
                str(forget),
                "--thresholds",
                "0.2,0.5,0.9",
                "--steps",
                "3",
                "--out",
                str(out),
                "--save",
                "0.5",
            ]
        )
        == 0
    )
    rows = list(csv.DictReader((out / "neurons.csv").open()))
    assert [float(r["threshold"]) for r in rows] == [0.2, 0.5, 0.9]
    totals = [int(r["total"]) for r in rows]
    assert totals[0] >= totals[1] >= totals[2] >= 0  # higher t, fewer critical neurons
    assert (out / "neurons.png").read_bytes()[:4] == b"\x89PNG"
    masks = load_masks(out / "simu_masks.safetensors")
    assert sum(int(m.sum()) for m in masks.values()) == totals[1]
