"""`asu-simu demo` end to end (shortened): it forgets, keeps the rest, saves a plain model."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from asu_simu_plugin.cli import main
from asu_simu_plugin.cli.demo import run_demo
from asu_simu_plugin.runner import RUN_FILE


@pytest.mark.slow
def test_short_demo_forgets_and_saves_a_plain_model(tmp_path, capsys):
    result = run_demo(tmp_path / "demo", progress=False, finetune_epochs=60, unlearn_epochs=6)
    before, teacher, after = result["before"], result["teacher"], result["after"]
    assert before["forget_prob"] > 0.8  # the target learnt the facts
    assert teacher["forget_prob"] < before["forget_prob"]  # smoothing hides them
    assert after["forget_prob"] < before["forget_prob"] - 0.05
    assert after["retain_prob"] > before["retain_prob"] - 0.2
    assert (tmp_path / "demo" / RUN_FILE).is_file()
    AutoModelForCausalLM.from_pretrained(tmp_path / "demo")
    table = capsys.readouterr().out
    assert "forget answer probability" in table and f"{after['forget_prob']:.3f}" in table


def test_demo_command_line_is_wired():
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
