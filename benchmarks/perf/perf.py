"""Cost of ASU, SO-GradDiff and SIMU against GradDiff, measured in one process.

    python benchmarks/perf/perf.py [--model DIR] [--batch-size 4] [--steps 5] [--warmup 2]
        [--simu-ig-steps 4] [--forget-size 8] [--out benchmarks/results]

Every method trains the same model from the same weights on the same batches (the standalone
trainers; the harness's GradDiff computes the same losses). Per training step (forward, backward,
optimizer step; the median of --steps after --warmup untimed ones):

  ASU_GD vs GradDiff (NLL retain)   ASU_KL vs GradDiff (KL retain)
  SOGradDiff vs GradDiff (NLL)      SIMU (masked SophiaG) vs GradDiff (NLL)

and SIMU's integrated-gradients attribution pass over the forget set vs one SIMU training epoch
on it. Peak memory: CUDA peak allocation, or on CPU the peak resident set size above the level
before the run (sampled every 2 ms, with freed memory handed back to the OS in between).

The default model is SmolLM2-135M's architecture built from its config (random weights: cost
does not depend on them), so nothing is downloaded; --model DIR times a saved model instead.
Writes <out>/perf.md and perf.json.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import gc
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, TrainerCallback

from asu_simu_plugin import neurons, toy
from asu_simu_plugin.data import PadCollator, QADataset, load_qa_jsonl
from asu_simu_plugin.diagnostics import machine_info
from asu_simu_plugin.runner import RunSettings, build_trainer

# SmolLM2-135M (HuggingFaceTB/SmolLM2-135M-Instruct config.json)
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# name: (standalone method, method args). ASU and SIMU keep their config defaults.
RUNS = {
    "GradDiff (NLL)": ("graddiff", {"retain_loss_type": "NLL"}),
    "GradDiff (KL)": ("graddiff", {"retain_loss_type": "KL"}),
    "ASU_GD": ("asu", {"temperature": 2.3, "gamma": 0.1, "retain_loss_type": "NLL"}),
    "ASU_KL": ("asu", {"temperature": 2.3, "gamma": 0.1, "retain_loss_type": "KL"}),
    "SOGradDiff": ("sograddiff", {"alpha": 2.0}),
    "SIMU": ("simu", {"alpha": 2.0}),
}
COMPARISONS = [
    ("ASU_GD", "GradDiff (NLL)"),
    ("ASU_KL", "GradDiff (KL)"),
    ("SOGradDiff", "GradDiff (NLL)"),
    ("SIMU", "GradDiff (NLL)"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, help="a saved causal LM (default: SmolLM2-135M shape)")
    p.add_argument(
        "--data", type=Path, help="folder holding locuslab/TOFU/ (default: the toy authors)"
    )
    p.add_argument("--batch-size", type=int, default=4, help="forget and retain rows per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--forget-size", type=int, default=8, help="forget rows (SIMU pass and epoch)")
    p.add_argument("--simu-ig-steps", type=int, default=4, help="integrated-gradients steps")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    return p.parse_args(argv)


class PeakMemory:
    """Peak memory over a block: CUDA allocator peak, or sampled RSS above the starting level."""

    def __init__(self, device):
        self.device = device
        self.peak_bytes = 0

    @staticmethod
    def rss():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        release_memory()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.start = self.rss()
        self.highest = self.start
        self.running = True

        def sample():
            while self.running:
                self.highest = max(self.highest, self.rss())
                time.sleep(0.002)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated() - self.start
        else:
            self.running = False
            self.thread.join()
            self.peak_bytes = max(self.highest, self.rss()) - self.start
        return False


def release_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:  # glibc keeps freed blocks; hand them back so the next RSS baseline is honest
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (all micro-batches, backward and optimizer update)."""

    def __init__(self, device):
        self.device = device
        self.times = []

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self.started)


