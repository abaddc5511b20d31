"""`asu-simu continual` through the real harness: two tasks of TOFU forget01 (one author each) on
a tiny model, with the original model as the reference; then a rerun that trains nothing."""

from __future__ import annotations

import json
import os

import pytest
from harness_support import harness_paths, save_tiny_harness_model

from asu_simu_plugin.continual import driver

pytestmark = pytest.mark.harness

CHEAP_EVAL = [  # the cheap TOFU metrics (no generation)
    "~eval.tofu.metrics.model_utility",
    "~eval.tofu.metrics.forget_Q_A_ROUGE",
    "~eval.tofu.metrics.privleak",
    "~eval.tofu.metrics.extraction_strength",
]


def test_two_steps_through_the_harness_then_a_rerun_skips_them(tmp_path, capsys):
    checkout, python = harness_paths()
    model = save_tiny_harness_model(tmp_path / "tiny")
    settings = driver.Settings(
        harness=checkout,
        data=checkout,  # its working directory reaches locuslab/TOFU
        model=model,
        work=tmp_path / "work",
        tasks=2,
        forget_split="forget01",
        retain_split="retain99",
        trainer="GradDiff",
        train_overrides=[
            "trainer.method_args.retain_loss_type=KL",  # builds a reference model
            "+trainer.args.max_steps=2",
            "trainer.args.per_device_train_batch_size=2",
        ],
        eval_overrides=CHEAP_EVAL,
        reference="original",
        python=python,
    )
    result = driver.run(settings)
    work = settings.work
    retain = (work / "data" / "locuslab" / "TOFU" / "retain_step1.json").read_text().splitlines()
    forget = (checkout / "locuslab" / "TOFU" / "forget01.json").read_text().splitlines()
    assert retain[-20:] == [line for line in forget[20:40] if line.strip()]  # author 2 kept
    # step 2 started from step 1's model and used the original one as its reference
    train_log = (work / "step_02" / "train.log").read_text().splitlines()[0]
    assert f"pretrained_model_name_or_path={work / 'step_01' / 'model'}" in train_log
    assert json.loads((work / "step_02" / "reference.json").read_text())["built"] is True
    rows = {(r["step"], r["task"]): r for r in result["rows"]}
    assert len(rows) == 3 * 2 and rows[2, 1]["status"] == "earlier"
    for step in (0, 1, 2):  # the per-task values average to the harness's own over the split
        summary = json.loads((work / f"step_{step:02d}" / "eval" / "TOFU_SUMMARY.json").read_text())
        mean = (rows[step, 1]["forget_Q_A_Prob"] + rows[step, 2]["forget_Q_A_Prob"]) / 2
        assert mean == pytest.approx(summary["forget_Q_A_Prob"], rel=1e-9)
    markers = {p: p.stat().st_mtime_ns for p in work.glob("step_*/step.json")}
    capsys.readouterr()
    driver.run(settings)
    assert capsys.readouterr().out.count("done before: skipped") == 3
    assert {p: p.stat().st_mtime_ns for p in work.glob("step_*/step.json")} == markers
    assert os.path.getsize(result["png"]) > 0
