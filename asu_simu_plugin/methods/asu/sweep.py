"""How the attention temperature τ changes a model: the diagnostic for choosing ASU's τ.

Used by `asu-simu tau-sweep` (`cli/tau_sweep.py`) and, jointly over τ and layer blocks, by the
ASU trainer's `temperature: auto` / `layers: auto` (`auto_temperature`, rule in
`choose_temperature`) and its collapse guard (`collapse_check`), all at the end of this module.

For each τ the model runs with `attention_temperature(model, τ, layers)` on question/answer pairs
(teacher forcing, the answer tokens scored) and we measure:

- mean NLL (nats) of the **content** answer tokens and of the **function** answer tokens.
  Rule: a token is a *function* token if its decoded text, stripped and lower-cased, is in
  `STOP_WORDS` (a compact English stop-word list, below) or contains no letter or digit
  (punctuation, whitespace, eos and other special tokens); every other answer token is a
  *content* token (names, places, titles, numbers: what carries the facts). Both means are
  token-weighted, so content_nll · content_tokens + function_nll · function_tokens is the summed
  answer NLL.
- mean attention entropy (nats) over the tempered layers, all heads and every query position
  that predicts an answer token, measured **under the temperature** (so it rises with τ towards
  log(prefix length), the entropy of uniform attention). Attention weights exist only with eager
  attention: a model loaded with another implementation is switched to eager for the sweep and
  switched back afterwards (`set_attn_implementation` where transformers has it; on 4.45 SDPA falls
  back to eager by itself when weights are requested, flash-attention cannot and is refused).
  Memory grows with batch · heads · length² per layer: lower `batch_size` for long prompts.

Recommendation rule (`recommend_tau`): the smallest τ at which the content-token NLL has risen by
at least `content_rise` nats over τ = 1 (default 1.0: the facts' probability divided by e ≈ 2.7)
while the function-token NLL has risen by at most `function_budget` nats (default 0.5: the
fluency tokens keep at least 60 % of their probability). Why: ASU's forget-teacher is useful when
smoothing has made the facts unreachable but the answer still reads as language — that is what
the student learns to say instead. The smallest such τ is the least intrusive one; beyond it the
teacher's fluency breaks first (the paper's stable range on Llama-2-7B was τ ∈ [2.0, 2.8], with
quality falling off above). If no τ qualifies, the τ with the largest content-minus-function rise
within the budget is proposed, with that reason; if every τ > 1 breaks the budget, none is.
"""

from __future__ import annotations

import csv
import math
from contextlib import contextmanager
from pathlib import Path

import torch

from asu_simu_plugin.arch import decoder_layers, resolve_layer_ids, unwrap_model
from asu_simu_plugin.attention import attention_temperature
from asu_simu_plugin.data import QADataset
from asu_simu_plugin.diagnostics import batches, token_nll
from asu_simu_plugin.losses import IGNORE_INDEX
from asu_simu_plugin.methods.asu.temperature import function_token_ids

FIELDS = (
    "tau",
    "content_nll",
    "function_nll",
    "attention_entropy",
    "content_tokens",
    "function_tokens",
)


@contextmanager
def eager_attention(model):
    """Run `model` with eager attention inside, the only implementation returning weights."""
    model = unwrap_model(model)
    current = getattr(model.config, "_attn_implementation", None)
    setter = getattr(model, "set_attn_implementation", None)
    if current in (None, "eager") or (setter is None and current == "sdpa"):
        yield  # 4.45's SDPA modules compute eager attention when weights are requested
        return
    if setter is None:
        raise ValueError(
            f"the model uses {current!r} attention, which cannot return attention weights: "
            "load it with attn_implementation='eager' for the τ sweep"
        )
    setter("eager")
    try:
        yield
    finally:
        setter(current)


