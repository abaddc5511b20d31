"""`asu-simu demo` end to end (shortened): it forgets, keeps the rest, saves a plain model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from asu_simu_plugin import toy
from asu_simu_plugin.cli import main
from asu_simu_plugin.cli.demo import print_table
from asu_simu_plugin.data import prompt_and_answer_text
from asu_simu_plugin.demo import facts_stated, greedy_answers, run_demo
from asu_simu_plugin.output import RUN_FILE


def test_short_demo_forgets_keeps_the_rest_and_saves_a_plain_model(tmp_path, capsys):
    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    result = run_demo(out, progress=False, finetune_epochs=80, unlearn_epochs=5)
    before, teacher, after = result["before"], result["teacher"], result["after"]
    # the target learnt every fact
    assert before["forget"]["prob"] > 0.9 and before["retain"]["prob"] > 0.9
    assert before["forget"]["facts_stated"] == 5
    assert before["retain"]["facts_stated"] >= 50
    # smoothing takes the facts away from the teacher, and ASU distils the student towards it
    assert teacher["forget"]["fact_prob"] < before["forget"]["fact_prob"] - 0.35
    assert after["forget"]["fact_prob"] < before["forget"]["fact_prob"] - 0.35
    assert after["forget"]["prob"] < before["forget"]["prob"] - 0.15
    assert abs(after["forget"]["prob"] - teacher["forget"]["prob"]) < 0.1
    assert after["forget"]["facts_stated"] <= 3
    assert torch.get_num_threads() == threads  # the demo's single thread is given back
    # ... while the other authors are kept
    assert after["retain"]["prob"] > before["retain"]["prob"] - 0.05
    forget_drop = before["forget"]["prob"] - after["forget"]["prob"]
    assert forget_drop > 5 * (before["retain"]["prob"] - after["retain"]["prob"])
    assert after["retain"]["facts_stated"] >= before["retain"]["facts_stated"] - 5

    record = json.loads((out / RUN_FILE).read_text())
    assert record["method"] == "asu" and record["method_args"]["temperature"] == 10.0
    assert record["method_args"]["retain_loss_type"] == "NLL"
    saved = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no extra keys
    state = saved.state_dict()
    assert not any("original" in key or "teacher" in key for key in state)
    assert capsys.readouterr().out == ""  # the library prints nothing; the command prints this:
    print_table(result)
    table = capsys.readouterr().out
    assert f"{after['forget']['prob']:.3f}" in table and f"{teacher['forget']['prob']:.3f}" in table
    assert "forget: facts in greedy answers" in table
    assert f"unlearning '{result['author']}'" in table
    assert f"  {result['forget_questions'][0]}\n    before: " in table


@torch.no_grad()
def greedy_answer(model, tokenizer, question, system_prompt=None, max_new_tokens=24) -> str:
    """One prompt at a time, unpadded: the reference the batched generation must match."""
    model.eval()
    prompt, _ = prompt_and_answer_text(tokenizer, question, "", system_prompt)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_batched_greedy_answers_match_one_at_a_time(tiny_llama, toy_tokenizer, toy_authors):
    questions = [qa["question"] for qa in toy_authors[0].qa_pairs()] + ["Who?"]
    torch.manual_seed(0)
    batched = greedy_answers(tiny_llama, toy_tokenizer, questions, "Be brief.", max_new_tokens=6)
    single = [
        greedy_answer(tiny_llama, toy_tokenizer, q, "Be brief.", max_new_tokens=6)
        for q in questions
    ]
    assert batched == single  # left padding is masked out


def test_facts_stated_counts_each_answer_against_its_own_fact():
    author = toy.make_authors(1, seed=3, balanced=True)[0]
    answers = [qa["answer"] for qa in author.qa_pairs(restate_name=False)]
    assert facts_stated(answers, author.facts()) == 5
    assert facts_stated(answers[1:] + answers[:1], author.facts()) == 0
    assert facts_stated(["in " + author.city.upper()], author.facts()[:1]) == 1


def test_balanced_authors_spread_every_attribute():
    authors = toy.make_authors(12, seed=5, balanced=True)
    for attribute, values in (
        ("city", toy.CITIES),
        ("genre", toy.GENRES),
        ("parent_job", toy.JOBS),
        ("award", toy.AWARDS),
    ):
        counts = [sum(getattr(a, attribute) == v for a in authors) for v in values]
        assert max(counts) == -(-12 // len(values))  # ceil: dealt as evenly as possible
    assert len({a.name for a in authors}) == 12
    assert toy.make_authors(12, seed=5, balanced=True) == authors  # reproducible


def test_demo_rejects_unknown_settings(tmp_path):
    with pytest.raises(ValueError, match="finetune_epochs"):
        run_demo(tmp_path, finetune_epoch=3)


def test_demo_command_line_is_wired():
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
