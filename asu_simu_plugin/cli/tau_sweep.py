"""`asu-simu tau-sweep`: how the attention temperature τ changes a model (choosing ASU's τ).

    asu-simu tau-sweep --model PATH --data qa.jsonl --taus 1,1.5,2,2.3,2.5,3,4,6 \\
        [--layers 0,1,2] [--system-prompt TEXT] [--out DIR] [--max-examples N]

Per τ: mean NLL of the content and of the function answer tokens, and the mean attention entropy
(tau_sweep.csv, tau_sweep.png in --out). The recommended τ is the smallest one whose content-token
NLL rose by at least --content-rise nats while the function-token NLL rose by at most
--function-budget (the rule of `asu_simu_plugin.methods.asu.sweep`); when no τ meets the rule, it says so
and names the closest τ without recommending it.

With `--layers auto` it runs the pass of ASU's `temperature: auto` / `layers: auto` instead: every
τ > 1 of --taus on all layers and on consecutive blocks (thirds, quarters), chosen jointly by the
rule of `asu_simu_plugin.methods.asu.temperature.choose_temperature` (asu_tau_sweep.csv/.png and
asu_temperature.json in --out).
"""

from __future__ import annotations

import math
from pathlib import Path

from asu_simu_plugin.cli import usage_checks
from asu_simu_plugin.cli.checks import (
    model_source,
    non_negative_float,
    number_list,
    positive_float,
    positive_int,
)
from asu_simu_plugin.cli.neurons import check_out_folder

RESULT_FILES = ("tau_sweep.csv", "tau_sweep.png")
AUTO_FILES = ("asu_tau_sweep.csv", "asu_tau_sweep.png", "asu_temperature.json")


def add_arguments(parser) -> None:
    parser.add_argument(
        "--model", required=True, type=model_source, help="local model folder (or hub id)"
    )
    parser.add_argument("--data", required=True, help="question/answer JSON lines")
    parser.add_argument(
        "--taus", default="1,1.5,2,2.3,2.5,3,4,6", help="comma-separated, each > 0; 1 is added"
    )
    parser.add_argument(
        "--layers",
        default=None,
        help="0-based layer ids, e.g. 0,1,2 (all); auto: choose tau and a layer block jointly, "
        "as ASU's temperature/layers auto (asu_tau_sweep.csv/.png, asu_temperature.json)",
    )
    parser.add_argument("--system-prompt", default=None, help="system prompt of the chat template")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="examples per batch")
    parser.add_argument(
        "--max-length", type=positive_int, default=512, help="tokens per example (truncation)"
    )
    parser.add_argument(
        "--max-examples", type=positive_int, default=None, help="use the first N examples only"
    )
    parser.add_argument("--question-key", default="question", help="question key in the file")
    parser.add_argument("--answer-key", default="answer", help="answer key in the file")
    parser.add_argument(
        "--content-rise",
        type=positive_float,
        default=1.0,
        help="nats the content-token NLL must rise (rule)",
    )
    parser.add_argument(
        "--function-budget",
        type=non_negative_float,
        default=0.5,
        help="nats the function-token NLL may rise (rule)",
    )
    parser.add_argument("--out", default="tau_sweep", help="folder for tau_sweep.csv/.png")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace result files already in --out"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _positive_tau(value: float) -> None:
    if value <= 0:
        raise ValueError(f"--taus: each must be > 0, got {value:g}")


def _layer_id(value: int) -> None:
    if value < 0:
        raise ValueError(f"--layers: ids are 0-based, got {value}")


def meets_rule(results, tau, content_rise: float, function_budget: float) -> bool:
    """Whether `tau`'s row rose content NLL by >= content_rise within the function budget."""
    if tau is None:
        return False
    base = next(r for r in results if math.isclose(r["tau"], 1.0))
    row = next(r for r in results if math.isclose(r["tau"], tau))
    return (
        row["content_nll"] - base["content_nll"] >= content_rise
        and row["function_nll"] - base["function_nll"] <= function_budget
    )


def run(args) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from asu_simu_plugin.arguments import check_layers_exist
    from asu_simu_plugin.data import load_qa_jsonl
    from asu_simu_plugin.methods.asu.sweep import (
        format_table,
        plot_sweep,
        recommend_tau,
        tau_sweep,
        write_sweep_csv,
    )

    out = Path(args.out)
    if args.layers == "auto":
        return run_auto(args, out)
    with usage_checks():
        taus = number_list(args.taus, "--taus", float, _positive_tau)
        if not any(math.isclose(t, 1.0) for t in taus):
            taus.append(1.0)  # the baseline the rule compares against
        taus = sorted(set(taus))
        layers = number_list(args.layers, "--layers", int, _layer_id) if args.layers else None
        rows = load_qa_jsonl(args.data, args.question_key, args.answer_key)[: args.max_examples]
        check_out_folder(out, RESULT_FILES, args.overwrite)
        layer_count = getattr(AutoConfig.from_pretrained(args.model), "num_hidden_layers", None)
        if layers is not None and layer_count:
            check_layers_exist("--layers", layers, layer_count)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="eager")
    results = tau_sweep(
        model,
        tokenizer,
        rows,
        taus,
        layers,
        args.system_prompt,
        args.batch_size,
        progress=not args.quiet,
        max_length=args.max_length,
    )
    tau, reason = recommend_tau(results, args.content_rise, args.function_budget)
    met = meets_rule(results, tau, args.content_rise, args.function_budget)
    write_sweep_csv(results, out / "tau_sweep.csv")
    plot_sweep(results, out / "tau_sweep.png", tau if met else None)
    print(format_table(results))
    if met:
        print(f"recommended tau: {tau:g} ({reason})")
    else:
        closest = f" Closest: tau {tau:g} ({reason})." if tau is not None else f" ({reason})"
        print(
            f"no tau meets the rule (content-token NLL +{args.content_rise:g} nats with "
            f"function-token NLL at most +{args.function_budget:g}): none is recommended."
            f"{closest} Try other --taus or --layers, or relax --content-rise."
        )
    print(f"wrote {out / 'tau_sweep.csv'} and {out / 'tau_sweep.png'}")
    return 0


def run_auto(args, out: Path) -> int:
    """`--layers auto`: the joint (tau, layer block) sweep and rule of ASU's `auto` settings."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asu_simu_plugin.data import QADataset, load_qa_jsonl
    from asu_simu_plugin.methods.asu.temperature import AutoTemperatureConfig, auto_temperature

    with usage_checks():
        taus = number_list(args.taus, "--taus", float, _positive_tau)
        taus = sorted({t for t in taus if t > 1.0})
        if not taus:
            raise ValueError("--taus: --layers auto needs values > 1, e.g. 1.5,2,2.3,3,4")
        rows = load_qa_jsonl(args.data, args.question_key, args.answer_key)[: args.max_examples]
        settings = AutoTemperatureConfig(
            sample=len(rows),
            taus=taus,
            content_rise=args.content_rise,
            function_budget=args.function_budget,
            batch_size=args.batch_size,
            progress=not args.quiet,
        )
        check_out_folder(out, AUTO_FILES, args.overwrite)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    dataset = QADataset(rows, tokenizer, args.max_length, args.system_prompt)
    tau, layers, record = auto_temperature(
        model, dataset, tokenizer, "auto", "auto", settings, output_dir=out
    )
    shown = "all" if layers is None else record["layers_label"]
    print(f"chosen: temperature {tau:g}, layers {shown} ({record['reason']})")
    print(f"wrote {', '.join(str(out / name) for name in AUTO_FILES)}")
    return 0
