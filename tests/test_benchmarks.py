"""The TOFU-mini pipeline's own computations: token entropy and the offline data folder."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from benchmark_support import WordTokenizer, fake_harness

from benchmarks.mini.pipeline import Run
from benchmarks.mini.report import mean_token_entropy, token_entropy
from benchmarks.mini.rules import select_rate
from benchmarks.tofu_mini import run

ROOT = Path(__file__).resolve().parents[1]
SHARED_TOFU = ROOT.parent / "shared" / "data" / "locuslab" / "TOFU"


def test_token_entropy_matches_hand_computation():
    # ids {7: 2, 3: 1} over 3 tokens: the unigram entropy in bits over log2 3
    expected = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3)) / math.log2(3)
    assert token_entropy([7, 7, 3]) == pytest.approx(expected, rel=1e-12)
    assert token_entropy([0, 1, 2, 3]) == pytest.approx(1.0)
    assert token_entropy([5, 5, 5, 5]) == 0.0
    assert token_entropy([5]) == 0.0 and token_entropy([]) == 0.0
    # a generation is measured on its token ids
    tok = WordTokenizer()
    assert mean_token_entropy(tok, ["a a b"]) == pytest.approx(expected, rel=1e-12)
    assert mean_token_entropy(tok, ["a b c d"]) == pytest.approx(1.0)
    assert mean_token_entropy(tok, ["the the the the"]) == 0.0
    assert mean_token_entropy(tok, ["single"]) == 0.0
    assert mean_token_entropy(tok, ["a b", "a a"]) == pytest.approx(0.5)


def test_token_entropy_counts_the_tokens_the_tokenizer_shows(toy_tokenizer):
    """A real tokenizer: the ids the report encodes are the tokens `tokenize` shows, one to one
    (no special tokens added), so their entropy is that of the token strings."""
    text = "The author was born in the city where the author was born."
    tokens = toy_tokenizer.tokenize(text)
    assert len(set(tokens)) < len(tokens)  # some tokens repeat
    first = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    expected = token_entropy([first[t] for t in tokens])
    assert 0 < expected < 1
    assert mean_token_entropy(toy_tokenizer, [text]) == pytest.approx(expected, rel=1e-12)


def fake_tree(tmp_path):
    harness = fake_harness(tmp_path)
    data = tmp_path / "data"
    (data / "locuslab" / "TOFU").mkdir(parents=True)
    (data / "locuslab" / "TOFU" / "forget01.json").write_text("{}\n")
    return ["--data", str(data), "--work", str(tmp_path / "w"), "--harness", str(harness)]


def test_rows_rates_and_bad_options(tmp_path):
    base = fake_tree(tmp_path)
    args = run.parse_args([*base, "--device", "cpu"])
    assert args.rows == [
        "SOGradDiff", "SIMU", "NPO", "ASU", "GradDiff", "ASU_tau2.3", "ME_GD", "IDK_AP"
    ]  # fmt: skip
    assert all(args.rates[r] == [5e-5, 1e-4, 2e-4] for r in args.rows)  # one grid for all
    assert args.seeds == [0, 1, 2] and args.headline == ["GradDiff", "NPO", "ASU", "ASU_tau2.3"]
    # curve-only rates below and above the grid, for the equal-forgetting pair only
    assert args.curves == {"SOGradDiff": [2e-5, 5e-4], "SIMU": [2e-5, 5e-4]}
    args = run.parse_args([*base, "--curve", "SIMU=", "--curve", "NPO=1e-4,3e-4"])
    assert args.curves == {"SOGradDiff": [2e-5, 5e-4], "SIMU": [], "NPO": [3e-4]}  # 1e-4: grid
    args = run.parse_args(
        [*base, "--grid", "default", "--finetune-lr", "1e-4", "--lr", "SIMU=3e-5"]
    )
    assert args.rates["GradDiff"] == [pytest.approx(1e-4)]  # 1e-5 × (1e-4 / 1e-5)
    assert args.rates["SOGradDiff"] == [pytest.approx(5e-5)] and args.rates["SIMU"] == [3e-5]
    assert args.given_rates == ["SIMU"]  # named with --lr; the others: their default rate
    args = run.parse_args([*base, "--variant", "ASU_t=ASU:trainer.method_args.temperature=1.5,a=b"])
    assert args.variants == {"ASU_t": ("ASU", ["trainer.method_args.temperature=1.5", "a=b"])}
    assert args.rows[-1] == "ASU_t" and args.rates["ASU_t"] == [5e-5, 1e-4, 2e-4]
    for bad in (
        ["--grid", "fast"],
        ["--grid", "1e-4,1e-4"],
        ["--grid", "-1e-4"],
        ["--seeds", "0,x"],
        ["--headline", "SimNPO"],  # not a row
        ["--utility-floor", "1.5"],
        ["--variant", "X=Unknown:a=b"],
        ["--lr", "Nope=1"],
        ["--lr", "SIMU=1e-4,2e-4"],  # one rate per row
        ["--curve", "SimNPO=1e-4"],
        ["--curve", "SIMU=x"],
    ):
        with pytest.raises(SystemExit):
            run.parse_args([*base, *bad])
    with pytest.raises(SystemExit):
        run.parse_args(["--data", base[1], "--work", str(tmp_path / "w"), "--harness", "/nope"])


def test_select_rate_rule():
    target = {"model_utility": 0.40}
    grid = {
        1e-5: {"model_utility": 0.40, "forget_quality": 0.01},
        1e-4: {"model_utility": 0.37, "forget_quality": 0.30},  # kept (0.37 >= 0.36)
        2e-4: {"model_utility": 0.20, "forget_quality": 0.90},  # forgets most, utility lost
    }
    assert select_rate(grid, target, 0.9, run.SELECTION)[0] == 1e-4
    assert select_rate(grid, target, 0.5, run.SELECTION)[0] == 2e-4
    # a tie in forget_quality (discrete KS p-values) goes to the higher utility
    grid[2e-4] = {"model_utility": 0.38, "forget_quality": 0.30}
    assert select_rate(grid, target, 0.9, run.SELECTION)[0] == 2e-4
    # nobody keeps the floor: the highest utility
    grid[1e-5]["model_utility"] = 0.39
    lr, why = select_rate(grid, target, 1.0, run.SELECTION)
    assert lr == 1e-5 and "no rate kept" in why


def finish_run(work, name, fq, mu, prob, answers):
    """What a finished unlearning run and its evaluation leave in the work folder."""
    import json

    evals = work / "evals" / name
    evals.mkdir(parents=True)
    summary = {"forget_quality": fq, "model_utility": mu, "forget_Q_A_Prob": prob}
    (evals / "TOFU_SUMMARY.json").write_text(json.dumps(summary))
    items = {str(i): {"input": "q", "generation": g} for i, g in enumerate(answers)}
    per_item = {"forget_Q_A_ROUGE": {"value_by_index": items}}
    (evals / "TOFU_EVAL.json").write_text(json.dumps(per_item))
    for stage in ("eval", "unlearn"):
        marker = {"seconds": 10.0, "finished": "2026-12-04T00:00:00+00:00"}
        (work / "stages" / f"{stage}_{name}.json").write_text(json.dumps(marker))


def test_report_aggregates_seeds_and_compares_at_equal_forgetting(tmp_path):
    """A finished work folder made by hand: the report's selection, {mean, std}, matching."""
    import json
    import statistics

    base = fake_tree(tmp_path)
    args = run.parse_args(
        [*base, "--methods", "NPO", "ASU", "SOGradDiff", "SIMU", "--grid", "1e-4,2e-4"]
        + ["--headline", "NPO", "ASU", "--seeds", "0,1", "--out", str(tmp_path / "out")]
    )
    pipeline = run.Pipeline(args)
    work = pipeline.work
    data_marker = {"forget01": 40, "seconds": 0.0, "finished": "2026-12-04T00:00:00+00:00"}
    (work / "stages" / "data.json").write_text(json.dumps(data_marker))

    def finish(*values):
        finish_run(work, *values)

    finish("retain", None, 0.38, 0.1, ["a b"])
    finish("target", 0.03, 0.40, 0.9, ["a b"])
    # NPO: 1e-4 keeps utility (0.39 >= 0.36), 2e-4 does not
    finish("NPO_lr0.0001_s0", 0.2, 0.39, 0.5, ["a b"])
    finish("NPO_lr0.0002_s0", 0.9, 0.30, 0.1, ["a b"])
    finish("NPO_lr0.0001_s1", 0.4, 0.37, 0.4, ["a a"])
    # ASU: 2e-4 forgets more and keeps utility; seed 1 answers one of two questions empty
    finish("ASU_lr0.0001_s0", 0.1, 0.40, 0.6, ["a b"])
    finish("ASU_lr0.0002_s0", 0.5, 0.38, 0.3, ["a b", "c d"])
    finish("ASU_lr0.0002_s1", 0.7, 0.36, 0.2, ["a b", ""])
    # SOGradDiff and SIMU, forget probabilities 0.8/0.2 and 0.4/0.1 (one seed each)
    finish("SOGradDiff_lr0.0001_s0", 0.05, 0.39, 0.8, ["a b"])
    finish("SOGradDiff_lr0.0002_s0", 0.3, 0.33, 0.2, ["a b"])
    finish("SIMU_lr0.0001_s0", 0.1, 0.395, 0.4, ["a b"])
    finish("SIMU_lr0.0002_s0", 0.4, 0.35, 0.1, ["a b"])
    # a curve-only rate: it would win the rule, but only grid rates are candidates
    finish("SIMU_lr0.0005_s0", 0.9, 0.395, 0.05, ["a b"])
    for seed in (0, 1):  # what ASU's temperature: auto leaves beside each model
        unlearned = work / "unlearn" / f"ASU_lr0.0002_s{seed}"
        unlearned.mkdir(parents=True)
        choice = {"temperature": 1.5 + seed, "layers_label": "0-9", "reason": "rule"}
        (unlearned / "asu_temperature.json").write_text(json.dumps(choice))
        for ext in ("csv", "png"):
            (unlearned / f"asu_tau_sweep.{ext}").write_text(f"seed {seed}")
    # the ASU paper's aggregates of one run (eval=asu_paper), shown in the grid too
    paper = {"paper_model_utility": 0.41, "paper_forget_efficacy": 0.77}
    (work / "evals" / "NPO_lr0.0001_s0" / "ASU_PAPER_SUMMARY.json").write_text(json.dumps(paper))
    pipeline.tokenizer = WordTokenizer
    pipeline.report()

    result = json.loads((tmp_path / "out" / "tofu_mini.json").read_text())
    rows = {row["name"]: row for row in result["rows"]}
    assert list(rows) == ["retain", "target", "NPO", "ASU", "SOGradDiff", "SIMU"]
    npo, asu = rows["NPO"], rows["ASU"]
    assert npo["learning_rate"] == 1e-4 and asu["learning_rate"] == 2e-4
    assert [g["selected"] for g in asu["lr_grid"]] == [False, True]
    assert [s["seed"] for s in asu["seeds"]] == [0, 1]
    assert asu["forget_quality"]["mean"] == pytest.approx(0.6)
    assert asu["forget_quality"]["std"] == pytest.approx(statistics.stdev([0.5, 0.7]))
    assert asu["empty_share"]["mean"] == pytest.approx(0.25)  # 0/2 and 1/2
    assert npo["token_entropy"]["mean"] == pytest.approx(0.5)  # "a b" 1, "a a" 0
    assert rows["SIMU"]["model_utility"] == {"mean": 0.395, "std": None}  # one seed
    assert rows["SIMU"]["learning_rate"] == 1e-4
    simu_grid = [(g["learning_rate"], g["in_grid"]) for g in rows["SIMU"]["lr_grid"]]
    assert simu_grid == [(1e-4, True), (2e-4, True), (5e-4, False)]
    assert rows["target"]["seeds"][0]["model_utility"] == 0.40
    # ASU vs NPO: fq 0.6 >= 0.3, MU 0.37 >= 0.38 fails, empty 0.25 > 0.05 fails
    goal = result["goal"]
    assert goal["forget_quality >= NPO's"]["met"] and not goal["model_utility >= NPO's"]["met"]
    assert not goal["empty answers <= 0.05"]["met"] and goal["met"] is False
    # SIMU at p=0.4 against SOGradDiff's curve (0.8, 0.39)-(0.2, 0.33) in log p
    (c,) = result["equal_forgetting"]
    t = (math.log(0.4) - math.log(0.2)) / (math.log(0.8) - math.log(0.2))
    expected = 0.395 - (0.33 + t * (0.39 - 0.33))
    simu_points = [m for m in c["matches"] if m["point_of"] == "SIMU"]
    # 0.1 and the curve point's 0.05 are outside SOGradDiff's 0.2-0.8
    assert [m["forget_Q_A_Prob"] for m in simu_points] == [0.4]
    assert simu_points[0]["utility_difference"] == pytest.approx(expected)
    # SOGradDiff's 0.2 lies on SIMU's 0.1-0.4 curve; the difference is signed SIMU − SOGradDiff
    t = (math.log(0.2) - math.log(0.1)) / (math.log(0.4) - math.log(0.1))
    other = [m for m in c["matches"] if m["point_of"] == "SOGradDiff"]
    assert other[0]["utility_difference"] == pytest.approx(0.35 + t * (0.395 - 0.35) - 0.33)
    assert [c["temperature"] for c in asu["asu_auto"]] == [1.5, 2.5]
    assert "asu_auto" not in npo
    assert (tmp_path / "out" / "tofu_mini_ASU_tau_sweep.png").read_text() == "seed 0"
    md = (tmp_path / "out" / "tofu_mini.md").read_text()
    assert "- ASU seed 1: τ 2.5, layers 0-9 (rule)" in md
    assert "| SIMU | *5.00e-04* |" in md
    grid = "| model | lr | forget_quality | model_utility | forget_Q_A_Prob | token_entropy | "
    assert grid + "empty_share | paper_model_utility | paper_forget_efficacy |" in md
    assert "| NPO | **1.00e-04** | 0.200 | 0.390 | 0.500 | 1.000 | 0.000 | 0.410 | 0.770 |" in md
    assert "| NPO | 2.00e-04 | 0.900 | 0.300 | 0.100 | 1.000 | 0.000 | – | – |" in md
    assert "| ASU (ours) | 2.00e-04 | 2 | 0.600 ± 0.141 |" in md
    for png in ("tofu_mini.png", "tofu_mini_equal_forgetting.png"):
        assert (tmp_path / "out" / png).stat().st_size > 10_000


