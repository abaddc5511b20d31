"""The MUSE-mini pipeline's own computations: article matching, cuts, the offline data folder,
its rows and the report it builds on TOFU-mini's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from benchmark_support import WordTokenizer, fake_harness

from benchmarks.mini.pipeline import Run
from benchmarks.muse_mini import run

ROOT = Path(__file__).resolve().parents[1]
SHARED_MUSE = ROOT.parent / "shared" / "data" / "muse-bench" / "MUSE-News"


def test_covering_articles_finds_cut_and_whole_paragraphs():
    para = "x" * 70
    articles = [f"intro\n\n{para}\n\nend", "other text " * 20, f"A{'b' * 80}C"]
    # a window that starts mid-paragraph of article 2 and then holds article 0's paragraph
    window = f"{'b' * 80}C\n\n{para}\n\nshort"
    assert run.covering_articles(window, articles) == {0, 2}
    assert run.covering_articles("short\n\nlines", articles) == set()  # < 60 chars: ignored


def test_knowmem_match_needs_answer_and_every_name():
    articles = ["Greek Prime Minister Kyriakos Mitsotakis said 57 died.", "Mitsotakis: 57"]
    row = {"question": "How many died, according to Kyriakos Mitsotakis?", "answer": "57"}
    assert run.knowmem_articles(row, articles) == {0}
    assert run.knowmem_articles({"question": "How many died?", "answer": "57"}, articles) == set()


def test_cuts_keep_whole_words():
    assert run.tail("alpha beta gamma", 8) == "gamma"
    assert run.head("alpha beta gamma", 12) == "alpha beta"
    assert run.tail("short", 10) == "short" and run.head("short", 10) == "short"


def muse_tree(tmp_path):
    data = tmp_path / "data" / "muse-bench" / "MUSE-News"
    (data / "raw").mkdir(parents=True)
    (data / "sust").mkdir()
    (data / "raw" / "forget.json").write_text("{}\n")
    harness = ["--harness", str(fake_harness(tmp_path))]
    return ["--data", str(tmp_path / "data"), "--work", str(tmp_path / "w"), *harness]


def test_method_table_and_scaled_rates(tmp_path):
    base = muse_tree(tmp_path)
    args = run.parse_args([*base, "--device", "cpu"])
    assert args.rows == ["GradDiff", "NPO", "ASU", "SIMU"]
    assert all(args.rates[r] == [3e-5, 1e-4, 3e-4] for r in args.rows)  # MUSE's own grid
    assert args.seeds == [0] and args.headline == ["GradDiff", "NPO", "ASU"]  # fits a session
    assert args.batch_size == 2 and args.max_steps is None and args.unlearn_epochs == 1
    assert args.finetune_lr == 3e-4 and args.finetune_epochs == 8
    args = run.parse_args(
        [*base, "--device", "cpu", "--grid", "default", "--methods", "ASU", "ASU_KL", "SIMU"]
    )
    assert args.rates["ASU"] == [pytest.approx(3e-4)]  # 1e-5 × (3e-4 / 1e-5)
    assert args.rates["SIMU"] == [pytest.approx(1.5e-4)] and args.headline == ["ASU"]
    pipeline = run.Pipeline(args)
    simu = pipeline.unlearn_overrides(Run("SIMU", 5e-5, 0))
    assert simu[0] == "experiment=unlearn/muse/simu"
    assert "trainer.method_args.attribution_max_batches=1" in simu
    assert "trainer.method_args.steps=5" in simu
    asu_kl = pipeline.unlearn_overrides(Run("ASU_KL", 1e-4, 0))
    assert asu_kl == ["experiment=unlearn/muse/asu", "trainer.method_args.retain_loss_type=KL"]
    data = pipeline.unlearn_data_overrides()
    assert "retain_split=forget_2" in data and not any(o.startswith("holdout") for o in data)
    with pytest.raises(SystemExit):
        run.parse_args(["--data", str(tmp_path), *base[2:]])


def test_report_selects_lowest_verbmem_and_aggregates_seeds(tmp_path):
    """A finished work folder made by hand: the selection (lower verbmem ROUGE = more forgotten),
    {mean, std} over seeds, ASU vs NPO at equal forgetting, and the stand-in retain paragraph."""
    import statistics

    args = run.parse_args(
        [*muse_tree(tmp_path), "--methods", "NPO", "ASU", "--grid", "1e-4,2e-4", "--seeds", "0,1"]
        + ["--out", str(tmp_path / "out"), "--device", "cpu"]
    )
    pipeline = run.Pipeline(args)
    work = pipeline.work
    data_marker = {"verbmem/forget": 6, "seconds": 0.0, "finished": "2026-12-04T00:00:00+00:00"}
    (work / "stages" / "data.json").write_text(json.dumps(data_marker))

    def finish(name, verbmem, retain, answers):
        """`retain`: the retain-verbmem call's verbmem ROUGE, in evals/<name>/retain_verbmem."""
        evals = work / "evals" / name
        (evals / "retain_verbmem").mkdir(parents=True)
        summary = {
            "forget_verbmem_ROUGE": verbmem,
            "forget_knowmem_ROUGE": verbmem / 2,
            "retain_knowmem_ROUGE": 0.0,
            "privleak": -10.0,
        }
        (evals / "MUSE_SUMMARY.json").write_text(json.dumps(summary))
        retained = {"forget_verbmem_ROUGE": retain}
        (evals / "retain_verbmem" / "MUSE_SUMMARY.json").write_text(json.dumps(retained))
        items = {str(i): {"input": "prompt", "generation": g} for i, g in enumerate(answers)}
        per_item = {"forget_verbmem_ROUGE": {"value_by_index": items}}
        (evals / "MUSE_EVAL.json").write_text(json.dumps(per_item))
        for stage in ("eval", "unlearn"):
            marker = {"seconds": 10.0, "finished": "2026-12-04T00:00:00+00:00"}
            (work / "stages" / f"{stage}_{name}.json").write_text(json.dumps(marker))

    finish("retain", 0.2, 0.38, ["a b"])
    finish("target", 0.8, 0.40, ["a b"])
    # verbmem retain floor 0.9 × 0.40 = 0.36. NPO: only 1e-4 keeps it
    finish("NPO_lr0.0001_s0", 0.5, 0.38, ["a b"])
    finish("NPO_lr0.0002_s0", 0.1, 0.30, ["a b"])
    finish("NPO_lr0.0001_s1", 0.3, 0.36, ["a a"])
    # ASU: both keep it; 2e-4 leaves less verbatim memory (a higher-is-better rule takes 1e-4)
    finish("ASU_lr0.0001_s0", 0.6, 0.40, ["a b"])
    finish("ASU_lr0.0002_s0", 0.3, 0.37, ["a b", "c d"])
    finish("ASU_lr0.0002_s1", 0.5, 0.35, ["a b", ""])
    pipeline.tokenizer = WordTokenizer
    pipeline.report()

    result = json.loads((tmp_path / "out" / "muse_mini.json").read_text())
    assert result["settings"]["selection"]["forget_better"] == "lower"
    assert result["goal"] is None
    rows = {row["name"]: row for row in result["rows"]}
    assert list(rows) == ["retain", "target", "NPO", "ASU"]
    npo, asu = rows["NPO"], rows["ASU"]
    assert npo["learning_rate"] == 1e-4 and asu["learning_rate"] == 2e-4
    assert asu["selection"].startswith("lowest forget_verbmem_ROUGE")
    assert [g["selected"] for g in asu["lr_grid"]] == [False, True]
    assert [s["seed"] for s in asu["seeds"]] == [0, 1]
    assert asu["forget_verbmem_ROUGE"]["mean"] == pytest.approx(0.4)
    assert asu["forget_verbmem_ROUGE"]["std"] == pytest.approx(statistics.stdev([0.3, 0.5]))
    assert asu["retain_verbmem_ROUGE"]["mean"] == pytest.approx(0.36)
    assert asu["retain_knowmem_ROUGE"]["mean"] == 0.0
    assert asu["empty_share"]["mean"] == pytest.approx(0.25)  # 0/2 and 1/2
    assert npo["token_entropy"]["mean"] == pytest.approx(0.5)  # "a b" 1, "a a" 0
    assert rows["target"]["retain_verbmem_ROUGE"] == {"mean": 0.40, "std": None}
    # ASU's 0.3 on NPO's (0.1, 0.30)-(0.5, 0.38) curve, in log verbmem ROUGE
    (c,) = result["equal_forgetting"]
    assert (c["row"], c["baseline"], c["matched_on"]) == ("ASU", "NPO", "forget_verbmem_ROUGE")
    t = (math.log(0.3) - math.log(0.1)) / (math.log(0.5) - math.log(0.1))
    (asu_point,) = [m for m in c["matches"] if m["point_of"] == "ASU"]  # 0.6: outside NPO's
    assert asu_point["utility_difference"] == pytest.approx(0.37 - (0.30 + t * 0.08))
    md = (tmp_path / "out" / "muse_mini.md").read_text()
    assert "Generated by `muse_mini/run.py`" in md
    assert "**Stand-in retain corpus**" in md and "privleak: min-k%" in md
    assert "the lowest forget_verbmem_ROUGE" in md
    assert "| ASU (ours) | 2.00e-04 | 2 | 0.400 ± 0.141 | 0.360 ± 0.014 |" in md
    for png in ("muse_mini.png", "muse_mini_equal_forgetting.png"):
        assert (tmp_path / "out" / png).stat().st_size > 10_000


