"""`asu-simu neurons`: SIMU's critical neurons of a model on a QA set, for several thresholds.

    asu-simu neurons --model M --data forget.jsonl --thresholds 0.1,0.2,0.3,0.5 \
        [--retain retain.jsonl --mode forget_only] [--steps 20] [--out DIR] [--save 0.3]

Attribution runs once; each threshold only re-cuts it. Writes DIR/neurons.csv (critical neurons
per layer for each t), DIR/neurons.png (count per layer, one line per t — the SIMU paper's
Figure 4 analogue) and, with --save T, DIR/simu_masks.safetensors/.json for threshold T, which
the SIMU trainer accepts as `mask_path`.
"""

from __future__ import annotations

import csv
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="forget set, question/answer JSON lines")
    parser.add_argument("--retain", default=None, help="retain set (needed for --mode forget_only)")
    parser.add_argument("--thresholds", default="0.1,0.2,0.3,0.4,0.5")
    parser.add_argument("--mode", default="dual", choices=["dual", "forget_only"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-examples", type=int, default=None)
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="batch copies per forward pass (lower it if memory is short)",
    )
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--out", default="simu_neurons")
    parser.add_argument(
        "--save",
        type=float,
        default=None,
        metavar="T",
        help="also write the mask file for threshold T",
    )


def _attribute(model, tokenizer, path, args):
    from asu_simu_plugin.data import QADataset, load_qa_jsonl
    from asu_simu_plugin.diagnostics import batches
    from asu_simu_plugin.neurons import neuron_attributions

    rows = load_qa_jsonl(path)[: args.max_examples]
    dataset = QADataset(rows, tokenizer, args.max_length, args.system_prompt)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return neuron_attributions(
        model, batches(dataset, args.batch_size, pad), steps=args.steps, chunk_size=args.chunk_size
    )


def run(args) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asu_simu_plugin.neurons import (
        critical_neuron_masks,
        mask_summary,
        plot_mask_counts,
        save_masks,
    )

    thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    if args.mode == "forget_only" and not args.retain:
        raise SystemExit("--mode forget_only needs --retain (neurons critical there are dropped)")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    forget = _attribute(model, tokenizer, args.data, args)
    retain = _attribute(model, tokenizer, args.retain, args) if args.retain else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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
        tensors, _ = save_masks(
            masks,
            out / "simu_masks",
            {
                "threshold": args.save,
                "steps": args.steps,
                "mode": args.mode,
                "model": args.model,
                "data": args.data,
            },
        )
        print(f"mask for t={args.save} saved to {tensors} (SIMU: trainer.method_args.mask_path)")
    print(f"wrote {out / 'neurons.csv'} and {out / 'neurons.png'}")
    return 0
