"""The ASU demo as a library: train a toy target, measure it, unlearn one author, measure again.

`asu-simu demo` is `run_demo` plus a printed table. The pieces are usable on their own:
`finetune` (plain next-token training until a small model memorises its answers),
`greedy_answers` (batched greedy generation), `facts_stated` and `measure` (TOFU answer
probability, fact-token probability, how many greedy answers still state their fact).

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
  WMDP variant uses τ = 100). `asu-simu tau-sweep`'s rule is more cautious on the seed-0
  target (it keeps τ <= 5, where the function-token NLL stays within its 0.5-nat budget): the
  demo trades some fluency for a visible effect; on a real model, choose τ with the sweep.
- Retain weight alpha = 3 and a small learning rate: what the student learns on the forgotten
  author would otherwise spread to the other authors, who share every answer template.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM
from transformers.utils import logging as hf_logging

from asu_simu_plugin import toy
from asu_simu_plugin.attention import attention_temperature
from asu_simu_plugin.data import PadCollator, QADataset, prompt_and_answer_text
from asu_simu_plugin.diagnostics import answer_probability
from asu_simu_plugin.methods.asu.sweep import tau_sweep
from asu_simu_plugin.output import prepare_output
from asu_simu_plugin.runner import RunSettings, method_arguments, run_unlearning

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
    output_dir="asu_demo",
    seed: int = 0,
    progress: bool = True,
    overwrite=False,
    say: Callable[[str], None] | None = None,
    **overrides,
) -> dict:
    """Train a toy target, unlearn author 0 with ASU, save the result to `output_dir`.

    `overrides` replace entries of DEFAULTS (e.g. `finetune_epochs=60, temperature=3`); `say`
    receives a line at each of the three stages (`print` on the command line). Runs on one CPU
    thread (restored afterwards); about 30 s on a laptop CPU.
    Returns {"before", "teacher", "after"}: each has "forget" (and, except the teacher,
    "retain") measurements from `measure`; plus "author" (the forgotten author's name),
    "forget_questions" / "retain_questions", "seconds", "output_dir" and "settings".
    """
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown demo setting(s) {unknown}; known: {sorted(DEFAULTS)}")
    settings = {**DEFAULTS, **overrides}
    # ASU's arguments and the output folder are checked before the half minute of fine-tuning.
    method_args = method_arguments(
        "asu",
        {
            "temperature": settings["temperature"],
            "gamma": settings["gamma"],
            "alpha": settings["alpha"],
            "retain_loss_type": "NLL",
        },
    )
    plan = prepare_output(output_dir, overwrite=overwrite)
    # The matrices are tiny: a second thread gains little on an idle machine and, busy-waiting,
    # makes the demo several times slower when other processes compete for the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with quiet_transformers():
            quiet = say or (lambda line: None)
            return _run_demo(plan, seed, progress, settings, method_args, quiet)
    except BaseException:
        plan.abandon()
        raise
    finally:
        torch.set_num_threads(threads)


def _run_demo(plan, seed: int, progress: bool, settings: dict, method_args, say) -> dict:
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
    say(
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

    say("[2/3] measuring the target and the forget-teacher")
    before = measure_both(model)
    with attention_temperature(model, settings["temperature"]):
        teacher = {"forget": measure(model, tokenizer, forget_rows, forget_facts, SYSTEM_PROMPT)}

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
    say(f"[3/3] unlearning {authors[0].name} with ASU")
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
    return {
        "before": before,
        "teacher": teacher,
        "after": after,
        "author": authors[0].name,
        "forget_questions": [row["question"] for row in forget_rows],
        "retain_questions": [row["question"] for row in retain_rows],
        "seconds": time.perf_counter() - start,
        "output_dir": str(plan.output),
        "settings": settings,
    }