@pytest.mark.skipif(not SHARED_MUSE.is_dir(), reason="needs ../shared/data (MUSE-News files)")
def test_mini_muse_folder_loads_offline_and_trains_on_what_it_scores(tmp_path):
    from datasets import load_dataset

    args = run.parse_args(
        [
            *("--data", str(SHARED_MUSE.parents[1]), "--work", str(tmp_path / "w")),
            *("--harness", str(fake_harness(tmp_path)), "--device", "cpu"),
            *("--verbmem-size", "3", "--privleak-size", "3", "--knowmem-size", "3"),
            *("--retain-size", "4", "--prompt-chars", "500", "--mia-chars", "600"),
        ]
    )
    counts = run.Pipeline(args).build_data()
    assert counts["verbmem/forget"] == counts["privleak/forget"] == 3
    assert counts["privleak/holdout"] == counts["knowmem/forget_qa"] == 3
    assert counts["sust/forget_2"] == counts["train/retain"] == 4
    assert counts["train/target"] == counts["raw/forget"] + 4
    folder = str(tmp_path / "w" / "data" / "muse-bench" / "MUSE-News")
    cache = str(tmp_path / "cache")

    def load(name, split):
        return load_dataset(folder, name=name, split=split, cache_dir=cache)

    target = list(load("train", "target")["text"])
    forget_articles = list(load("raw", "forget")["text"])
    retain_articles = list(load("sust", "forget_2")["text"])
    assert target == forget_articles + retain_articles
    shared_sust = [json.loads(x)["text"] for x in (SHARED_MUSE / "sust/forget_2.json").open()]
    assert retain_articles == shared_sust[:4]  # the retain stand-in, in order
    retained = list(load("verbmem", "retain"))
    assert len(retained) == 4
    for row, article in zip(retained, retain_articles, strict=True):
        assert len(row["prompt"]) <= 500 and row["prompt"] in article and row["gt"] in article
        assert article.index(row["prompt"]) < article.index(row["gt"])  # prompt, then its rest
    for row in load("verbmem", "forget"):
        assert len(row["prompt"]) <= 500
        assert run.covering_articles(row["prompt"] + "\n\n" + row["gt"], forget_articles)
    for text in load("privleak", "forget")["text"]:
        assert len(text) <= 600 and run.covering_articles(text, forget_articles)
    for text in load("privleak", "holdout")["text"]:
        assert not run.covering_articles(text, target)  # never trained on
    for row in load("knowmem", "forget_qa"):
        assert run.knowmem_articles(row, forget_articles)
    assert len(load("knowmem", "retain_qa_icl")) == 10