def _attention_entropy(attentions, layer_ids, query_mask) -> tuple[float, int]:
    total, count = 0.0, 0
    for layer_id in layer_ids:
        probs = attentions[layer_id].float()  # [B, H, T, T]
        entropy = -torch.special.xlogy(probs, probs).sum(-1)  # [B, H, T]; 0·log 0 = 0
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
    batch_size: int = 8,
    progress: bool = True,
    max_length: int = 512,
) -> list[dict]:
    """Content/function answer NLL and attention entropy for each τ (one dict per τ, keys FIELDS).

    Args:
      model, tokenizer: a causal LM and its tokenizer (the chat template is used if it has one).
      rows: question/answer dicts (`question`, `answer`), as `data.load_qa_jsonl` returns them.
      taus: temperatures, each > 0 (include 1.0: it is the baseline `recommend_tau` needs).
      layers: 0-based decoder layer ids to temper; None = all (ASU's default).
      system_prompt: prepended as the system turn, as in the unlearning run.
      batch_size, max_length: examples per forward pass; tokens kept per example.
      progress: a tqdm bar over the τ values.
    """
    from tqdm.auto import tqdm

    dataset = QADataset(rows, tokenizer, max_length, system_prompt)
    layer_ids = resolve_layer_ids(layers, len(decoder_layers(model)))
    if not layer_ids:
        raise ValueError("no layer to temper: pass None for all layers or a non-empty id list")
    answer_ids = torch.cat([item["labels"][item["labels"] != IGNORE_INDEX] for item in dataset])
    function_ids = function_token_ids(tokenizer, answer_ids.tolist())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    function_ids = function_ids.to(device)
    was_training = model.training
    model.eval()
    results = []
    with eager_attention(model):
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
                    attentions = out.attentions or ()
                    if len(attentions) <= max(layer_ids) or attentions[layer_ids[0]] is None:
                        raise ValueError(
                            "the model returned no attention weights: load it with "
                            "attn_implementation='eager' for the attention-entropy measurement"
                        )
                    nll = token_nll(out.logits, batch["labels"])
                    targets = batch["labels"][:, 1:]
                    answer = targets != IGNORE_INDEX
                    function = torch.isin(targets, function_ids) & answer
                    content = answer & ~function
                    sums["content"] += float(nll[content].sum())
                    sums["function"] += float(nll[function].sum())
                    counts["content"] += int(content.sum())
                    counts["function"] += int(function.sum())
                    # logits at position t predict token t + 1: the query positions to look at
                    query_mask = torch.zeros_like(batch["labels"], dtype=torch.bool)
                    query_mask[:, :-1] = answer
                    total, count = _attention_entropy(attentions, layer_ids, query_mask)
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
    model.train(was_training)
    return results


def recommend_tau(results, content_rise: float = 1.0, function_budget: float = 0.5):
    """(τ, reason) by the rule in the module docstring; (None, reason) when no τ fits."""
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
                f"(>= {content_rise:g}) while function-token NLL rose by {d_function:.2f} "
                f"(<= {function_budget:g})"
            )
        within.append((d_content - d_function, r["tau"], d_content, d_function))
    if not within:
        return None, (
            f"every tau > 1 raises function-token NLL by more than {function_budget:g} nats: "
            "try taus closer to 1 or fewer layers"
        )
    _, tau, d_content, d_function = max(within)
    return tau, (
        f"no tau raised content-token NLL by {content_rise:g} nats within the fluency budget; "
        f"tau {tau:g} separates them most (content +{d_content:.2f}, function +{d_function:.2f})"
    )


def write_sweep_csv(results, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    return path


def plot_sweep(results, path, recommended=None) -> Path:
    """PNG: content and function NLL against τ (left axis), attention entropy (right axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    taus = [r["tau"] for r in results]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(taus, [r["content_nll"] for r in results], "o-", label="content-token NLL")
    ax.plot(taus, [r["function_nll"] for r in results], "s-", label="function-token NLL")
    ax.set_xlabel("attention temperature τ")
    if max(taus) >= 10 * min(taus):
        ax.set_xscale("log")  # a sweep such as 1, 2, 3, 10, 100 stays readable
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


def format_table(results) -> str:
    lines = [f"{'tau':>6} {'content NLL':>12} {'function NLL':>13} {'attn entropy':>13}"]
    for r in results:
        lines.append(
            f"{r['tau']:>6g} {r['content_nll']:>12.3f} {r['function_nll']:>13.3f} "
            f"{r['attention_entropy']:>13.3f}"
        )
    return "\n".join(lines)
