"""The MUSE-mini pipeline's own computations: article matching, cuts and the offline data folder."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_MUSE = ROOT.parent / "shared" / "data" / "muse-bench" / "MUSE-News"


def load_pipeline():
    spec = importlib.util.spec_from_file_location(
        "muse_mini_run", ROOT / "benchmarks/muse_mini/run.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_harness(tmp_path):
    harness = tmp_path / "ou"
    (harness / "src").mkdir(parents=True)
    (harness / "src" / "train.py").write_text("")
    return harness


def test_covering_articles_finds_cut_and_whole_paragraphs():
    run = load_pipeline()
    para = "x" * 70
    articles = [f"intro\n\n{para}\n\nend", "other text " * 20, f"A{'b' * 80}C"]
    # a window that starts mid-paragraph of article 2 and then holds article 0's paragraph
    window = f"{'b' * 80}C\n\n{para}\n\nshort"
    assert run.covering_articles(window, articles) == {0, 2}
    assert run.covering_articles("short\n\nlines", articles) == set()  # < 60 chars: ignored


def test_knowmem_match_needs_answer_and_every_name():
    run = load_pipeline()
    articles = ["Greek Prime Minister Kyriakos Mitsotakis said 57 died.", "Mitsotakis: 57"]
    row = {"question": "How many died, according to Kyriakos Mitsotakis?", "answer": "57"}
    assert run.knowmem_articles(row, articles) == {0}
    assert run.knowmem_articles({"question": "How many died?", "answer": "57"}, articles) == set()


def test_cuts_keep_whole_words():
    run = load_pipeline()
    assert run.tail("alpha beta gamma", 8) == "gamma"
    assert run.head("alpha beta gamma", 12) == "alpha beta"
    assert run.tail("short", 10) == "short" and run.head("short", 10) == "short"


def test_method_table_and_scaled_rates(tmp_path):
    run = load_pipeline()
    data = tmp_path / "data" / "muse-bench" / "MUSE-News"
    (data / "raw").mkdir(parents=True)
    (data / "sust").mkdir()
    (data / "raw" / "forget.json").write_text("{}\n")
    base = ["--data", str(tmp_path / "data"), "--work", str(tmp_path / "w")]
    args = run.parse_args([*base, "--harness", str(fake_harness(tmp_path)), "--device", "cpu"])
    assert args.runs == ["GradDiff", "NPO", "ASU_GD", "ASU_KL", "SIMU"]
    assert args.learning_rates["ASU_GD"] == pytest.approx(1e-4)  # 1e-5 × (1e-4 / 1e-5)
    assert args.learning_rates["SIMU"] == pytest.approx(5e-5)
    assert args.batch_size == 4 and args.max_steps is None
    with pytest.raises(SystemExit):
        run.parse_args([*base[:1], str(tmp_path), *base[2:], "--harness", str(tmp_path / "ou")])


@pytest.mark.skipif(not SHARED_MUSE.is_dir(), reason="needs ../shared/data (MUSE-News files)")
def test_mini_muse_folder_loads_offline_and_trains_on_what_it_scores(tmp_path):
    from datasets import load_dataset

    run = load_pipeline()
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
