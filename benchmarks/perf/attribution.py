"""SIMU attribution cost: per-answer-token integrated gradients (m = 5, the default and the
paper's definition) against whole-sequence integrated gradients (m = 4, the previous default
as benchmarked), on the same model and forget rows, in one process.

    python -m benchmarks.perf.attribution [--model DIR] [--data FOLDER] [--rows 16]
        [--batch-size 8] [--repeats 3] [--layers 0,15,29] [--threads N]

The variants alternate within each repeat (and swap order between repeats) so machine noise
hits both alike; the script prints every time, the medians and their ratio, and the mean
prompt / answer lengths. `--model` is a saved causal LM with its tokenizer (e.g. the TOFU-mini
base or target model built by benchmarks/tofu_mini/run.py); without it, SmolLM2-135M's shape
with random weights and the toy tokenizer (cost does not depend on the weights). `--data` is a
folder holding locuslab/TOFU/ (forget01 rows); without it, the toy authors' facts.

`attribution_rows(...)` returns the same comparison as a dict for `benchmarks.perf.perf`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from asu_simu_plugin import toy
from asu_simu_plugin.data import QADataset, load_qa_jsonl
from asu_simu_plugin.diagnostics import batches
from asu_simu_plugin.methods.simu import attribution as neurons

VARIANTS = {"sequence, m = 4": ("sequence", 4), "per_token, m = 5": ("per_token", 5)}


def _smollm2_shape_model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    from benchmarks.perf.perf import SMOLLM2_135M  # the one copy of the shape

    config = LlamaConfig(**SMOLLM2_135M)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def load_model(model_dir=None):
    """(model, tokenizer, description)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_dir:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
        return model.eval(), tokenizer, str(model_dir)
    tokenizer = toy.build_tokenizer(toy.corpus_texts(toy.make_authors(24)))
    return _smollm2_shape_model(), tokenizer, "SmolLM2-135M shape (random weights)"


def forget_rows(data=None, rows=16):
    if data:
        return load_qa_jsonl(Path(data) / "locuslab" / "TOFU" / "forget01.json")[:rows]
    return [qa for author in toy.make_authors(24) for qa in author.qa_pairs()][:rows]


def attribution_rows(model, tokenizer, rows, batch_size=8, repeats=3, layers=None) -> dict:
    """Seconds of each variant per repeat (interleaved), medians, ratio, lengths."""
    dataset = QADataset(rows, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    answers = dataset.answer_token_counts()
    lengths = [len(item["input_ids"]) for item in dataset.items]
    times = {name: [] for name in VARIANTS}
    for repeat in range(repeats):
        order = list(VARIANTS) if repeat % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            attribution, steps = VARIANTS[name]
            started = time.perf_counter()
            neurons.neuron_attributions(
                model,
                batches(dataset, batch_size, pad),
                steps=steps,
                attribution=attribution,
                layers=layers,
                progress=False,
            )
            times[name].append(time.perf_counter() - started)
            print(f"repeat {repeat + 1}: {name:18s} {times[name][-1]:7.1f} s", flush=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        "rows": len(rows),
        "batch_size": batch_size,
        "layers": "all" if layers is None else list(layers),
        "mean_tokens": statistics.mean(lengths),
        "mean_answer_tokens": statistics.mean(answers),
        "times_s": times,
        "median_s": medians,
        "ratio_per_token_m5_to_sequence_m4": medians["per_token, m = 5"]
        / medians["sequence, m = 4"],
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, help="a saved causal LM (default: SmolLM2-135M shape)")
    p.add_argument("--data", type=Path, help="folder holding locuslab/TOFU/ (default: toy rows)")
    p.add_argument("--rows", type=int, default=16, help="forget rows attributed")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--layers",
        default=None,
        help="comma-separated decoder layers to attribute (default: all; a pass for layer l "
        "runs layers >= l, so a spread such as 0,15,29 samples the cost)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, name = load_model(args.model)
    layers = [int(i) for i in args.layers.split(",")] if args.layers else None
    result = attribution_rows(
        model, tokenizer, forget_rows(args.data, args.rows), args.batch_size, args.repeats, layers
    )
    print(
        f"model: {name}; layers {result['layers']}; {result['rows']} forget rows, "
        f"batch {result['batch_size']}, "
        f"{result['mean_tokens']:.1f} tokens / {result['mean_answer_tokens']:.1f} answer "
        f"tokens per row on average"
    )
    for variant, seconds in result["median_s"].items():
        spread = f"{min(result['times_s'][variant]):.1f}-{max(result['times_s'][variant]):.1f}"
        print(f"  {variant:18s} median {seconds:7.1f} s (range {spread} s)")
    print(f"  per_token m = 5 / sequence m = 4: {result['ratio_per_token_m5_to_sequence_m4']:.2f}")
    return result


if __name__ == "__main__":
    main()
