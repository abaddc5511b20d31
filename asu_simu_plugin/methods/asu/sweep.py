"""How the attention temperature τ changes a model: the diagnostic `asu-simu tau-sweep`, and the
picture and table of every τ grid.

`tau_sweep` is a grid over τ with one layer set, measured on question/answer pairs by the same
function as ASU's `temperature: auto` (`temperature.measure_teacher`): per τ the mean NLL of the
content and of the function answer tokens, P(end of answer) at the first answer token and the
attention entropy (nats) under the temperature, over the tempered layers, all heads and every
position predicting an answer token; it rises with τ towards log(prefix length), the entropy of
uniform attention. Attention weights exist only with eager attention: a model loaded with another
implementation is switched to eager for the sweep and switched back afterwards
(`temperature.eager_attention`). Memory grows with batch · heads · length² per layer: lower
`batch_size` for long prompts. The setting is chosen by the one rule, `choose_temperature`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from asu_simu_plugin.arch import decoder_layers, resolve_layer_ids
from asu_simu_plugin.data import QADataset
from asu_simu_plugin.losses import IGNORE_INDEX
from asu_simu_plugin.methods.asu.temperature import sweep_grid
from asu_simu_plugin.methods.asu.tokens import function_token_ids


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
    attention_entropy: bool = True,
) -> list[dict]:
    """One row per τ of `taus` (in that order), measured on every QA row with `layers` tempered.

    Args:
      model, tokenizer: a causal LM and its tokenizer (the chat template is used if it has one).
      rows: question/answer dicts (`question`, `answer`), as `data.load_qa_jsonl` returns them.
      taus: temperatures, each > 0 (include 1.0: `choose_temperature` compares against it).
      layers: 0-based decoder layer ids to temper; None = all (ASU's default).
      system_prompt: prepended as the system turn, as in the unlearning run.
      batch_size, max_length: examples per forward pass; tokens kept per example.
      progress: a tqdm bar over the τ values.
      attention_entropy: also measure the attention entropy (eager attention).

    Rows have the keys of `temperature.GRID_FIELDS` (`layers` the label of the layer set) plus
    `layer_ids`. The model's train mode is restored afterwards, also when a measurement fails.
    """
    from asu_simu_plugin.diagnostics import end_token_ids

    dataset = QADataset(rows, tokenizer, max_length, system_prompt)
    layer_ids = resolve_layer_ids(layers, len(decoder_layers(model)))
    if not layer_ids:
        raise ValueError("no layer to temper: pass None for all layers or a non-empty id list")
    items = [dataset[i] for i in range(len(dataset))]
    answer_ids = torch.cat([item["labels"][item["labels"] != IGNORE_INDEX] for item in items])
    function_ids = function_token_ids(tokenizer, answer_ids.tolist())
    ends = end_token_ids(tokenizer, model, answer_ids.tolist())
    settings = [(float(tau), layer_ids) for tau in taus]
    return sweep_grid(
        model, items, settings, function_ids, ends, batch_size, progress, attention_entropy
    )


def plot_grid(rows, path, chosen=None) -> Path:
    """PNG of a τ grid: Δ content NLL, Δ function NLL, P(end) (and the attention entropy when it
    was measured) against τ, one line per layer set; not admissible settings crossed, the chosen
    one starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in rows if math.isclose(r["tau"], 1.0))
    blocks = list(dict.fromkeys(r["layers"] for r in rows if r is not base)) or [base["layers"]]
    panels = [
        ("content_nll", "content-token NLL rise (nats)\n(facts forgotten)"),
        ("function_nll", "function-token NLL rise (nats)\n(fluency lost)"),
        ("end_probability", "P(end) at the first answer token\n(collapse into silence)"),
    ]
    if all("attention_entropy" in r for r in rows):
        panels.append(("attention_entropy", "attention entropy (nats)\n(under the temperature)"))
    rises = ("content_nll", "function_nll")  # drawn against the untempered baseline
    taus = [r["tau"] for r in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4))
    for ax, (key, title) in zip(axes, panels, strict=True):
        offset = base[key] if key in rises else 0.0
        for block in blocks:
            points = [(r["tau"], r[key]) for r in rows if r["layers"] == block]
            if not any(math.isclose(tau, 1.0) for tau, _ in points):
                points.append((1.0, base[key]))
            points.sort()
            ax.plot(
                [p[0] for p in points],
                [p[1] - offset for p in points],
                "o-",
                label=f"layers {block}",
            )
        excluded = [r for r in rows if r["tau"] > 1.0 and r.get("admissible") is False]
        if excluded:  # outside the fluency budget or above the P(end) limit
            ax.plot(
                [r["tau"] for r in excluded],
                [r[key] - offset for r in excluded],
                "x",
                color="black",
                markersize=7,
                label="not admissible",
            )
        if chosen is not None:
            value = chosen[key] - offset
            ax.plot([chosen["tau"]], [value], "*", color="tab:red", markersize=16, zorder=5)
        if max(taus) >= 10 * min(taus):
            ax.set_xscale("log")  # a sweep such as 1, 2, 3, 10, 100 stays readable
        ax.set_xlabel("attention temperature τ")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    if chosen is not None:
        fig.suptitle(f"chosen: τ = {chosen['tau']:g}, layers {chosen['layers']} (red star)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(rows) -> str:
    """The grid as text; `*` marks the chosen setting, `-` a setting the rule does not admit."""
    entropy = all("attention_entropy" in r for r in rows)
    head = f"{'tau':>6} {'layers':>8} {'content NLL':>12} {'function NLL':>13} {'P(end)':>7}"
    lines = [head + (f" {'attn entropy':>13}" if entropy else "")]
    for r in rows:
        excluded = r["tau"] > 1.0 and r.get("admissible") is False
        mark = "*" if r.get("chosen") else ("-" if excluded else " ")
        line = (
            f"{r['tau']:>6g} {r['layers']:>8} {r['content_nll']:>12.3f} "
            f"{r['function_nll']:>13.3f} {r['end_probability']:>7.3f}"
        )
        if entropy:
            line += f" {r['attention_entropy']:>13.3f}"
        lines.append(f"{line} {mark}")
    return "\n".join(lines)
