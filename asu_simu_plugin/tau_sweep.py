"""How the attention temperature τ changes a model: the diagnostic for choosing ASU's τ.

For each τ the model runs with `attention_temperature(model, τ, layers)` on question/answer
pairs and we measure, on the answer tokens:

- mean NLL of **content** tokens (names, places, titles: the facts ASU should make unreachable)
  and of **function** tokens (what keeps the answer fluent). A token is a *function* token if its
  text, stripped and lower-cased, is an English stop word (the list below) or has no letter or
  digit (punctuation, whitespace, special tokens); every other answer token is a *content* token.
- mean attention entropy (nats) over the tempered layers, all heads and every query position
  that predicts an answer token, measured under the temperature (needs eager attention, the
  only implementation that returns attention weights).

Recommendation rule (`recommend_tau`): the smallest τ at which the content-token NLL has risen by
at least `content_rise` nats over τ = 1 (default 1.0: the fact's probability is divided by e)
while the function-token NLL has risen by at most `function_budget` nats (default 0.5): the
forget-teacher then no longer knows the facts but still speaks fluently — exactly what ASU
distils. If no τ qualifies, the τ with the largest content-minus-function rise within the
budget is proposed, with that reason. (The paper's stable range on Llama-2-7B was τ ∈ [2.0, 2.8].)
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch

from asu_simu_plugin.arch import decoder_layers, resolve_layer_ids
from asu_simu_plugin.attention import attention_temperature
from asu_simu_plugin.data import QADataset
from asu_simu_plugin.diagnostics import batches, token_nll
from asu_simu_plugin.losses import IGNORE_INDEX

STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself yourselves
    also known born named called wrote writes written worked works one two many much""".split()
)
FIELDS = (
    "tau",
    "content_nll",
    "function_nll",
    "attention_entropy",
    "content_tokens",
    "function_tokens",
)


def is_function_token(text: str) -> bool:
    word = text.strip().lower()
    return not any(ch.isalnum() for ch in word) or word in STOP_WORDS


def _function_token_table(tokenizer) -> torch.Tensor:
    table = torch.tensor(
        [is_function_token(tokenizer.decode([i])) for i in range(len(tokenizer))],
        dtype=torch.bool,
    )
    table[list(tokenizer.all_special_ids)] = True  # eos and chat tags carry no fact
    return table


def _attention_entropy(attentions, layer_ids, query_mask) -> tuple[float, int]:
    total, count = 0.0, 0
    for layer_id in layer_ids:
        probs = attentions[layer_id].float()  # [B, H, T, T]
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)  # [B, H, T]
        selected = entropy.permute(0, 2, 1)[query_mask]  # [N, H]
        total += float(selected.sum())
        count += selected.numel()
    return total, count


@torch.no_grad()
def tau_sweep(
    model,
    tokenizer,
    rows,
    taus,
    layers=None,
    system_prompt=None,
    batch_size=8,
    max_length=512,
    progress=True,
) -> list[dict]:
    """One result dict per τ (keys: FIELDS)."""
    from tqdm.auto import tqdm

    dataset = QADataset(rows, tokenizer, max_length, system_prompt)
    layer_ids = resolve_layer_ids(layers, len(decoder_layers(model)))
    function_table = _function_token_table(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    model.eval()
    results = []
    for tau in tqdm(list(taus), desc="tau sweep", unit="tau", disable=not progress):
        sums = {"content": 0.0, "function": 0.0}
        counts = {"content": 0, "function": 0}
        entropy_sum, entropy_count = 0.0, 0
        with attention_temperature(model, float(tau), layer_ids):
            for batch in batches(dataset, batch_size, pad):
                batch = {k: v.to(device) for k, v in batch.items()}
                out = model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    output_attentions=True,
                )
                if out.attentions is None or out.attentions[0] is None:
                    raise ValueError(
                        "the model returned no attention weights: load it with "
                        "attn_implementation='eager' for the attention-entropy measurement"
                    )
                nll = token_nll(out.logits, batch["labels"])
                targets = batch["labels"][:, 1:]
                answer = targets != IGNORE_INDEX
                function = function_table.to(device)[targets.clamp_min(0)] & answer
                content = answer & ~function
                sums["content"] += float(nll[content].sum())
                sums["function"] += float(nll[function].sum())
                counts["content"] += int(content.sum())
                counts["function"] += int(function.sum())
                query_mask = torch.zeros_like(batch["labels"], dtype=torch.bool)
                query_mask[:, :-1] = answer
                total, count = _attention_entropy(out.attentions, layer_ids, query_mask)
                entropy_sum, entropy_count = entropy_sum + total, entropy_count + count
        results.append(
            {
                "tau": float(tau),
                "content_nll": sums["content"] / max(counts["content"], 1),
                "function_nll": sums["function"] / max(counts["function"], 1),
                "attention_entropy": entropy_sum / max(entropy_count, 1),
                "content_tokens": counts["content"],
                "function_tokens": counts["function"],
            }
        )
    return results