def test_simu_runs_after_the_first_reuse_its_masks(tmp_path):
    args = run.parse_args([*fake_tree(tmp_path), "--methods", "SIMU", "--device", "cpu"])
    pipeline = run.Pipeline(args)
    first, later = pipeline.runs_of("SIMU")[0], Run("SIMU", 2e-4, 1)
    assert pipeline.reused_masks(later) == []  # nothing saved yet: attribute
    masks = pipeline.work / "unlearn" / first.name / "simu_masks.safetensors"
    masks.parent.mkdir(parents=True)
    masks.write_bytes(b"")
    assert pipeline.reused_masks(first) == []
    assert pipeline.reused_masks(later) == [f"trainer.method_args.mask_path={masks}"]
    assert "trainer.method_args.steps=5" in pipeline.unlearn_overrides(later)


@pytest.mark.skipif(not SHARED_TOFU.is_dir(), reason="needs ../shared/data (real TOFU files)")
def test_mini_tofu_folder_loads_offline_with_datasets(tmp_path):
    from datasets import load_dataset

    harness = fake_harness(tmp_path)
    args = run.parse_args(
        [
            *("--data", str(SHARED_TOFU.parents[1]), "--work", str(tmp_path / "w")),
            *("--harness", str(harness), "--retain-size", "30", "--general-size", "7"),
            *("--retain-train-size", "20", "--device", "cpu"),
        ]
    )
    pipeline = run.Pipeline(args)
    counts = pipeline.build_data()
    assert counts["forget01"] == 40 and counts["holdout01"] == 40
    assert counts["retain_perturbed"] == 30 and counts["retain_mini"] == 20
    assert counts["retain_known"] == 50 and counts["target_train"] == 90
    assert counts["real_authors_perturbed"] == 7 and counts["world_facts_perturbed"] == 7
    folder = str(pipeline.data_dir / "locuslab" / "TOFU")
    # datasets keys a local folder's cache by config name: keep other runs' rows out
    cache = str(tmp_path / "cache")

    def questions(name):
        return list(load_dataset(folder, name=name, split="train", cache_dir=cache)["question"])

    target = load_dataset(folder, name="target_train", split="train", cache_dir=cache)
    assert len(target) == 90 and set(target.column_names) == {"question", "answer"}
    scored, unlearn_retain = questions("retain_perturbed"), questions("retain_mini")
    # the target and the retain model know the scored retain rows, but unlearning's retain loss
    # trains on other rows: model_utility is not measured on what a method optimises
    assert not set(scored) & set(unlearn_retain)
    assert list(target["question"])[40:] == scored + unlearn_retain
    assert questions("retain_known") == scored + unlearn_retain
    assert not set(questions("forget01")) & set(unlearn_retain)
    retain_eval = load_dataset(folder, name="retain_perturbed", split="train", cache_dir=cache)
    assert "perturbed_answer" in retain_eval.column_names


