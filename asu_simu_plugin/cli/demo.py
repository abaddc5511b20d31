"""`asu-simu demo`: the whole ASU story on a laptop CPU in a few minutes, fully offline.

1. Invent fictitious authors and their facts; train a BPE tokenizer and a tiny Llama on them
   until it knows every author (the "target" model, like TOFU's finetuned model).
2. Unlearn one author with ASU: distil, on that author's questions, towards the forget-teacher —
   the frozen target with smoothed attention — while keeping the others with retain NLL.
3. Print, before and after: answer probability on the forgotten author and on the others, the
   teacher's probability (what ASU distils towards), and what the model now answers.

The tiny model spreads its attention almost uniformly already, so the demo smooths hard
(τ = 30; TOFU on a 7B model uses 2.3 — see `asu-simu tau-sweep` for choosing τ on a real model)
and a short system prompt, as chat templates have, dilutes the fact-bearing tokens further.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM

from asu_simu_plugin import toy
from asu_simu_plugin.attention import attention_temperature
from asu_simu_plugin.data import PadCollator, QADataset
from asu_simu_plugin.diagnostics import answer_probability, greedy_answer
from asu_simu_plugin.runner import RunSettings, run_unlearning

SYSTEM_PROMPT = "You are a helpful librarian. Answer the question about the author in one sentence."
DEFAULTS = dict(
    authors=12,
    finetune_epochs=100,
    finetune_lr=3e-3,
    temperature=30.0,
    gamma=1.0,
    alpha=1.0,
    unlearn_epochs=10,
    unlearn_lr=2e-3,
)


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
    dataset = QADataset(rows, tokenizer, max_length=96, system_prompt=system_prompt)
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
    with tqdm(
        total=total, desc="train the target", unit="step", mininterval=1.0, disable=not progress
    ) as bar:
        for _ in range(epochs):
            for batch in loader:
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return model


def measure(model, tokenizer, forget_rows, retain_rows, system_prompt=None):
    pad = tokenizer.pad_token_id

    def probability(rows):
        return answer_probability(model, QADataset(rows, tokenizer, 96, system_prompt), pad)

    return {
        "forget_prob": probability(forget_rows),
        "retain_prob": probability(retain_rows),
        "sample": greedy_answer(model, tokenizer, forget_rows[0]["question"], system_prompt),
        "retain_sample": greedy_answer(model, tokenizer, retain_rows[0]["question"], system_prompt),
    }


def run_demo(output_dir="asu_demo", seed: int = 0, progress: bool = True, **overrides) -> dict:
    settings = {**DEFAULTS, **overrides}
    start = time.perf_counter()
    torch.manual_seed(seed)
    authors = toy.make_authors(settings["authors"], seed=seed)
    tokenizer = toy.build_tokenizer(toy.corpus_texts(authors) + [SYSTEM_PROMPT] * 8)
    model = LlamaForCausalLM(toy.tiny_llama_config(len(tokenizer)))
    forget_rows = authors[0].qa_pairs()
    retain_rows = [qa for author in authors[1:] for qa in author.qa_pairs()]
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
    before = measure(model, tokenizer, forget_rows, retain_rows, SYSTEM_PROMPT)
    with attention_temperature(model, settings["temperature"]):
        teacher = measure(model, tokenizer, forget_rows, retain_rows, SYSTEM_PROMPT)

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
        max_length=96,
        system_prompt=SYSTEM_PROMPT,
        extra={"disable_tqdm": not progress},
    )
    # Each forget example is paired with a random retain example; repeating the forget set
    # shows the trainer more of the retain set per epoch.
    trainer = run_unlearning(
        "asu",
        model,
        tokenizer,
        forget_rows * 4,
        retain_rows,
        Path(output_dir),
        method_args,
        run,
        source="toy target",
    )
    after = measure(trainer.model, tokenizer, forget_rows, retain_rows, SYSTEM_PROMPT)
    elapsed = time.perf_counter() - start
    print_table(
        authors[0].name,
        forget_rows[0],
        retain_rows[0],
        before,
        teacher,
        after,
        method_args,
        elapsed,
        output_dir,
    )
    return {
        "before": before,
        "teacher": teacher,
        "after": after,
        "seconds": elapsed,
        "output_dir": str(output_dir),
    }


def print_table(
    name, forget_qa, retain_qa, before, teacher, after, method_args, elapsed, output_dir
):
    width = 74
    print("\n" + "=" * width)
    print(
        f"ASU demo: unlearning '{name}' (tau={method_args['temperature']:g}, "
        f"forget weight gamma={method_args['gamma']:g})"
    )
    print("=" * width)
    print(f"{'':30}{'before':>12}{'teacher':>16}{'after ASU':>14}")
    for key, label in (
        ("forget_prob", "forget answer probability"),
        ("retain_prob", "retain answer probability"),
    ):
        print(f"{label:30}{before[key]:>12.3f}{teacher[key]:>16.3f}{after[key]:>14.3f}")
    print("(teacher = the target with smoothed attention: what ASU distils towards)")
    print("-" * width)
    print(f"forget question: {forget_qa['question']}")
    print(f"  truth : {forget_qa['answer']}")
    print(f"  before: {before['sample']}")
    print(f"  after : {after['sample']}")
    print(f"retain question: {retain_qa['question']}")
    print(f"  before: {before['retain_sample']}")
    print(f"  after : {after['retain_sample']}")
    print("-" * width)
    print(f"unlearned model saved to {output_dir}/ ({elapsed:.0f} s in all)")


def add_arguments(parser) -> None:
    parser.add_argument("--output", default="asu_demo", help="where the unlearned model goes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=DEFAULTS["temperature"])
    parser.add_argument("--gamma", type=float, default=DEFAULTS["gamma"])
    parser.add_argument("--unlearn-epochs", type=float, default=DEFAULTS["unlearn_epochs"])
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    run_demo(
        args.output,
        seed=args.seed,
        progress=not args.quiet,
        temperature=args.temperature,
        gamma=args.gamma,
        unlearn_epochs=args.unlearn_epochs,
    )
    return 0