def load_model_and_tokenizer(args):
    if args.model:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
        return model, tokenizer, str(args.model)
    authors = toy.make_authors(24)
    tokenizer = toy.build_tokenizer(toy.corpus_texts(authors))
    torch.manual_seed(0)
    config = LlamaConfig(**SMOLLM2_135M)
    return AutoModelForCausalLM.from_config(config), tokenizer, "SmolLM2-135M shape (random)"


def qa_rows(count_forget, data=None):
    """Forget and retain rows: TOFU forget01 / retain_perturbed, or the toy authors' facts."""
    if data is None:
        rows = [qa for author in toy.make_authors(24) for qa in author.qa_pairs()]
        return rows[:count_forget], rows[count_forget:]
    tofu = Path(data) / "locuslab" / "TOFU"
    forget = load_qa_jsonl(tofu / "forget01.json")[:count_forget]
    return forget, load_qa_jsonl(tofu / "retain_perturbed.json")


def time_steps(name, model, initial_state, tokenizer, forget, retain, args, workdir, extra=None):
    method, method_args = RUNS[name]
    method_args = {**method_args, **(extra or {})}
    model.load_state_dict(initial_state)
    settings = RunSettings(
        epochs=1000,
        batch_size=args.batch_size,
        learning_rate=1e-6,
        logging_steps=10_000,
        extra={"max_steps": args.warmup + args.steps, "disable_tqdm": True},
    )
    device = next(model.parameters()).device
    timer = StepTimer(device)
    with PeakMemory(device) as memory:
        trainer = build_trainer(
            method, model, tokenizer, forget, retain, workdir / method, method_args, settings
        )
        trainer.add_callback(timer)
        trainer.train()
    del trainer
    timed = timer.times[args.warmup :]
    print(
        f"{name:16s} {statistics.median(timed):8.3f} s/step  {memory.peak_bytes / 2**20:8.0f} MiB"
    )
    return {"step_seconds": statistics.median(timed), "steps": timed, "peak_mib": mib(memory)}


def simu_attribution(model, initial_state, tokenizer, forget, args, workdir):
    """Seconds and peak memory of the attribution pass; its masks saved for the SIMU runs."""
    model.load_state_dict(initial_state)
    device = next(model.parameters()).device
    dataset = QADataset(forget, tokenizer)
    collate = PadCollator(tokenizer.pad_token_id)
    batches = [
        collate([dataset[i] for i in range(start, min(start + args.batch_size, len(dataset)))])
        for start in range(0, len(dataset), args.batch_size)
    ]
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        attributions = neurons.neuron_attributions(model, batches, steps=args.simu_ig_steps)
        seconds = time.perf_counter() - start
    mask_path = workdir / "simu_masks.safetensors"
    neurons.save_masks(neurons.critical_neuron_masks(attributions, 0.3), mask_path)
    print(f"SIMU attribution {seconds:8.1f} s ({args.simu_ig_steps} IG steps)")
    return {"seconds": seconds, "peak_mib": mib(memory)}, str(mask_path)


