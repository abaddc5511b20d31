"""`asu-simu tau-sweep`: how the attention temperature τ changes a model (choosing ASU's τ).

    asu-simu tau-sweep --model PATH --data qa.jsonl --taus 1.5,2,2.3,2.5,3,4,6 \\
        [--layers 0,1,2 | --layers auto] [--system-prompt TEXT] [--out DIR] [--max-examples N]

For each τ of --taus, and for τ = 1 (the untempered baseline, always measured), on the layers of
--layers (all by default): the mean NLL of the content and of the function answer tokens, P(end
of answer) at the first answer token and the mean attention entropy (tau_sweep.csv and
tau_sweep.png in --out). The setting is chosen by the rule of ASU's `temperature: auto`
(`asu_simu_plugin.methods.asu.temperature.choose_temperature`): admissible when the
function-token NLL rose by at most --function-budget nats and P(end) is at most
--max-end-probability; among those, the largest content-minus-function NLL rise. When none is
admissible, the least violating one is named, and the reason says so.

With `--layers auto` it runs the pass of ASU's `temperature: auto` / `layers: auto` instead: every
τ > 1 of --taus on all layers and on consecutive blocks (thirds, quarters), chosen by the same
rule (asu_tau_sweep.csv/.png and asu_temperature.json in --out).
"""

from __future__ import annotations

from pathlib import Path

from asu_simu_plugin.cli import usage_checks
from asu_simu_plugin.cli.checks import model_source, number_list, positive_float, positive_int
from asu_simu_plugin.cli.neurons import check_out_folder
from asu_simu_plugin.methods.asu.temperature import AutoTemperatureConfig

RESULT_FILES = ("tau_sweep.csv", "tau_sweep.png")
AUTO_FILES = ("asu_tau_sweep.csv", "asu_tau_sweep.png", "asu_temperature.json")


def add_arguments(parser) -> None:
    parser.add_argument(
        "--model", required=True, type=model_source, help="local model folder (or hub id)"
    )
    parser.add_argument("--data", required=True, help="question/answer JSON lines")
    parser.add_argument(
        "--taus",
        default="1,1.5,2,2.3,2.5,3,4,6",
        help="comma-separated, each > 0 and at least one > 1; 1 (the baseline) is added",
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
        "--function-budget",
        type=positive_float,
        default=AutoTemperatureConfig.function_budget,
        help="nats the function-token NLL may rise (rule)",
    )
    parser.add_argument(
        "--max-end-probability",
        type=positive_float,
        default=AutoTemperatureConfig.max_end_probability,
        help="largest P(end of answer) at the first answer token (rule)",
    )
    parser.add_argument("--out", default="tau_sweep", help="folder for the result files")
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


def parse_taus(text: str) -> list[float]:
    """--taus, sorted, with the baseline τ = 1; at least one τ > 1, the settings the rule rates."""
    taus = number_list(text, "--taus", float, _positive_tau)
    if not any(t > 1.0 for t in taus):
        raise ValueError(
            f"--taus {text} has no value > 1: the rule compares tempered settings (τ > 1) with "
            "τ = 1, which is always measured; give e.g. --taus 1.5,2,2.3,3"
        )
    return sorted({*taus, 1.0})


def _settings(args, taus, sample: int) -> AutoTemperatureConfig:
    return AutoTemperatureConfig(
        sample=sample,
        taus=[t for t in taus if t > 1.0],
        function_budget=args.function_budget,
        max_end_probability=args.max_end_probability,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )


def run(args) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from asu_simu_plugin.arguments import check_layers_exist
    from asu_simu_plugin.data import load_qa_jsonl
    from asu_simu_plugin.methods.asu.sweep import format_table, plot_grid, tau_sweep
    from asu_simu_plugin.methods.asu.temperature import choose_temperature, write_grid_csv

    out = Path(args.out)
    if args.layers == "auto":
        return run_auto(args, out)
    with usage_checks():
        taus = parse_taus(args.taus)
        layers = number_list(args.layers, "--layers", int, _layer_id) if args.layers else None
        rows = load_qa_jsonl(args.data, args.question_key, args.answer_key)[: args.max_examples]
        settings = _settings(args, taus, len(rows))
        check_out_folder(out, RESULT_FILES, args.overwrite)
        layer_count = getattr(AutoConfig.from_pretrained(args.model), "num_hidden_layers", None)
        if layers is not None and layer_count:
            check_layers_exist("--layers", layers, layer_count)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="eager")
    grid = tau_sweep(
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
    chosen, reason = choose_temperature(grid, settings)
    write_grid_csv(grid, out / "tau_sweep.csv")
    plot_grid(grid, out / "tau_sweep.png", chosen)
    print(format_table(grid))
    print(f"chosen: temperature {chosen['tau']:g}, layers {chosen['layers']} ({reason})")
    print(f"wrote {out / 'tau_sweep.csv'} and {out / 'tau_sweep.png'}")
    return 0


def run_auto(args, out: Path) -> int:
    """`--layers auto`: the joint (tau, layer block) sweep and rule of ASU's `auto` settings."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asu_simu_plugin.data import QADataset, load_qa_jsonl
    from asu_simu_plugin.methods.asu.temperature import auto_temperature

    with usage_checks():
        taus = parse_taus(args.taus)
        rows = load_qa_jsonl(args.data, args.question_key, args.answer_key)[: args.max_examples]
        settings = _settings(args, taus, len(rows))
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
