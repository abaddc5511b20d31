"""ASU's `temperature: auto` / `layers: auto`: the forget-teacher's τ and layers, chosen on the
forget set before training; the one measurement, rule and CSV writer behind it and behind the
diagnostic `asu-simu tau-sweep` (`methods.asu.sweep`).

For each candidate (τ, layer block) the model runs tempered on a sample of forget rows (teacher
forcing, answer tokens scored) and `measure_teacher` records the mean NLL (nats) of the
**content** answer tokens and of the **function** answer tokens, P(end of answer) at the first
answer token and, when asked, the attention entropy under the temperature. A token is a
*function* token if its decoded text, stripped and lower-cased, is in `STOP_WORDS` (a compact
English stop-word list, below) or contains no letter or digit (punctuation, whitespace, eos and
other special tokens); every other answer token is a *content* token (names, places, titles,
numbers: what carries the facts). Both means are token-weighted, so content_nll ·
content_tokens + function_nll · function_tokens is the summed answer NLL. `choose_temperature`
is the rule; `write_grid_csv` writes every grid.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from asu_simu_plugin.arch import decoder_layers, resolve_layer_ids, unwrap_model
from asu_simu_plugin.attention import attention_temperature
from asu_simu_plugin.diagnostics import token_nll
from asu_simu_plugin.losses import IGNORE_INDEX
from asu_simu_plugin.methods.asu.tokens import function_token_ids

logger = logging.getLogger(__name__)

AUTO = "auto"
# The columns of every τ grid's CSV (a grid measured without attention entropy has no such column).
GRID_FIELDS = tuple(
    "tau layers content_nll function_nll end_probability attention_entropy content_tokens "
    "function_tokens admissible chosen".split()
)


@dataclass
class AutoTemperatureConfig:
    """Settings of the pass that picks ASU's τ and layers from the forget set (`tau_sweep:` in the
    ASU method arguments). See `choose_temperature` for the rule."""

    sample: int = field(default=16, metadata={"help": "forget rows measured (a seeded sample)"})
    taus: tuple = field(
        default=(1.5, 2.0, 2.3, 3.0, 4.0), metadata={"help": "τ values tried (each > 1)"}
    )
    layer_parts: tuple = field(
        default=(3, 4),
        metadata={"help": "layer blocks tried: consecutive thirds, quarters, ... plus all layers"},
    )
    function_budget: float = field(
        default=0.5, metadata={"help": "nats the function-token NLL may rise (fluency)"}
    )
    max_end_probability: float = field(
        default=0.1, metadata={"help": "largest P(end of answer) at the first answer token"}
    )
    batch_size: int = 8
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        self.taus = tuple(float(check_positive(t, "tau_sweep.taus", above=1.0)) for t in self.taus)
        self.layer_parts = tuple(
            int(check_positive(p, "tau_sweep.layer_parts")) for p in self.layer_parts
        )
        if not self.taus:
            raise ValueError("tau_sweep.taus is empty: give τ values > 1, e.g. [1.5, 2, 2.3, 3]")
        for name in ("sample", "batch_size", "function_budget", "max_end_probability"):
            check_positive(getattr(self, name), f"tau_sweep.{name}")


def check_positive(value, name: str, above: float = 0.0):
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number > {above:g} (got {value!r})")
    if value <= above:
        raise ValueError(f"{name} must be > {above:g} (got {value!r})")
    return value


def settings_of(cls, value, name: str):
    if isinstance(value, cls):
        return value
    if value is None or value is True:
        return cls()
    try:
        return cls(**dict(value))
    except TypeError as error:
        known = ", ".join(f.name for f in dataclasses.fields(cls))
        raise ValueError(f"{name}: {error}; known keys: {known}") from None


def layer_blocks(num_layers: int, parts=(3, 4)) -> list[list[int]]:
    """All layers, then the model cut into `n` consecutive blocks for each n in `parts`."""
    blocks = [list(range(num_layers))]
    for n in parts:
        n = min(int(n), num_layers)
        edges = [round(i * num_layers / n) for i in range(n + 1)]
        for start, stop in zip(edges, edges[1:], strict=False):
            block = list(range(start, stop))
            if block and block not in blocks:
                blocks.append(block)
    return blocks


def layers_label(layer_ids, num_layers: int) -> str:
    ids = list(layer_ids)
    if ids == list(range(num_layers)):
        return "all"
    if ids and ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}-{ids[-1]}" if len(ids) > 1 else str(ids[0])
    return ",".join(map(str, ids))


def sample_items(dataset, size: int, seed: int = 0) -> list[dict]:
    """A seeded sample of tokenised examples (input_ids, attention_mask, labels as tensors)."""
    count = len(dataset)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:size]
    keys = ("input_ids", "attention_mask", "labels")
    return [{k: torch.as_tensor(dataset[int(i)][k]) for k in keys} for i in sorted(order.tolist())]


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
    """Summed entropy (nats) of the attention rows of `query_mask`'s positions, and their count."""
    if len(attentions) <= max(layer_ids) or attentions[layer_ids[0]] is None:
        raise ValueError(
            "the model returned no attention weights: load it with "
            "attn_implementation='eager' for the attention-entropy measurement"
        )
    total, count = 0.0, 0
    for layer_id in layer_ids:
        probs = attentions[layer_id].float()  # [B, H, T, T]
        entropy = -torch.special.xlogy(probs, probs).sum(-1)  # [B, H, T]; 0·log 0 = 0
        selected = entropy.permute(0, 2, 1)[query_mask]  # [N, H]
        total += float(selected.sum())
        count += selected.numel()
    return total, count


