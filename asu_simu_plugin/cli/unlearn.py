"""`asu-simu unlearn`: ASU / SIMU / Sophia unlearning of a local model, without the harness.

    asu-simu unlearn --method asu --model PATH --forget forget.jsonl --retain retain.jsonl \\
        --output DIR [--set temperature=2.3 --set retain_loss_type=KL] [--epochs 5 --lr 1e-5]

Data: JSON lines with `question` and `answer` (other keys with --question-key/--answer-key); the
tokenizer's chat template is used when it has one. The output is a plain `save_pretrained` model,
its tokenizer and `asu_simu_run.json` (method, arguments, settings, versions, log history).

Everything is checked before the model is loaded. The run writes into DIR.partial and moves it to
DIR at the end, so an interrupted run never leaves a half-written model in DIR; DIR may not hold
the model or the data files, and one run at a time writes to it (DIR.lock). An existing
non-empty DIR is replaced only with --overwrite; --resume continues an interrupted run from its
newest complete checkpoint (--save-steps) only if the checkpoint records the same method, data
and settings.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import fields

from asu_simu_plugin.cli import checks, usage_checks
from asu_simu_plugin.cli.checks import check_model_folder, model_source, output_folder
from asu_simu_plugin.registry import methods
from asu_simu_plugin.runner import RunSettings


def _method_help() -> str:
    lines = ["method arguments (--set KEY=VALUE, VALUE in JSON; as in configs/trainer/*.yaml):"]
    for method in methods().values():
        lines.append(f"  --method {method.cli_name}: {method.summary}")
        for name, default, text in method.arguments.describe():
            shown = json.dumps(list(default) if isinstance(default, tuple) else default)
            lines.append(f"    {name} (default {shown}): {text}")
    return "\n".join(lines)


EPILOG = _method_help()


def parse_value(text: str):
    """`--set key=value` values: JSON when it parses (numbers, lists, null, true), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_sets(items) -> dict:
    method_args = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        if key.strip() in method_args:
            raise ValueError(f"--set {key.strip()} is given twice")
        method_args[key.strip()] = parse_value(value)
    return method_args


def _setting_flags():
    """(field, flag, check, default, help) of every RunSettings field that is a flag."""
    for f in fields(RunSettings):
        if f.metadata.get("flag"):
            check = f.metadata.get("check")
            yield (
                f.name,
                f.metadata["flag"],
                check and getattr(checks, check),
                f.default,
                f.metadata["help"],
            )


class _SettingFlag(argparse.Action):
    """Stores a training flag and notes that it was given (a default may depend on the model)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = {*namespace.given, self.dest}


def add_arguments(parser) -> None:
    parser.add_argument(
        "--method",
        required=True,
        choices=sorted(m.cli_name for m in methods().values()),
        help="unlearning method",
    )
    parser.add_argument(
        "--model", required=True, type=model_source, help="local model folder (or hub id)"
    )
    parser.add_argument("--forget", required=True, help="forget set, question/answer JSON lines")
    parser.add_argument("--retain", required=True, help="retain set, question/answer JSON lines")
    parser.add_argument(
        "--output",
        required=True,
        type=output_folder,
        help="folder for the unlearned model (not the --model folder)",
    )
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing non-empty --output (once the new model is saved)",
    )
    what.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from its last checkpoint (same method, data, settings)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method argument (listed below), repeatable",
    )
    for name, flag, check, default, text in _setting_flags():
        parser.add_argument(
            flag, dest=name, type=check, default=default, help=text, action=_SettingFlag
        )
    parser.set_defaults(given=frozenset())
    parser.add_argument("--question-key", default="question", help="question key in the files")
    parser.add_argument("--answer-key", default="answer", help="answer key in the files")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="weights dtype (float16 training overflows easily: prefer bfloat16)",
    )


def model_positions(config) -> int | None:
    """How many positions the model has (its config's max_position_embeddings), if it says."""
    config = getattr(config, "text_config", None) or config
    positions = getattr(config, "max_position_embeddings", None)
    return positions if isinstance(positions, int) and positions > 0 else None


def run_settings(args, config=None) -> RunSettings:
    """The flags' RunSettings; --max-length at most the model's positions (read from `config`):
    beyond them is refused, and the default is lowered to them."""
    values = {name: getattr(args, name) for name, *_ in _setting_flags()}
    positions = model_positions(config)
    if positions is not None and values["max_length"] > positions:
        if "max_length" in getattr(args, "given", ()):
            raise ValueError(
                f"--max-length {values['max_length']} is beyond the model's {positions} positions "
                f"(max_position_embeddings in its config.json): give --max-length {positions} "
                "or less"
            )
        values["max_length"] = positions
    return RunSettings(**values)


def input_paths(args, method_args) -> dict:
    """The inputs an --output must not hold (the model is `prepare_output`'s `source`)."""
    inputs = {"--forget file": args.forget, "--retain file": args.retain}
    for name, value in method_args.to_dict().items():
        if name.endswith("_path") and value:
            inputs[f"{name} file"] = value
    return inputs


def run(args) -> int:
    from transformers import AutoConfig

    from asu_simu_plugin.data import load_qa_jsonl
    from asu_simu_plugin.output import prepare_output, run_identity
    from asu_simu_plugin.runner import method_arguments, qa_datasets

    with usage_checks():
        parsed = method_arguments(args.method, parse_sets(args.set))
        # The config is read, the weights are not loaded yet.
        config = AutoConfig.from_pretrained(args.model)
        parsed.check_model_config(config)
        check_model_folder(args.model)
        forget = load_qa_jsonl(args.forget, args.question_key, args.answer_key)
        retain = load_qa_jsonl(args.retain, args.question_key, args.answer_key)
        settings = run_settings(args, config)
        identity = run_identity(args.method, parsed, settings, forget, retain, args.model)
        plan = prepare_output(
            args.output,
            args.model,
            identity,
            args.overwrite,
            args.resume,
            inputs=input_paths(args, parsed),
        )
    if plan.finished:
        print(
            f"{plan.output} already holds this run (same method, data and settings): nothing to do"
        )
        return 0
    try:
        return _train(args, parsed, forget, retain, settings, plan, qa_datasets)
    except BaseException:
        plan.abandon()
        raise


def _train(args, method_args, forget, retain, settings, plan, qa_datasets) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asu_simu_plugin.runner import run_unlearning

    with usage_checks():
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        forget_set, retain_set = qa_datasets(tokenizer, forget, retain, settings)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype))
    run_unlearning(
        args.method,
        model,
        tokenizer,
        forget_set,
        retain_set,
        args.output,
        method_args,
        settings,
        source=args.model,
        command=shlex.join(["asu-simu", *sys.argv[1:]]),
        plan=plan,
    )
    print(f"unlearned model saved to {plan.output}")
    return 0