def recommend_tau(results, content_rise: float = 1.0, function_budget: float = 0.5):
    """(τ, reason) by the documented rule; (None, reason) when nothing fits the budget."""
    ordered = sorted(results, key=lambda r: r["tau"])
    base = next((r for r in ordered if math.isclose(r["tau"], 1.0)), None)
    if base is None:
        return None, "the sweep must include tau = 1 (the original model) as the baseline"
    within = []
    for r in ordered:
        d_content = r["content_nll"] - base["content_nll"]
        d_function = r["function_nll"] - base["function_nll"]
        if r["tau"] <= 1.0 or d_function > function_budget:
            continue
        if d_content >= content_rise:
            return r["tau"], (
                f"smallest tau whose content-token NLL rose by {d_content:.2f} nats "
                f"(>= {content_rise}) while function-token NLL rose by {d_function:.2f} "
                f"(<= {function_budget})"
            )
        within.append((d_content - d_function, r["tau"], d_content, d_function))
    if not within:
        return None, f"every tau > 1 raises function-token NLL by more than {function_budget} nats"
    _, tau, d_content, d_function = max(within)
    return tau, (
        f"no tau raised content-token NLL by {content_rise} nats within the fluency budget; "
        f"tau {tau:g} separates them most (content +{d_content:.2f}, function +{d_function:.2f})"
    )


def write_sweep_csv(results, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(results)
    return path


def plot_sweep(results, path, recommended=None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    taus = [r["tau"] for r in results]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(taus, [r["content_nll"] for r in results], "o-", label="content-token NLL")
    ax.plot(taus, [r["function_nll"] for r in results], "s-", label="function-token NLL")
    ax.set_xlabel("attention temperature τ")
    ax.set_ylabel("mean answer-token NLL (nats)")
    other = ax.twinx()
    other.plot(
        taus,
        [r["attention_entropy"] for r in results],
        "^--",
        color="tab:green",
        label="attention entropy",
    )
    other.set_ylabel("attention entropy (nats)")
    if recommended is not None:
        ax.axvline(
            recommended, color="tab:red", linestyle=":", label=f"recommended τ={recommended:g}"
        )
    lines = ax.get_legend_handles_labels()
    more = other.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=8)
    ax.set_title("ASU forget-teacher: what attention smoothing does")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="question/answer JSON lines")
    parser.add_argument("--taus", default="1,1.5,2,2.3,2.5,3,4,6")
    parser.add_argument("--layers", default=None, help="0-based layer ids, e.g. 0,1,2 (all)")
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-examples", type=int, default=None)
    parser.add_argument("--question-key", default="question")
    parser.add_argument("--answer-key", default="answer")
    parser.add_argument("--content-rise", type=float, default=1.0)
    parser.add_argument("--function-budget", type=float, default=0.5)
    parser.add_argument("--out", default="tau_sweep")


def run(args) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asu_simu_plugin.data import load_qa_jsonl

    taus = [float(t) for t in args.taus.split(",") if t.strip()]
    if 1.0 not in taus:
        taus = [1.0, *taus]  # the baseline the recommendation compares against
    layers = [int(i) for i in args.layers.split(",")] if args.layers else None
    rows = load_qa_jsonl(args.data, args.question_key, args.answer_key)[: args.max_examples]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="eager")
    results = tau_sweep(
        model,
        tokenizer,
        rows,
        sorted(taus),
        layers,
        args.system_prompt,
        args.batch_size,
        args.max_length,
    )
    tau, reason = recommend_tau(results, args.content_rise, args.function_budget)
    out = Path(args.out)
    write_sweep_csv(results, out / "tau_sweep.csv")
    plot_sweep(results, out / "tau_sweep.png", tau)
    print(f"{'tau':>6} {'content NLL':>12} {'function NLL':>13} {'attn entropy':>13}")
    for r in results:
        print(
            f"{r['tau']:>6g} {r['content_nll']:>12.3f} {r['function_nll']:>13.3f} "
            f"{r['attention_entropy']:>13.3f}"
        )
    print(f"recommended tau: {tau if tau is not None else 'none'} — {reason}")
    print(f"wrote {out / 'tau_sweep.csv'} and {out / 'tau_sweep.png'}")
    return 0