@torch.no_grad()
def measure_teacher(
    model, items, tau, layer_ids, function_ids, end_ids, batch_size=8, attention_entropy=False
) -> dict:
    """The one measurement of a tempered (τ, layers) model on tokenised items: content/function
    answer NLL, P(end) at the first answer token and, with `attention_entropy`, the mean
    attention entropy (nats) over the tempered layers, all heads and every position predicting
    an answer token (eager attention, switched on inside; memory grows with heads · length²)."""
    from asu_simu_plugin.data import PadCollator
    from asu_simu_plugin.diagnostics import end_probability_at_first_answer_token

    device = next(model.parameters()).device
    collate = PadCollator(0)  # padded positions are masked and carry label -100
    function_ids = torch.as_tensor(function_ids, dtype=torch.long, device=device)
    sums, counts, ends = {"content": 0.0, "function": 0.0}, {"content": 0, "function": 0}, []
    entropy = [0.0, 0]
    with (
        eager_attention(model) if attention_entropy else nullcontext(),
        attention_temperature(model, float(tau), layer_ids),
    ):
        for start in range(0, len(items), batch_size):
            batch = {k: v.to(device) for k, v in collate(items[start : start + batch_size]).items()}
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                **({"output_attentions": True} if attention_entropy else {}),
            )
            nll = token_nll(out.logits, batch["labels"])
            targets = batch["labels"][:, 1:]
            answer = targets != IGNORE_INDEX
            function = torch.isin(targets, function_ids) & answer
            for kind, mask in (("content", answer & ~function), ("function", function)):
                sums[kind] += float(nll[mask].sum())
                counts[kind] += int(mask.sum())
            ends += end_probability_at_first_answer_token(
                out.logits, batch["labels"], end_ids
            ).tolist()
            if attention_entropy:
                # logits at position t predict token t + 1: the query positions to look at
                queries = torch.zeros_like(batch["labels"], dtype=torch.bool)
                queries[:, :-1] = answer
                total, count = _attention_entropy(out.attentions or (), layer_ids, queries)
                entropy = [entropy[0] + total, entropy[1] + count]
    measured = {
        "content_nll": sums["content"] / max(counts["content"], 1),
        "function_nll": sums["function"] / max(counts["function"], 1),
        "end_probability": sum(ends) / max(len(ends), 1),
        "content_tokens": counts["content"],
        "function_tokens": counts["function"],
    }
    if attention_entropy:
        measured["attention_entropy"] = entropy[0] / max(entropy[1], 1)
    return measured


def sweep_grid(
    model,
    items,
    settings,
    function_ids,
    end_ids,
    batch_size=8,
    progress=True,
    attention_entropy=False,
):
    """One row per (τ, layer ids) of `settings`, measured by `measure_teacher` in eval mode (the
    model's mode is restored afterwards, also on an error)."""
    from tqdm.auto import tqdm

    num_layers = len(decoder_layers(model))
    was_training = model.training
    model.eval()
    rows = []
    try:
        for tau, block in tqdm(settings, desc="ASU tau sweep", disable=not progress):
            measured = measure_teacher(
                model, items, tau, block, function_ids, end_ids, batch_size, attention_entropy
            )
            rows.append({"tau": float(tau), "layers": layers_label(block, num_layers), **measured})
            rows[-1]["layer_ids"] = list(block)
    finally:
        model.train(was_training)
    return rows


