"""The TOFU-mini pipeline's own computations: token entropy and the offline data folder."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_TOFU = ROOT.parent / "shared" / "data" / "locuslab" / "TOFU"


def load_pipeline():
    spec = importlib.util.spec_from_file_location(
        "tofu_mini_run", ROOT / "benchmarks/tofu_mini/run.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class WordTokenizer:
    def tokenize(self, text):
        return text.split()


def test_token_entropy_matches_hand_computation():
    run = load_pipeline()
    tok = WordTokenizer()
    # counts {a: 2, b: 1} over 3 tokens, normalised by ln 3
    expected = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)) / math.log(3)
    assert run.token_entropy(tok, "a a b") == pytest.approx(expected, rel=1e-12)
    assert run.token_entropy(tok, "a b c d") == pytest.approx(1.0)
    assert run.token_entropy(tok, "the the the the") == 0.0
    assert run.token_entropy(tok, "single") == 0.0
    assert run.mean_token_entropy(tok, ["a b", "a a"]) == pytest.approx(0.5)


def test_lr_scaling_and_unknown_method(tmp_path):
    run = load_pipeline()
    harness = tmp_path / "ou"
    (harness / "src").mkdir(parents=True)
    (harness / "src" / "train.py").write_text("")
    data = tmp_path / "data"
    (data / "locuslab" / "TOFU").mkdir(parents=True)
    (data / "locuslab" / "TOFU" / "forget01.json").write_text("{}\n")
    base = ["--data", str(data), "--work", str(tmp_path / "w"), "--harness", str(harness)]
    args = run.parse_args([*base, "--finetune-lr", "1e-4", "--lr", "SIMU=3e-5", "--device", "cpu"])
    assert args.learning_rates["GradDiff"] == pytest.approx(1e-4)  # 1e-5 × (1e-4 / 1e-5)
    assert args.learning_rates["SOGradDiff"] == pytest.approx(5e-5)
    assert args.learning_rates["SIMU"] == 3e-5
    args = run.parse_args(
        [*base, "--variant", "ASU_t=ASU_GD:trainer.method_args.temperature=1.5,a=b"]
    )
    assert args.variants == {"ASU_t": ("ASU_GD", ["trainer.method_args.temperature=1.5", "a=b"])}
    assert args.runs[-1] == "ASU_t" and args.learning_rates["ASU_t"] == 1e-4
    args = run.parse_args([*base, "--lr-grid", "SIMU=2e-4,5e-4", "--lr-grid", "SOGradDiff=1e-5"])
    assert args.runs[-3:] == ["SIMU_lr0.0002", "SIMU_lr0.0005", "SOGradDiff_lr1e-05"]
    assert args.variants["SIMU_lr0.0005"] == ("SIMU", [])
    assert [args.learning_rates[n] for n in args.runs[-3:]] == [2e-4, 5e-4, 1e-5]
    for bad in ("SIMU=", "SIMU=fast", "Nope=1e-4"):
        with pytest.raises(SystemExit):
            run.parse_args([*base, "--lr-grid", bad])
    with pytest.raises(SystemExit):
        run.parse_args([*base, "--variant", "X=Unknown:a=b"])
    with pytest.raises(SystemExit):
        run.parse_args([*base, "--lr", "Nope=1"])
    with pytest.raises(SystemExit):
        run.parse_args(["--data", str(data), "--work", str(tmp_path / "w"), "--harness", "/nope"])


@pytest.mark.skipif(not SHARED_TOFU.is_dir(), reason="needs ../shared/data (real TOFU files)")
def test_mini_tofu_folder_loads_offline_with_datasets(tmp_path):
    from datasets import load_dataset

    run = load_pipeline()
    harness = tmp_path / "ou"
    (harness / "src").mkdir(parents=True)
    (harness / "src" / "train.py").write_text("")
    args = run.parse_args(
        [
            *("--data", str(SHARED_TOFU.parents[1]), "--work", str(tmp_path / "w")),
            *("--harness", str(harness), "--retain-size", "30", "--general-size", "7"),
            *("--device", "cpu"),
        ]
    )
    pipeline = run.Pipeline(args)
    counts = pipeline.build_data()
    assert counts["forget01"] == 40 and counts["holdout01"] == 40
    assert counts["retain_mini"] == 30 and counts["target_train"] == 70
    assert counts["real_authors_perturbed"] == 7 and counts["world_facts_perturbed"] == 7
    folder = str(pipeline.data_dir / "locuslab" / "TOFU")
    # datasets keys a local folder's cache by config name: keep other runs' rows out
    cache = str(tmp_path / "cache")
    target = load_dataset(folder, name="target_train", split="train", cache_dir=cache)
    retain_eval = load_dataset(folder, name="retain_perturbed", split="train", cache_dir=cache)
    assert len(target) == 70 and set(target.column_names) == {"question", "answer"}
    # the retain rows trained on are exactly the retain rows scored
    assert target["question"][40:] == retain_eval["question"]
    assert "perturbed_answer" in retain_eval.column_names
