"""The GPU smoke benchmark, run on the CPU with its tiny shape: every check passes, every row
runs, the report says what ran where."""

from __future__ import annotations

import json

import pytest

from benchmarks import gpu_smoke

pytestmark = pytest.mark.usefixtures("single_thread")

ARGS = ["--tiny", "--device", "cpu", "--batch-size", "4", "--forget-size", "8", "--steps", "3"]


def test_the_tiny_smoke_runs_every_check_and_method(tmp_path):
    pytest.importorskip("peft")
    assert gpu_smoke.main([*ARGS, "--out", str(tmp_path), "--name", "smoke"]) == 0
    result = json.loads((tmp_path / "smoke.json").read_text())
    assert list(result["checks"]) == [
        "attention hook, bf16 SDPA vs fp32",
        "ASU teachers agree (live, cache, LoRA)",
        "SIMU attribution",
        "every training loss finite",
    ]
    assert all(check["ok"] for check in result["checks"].values())
    hook = result["checks"]["attention hook, bf16 SDPA vs fp32"]
    # tempered in bf16 no further from fp32 than the untempered model, and τ visibly changes it
    assert hook["bf16 error, tempered"] <= 2 * hook["bf16 error, untempered (floor)"]
    assert hook["what τ changes (fp32)"] > 2 * hook["bf16 error, untempered (floor)"]
    assert hook["τ = 1 bit-identical"] is True
    assert (
        result["checks"]["ASU teachers agree (live, cache, LoRA)"]["largest relative difference"]
        <= 2e-2
    )
    assert list(result["runs"]) == list(gpu_smoke.ROWS)
    for name, run in result["runs"].items():
        assert run["timed_steps"] == 2 and run["step_seconds"] > 0 and run["finite"], name
        assert result["ratios"][name]["time"] == pytest.approx(
            run["step_seconds"] / result["runs"]["GradDiff (NLL)"]["step_seconds"]
        )
    assert result["settings"]["dtype"] == "bfloat16" and result["settings"]["attention"] == "sdpa"
    assert result["machine"]["device"] == "cpu"
    report = (tmp_path / "smoke.md").read_text()
    assert "device cpu (CPU)" in report and "tiny Llama" in report
    assert report.count("| ok |") == 4 and "FAILED" not in report