def choose_temperature(rows, config: AutoTemperatureConfig | None = None):
    """The joint (τ, layers) rule of `temperature: auto` / `layers: auto`. Returns (row, reason).

    Against the untempered baseline (τ = 1), every tempered setting has a content-token NLL rise
    Δc (facts forgotten), a function-token NLL rise Δf (fluency lost) and P(end), the teacher's
    probability of ending the answer at its first token (collapse into silence). A setting is
    *admissible* when Δf ≤ `function_budget` and P(end) ≤ `max_end_probability`. Among admissible
    settings the one with the largest Δc − Δf wins (facts removed most, beyond what fluency loses;
    ties: smaller τ, then fewer layers). Why: ASU's teacher must stay a fluent speaker that no
    longer knows the facts; a teacher that ends the turn or loses its function words teaches
    silence or babble instead. If none is admissible, the setting that violates the limits least
    (smallest max(Δf / function_budget, P(end) / max_end_probability)) is taken, with that reason.
    """
    config = config or AutoTemperatureConfig()
    base = next((r for r in rows if math.isclose(r["tau"], 1.0)), None)
    if base is None:
        raise ValueError("the sweep has no τ = 1 row, the untempered baseline the rule needs")
    candidates = []
    for row in rows:
        if row["tau"] <= 1.0:
            row["admissible"] = False
            continue
        d_content = row["content_nll"] - base["content_nll"]
        d_function = row["function_nll"] - base["function_nll"]
        row["admissible"] = (
            d_function <= config.function_budget
            and row["end_probability"] <= config.max_end_probability
        )
        violation = max(
            d_function / config.function_budget,
            row["end_probability"] / config.max_end_probability,
        )
        size = len(row.get("layer_ids", ()))
        candidates.append((row, d_content, d_function, violation, size))
    if not candidates:
        raise ValueError("the sweep has no τ > 1: give tau_sweep.taus values above 1")
    admissible = [c for c in candidates if c[0]["admissible"]]
    for row in rows:
        row["chosen"] = False
    if admissible:
        row, d_content, d_function, _, _ = max(
            admissible, key=lambda c: (round(c[1] - c[2], 6), -c[0]["tau"], -c[4])
        )
        reason = (
            f"largest content-minus-function NLL rise among settings with function-token NLL "
            f"rise <= {config.function_budget:g} and P(end) <= {config.max_end_probability:g}: "
            f"content {d_content:+.2f} nats, function {d_function:+.2f}, "
            f"P(end) {row['end_probability']:.3f}"
        )
    else:
        row, d_content, d_function, _, _ = min(candidates, key=lambda c: (c[3], c[0]["tau"], c[4]))
        reason = (
            f"no setting keeps function-token NLL rise <= {config.function_budget:g} and P(end) "
            f"<= {config.max_end_probability:g}; the least violating one is taken (content "
            f"{d_content:+.2f}, function {d_function:+.2f}, P(end) "
            f"{row['end_probability']:.3f}): try smaller taus or teacher_eos=suppress"
        )
    row["chosen"] = True
    return row, reason


def _announce(message: str) -> None:
    logger.info(message)
    if not logging.getLogger().handlers:  # no logging configured (plain scripts): still show it
        print(message, file=sys.stderr)


