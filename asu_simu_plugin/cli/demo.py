"""`asu-simu demo`: the whole ASU story on a laptop CPU in a couple of minutes, fully offline.

1. Invent fictitious authors and their facts; train a BPE tokenizer and a tiny Llama on them
   until it knows every author (the "target" model, like TOFU's finetuned model).
2. Unlearn one author with ASU (forget-teacher = the target with smoothed attention).
3. Print, before and after: answer probability on the forgotten author and on the others, and
   what the model now answers to a question about the forgotten author.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM

from asu_simu_plugin import toy
from asu_simu_plugin.data import PadCollator, QADataset
from asu_simu_plugin.diagnostics import answer_probability, greedy_answer
from asu_simu_plugin.runner import RunSettings, run_unlearning

DEFAULTS = dict(
    authors=12,
    finetune_epochs=120,
    finetune_lr=3e-3,
    temperature=3.0,
    gamma=1.0,
    unlearn_epochs=8,
    unlearn_lr=2e-3,
)


def finetune(model, tokenizer, rows, epochs: int, lr: float, seed: int, batch_size: int = 16):
    """Plain next-token training on the answers until the tiny model has memorised them."""
    dataset = QADataset(rows, tokenizer, max_length=64)
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
    with tqdm(total=total, desc="finetune target", unit="step") as bar:
        for _ in range(epochs):
            for batch in loader:
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model


def measure(model, tokenizer, forget_rows, retain_rows):
    pad = tokenizer.pad_token_id
    return {
        "forget_prob": answer_probability(model, QADataset(forget_rows, tokenizer, 64), pad),
        "retain_prob": answer_probability(model, QADataset(retain_rows, tokenizer, 64), pad),
        "sample": greedy_answer(model, tokenizer, forget_rows[0]["question"]),
        "retain_sample": greedy_answer(model, tokenizer, retain_rows[0]["question"]),
    }


def run_demo(output_dir="asu_demo", seed: int = 0, **overrides) -> dict:
    settings = {**DEFAULTS, **overrides}
    start = time.perf_counter()
    torch.manual_seed(seed)
    authors = toy.make_authors(settings["authors"], seed=seed)
    tokenizer = toy.build_tokenizer(toy.corpus_texts(authors))
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
    )
    before = measure(model, tokenizer, forget_rows, retain_rows)

    method_args = {
        "temperature": settings["temperature"],
        "gamma": settings["gamma"],
        "alpha": 1.0,
        "retain_loss_type": "NLL",
    }
    run = RunSettings(
        epochs=settings["unlearn_epochs"],
        learning_rate=settings["unlearn_lr"],
        batch_size=5,
        logging_steps=5,
        seed=seed,
        max_length=64,
    )
    # Each forget example is paired with a retain example, so repeat the forget set to see more
    # of the retain set per epoch.
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
    after = measure(trainer.model, tokenizer, forget_rows, retain_rows)
    elapsed = time.perf_counter() - start
    print_table(
        authors[0].name,
        forget_rows[0],
        retain_rows[0],
        before,
        after,
        method_args,
        elapsed,
        output_dir,
    )
    return {"before": before, "after": after, "seconds": elapsed, "output_dir": str(output_dir)}


def print_table(name, forget_qa, retain_qa, before, after, method_args, elapsed, output_dir):
    width = 62
    print("\n" + "=" * width)
    print(
        f"ASU demo: unlearning '{name}' (tau={method_args['temperature']}, "
        f"gamma={method_args['gamma']})"
    )
    print("=" * width)
    print(f"{'':34}{'before':>12}{'after':>12}")
    print(
        f"{'forget answer probability':34}{before['forget_prob']:>12.3f}"
        f"{after['forget_prob']:>12.3f}"
    )
    print(
        f"{'retain answer probability':34}{before['retain_prob']:>12.3f}"
        f"{after['retain_prob']:>12.3f}"
    )
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
