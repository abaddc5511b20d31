"""`asu-simu unlearn`: ASU / SIMU / Sophia unlearning of a local model, without the harness.

    asu-simu unlearn --method asu --model PATH --forget forget.jsonl --retain retain.jsonl \
        --output DIR [--set temperature=2.3 --set retain_loss_type=KL] [--epochs 5 --lr 1e-5]

Data: JSON lines with `question` and `answer` (other keys with --question-key/--answer-key); the
tokenizer's chat template is used when it has one. The output is a plain `save_pretrained` model,
its tokenizer and `asu_simu_run.json` (method, arguments, settings, versions, log history).
"""

from __future__ import annotations

import json
import shlex
import sys

from asu_simu_plugin.runner import STANDALONE_METHODS, RunSettings, run_unlearning


def parse_value(text: str):
    """`--set key=value` values: JSON when it parses (numbers, lists, null, true), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def add_arguments(parser) -> None:
    parser.add_argument("--method", required=True, choices=sorted(STANDALONE_METHODS))
    parser.add_argument("--model", required=True, help="local model directory (or hub id)")
    parser.add_argument("--forget", required=True, help="forget set, question/answer JSON lines")
    parser.add_argument("--retain", required=True, help="retain set, question/answer JSON lines")
    parser.add_argument("--output", required=True, help="where the unlearned model is saved")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method argument (as in configs/trainer/*.yaml method_args)",
    )
    parser.add_argument("--epochs", type=float, default=5.0)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--save-steps",
        type=int,
        default=0,
        help="checkpoint every N steps (re-running resumes from the last one)",
    )
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--question-key", default="question")
    parser.add_argument("--answer-key", default="answer")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def run(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asu_simu_plugin.data import load_qa_jsonl

    method_args = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        method_args[key.strip()] = parse_value(value)
    forget = load_qa_jsonl(args.forget, args.question_key, args.answer_key)
    retain = load_qa_jsonl(args.retain, args.question_key, args.answer_key)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype))
    settings = RunSettings(
        epochs=args.epochs,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_length=args.max_length,
        weight_decay=args.weight_decay,
        seed=args.seed,
        save_strategy="steps" if args.save_steps else "no",
        system_prompt=args.system_prompt,
        extra={"save_steps": args.save_steps} if args.save_steps else {},
    )
    command = shlex.join(["asu-simu", *sys.argv[1:]])
    run_unlearning(
        args.method,
        model,
        tokenizer,
        forget,
        retain,
        args.output,
        method_args,
        settings,
        source=args.model,
        command=command,
    )
    print(f"unlearned model saved to {args.output}")
    return 0