def main_process_then_broadcast(compute, model=None):
    """Run `compute` on rank 0 only and give its result to every rank (or just run it).

    `model`: the model `compute` runs. Partitioned by DeepSpeed ZeRO-3 (loaded under zero.Init)
    it holds only a slice of each weight per rank, and rank 0 cannot gather alone: every rank
    gathers it whole for the pass (`zero.whole_parameters`). An error on rank 0 is raised on
    every rank, so none waits for a result that never comes.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return compute()
    from asu_simu_plugin import zero

    failure = None
    with zero.whole_parameters(model):
        if dist.get_rank() == 0:
            try:
                box = [(True, compute())]
            except Exception as error:
                failure, box = error, [(False, f"{type(error).__name__}: {error}")]
        else:
            box = [None]
    dist.broadcast_object_list(box, src=0)
    done, value = box[0]
    if failure is not None:
        raise failure
    if not done:
        raise RuntimeError(f"rank 0 failed while measuring the teacher: {value}")
    return value


def auto_temperature(
    model,
    forget_dataset,
    tokenizer=None,
    temperature=AUTO,
    layers=AUTO,
    settings=None,
    output_dir=None,
):
    """Resolve `temperature: auto` and/or `layers: auto` on the forget set (callable on its own).

    Returns (τ, layer ids or None for all layers, record). A value that is not "auto" is kept and
    only the other one is searched. The sweep table (CSV), its picture (PNG) and the choice
    (`asu_temperature.json`) are written to `output_dir` when given. Under DDP rank 0 measures
    and the result is broadcast, so every rank tempers the same way.
    """
    from asu_simu_plugin.diagnostics import end_token_ids

    config = settings_of(AutoTemperatureConfig, settings, "tau_sweep")
    model = unwrap_model(model)
    num_layers = len(decoder_layers(model))
    auto_tau, auto_layers = temperature == AUTO, layers == AUTO
    taus = config.taus if auto_tau else (float(temperature),)
    if not auto_tau and taus[0] <= 1.0:
        raise ValueError(
            f"layers: auto needs a temperature > 1 to compare layers (got {temperature})"
        )
    blocks = (
        layer_blocks(num_layers, config.layer_parts)
        if auto_layers
        else [resolve_layer_ids(layers, num_layers)]
    )
    if forget_dataset is None or len(forget_dataset) == 0:
        raise ValueError("temperature/layers: auto needs the forget set (the trainer got none)")

    def compute():
        items = sample_items(forget_dataset, config.sample, config.seed)
        answer_ids = torch.cat([item["labels"][item["labels"] != IGNORE_INDEX] for item in items])
        ends = end_token_ids(tokenizer, model, answer_ids.tolist())
        if tokenizer is not None:
            function = function_token_ids(tokenizer, answer_ids.tolist()).tolist()
        else:  # without a tokenizer only the end tokens count as function tokens
            function = ends
        grid = [(1.0, list(range(num_layers)))]  # the untempered baseline
        grid += [(float(t), block) for block in blocks for t in taus if float(t) != 1.0]
        rows = sweep_grid(model, items, grid, function, ends, config.batch_size, config.progress)
        chosen, reason = choose_temperature(rows, config)
        record = {
            "temperature": chosen["tau"],
            "layers": None if chosen["layers"] == "all" else chosen["layer_ids"],
            "layers_label": chosen["layers"],
            "searched": [
                name for name, on in (("temperature", auto_tau), ("layers", auto_layers)) if on
            ],
            "reason": reason,
            "sample": len(items),
            "end_token_ids": ends,
            "settings": dataclasses.asdict(config),
            "rows": [{k: v for k, v in r.items() if k != "layer_ids"} for r in rows],
        }
        if output_dir is not None:
            from asu_simu_plugin.methods.asu.sweep import plot_grid

            out = Path(output_dir)
            write_grid_csv(rows, out / "asu_tau_sweep.csv")
            plot_grid(rows, out / "asu_tau_sweep.png", chosen)
            (out / "asu_temperature.json").write_text(json.dumps(record, indent=2) + "\n")
        _announce(
            f"ASU auto: temperature {chosen['tau']:g}, layers {chosen['layers']} ({reason}); "
            f"{len(rows)} settings on {len(items)} forget rows"
            + ("; asu_tau_sweep.csv/.png, asu_temperature.json saved" if output_dir else "")
        )
        return record

    record = main_process_then_broadcast(compute, model)
    return record["temperature"], record["layers"], record


def write_grid_csv(rows, path) -> Path:
    """The one CSV of a τ grid (the diagnostic's and `auto`'s): the GRID_FIELDS some row has."""
    fields = [name for name in GRID_FIELDS if any(name in row for row in rows)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


# -- the ASU trainer's entry points ---------------------------------------------------------------
def trainer_parts(trainer):
    """(model as it is before training, tokenizer, forget set, output folder) of an ASU trainer."""
    from asu_simu_plugin.lora import plain_model

    tokenizer = getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    if tokenizer is not None and not hasattr(tokenizer, "all_special_ids"):
        tokenizer = getattr(tokenizer, "tokenizer", None)  # a processor wrapping one
    forget = getattr(trainer.train_dataset, "forget", None)
    return plain_model(trainer.model), tokenizer, forget, trainer.args.output_dir


def resolve_for_trainer(trainer, temperature, layers, settings=None):
    """`temperature: auto` / `layers: auto` for an ASU trainer, before its teacher is built: the
    sweep runs on the model as it is (the original) and the forget set; results are saved in
    `trainer.args.output_dir`. Returns (τ, layers) with any "auto" replaced."""
    if temperature != AUTO and layers != AUTO:
        return temperature, layers
    model, tokenizer, forget, output_dir = trainer_parts(trainer)
    if forget is None:
        raise ValueError(
            "temperature/layers: auto needs the trainer's forget set (train_dataset.forget); "
            "give a number and layer ids instead"
        )
    settings = dict(vars(settings_of(AutoTemperatureConfig, settings, "tau_sweep")))
    if trainer.args.disable_tqdm:
        settings["progress"] = False
    tau, chosen_layers, _ = auto_temperature(
        model, forget, tokenizer, temperature, layers, settings, output_dir
    )
    return tau, chosen_layers


def end_tokens_for_trainer(trainer, sample: int = 16) -> list[int]:
    """The end-of-answer token ids an ASU trainer's `teacher_eos: suppress` removes."""
    from asu_simu_plugin.diagnostics import end_token_ids

    model, tokenizer, forget, _ = trainer_parts(trainer)
    answer_ids = []
    if forget is not None and tokenizer is not None:
        for item in sample_items(forget, sample):
            answer_ids += item["labels"][item["labels"] != IGNORE_INDEX].tolist()
    return end_token_ids(tokenizer, model, answer_ids)
