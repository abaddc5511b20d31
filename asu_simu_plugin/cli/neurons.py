"""`asu-simu neurons`: SIMU's critical neurons of a model on a QA set, for several thresholds.

    asu-simu neurons --model M --data forget.jsonl --thresholds 0.1,0.2,0.3,0.5 \
        [--retain retain.jsonl --mode forget_only] [--steps 5] [--out DIR] [--save 0.3]

Attribution runs once; each threshold only re-cuts it. Writes DIR/neurons.csv (critical neurons
per layer for each t), DIR/neurons.png (count per layer, one line per t — the SIMU paper's
Figure 4 analogue) and, with --save T, DIR/simu_masks.safetensors/.json for threshold T, which
the SIMU trainer accepts as `mask_path`.
"""

from __future__ import annotations

import csv
from pathlib import Path

from asu_simu_plugin.cli import usage_checks
from asu_simu_plugin.cli.checks import model_source, number_list, positive_int


def add_arguments(parser) -> None:
    parser.add_argument(
        "--model", required=True, type=model_source, help="local model folder (or hub id)"
    )
    parser.add_argument("--data", required=True, help="forget set, question/answer JSON lines")
    parser.add_argument("--retain", default=None, help="retain set (needed for --mode forget_only)")
    parser.add_argument(
        "--thresholds", default="0.1,0.2,0.3,0.4,0.5", help="comma-separated, each in (0, 1)"
    )
    parser.add_argument(
        "--mode",
        default="dual",
        choices=["dual", "forget_only"],
        help="forget_only drops neurons also critical on --retain",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=5, help="integrated-gradients Riemann steps"
    )
    parser.add_argument("--batch-size", type=positive_int, default=4, help="examples per batch")
    parser.add_argument(
        "--max-length", type=positive_int, default=512, help="tokens per example (truncation)"
    )
    parser.add_argument(
        "--max-examples", type=positive_int, default=None, help="use the first N examples only"
    )
    parser.add_argument(
        "--chunk-size",
        type=positive_int,
        default=None,
        help="batch copies per forward pass (lower it if memory is short)",
    )
    parser.add_argument("--system-prompt", default=None, help="system prompt of the chat template")
    parser.add_argument("--question-key", default="question", help="question key in the files")
    parser.add_argument("--answer-key", default="answer", help="answer key in the files")
    parser.add_argument("--out", default="simu_neurons", help="folder for the CSV, PNG and mask")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace result files already in --out"
    )
    parser.add_argument(
        "--save",
        type=float,
        default=None,
        metavar="T",
        help="also write the mask file for threshold T, in (0, 1)",
    )


def check_out_folder(out: Path, names, overwrite: bool) -> None:
    """--out must be a folder we can write, and its result files are replaced only if asked."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    existing = [n for n in names if (out / n).exists()]
    if existing and not overwrite:
        raise ValueError(
            f"{out} already holds {', '.join(existing)}: add --overwrite to replace them, or "
            "choose another --out"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise OSError(f"cannot write to --out {out}: {error.strerror or error}") from None


def _attribute(model, tokenizer, rows, name, args):
    from asu_simu_plugin.data import QADataset
    from asu_simu_plugin.diagnostics import batches
    from asu_simu_plugin.methods.simu.attribution import neuron_attributions

    dataset = QADataset(rows, tokenizer, args.max_length, args.system_prompt)
    dataset = dataset.without_empty_answers(name)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return neuron_attributions(
        model, batches(dataset, args.batch_size, pad), steps=args.steps, chunk_size=args.chunk_size
    )


def run(args) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asu_simu_plugin.data import load_qa_jsonl
    from asu_simu_plugin.methods.simu.attribution import check_threshold, critical_neuron_masks
    from asu_simu_plugin.methods.simu.masks import mask_summary, plot_mask_counts, save_masks

    out = Path(args.out)
    with usage_checks():
        # Before any attribution: at t >= 1 no neuron can be critical (an empty mask).
        thresholds = number_list(
            args.thresholds, "--thresholds", float, lambda t: check_threshold(t, "--thresholds")
        )
        if args.save is not None:
            check_threshold(args.save, "--save")
        if args.mode == "forget_only" and not args.retain:
            raise ValueError(
                "--mode forget_only needs --retain (neurons critical there are dropped)"
            )
        keys = (args.question_key, args.answer_key)
        forget_rows = load_qa_jsonl(args.data, *keys)[: args.max_examples]
        retain_rows = (
            load_qa_jsonl(args.retain, *keys)[: args.max_examples] if args.retain else None
        )
        results = ["neurons.csv", "neurons.png"]
        if args.save is not None:
            results += ["simu_masks.safetensors", "simu_masks.json"]
        check_out_folder(out, results, args.overwrite)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    forget = _attribute(model, tokenizer, forget_rows, "forget", args)
    retain = _attribute(model, tokenizer, retain_rows, "retain", args) if retain_rows else None
    sweep = {t: critical_neuron_masks(forget, t, retain, args.mode) for t in thresholds}
    layers = sorted(forget)
    with (out / "neurons.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["threshold", *[f"layer_{i}" for i in layers], "total", "fraction"])
        for t, masks in sweep.items():
            summary = mask_summary(masks)
            per_layer = summary["critical_per_layer"]
            writer.writerow(
                [
                    t,
                    *[per_layer[i] for i in layers],
                    summary["critical_total"],
                    f"{summary['critical_fraction']:.6f}",
                ]
            )
            print(
                f"t={t:<5g} critical neurons: {summary['critical_total']:>7} "
                f"({100 * summary['critical_fraction']:.2f}%)  per layer: "
                + " ".join(str(per_layer[i]) for i in layers)
            )
    plot_mask_counts(sweep, out / "neurons.png")
    if args.save is not None:
        masks = critical_neuron_masks(forget, args.save, retain, args.mode)
        if not any(bool(mask.any()) for mask in masks.values()):
            raise ValueError(
                f"--save {args.save:g}: no neuron is critical in any layer, so no mask was saved "
                f"(SIMU refuses an empty one): save a lower threshold, see {out / 'neurons.csv'}"
            )
        tensors, _ = save_masks(
            masks,
            out / "simu_masks",
            {
                "threshold": args.save,
                "steps": args.steps,
                "mode": args.mode,
                "attribution": "per_token",
                "model_path": args.model,
                "data": args.data,
            },
            model=model,  # recorded, so SIMU refuses the mask for any other model
        )
        print(f"mask for t={args.save} saved to {tensors} (SIMU: trainer.method_args.mask_path)")
    print(f"wrote {out / 'neurons.csv'} and {out / 'neurons.png'}")
    return 0
