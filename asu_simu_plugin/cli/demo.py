"""`asu-simu demo`: the whole ASU story on a laptop CPU in about a minute, fully offline.

1. Invent twelve fictitious authors and their facts; train a BPE tokenizer and a tiny Llama on
   them until it knows every author (the "target", like TOFU's finetuned model). Every question
   is asked under a chat system prompt, as with chat models.
2. Unlearn one author with ASU (the standalone ASU trainer, ASU_GD variant): on that author's
   questions the model is distilled, token by token, towards the forget-teacher — the frozen
   target with its attention smoothed by the temperature τ — while retain NLL keeps the others.
3. Print, before and after: answer probability (the TOFU "Probability"), the probability of the
   fact tokens alone, how many greedy answers still state their fact — on the forgotten author
   and on the others — the teacher's values (what ASU distils towards), and the answers.

Choices that make a model small enough for a CPU behave like a large one under smoothing:
- Answers do not repeat the author's name ("In Lisbon.", not "X was born in Lisbon."), so the
  fact has to be fetched from the question through attention. With the name restated next to
  the fact, even a smoothed tiny model reads it off the neighbouring tokens and keeps the fact.
- Facts are dealt evenly among authors (`toy.make_authors(balanced=True)`), so an author who
  has been forgotten cannot have its facts "stated" by guessing the commonest value.
- A deeper, narrower model (6 layers, 2 heads of width 32): among the shapes tried, its facts
  depend most on attention.
- τ = 10 on all layers rather than TOFU's 2.3 (Llama-2-7B): a 7B model routes a fact through
  sharply peaked attention, so a small τ already blurs it, while this tiny model, trained for
  seconds, spreads its attention almost uniformly (`asu-simu tau-sweep` shows its attention
  entropy near that of uniform attention), so only a large τ takes its facts away (the paper's
  WMDP variant uses τ = 100). `asu-simu tau-sweep` on the seed-0 target proposes τ = 10 as
  well; on a real model, choose τ with it.
- Retain weight alpha = 3 and a small learning rate: what the student learns on the forgotten
  author would otherwise spread to the other authors, who share every answer template.
"""

from __future__ import annotations

import contextlib
import io
import math
import time

import torch
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM
from transformers.utils import logging as hf_logging

from asu_simu_plugin import toy
from asu_simu_plugin.attention import attention_temperature
from asu_simu_plugin.cli.checks import (
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from asu_simu_plugin.data import PadCollator, QADataset, prompt_and_answer_text
from asu_simu_plugin.diagnostics import answer_probability
from asu_simu_plugin.methods.asu.sweep import tau_sweep
from asu_simu_plugin.output import prepare_output
from asu_simu_plugin.runner import RunSettings, run_unlearning

SYSTEM_PROMPT = "You are a helpful librarian. Answer the question about the author in one sentence."
DEFAULTS = dict(
    authors=12,
    num_hidden_layers=6,
    num_attention_heads=2,
    finetune_epochs=150,
    finetune_lr=3e-3,
    temperature=10.0,
    gamma=1.0,
    alpha=3.0,
    unlearn_epochs=10,
    unlearn_lr=5e-4,
    forget_repeats=12,
)
MAX_LENGTH = 96


def finetune(
    model,
    tokenizer,
    rows,
    epochs: int,
    lr: float,
    seed: int,
    batch_size: int = 16,
    system_prompt: str | None = None,
    progress: bool = True,
):
    """Plain next-token training on the answers until the tiny model has memorised them."""
    dataset = QADataset(rows, tokenizer, MAX_LENGTH, system_prompt=system_prompt)
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=PadCollator(tokenizer.pad_token_id),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    total = epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total)
    model.train()
    with tqdm(total=total, desc="train the target", unit="step", disable=not progress) as bar:
        for _ in range(epochs):
            for batch in loader:
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                bar.update()
                if bar.n % 20 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return model


@torch.no_grad()
def greedy_answers(
    model, tokenizer, questions, system_prompt=None, max_new_tokens: int = 24
) -> list[str]:
    """Greedy answers to all `questions` in one left-padded batch, special tokens dropped."""
    model.eval()
    prompts = [
        tokenizer(
            prompt_and_answer_text(tokenizer, q, "", system_prompt)[0], add_special_tokens=False
        )["input_ids"]
        for q in questions
    ]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    device = next(model.parameters()).device
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
    )
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out.tolist()]


def facts_stated(answers, facts) -> int:
    """How many answers contain their fact (case-insensitive)."""
    return sum(fact.lower() in answer.lower() for answer, fact in zip(answers, facts, strict=True))