def test_retain_verbmem_call_keeps_only_the_verbmem_metric_on_the_retain_split():
    """Every eval.py call is repeated as the verbmem test on `verbmem/retain`: the other metrics
    and their settings are dropped, the verbmem settings kept, the output goes one level down."""
    m = "eval.muse.metrics"
    main = [
        "experiment=eval/muse/asu_teacher",
        "++model.model_args.device_map=cpu",
        "retain_logs_path=/w/evals/retain/MUSE_EVAL.json",
        "task_name=ASU_lr0.0001_s0",
        "paths.output_dir=/w/evals/ASU_lr0.0001_s0",
        f"{m}.retain_knowmem_ROUGE.batch_size=8",
        f"{m}.forget_verbmem_ROUGE.generation_args.max_new_tokens=64",
        f"{m}.extraction_strength.datasets.MUSE_forget_verbmem.args.max_length=64",
        "model.model_args.temperature=2.0",
    ]
    assert run.retain_verbmem_overrides(main) == [
        "experiment=eval/muse/asu_teacher",
        "++model.model_args.device_map=cpu",
        "retain_logs_path=null",
        "task_name=ASU_lr0.0001_s0_retain_verbmem",
        "paths.output_dir=/w/evals/ASU_lr0.0001_s0/retain_verbmem",
        f"{m}.forget_verbmem_ROUGE.generation_args.max_new_tokens=64",
        "model.model_args.temperature=2.0",
        f"~{m}.forget_knowmem_ROUGE",
        f"~{m}.retain_knowmem_ROUGE",
        f"~{m}.privleak",
        f"~{m}.extraction_strength",
        f"{m}.forget_verbmem_ROUGE.datasets.MUSE_forget_verbmem.args.hf_args.split=retain",
    ]
    article = "First paragraph here.\nSecond one, a bit longer than the first.\nThird and last."
    row = run.retain_verbmem(article, 12)
    assert row == {
        "prompt": "here.",
        "gt": "Second one, a bit longer than the first.\nThird and last.",
    }