def simu_epoch(model, initial_state, tokenizer, forget, retain, args, workdir, mask_path):
    """Seconds and peak memory of one SIMU training epoch on the forget rows."""
    model.load_state_dict(initial_state)
    device = next(model.parameters()).device
    settings = RunSettings(
        epochs=1, batch_size=args.batch_size, learning_rate=1e-6, extra={"disable_tqdm": True}
    )
    with PeakMemory(device) as memory:
        trainer = build_trainer(
            "simu",
            model,
            tokenizer,
            forget,
            retain,
            workdir / "simu_epoch",
            {**RUNS["SIMU"][1], "mask_path": mask_path},
            settings,
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    del trainer
    print(f"SIMU one epoch {seconds:8.1f} s")
    return {"seconds": seconds, "peak_mib": mib(memory)}


def mib(memory):
    return round(memory.peak_bytes / 2**20, 1)


def markdown(result):
    m, s = result["machine"], result["settings"]
    steps, simu = result["per_step"], result["simu"]
    lines = [
        "# Cost per training step: ASU, SO-GradDiff, SIMU vs GradDiff",
        "",
        f"Generated by `benchmarks/perf/perf.py` on {result['date'][:10]}: {m['cpu']}, "
        f"{m['cpu_cores']} cores ({m['torch_threads']} torch threads), device {m['device']}"
        + (f" ({m['gpu']})" if m.get("gpu") else "")
        + "; "
        f"torch {result['versions']['torch']}, transformers {result['versions']['transformers']}."
        f" Model: {s['model']} ({s['parameters'] / 1e6:.1f}M parameters, fp32). Batch: "
        f"{s['batch_size']} forget + {s['batch_size']} retain rows "
        f"of {s['data']} ({s['tokens_per_row']:.0f} tokens a row on average); median of {s['steps']} steps "
        f"after {s['warmup']}. Memory: {m['memory']}.",
        "",
        "| method | s / step | peak MiB | vs | time ratio | memory ratio |",
        "|---|---|---|---|---|---|",
    ]
    for method, baseline in COMPARISONS:
        a, b = steps[method], steps[baseline]
        lines.append(
            f"| {method} | {a['step_seconds']:.3f} | {a['peak_mib']:.0f} | {baseline} "
            f"({b['step_seconds']:.3f} s, {b['peak_mib']:.0f} MiB) | "
            f"**{a['step_seconds'] / b['step_seconds']:.2f}×** | "
            f"{a['peak_mib'] / b['peak_mib']:.2f}× |"
        )
    att, epoch = simu["attribution"], simu["epoch"]
    lines += [
        "",
        f"SIMU attribution ({s['simu_ig_steps']} integrated-gradients steps, "
        f"{s['forget_size']} forget rows, every decoder layer): {att['seconds']:.1f} s, peak "
        f"{att['peak_mib']:.0f} MiB; one SIMU training epoch on the same rows: "
        f"{epoch['seconds']:.1f} s, peak {epoch['peak_mib']:.0f} MiB → attribution = "
        f"**{att['seconds'] / epoch['seconds']:.1f} epochs**. Per (layer l, step), the pass "
        "runs layers ≥ l forward and backward on the forget set (layers below l replay the "
        f"observed pass), so it grows with layers × steps (×{20 / s['simu_ig_steps']:.0f} at the paper's 20 steps) and not with "
        "the number of training epochs; it runs once, and `mask_path` reuses its masks.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, model_name = load_model_and_tokenizer(args)
    model.to(device)
    initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    forget, retain = qa_rows(args.forget_size, args.data)
    lengths = [len(QADataset([r], tokenizer)[0]["input_ids"]) for r in forget + retain]
    per_step = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        attribution, mask_path = simu_attribution(
            model, initial_state, tokenizer, forget, args, workdir
        )
        # the SIMU rows reuse the attribution's masks instead of attributing again
        simu_masks = {"SIMU": {"mask_path": mask_path}}
        for name in RUNS:
            per_step[name] = time_steps(
                name,
                model,
                initial_state,
                tokenizer,
                forget,
                retain,
                args,
                workdir,
                simu_masks.get(name),
            )
        epoch = simu_epoch(
            model, initial_state, tokenizer, forget, retain, args, workdir, mask_path
        )
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            **machine_info(),
            "device": device.type,
            "memory": "CUDA peak allocated above the start"
            if device.type == "cuda"
            else "peak resident set size above the start",
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "settings": {
            "model": model_name,
            "data": "TOFU forget01 / retain_perturbed" if args.data else "toy authors",
            "parameters": sum(p.numel() for p in model.parameters()),
            "batch_size": args.batch_size,
            "tokens_per_row": statistics.mean(lengths),
            "steps": args.steps,
            "warmup": args.warmup,
            "forget_size": args.forget_size,
            "simu_ig_steps": args.simu_ig_steps,
        },
        "per_step": per_step,
        "ratios": {
            f"{a} / {b}": per_step[a]["step_seconds"] / per_step[b]["step_seconds"]
            for a, b in COMPARISONS
        },
        "simu": {
            "attribution": attribution,
            "epoch": epoch,
            "attribution_in_epochs": attribution["seconds"] / epoch["seconds"],
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "perf.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (args.out / "perf.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