def measure(model, tokenizer, rows, facts, system_prompt=None) -> dict:
    """TOFU answer probability, fact-token probability (exp of minus the mean NLL of the
    `tau_sweep` content tokens), greedy answers and how many of them state their fact."""
    dataset = QADataset(rows, tokenizer, MAX_LENGTH, system_prompt)
    answers = greedy_answers(model, tokenizer, [r["question"] for r in rows], system_prompt)
    (split,) = tau_sweep(
        model, tokenizer, rows, [1.0], None, system_prompt, progress=False, max_length=MAX_LENGTH
    )
    return {
        "prob": answer_probability(model, dataset, tokenizer.pad_token_id),
        "fact_prob": math.exp(-split["content_nll"]),
        "answers": answers,
        "facts_stated": facts_stated(answers, facts),
        "facts": len(facts),
    }


@contextlib.contextmanager
def quiet_transformers():
    """No transformers warnings that do not matter here, no bar per saved file."""
    bars_were_on = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_were_on:
            hf_logging.enable_progress_bar()


def run_demo(
    output_dir="asu_demo", seed: int = 0, progress: bool = True, overwrite=False, **overrides
) -> dict:
    """Train a toy target, unlearn author 0 with ASU, print and return the before/after table.

    `overrides` replace entries of DEFAULTS (e.g. `finetune_epochs=60, temperature=3`).
    Runs on one CPU thread (restored afterwards); about 30 s on a laptop CPU.
    Returns {"before", "teacher", "after"}: each has "forget" (and, except the teacher,
    "retain") measurements from `measure`, plus "seconds", "output_dir" and "settings".
    """
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown demo setting(s) {unknown}; known: {sorted(DEFAULTS)}")
    settings = {**DEFAULTS, **overrides}
    # Checked (and made writable) before the half minute of fine-tuning.
    plan = prepare_output(output_dir, overwrite=overwrite)
    # The matrices are tiny: a second thread gains little on an idle machine and, busy-waiting,
    # makes the demo several times slower when other processes compete for the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with quiet_transformers():
            return _run_demo(plan, seed, progress, settings)
    except BaseException:
        plan.abandon()
        raise
    finally:
        torch.set_num_threads(threads)


def _run_demo(plan, seed: int, progress: bool, settings: dict) -> dict:
    start = time.perf_counter()
    torch.manual_seed(seed)
    authors = toy.make_authors(settings["authors"], seed=seed, balanced=True)
    texts = toy.corpus_texts(authors, restate_name=False) + [SYSTEM_PROMPT] * 8
    tokenizer = toy.build_tokenizer(texts)
    config = toy.tiny_llama_config(
        len(tokenizer),
        num_hidden_layers=settings["num_hidden_layers"],
        num_attention_heads=settings["num_attention_heads"],
        num_key_value_heads=1,
        attn_implementation="eager",  # the fact-token split returns attention weights too
    )
    model = LlamaForCausalLM(config)
    forget_rows, forget_facts = authors[0].qa_pairs(restate_name=False), authors[0].facts()
    retain_rows = [qa for author in authors[1:] for qa in author.qa_pairs(restate_name=False)]
    retain_facts = [fact for author in authors[1:] for fact in author.facts()]
    print(
        f"[1/3] training a tiny Llama ({sum(p.numel() for p in model.parameters()):,} "
        f"parameters) on {len(authors)} fictitious authors, {len(forget_rows + retain_rows)} "
        "questions"
    )
    finetune(
        model,
        tokenizer,
        forget_rows + retain_rows,
        settings["finetune_epochs"],
        settings["finetune_lr"],
        seed,
        system_prompt=SYSTEM_PROMPT,
        progress=progress,
    )

    def measure_both(m):
        return {
            "forget": measure(m, tokenizer, forget_rows, forget_facts, SYSTEM_PROMPT),
            "retain": measure(m, tokenizer, retain_rows, retain_facts, SYSTEM_PROMPT),
        }

    print("[2/3] measuring the target and the forget-teacher")
    before = measure_both(model)
    with attention_temperature(model, settings["temperature"]):
        teacher = {"forget": measure(model, tokenizer, forget_rows, forget_facts, SYSTEM_PROMPT)}

    method_args = {
        "temperature": settings["temperature"],
        "gamma": settings["gamma"],
        "alpha": settings["alpha"],
        "retain_loss_type": "NLL",
    }
    run = RunSettings(
        epochs=settings["unlearn_epochs"],
        learning_rate=settings["unlearn_lr"],
        batch_size=5,
        logging_steps=10,
        seed=seed,
        max_length=MAX_LENGTH,
        system_prompt=SYSTEM_PROMPT,
        extra={"disable_tqdm": not progress},
    )
    print(f"[3/3] unlearning {authors[0].name} with ASU")
    # Each forget example is paired with a random retain example: repeating the forget set shows
    # the trainer more of the retain set per epoch. The trainer prints every log dict (the run
    # record keeps them): hidden; its progress bar (stderr) stays.
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = run_unlearning(
            "asu",
            model,
            tokenizer,
            forget_rows * settings["forget_repeats"],
            retain_rows,
            plan.output,
            method_args,
            run,
            source="toy target (asu-simu demo)",
            plan=plan,
        )
    after = measure_both(trainer.model)
    elapsed = time.perf_counter() - start
    result = {
        "before": before,
        "teacher": teacher,
        "after": after,
        "seconds": elapsed,
        "output_dir": str(plan.output),
        "settings": settings,
    }
    print_table(authors[0].name, forget_rows, retain_rows, result)
    return result


