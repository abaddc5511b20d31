"""Cost of ASU, SO-GradDiff, SONPO and SIMU against GradDiff, each in its shipped configuration.

    python benchmarks/perf/perf.py [--model DIR] [--batch-size 4] [--rounds 2] [--run-steps 10]
        [--warmup 1] [--simu-ig-steps 5] [--forget-size 8] [--distributed] [--out benchmarks/results]

Every row trains the same model from the same weights on the same batches (the standalone
trainers; the harness's GradDiff computes the same losses) with the method arguments, learning
rate and weight decay of its `configs/trainer/<Name>.yaml` (GradDiff: the harness's defaults), so
SOGradDiff and SIMU run SOUL's grad2 Hessian and betas, as users get them. `SOGradDiff (gnb)` is
the Sophia-G variant: its runs together last at least 2 × `hessian_interval` steps (each at least
one interval), so its sampled-label Hessian pass is timed (it is also reported on its own).

Methods are interleaved: in each of --rounds rounds every method (in a rotated order) trains
--run-steps optimizer steps from the initial weights; the first --warmup steps of a run are not
timed. Machine noise then hits every method alike. Reported per method: median seconds per step
(ratios use medians), spread (min-max and the interquartile range) and the mean; for the GNB
variant the mean over whole Hessian intervals is its amortised cost. Peak memory: CUDA peak
allocation, or on CPU the peak resident set size above the level before the run (sampled every
2 ms, with freed memory handed back to the OS in between).

--distributed adds 2-process rows (DDP with gloo on CPU / NCCL on GPUs, and DeepSpeed ZeRO-2 through
accelerate when deepspeed is importable): per-step time at the same global batch (each process
gets half of it), GradDiff and SOGradDiff.

SIMU's integrated-gradients attribution pass over the forget set is timed against one SIMU
training epoch on it.

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

from asu_simu_plugin import lora, toy
from asu_simu_plugin.data import PadCollator, QADataset, load_qa_jsonl
from asu_simu_plugin.diagnostics import machine_info
from asu_simu_plugin.methods.simu import attribution as neurons
from asu_simu_plugin.methods.simu.masks import save_masks
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

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "trainer"
# The harness's GradDiff.yaml / finetune.yaml values for what our trainer configs leave to them.
HARNESS_DEFAULTS = {
    "method_args": {"gamma": 1.0, "alpha": 1.0, "retain_loss_type": "NLL"},
    "args": {"learning_rate": 1e-5, "weight_decay": 0.01},
}

# name: (standalone method, shipped trainer config or None for the harness's GradDiff, overrides)
RUNS = {
    "GradDiff (NLL)": ("graddiff", None, {"retain_loss_type": "NLL"}),
    "GradDiff (KL)": ("graddiff", None, {"retain_loss_type": "KL"}),
    "ASU_GD": ("asu", "ASU", {"retain_loss_type": "NLL"}),
    "ASU_KL": ("asu", "ASU", {"retain_loss_type": "KL"}),
    "SOGradDiff": ("sograddiff", "SOGradDiff", {}),
    "SOGradDiff (gnb)": ("sograddiff", "SOGradDiff", {"hessian_mode": "gnb"}),
    "SONPO": ("sonpo", "SONPO", {}),
    "SIMU": ("simu", "SIMU", {}),
    # the teacher-output cache: step 1 (untimed warm-up) fills it, later steps only read it
    "ASU_GD + cache": ("asu", "ASU", {"retain_loss_type": "NLL", "teacher_cache": True}),
    # `lora`: the run's model is wrapped in LoRA adapters (the LoRACausalLM defaults)
    "GradDiff (NLL) + LoRA": ("graddiff", None, {"retain_loss_type": "NLL", "lora": True}),
    "ASU_GD + LoRA": ("asu", "ASU", {"retain_loss_type": "NLL", "lora": True}),
}
COMPARISONS = [
    ("ASU_GD", "GradDiff (NLL)"),
    ("ASU_KL", "GradDiff (KL)"),
    ("SOGradDiff", "GradDiff (NLL)"),
    ("SOGradDiff (gnb)", "GradDiff (NLL)"),
    ("SONPO", "GradDiff (NLL)"),
    ("SIMU", "GradDiff (NLL)"),
    ("ASU_GD + cache", "GradDiff (NLL)"),
    ("GradDiff (NLL) + LoRA", "GradDiff (NLL)"),
    ("ASU_GD + LoRA", "ASU_GD"),
]
# 2-process rows (--distributed): name: (launcher, RUNS entry)
DISTRIBUTED_RUNS = {
    "GradDiff (NLL), DDP ×2": ("ddp", "GradDiff (NLL)"),
    "SOGradDiff, DDP ×2": ("ddp", "SOGradDiff"),
    "GradDiff (NLL), ZeRO-2 ×2": ("zero2", "GradDiff (NLL)"),
    "SOGradDiff, ZeRO-2 ×2": ("zero2", "SOGradDiff"),
}
# --asu-temperature: every ASU row runs that tau on all layers instead of the shipped "auto",
# without the collapse guard (the tau sweep and the guard's sampled answers at trainer start
# dominate a short benchmark run; a step costs the same).
ASU_FIXED: dict = {}
ZERO2_CONFIG = Path(__file__).resolve().parents[2] / "tests" / "distributed" / "zero2.yaml"


def shipped_configuration(name: str) -> tuple[str, dict, dict]:
    """(method, method args, {learning_rate, weight_decay}) of a row, from its trainer YAML."""
    import yaml

    method, config_name, overrides = RUNS[name]
    method_args = dict(HARNESS_DEFAULTS["method_args"])
    args = dict(HARNESS_DEFAULTS["args"])
    if config_name is not None:
        config = yaml.safe_load((CONFIGS / f"{config_name}.yaml").read_text())
        method_args.update(config.get("method_args") or {})
        args.update({k: v for k, v in (config.get("args") or {}).items() if k in args})
    method_args = {k: v for k, v in {**method_args, **overrides}.items() if v is not None}
    if method == "asu":
        method_args.update(ASU_FIXED)
    return method, method_args, {k: float(v) for k, v in args.items()}


def run_steps(name: str, args) -> int:
    """Optimizer steps of one run: the GNB runs of all rounds together cover two Hessian
    intervals at least, each run at least one (so every run times a pass)."""
    _, method_args, _ = shipped_configuration(name)
    if method_args.get("hessian_mode") == "gnb":
        interval = int(method_args.get("hessian_interval", 10))
        return max(args.run_steps, interval, -(-2 * interval // max(1, args.rounds)))
    return args.run_steps


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, help="a saved causal LM (default: SmolLM2-135M shape)")
    p.add_argument(
        "--data", type=Path, help="folder holding locuslab/TOFU/ (default: the toy authors)"
    )
    p.add_argument("--batch-size", type=int, default=4, help="forget and retain rows per step")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every method")
    p.add_argument("--run-steps", type=int, default=10, help="optimizer steps per method and round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each run")
    p.add_argument("--distributed", action="store_true", help="add the 2-process rows")
    p.add_argument("--only", nargs="*", help="time only these rows (default: all)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # a 2-process row's process (JSON spec)
    p.add_argument("--forget-size", type=int, default=8, help="forget rows (SIMU pass and epoch)")
    p.add_argument(
        "--simu-ig-steps", type=int, default=5, help="integrated-gradients steps (paper: 5)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    p.add_argument(
        "--asu-temperature",
        type=float,
        help="ASU rows: this tau on all layers (default: the shipped config, tau sweep included)",
    )
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


def settings_for(name, args, steps, **extra):
    _, _, train_args = shipped_configuration(name)
    return RunSettings(
        epochs=1000,
        batch_size=args.batch_size,
        learning_rate=train_args["learning_rate"],
        weight_decay=train_args["weight_decay"],
        logging_steps=10_000,
        extra={"max_steps": steps, "disable_tqdm": True, **extra},
    )


def time_run(name, model, initial_state, tokenizer, forget, retain, args, workdir, extra=None):
    """One run of a row from the initial weights: its step times (warm-up dropped), peak memory
    and, for the GNB variant, the seconds of each Hessian pass."""
    method, method_args, _ = shipped_configuration(name)
    method_args = {**method_args, **(extra or {})}
    use_lora = method_args.pop("lora", False)
    model.load_state_dict(initial_state)
    model.requires_grad_(True)  # a LoRA run before froze the base weights in place
    steps = run_steps(name, args)
    device = next(model.parameters()).device
    timer = StepTimer(device)
    with PeakMemory(device) as memory:
        trainer = build_trainer(
            method,
            lora.add_lora(model) if use_lora else model,
            tokenizer,
            forget,
            retain,
            workdir / method,
            method_args,
            settings_for(name, args, steps),
        )
        trainer.add_callback(timer)
        passes = time_hessian_passes(trainer, timer)
        trainer.train()
    if use_lora:  # the adapters out again: the next run starts from the plain model
        trainer.model.unload()
        model.disable_input_require_grads()
    del trainer
    return {"steps": timer.times[args.warmup :], "passes": passes, "peak_mib": mib(memory)}


def time_hessian_passes(trainer, timer) -> list[float]:
    """Seconds of each GNB pass, timed inside its training step (the step time includes it)."""
    passes = []
    if not hasattr(trainer, "gauss_newton_bartlett_update"):
        return passes
    original = trainer.gauss_newton_bartlett_update

    def timed(*a, **k):
        timer._sync()
        start = time.perf_counter()
        original(*a, **k)
        timer._sync()
        passes.append(time.perf_counter() - start)

    trainer.gauss_newton_bartlett_update = timed
    return passes


def summary(times: list[float]) -> dict:
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {
        "step_seconds": statistics.median(times),
        "mean_seconds": statistics.mean(times),
        "min_seconds": min(times),
        "max_seconds": max(times),
        "iqr_seconds": [quartiles[0], quartiles[2]],
        "timed_steps": len(times),
    }


def interleaved(names, model, initial_state, tokenizer, forget, retain, args, workdir, extra):
    """Every row, --rounds times, in an order rotated each round; step times pooled per row."""
    pooled = {name: {"steps": [], "passes": [], "peak_mib": 0.0} for name in names}
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            run = time_run(
                name,
                model,
                initial_state,
                tokenizer,
                forget,
                retain,
                args,
                workdir,
                extra.get(name),
            )
            pooled[name]["steps"] += run["steps"]
            pooled[name]["passes"] += run["passes"]
            pooled[name]["peak_mib"] = max(pooled[name]["peak_mib"], run["peak_mib"])
            print(
                f"round {round_index + 1}/{args.rounds}  {name:18s} "
                f"{statistics.median(run['steps']):8.3f} s/step (median of {len(run['steps'])})"
            )
    result = {}
    for name, run in pooled.items():
        _, method_args, train_args = shipped_configuration(name)
        row = {
            **summary(run["steps"]),
            "steps": run["steps"],
            "peak_mib": run["peak_mib"],
            "configuration": {**method_args, **train_args},
        }
        if run["passes"]:
            interval = int(method_args["hessian_interval"])
            row["hessian_pass_seconds"] = statistics.median(run["passes"])
            row["hessian_passes"] = run["passes"]
            row["hessian_interval"] = interval
            # amortised: a typical step (the median: passes are 1 step in `interval`), plus one
            # pass every `interval` steps
            row["amortised_seconds"] = row["step_seconds"] + row["hessian_pass_seconds"] / interval
        result[name] = row
    return result


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
    masks = neurons.critical_neuron_masks(attributions, 0.3)
    save_masks(masks, mask_path, model=model)  # the SIMU rows load them for this model
    print(f"SIMU attribution {seconds:8.1f} s ({args.simu_ig_steps} IG steps)")
    return {"seconds": seconds, "peak_mib": mib(memory)}, str(mask_path)


def simu_epoch(model, initial_state, tokenizer, forget, retain, args, workdir, mask_path):
    """Seconds and peak memory of one SIMU training epoch on the forget rows."""
    model.load_state_dict(initial_state)
    device = next(model.parameters()).device
    _, method_args, train_args = shipped_configuration("SIMU")
    settings = RunSettings(
        epochs=1,
        batch_size=args.batch_size,
        learning_rate=train_args["learning_rate"],
        weight_decay=train_args["weight_decay"],
        extra={"disable_tqdm": True},
    )
    with PeakMemory(device) as memory:
        trainer = build_trainer(
            "simu",
            model,
            tokenizer,
            forget,
            retain,
            workdir / "simu_epoch",
            {**method_args, "mask_path": mask_path},
            settings,
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    del trainer
    print(f"SIMU one epoch {seconds:8.1f} s")
    return {"seconds": seconds, "peak_mib": mib(memory)}


def distributed_rows(args, workdir) -> dict:
    """Per-step time of 2-process runs (each process half the batch), launched as workers."""
    import importlib.util
    import subprocess
    import sys

    rows = {}
    for name, (launcher, row) in DISTRIBUTED_RUNS.items():
        if launcher == "zero2" and importlib.util.find_spec("deepspeed") is None:
            print(f"{name}: skipped (deepspeed is not importable here)")
            continue
        out = workdir / f"worker-{len(rows)}.json"
        spec = json.dumps({"row": row, "out": str(out), "argv": _worker_argv(args)})
        script = [str(Path(__file__).resolve()), "--worker", spec]
        port = str(_free_port())
        if launcher == "ddp":
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node=2",
                f"--master_port={port}",
                *script,
            ]
        else:
            command = [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                str(_absolute_config(ZERO2_CONFIG, workdir)),
                "--main_process_port",
                port,
                *script,
            ]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // 2))}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{done.stderr[-4000:]}")
        rows[name] = {**json.loads(out.read_text()), "launcher": launcher, "single": row}
        print(f"{name:28s} {rows[name]['step_seconds']:8.3f} s/step")
    return rows


def _worker_argv(args) -> list[str]:
    argv = [
        "--batch-size",
        str(max(1, args.batch_size // 2)),
        "--run-steps",
        str(args.rounds * args.run_steps),
        "--warmup",
        str(args.warmup),
        "--forget-size",
        str(args.forget_size),
    ]
    if args.model:
        argv += ["--model", str(args.model)]
    if args.data:
        argv += ["--data", str(args.data)]
    return argv


def _absolute_config(config: Path, workdir: Path) -> Path:
    """The accelerate config with its DeepSpeed JSON path made absolute (it is relative to the
    repository root)."""
    json_name = config.with_suffix(".json").name
    text = config.read_text().replace(
        f"tests/distributed/{json_name}", str(config.parent / json_name)
    )
    copy = workdir / config.name
    copy.write_text(text)
    return copy


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def worker(spec: dict) -> None:
    """One process of a 2-process row: time its steps; rank 0 writes the summary."""
    args = parse_args(spec["argv"])
    transformers.logging.set_verbosity_error()
    model, tokenizer, _ = load_model_and_tokenizer(args)
    forget, retain = qa_rows(args.forget_size, args.data)
    timer = StepTimer(torch.device("cpu"))
    name = spec["row"]
    method, method_args, _ = shipped_configuration(name)
    steps = run_steps(name, args)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(
            method,
            model,
            tokenizer,
            forget,
            retain,
            Path(tmp),
            method_args,
            settings_for(
                name,
                args,
                steps,
                ddp_backend="gloo" if not torch.cuda.is_available() else None,
                # True would make transformers skip DeepSpeed (which finds the CPU itself)
                use_cpu=not torch.cuda.is_available()
                and os.environ.get("ACCELERATE_USE_DEEPSPEED") != "true",
            ),
        )
        trainer.add_callback(timer)
        trainer.train()
        rank = trainer.args.process_index
        del trainer
    from asu_simu_plugin.guards import close_distributed

    close_distributed()
    if rank == 0:
        times = timer.times[args.warmup :]
        Path(spec["out"]).write_text(json.dumps({**summary(times), "steps": times}))


def mib(memory):
    return round(memory.peak_bytes / 2**20, 1)


def spread(row) -> str:
    low, high = row["iqr_seconds"]
    return f"{row['min_seconds']:.2f}–{row['max_seconds']:.2f} (IQR {low:.2f}–{high:.2f})"


def markdown(result):
    m, s = result["machine"], result["settings"]
    steps, simu = result["per_step"], result.get("simu")
    lines = [
        "# Cost per training step: ASU, SO-GradDiff, SONPO, SIMU vs GradDiff",
        "",
        f"Generated by `benchmarks/perf/perf.py` on {result['date'][:10]}: {m['cpu']}, "
        f"{m['cpu_cores']} cores ({m['torch_threads']} torch threads), device {m['device']}"
        + (f" ({m['gpu']})" if m.get("gpu") else "")
        + "; "
        f"torch {result['versions']['torch']}, transformers {result['versions']['transformers']}."
        f" Model: {s['model']} ({s['parameters'] / 1e6:.1f}M parameters, fp32). Batch: "
        f"{s['batch_size']} forget + {s['batch_size']} retain rows "
        f"of {s['data']} ({s['tokens_per_row']:.0f} tokens a row on average). Every method runs "
        "its shipped `configs/trainer/*.yaml` (SOGradDiff, SONPO and SIMU: grad2 Hessian, betas "
        "0.9/0.95); the methods were interleaved, "
        f"{s['rounds']} rounds × {s['run_steps']} steps each from the same weights (GNB: "
        f"{s['gnb_run_steps']}), the first {s['warmup']} of every run untimed. "
        f"Memory: {m['memory']}.",
        "",
        "| method | median s / step | spread (s) | timed steps | peak MiB | vs | time ratio | "
        "memory ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, baseline in COMPARISONS:
        if method not in steps or baseline not in steps:
            continue
        a, b = steps[method], steps[baseline]
        lines.append(
            f"| {method} | {a['step_seconds']:.3f} | {spread(a)} | {a['timed_steps']} | "
            f"{a['peak_mib']:.0f} | {baseline} ({b['step_seconds']:.3f} s, "
            f"{b['peak_mib']:.0f} MiB) | **{a['step_seconds'] / b['step_seconds']:.2f}×** | "
            f"{a['peak_mib'] / b['peak_mib']:.2f}× |"
        )
    with_lora, full = steps.get("ASU_GD + LoRA"), steps.get("ASU_GD")
    if with_lora and full:
        weights = s["parameters"] * 4 / 2**20  # fp32, held before every run
        total_lora, total_full = with_lora["peak_mib"] + weights, full["peak_mib"] + weights
        lines += [
            "",
            f"Counting the model weights held before each run ({weights:.0f} MiB, outside the "
            f"peak column): ASU_GD + LoRA peaks at {total_lora:.0f} MiB, ASU_GD at "
            f"{total_full:.0f} MiB = **{total_lora / total_full:.2f}×** (LoRA: one set of "
            "weights for student, teacher and reference; gradients and optimizer state for the "
            "adapters only).",
        ]
    gnb = steps.get("SOGradDiff (gnb)")
    if gnb and "hessian_pass_seconds" in gnb:
        base = steps["GradDiff (NLL)"]["step_seconds"]
        lines += [
            "",
            f"Sophia-G's sampled-label Hessian pass alone: {gnb['hessian_pass_seconds']:.3f} s "
            f"(median of {len(gnb['hessian_passes'])}; its steps include it), "
            f"{gnb['hessian_pass_seconds'] / gnb['step_seconds']:.2f}× a GNB training step; every "
            f"{gnb['hessian_interval']} steps, so the amortised GNB step is "
            f"{gnb['amortised_seconds']:.3f} s = **{gnb['amortised_seconds'] / base:.2f}×** "
            "GradDiff (NLL).",
        ]
    distributed = result.get("distributed") or {}
    if distributed:
        lines += [
            "",
            "Two processes (each with half the batch and half the threads; DDP over gloo, "
            "DeepSpeed ZeRO-2 through accelerate, fp32), per optimizer step:",
            "",
            "| run | median s / step | spread (s) | timed steps | vs one process |",
            "|---|---|---|---|---|",
        ]
        for name, row in distributed.items():
            single = steps.get(row["single"])
            versus = (
                f"{row['step_seconds'] / single['step_seconds']:.2f}× ({single['step_seconds']:.3f} s)"
                if single
                else "—"
            )
            lines.append(
                f"| {name} | {row['step_seconds']:.3f} | {spread(row)} | {row['timed_steps']} | "
                f"{versus} |"
            )
    if simu:
        att, epoch = simu["attribution"], simu["epoch"]
        lines += [
            "",
            f"SIMU attribution ({s['simu_ig_steps']} integrated-gradients steps, "
            f"{s['forget_size']} forget rows, every decoder layer): {att['seconds']:.1f} s, peak "
            f"{att['peak_mib']:.0f} MiB; one SIMU training epoch on the same rows: "
            f"{epoch['seconds']:.1f} s, peak {epoch['peak_mib']:.0f} MiB → attribution = "
            f"**{att['seconds'] / epoch['seconds']:.1f} epochs**. Per-answer-token attribution "
            "(the default): per (layer l, step), every answer position is a single-token query "
            "over the observed prefix's cached keys/values from layer l up (layers below l "
            "replay the observed pass), so it grows with answer tokens × layers × steps (the "
            "shipped and paper setting is 5 steps) and not with the number of training epochs; it "
            "runs once, and `mask_path` reuses its masks.",
        ]
    lines.append("")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.asu_temperature is not None:
        ASU_FIXED.update(temperature=args.asu_temperature, layers=None, collapse_guard=False)
    transformers.logging.set_verbosity_error()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, model_name = load_model_and_tokenizer(args)
    model.to(device)
    initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    forget, retain = qa_rows(args.forget_size, args.data)
    lengths = [len(QADataset([r], tokenizer)[0]["input_ids"]) for r in forget + retain]
    names = [n for n in RUNS if not args.only or n in args.only]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        simu = None
        extra = {}
        if "SIMU" in names:
            attribution, mask_path = simu_attribution(
                model, initial_state, tokenizer, forget, args, workdir
            )
            # the SIMU rows reuse the attribution's masks instead of attributing again
            extra["SIMU"] = {"mask_path": mask_path}
            epoch = simu_epoch(
                model, initial_state, tokenizer, forget, retain, args, workdir, mask_path
            )
            simu = {
                "attribution": attribution,
                "epoch": epoch,
                "attribution_in_epochs": attribution["seconds"] / epoch["seconds"],
            }
        per_step = interleaved(
            names, model, initial_state, tokenizer, forget, retain, args, workdir, extra
        )
        distributed = distributed_rows(args, workdir) if args.distributed else {}
    gnb_names = [n for n in names if shipped_configuration(n)[1].get("hessian_mode") == "gnb"]
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
            "rounds": args.rounds,
            "run_steps": args.run_steps,
            "gnb_run_steps": run_steps(gnb_names[0], args) if gnb_names else None,
            "warmup": args.warmup,
            "forget_size": args.forget_size,
            "simu_ig_steps": args.simu_ig_steps,
        },
        "per_step": per_step,
        "ratios": {
            f"{a} / {b}": per_step[a]["step_seconds"] / per_step[b]["step_seconds"]
            for a, b in COMPARISONS
            if a in per_step and b in per_step
        },
        "distributed": distributed,
        "simu": simu,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "perf.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (args.out / "perf.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