def test_asu_rows_teacher_is_read_from_their_first_run_and_scored(tmp_path):
    """τ/layers of an ASU row's teacher: the saved config, `auto` resolved by the logged choice;
    its evaluation is the tempered target; the report lists it beside the row."""
    import json

    import yaml

    args = run.parse_args(
        [*fake_tree(tmp_path), "--methods", "NPO", "ASU", "ASU_tau2.3", "--grid", "1e-4"]
        + ["--headline", "--out", str(tmp_path / "out")]
    )
    pipeline = run.Pipeline(args)
    work = pipeline.work

    def first_run(row, handler, tau, layers, chosen=None, **top):
        folder = work / "unlearn" / pipeline.runs_of(row)[0].name
        (folder / ".hydra").mkdir(parents=True)
        trainer = {"handler": handler, "method_args": {"temperature": tau, "layers": layers}}
        config = {"trainer": trainer, **top}
        (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
        if chosen:  # what temperature: auto leaves beside the model
            (folder / "asu_temperature.json").write_text(json.dumps(chosen))
            for ext in ("csv", "png"):
                (folder / f"asu_tau_sweep.{ext}").write_text("sweep")

    assert pipeline.teacher_setting("ASU") is None  # not run yet
    first_run("NPO", "NPO", None, None)
    # as the harness saves MUSE's ASU config: τ still an interpolation into the presets
    preset = {"presets": {"News": {"temperature": 2.3}}, "data_split": "News"}
    first_run("ASU_tau2.3", "ASU", "${presets.${data_split}.temperature}", None, **preset)
    chosen = {"temperature": 4.0, "layers": list(range(20, 30)), "layers_label": "20-29"}
    chosen["reason"] = "rule"
    first_run("ASU", "ASU", "auto", "auto", chosen)
    assert pipeline.teacher_setting("NPO") is None
    assert pipeline.teacher_setting("ASU_tau2.3") == (2.3, None)
    assert pipeline.teacher_setting("ASU") == (4.0, list(range(20, 30)))

    calls = []
    pipeline.harness = lambda stage, script, overrides: calls.append((stage, script, overrides))
    (work / "models" / "target").mkdir(parents=True)
    (work / "models" / "target" / "config.json").write_text('{"num_hidden_layers": 30}')
    record = pipeline.evaluate_teacher("ASU")
    ((stage, script, overrides),) = calls
    assert (stage, script) == ("eval_teacher_ASU", "eval.py")
    assert [o for o in overrides if o.startswith("experiment=")] == [
        "experiment=eval/tofu/asu_teacher"
    ]
    assert "model.model_args.temperature=4.0" in overrides
    assert "model.model_args.temperature_layers=[20,21,22,23,24,25,26,27,28,29]" in overrides
    assert (
        f"model.model_args.pretrained_model_name_or_path={work / 'models' / 'target'}" in overrides
    )
    assert record == {k: chosen[k] for k in ("temperature", "layers", "layers_label")}
    calls.clear()
    assert pipeline.evaluate_teacher("ASU_tau2.3")["layers_label"] == "all"
    assert "model.model_args.temperature_layers=null" in calls[0][2]

    data_marker = {"forget01": 40, "seconds": 0.0, "finished": "2026-12-04T00:00:00+00:00"}
    (work / "stages" / "data.json").write_text(json.dumps(data_marker))
    for name, fq, mu, prob in [
        ("retain", None, 0.38, 0.1),
        ("target", 0.03, 0.40, 0.9),
        ("NPO_lr0.0001_s0", 0.2, 0.39, 0.5),
        ("ASU_lr0.0001_s0", 0.1, 0.40, 0.6),
        ("teacher_ASU", 0.05, 0.37, 0.55),
    ]:
        finish_run(work, name, fq, mu, prob, ["a b"])
    (work / "stages" / "eval_teacher_ASU.json").write_text(
        json.dumps({**record, "seconds": 5.0, "finished": "2026-12-04T00:00:01+00:00"})
    )
    pipeline.tokenizer = WordTokenizer
    pipeline.report()
    result = json.loads((tmp_path / "out" / "tofu_mini.json").read_text())
    names = [row["name"] for row in result["rows"]]
    assert names == ["retain", "target", "NPO", "ASU", "ASU teacher"]  # ASU_tau2.3 unfinished
    teacher = result["rows"][-1]
    assert teacher["kind"] == "teacher" and teacher["teacher_of"] == "ASU"
    assert teacher["forget_Q_A_Prob"] == {"mean": 0.55, "std": None}
    assert teacher["layers_label"] == "20-29" and teacher["temperature"] == 4.0
    md = (tmp_path / "out" / "tofu_mini.md").read_text()
    assert "| *ASU teacher: τ 4, layers 20-29* | – | 1 | 0.050 |" in md


def test_redo_repeats_a_stage_once_per_invocation(tmp_path, capsys):
    """A headline row's seed-0 run is also a grid run: `--redo` of it must not train it twice."""
    import json

    args = run.parse_args([*fake_tree(tmp_path), "--device", "cpu", "--redo", "eval_x"])
    pipeline = run.Pipeline(args)
    pipeline.marker("eval_x").parent.mkdir(parents=True, exist_ok=True)
    pipeline.marker("eval_x").write_text("{}")
    calls = []
    for _ in range(3):
        pipeline.run_stage("eval_x", lambda: calls.append(1) or {"n": len(calls)})
    assert calls == [1]
    assert json.loads(pipeline.marker("eval_x").read_text())["n"] == 1
    assert capsys.readouterr().out.count("[skip] eval_x") == 2
    calls.clear()
    pipeline.run_stage("other", lambda: calls.append(1))  # not done yet: runs
    pipeline.run_stage("other", lambda: calls.append(1))  # done, not asked again: skipped
    assert calls == [1]


def test_the_report_names_the_rows_that_ran_at_a_given_rate_instead_of_the_rule():
    from benchmarks.mini.markdown import rate_sentence
    from benchmarks.mini.rules import GIVEN_RATE

    def result(*selections):
        rows = [{"name": "retain", "kind": "reference"}, {"name": "ASU teacher", "kind": "teacher"}]
        rows += [
            {"name": f"M{i}", "kind": "baseline", "selection": why}
            for i, why in enumerate(selections)
        ]
        return {"settings": {"selection": {"rule": "RULE"}}, "rows": rows}

    ruled = "the highest forget_quality"
    assert (
        rate_sentence(result(ruled, ruled)) == "Learning rate, the same rule for every row: RULE. "
    )
    assert rate_sentence(result(GIVEN_RATE, ruled, GIVEN_RATE)) == (
        "Rows M0, M2 ran at one learning rate given on the command line (--lr), no grid; "
        "the learning rate of M1: RULE. "
    )
    assert rate_sentence(result(GIVEN_RATE)) == (
        "Row M0 ran at one learning rate given on the command line (--lr), no grid. "
    )


def test_the_report_names_the_seeded_rows_only_when_rows_ran_at_several_seeds():
    from benchmarks.mini.markdown import seeds_sentence

    once = seeds_sentence({"seeds": [0], "headline": ["GradDiff", "NPO"]})
    assert once == "Every run used seed 0, once. "
    assert seeds_sentence({"seeds": [0, 1, 2], "headline": []}) == once
    assert seeds_sentence({"seeds": [0, 1, 2], "headline": ["NPO", "ASU"]}) == (
        "Rows NPO, ASU then run at seeds 0, 1, 2 at that rate "
        "(mean ± sample std; seed 0 is the grid run itself). "
    )


@pytest.mark.parametrize("flag, scored", [([], ["ASU"]), (["--no-teachers"], [])])
def test_the_plan_scores_an_asu_rows_teacher_unless_told_not_to(tmp_path, flag, scored):
    args = run.parse_args(
        [*fake_tree(tmp_path), "--methods", "NPO", "ASU", "--grid", "1e-4", "--headline", *flag]
    )
    pipeline = run.Pipeline(args)
    ran, teachers = [], []
    pipeline.setup = pipeline.report = lambda: None
    pipeline.unlearn_and_evaluate = lambda r: ran.append(r.name)
    pipeline.teacher_setting = lambda row: (4.0, None) if row == "ASU" else None
    pipeline.evaluate_teacher = lambda row: teachers.append(row) or {}
    pipeline.run()
    # the rows run either way (a row's seed-0 run is asked for again as a seed: its marker skips it)
    assert list(dict.fromkeys(ran)) == ["NPO_lr0.0001_s0", "ASU_lr0.0001_s0"]
    assert teachers == scored