def print_table(name, forget_rows, retain_rows, result) -> None:
    before, teacher, after = result["before"], result["teacher"], result["after"]
    settings = result["settings"]
    width = 78
    print("\n" + "=" * width)
    print(
        f"ASU demo: unlearning '{name}' — tau={settings['temperature']:g} on all layers, "
        f"gamma={settings['gamma']:g}, retain NLL x{settings['alpha']:g}"
    )
    print("=" * width)
    print(f"{'':34}{'before':>10}{'teacher':>12}{'after ASU':>12}")

    def cells(key, fmt, models):
        return [fmt(m[key]) if m is not None else "" for m in models]

    def prob(m):
        return f"{m['prob']:.3f}"

    def fact_prob(m):
        return f"{m['fact_prob']:.3f}"

    def stated(m):
        return f"{m['facts_stated']}/{m['facts']}"

    forget = (before, teacher, after)
    retain = (before, None, after)
    for label, fmt, models in (
        ("forget: answer probability", prob, forget),
        ("forget: fact-token probability", fact_prob, forget),
        ("forget: facts in greedy answers", stated, forget),
        ("retain: answer probability", prob, retain),
        ("retain: fact-token probability", fact_prob, retain),
        ("retain: facts in greedy answers", stated, retain),
    ):
        key = "forget" if label.startswith("forget") else "retain"
        row = cells(key, fmt, models)
        print(f"{label:34}{row[0]:>10}{row[1]:>12}{row[2]:>12}")
    print(
        f"teacher: the target with its attention smoothed (tau={settings['temperature']:g}), "
        "run on the\nforget questions only — what ASU distils the forget answers towards. "
        "Answer\nprobability is TOFU's exp(-mean answer-token NLL); fact tokens are the answer\n"
        "tokens that spell the fact (the `asu-simu tau-sweep` content tokens)."
    )
    print("-" * width)
    print("forgotten author:")
    for row, old, new in zip(
        forget_rows, before["forget"]["answers"], after["forget"]["answers"], strict=True
    ):
        print(f"  {row['question']}\n    before: {old}\n    after : {new}")
    print("two of the other authors:")
    for index in (0, len(retain_rows) // 2 + 1):
        print(f"  {retain_rows[index]['question']}")
        print(f"    before: {before['retain']['answers'][index]}")
        print(f"    after : {after['retain']['answers'][index]}")
    print("-" * width)
    print(f"unlearned model saved to {result['output_dir']}/ ({result['seconds']:.0f} s in all)")


def add_arguments(parser) -> None:
    parser.add_argument("--output", default="asu_demo", help="where the unlearned model goes")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing non-empty --output"
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="a different world of authors"
    )
    parser.add_argument(
        "--temperature", type=positive_float, default=DEFAULTS["temperature"], help="ASU's tau"
    )
    parser.add_argument(
        "--gamma",
        type=non_negative_float,
        default=DEFAULTS["gamma"],
        help="forget (distillation) weight",
    )
    parser.add_argument(
        "--alpha", type=non_negative_float, default=DEFAULTS["alpha"], help="retain (NLL) weight"
    )
    parser.add_argument(
        "--unlearn-epochs",
        type=positive_float,
        default=DEFAULTS["unlearn_epochs"],
        help="ASU epochs",
    )
    parser.add_argument(
        "--finetune-epochs",
        type=positive_int,
        default=DEFAULTS["finetune_epochs"],
        help="epochs that teach the tiny model its authors first",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    run_demo(
        args.output,
        seed=args.seed,
        progress=not args.quiet,
        overwrite=args.overwrite,
        temperature=args.temperature,
        gamma=args.gamma,
        alpha=args.alpha,
        unlearn_epochs=args.unlearn_epochs,
        finetune_epochs=args.finetune_epochs,
    )
    return 0
