"""Cost of ASU, SO-GradDiff, SONPO and SIMU against GradDiff, each in its shipped configuration.

    python -m benchmarks.perf.perf [--model DIR] [--batch-size 4] [--rounds 2] [--run-steps 10]
        [--warmup 1] [--simu-ig-steps 5] [--forget-size 8] [--distributed] [--only ROW ...]
        [--out benchmarks/results] [--name perf]

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
2 ms, with freed memory handed back to the OS in between); a row's value is the median of its
runs' peaks (every run's peak is in the JSON).

--distributed adds 2-process rows (DDP with gloo on CPU / NCCL on GPUs, and DeepSpeed ZeRO-2 through
accelerate when deepspeed is importable): per-step time at the same global batch (each process
gets half of it), GradDiff and SOGradDiff.

SIMU's integrated-gradients attribution pass over the forget set is timed against one SIMU
training epoch on it.

The default model is SmolLM2-135M's architecture built from its config (random weights: cost
does not depend on them), so nothing is downloaded; --model DIR times a saved model instead.
Writes <out>/<name>.md and <name>.json (run from the repository root).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from asu_simu_plugin import lora, toy
from asu_simu_plugin.data import PadCollator, QADataset, load_qa_jsonl
from asu_simu_plugin.diagnostics import machine_info
from asu_simu_plugin.methods.simu import attribution as neurons
from asu_simu_plugin.methods.simu.masks import save_masks
from asu_simu_plugin.runner import RunSettings, build_trainer
from benchmarks.perf.distributed import distributed_rows, worker
from benchmarks.perf.measure import PeakMemory, StepTimer, mib, summary
from benchmarks.perf.report import markdown

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
    # the teacher-output cache, filled from the student at train() start (no frozen copy)
    "ASU_GD + cache": ("asu", "ASU", {"retain_loss_type": "NLL", "teacher_cache": True}),
    # ASU_KL without a copy: the teacher cache and the KL reference cache
    "ASU_KL + caches": (
        "asu",
        "ASU",
        {"retain_loss_type": "KL", "teacher_cache": True, "reference_cache": True},
    ),
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
    ("ASU_KL + caches", "GradDiff (NLL)"),
    ("ASU_KL + caches", "GradDiff (KL)"),
    ("GradDiff (NLL) + LoRA", "GradDiff (NLL)"),
    ("ASU_GD + LoRA", "ASU_GD"),
]
# --asu-temperature: every ASU row runs that tau on all layers instead of the shipped "auto",
# without the collapse guard (the tau sweep and the guard's sampled answers at trainer start
# dominate a short benchmark run; a step costs the same).
ASU_FIXED: dict = {}


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
    p.add_argument("--name", default="perf", help="file stem of the results (<name>.md, .json)")
    return p.parse_args(argv)


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
        fill = time_cache_fill(trainer)
        trainer.train()
    if use_lora:  # the adapters out again: the next run starts from the plain model
        trainer.model.unload()
        model.disable_input_require_grads()
    del trainer
    return {
        "steps": timer.times[args.warmup :],
        "passes": passes,
        "peak_mib": mib(memory),
        "fill_seconds": fill,
    }


def time_cache_fill(trainer) -> float | None:
    """Seconds of ASU's cache fill, done here as `train()` would do it first thing."""
    if not getattr(trainer, "caches", lambda: [])():
        return None
    start = time.perf_counter()
    trainer.ensure_caches()
    return time.perf_counter() - start


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


def interleaved(names, model, initial_state, tokenizer, forget, retain, args, workdir, extra):
    """Every row, --rounds times, in an order rotated each round; step times pooled per row."""
    pooled = {name: {"steps": [], "passes": [], "fills": [], "peaks": []} for name in names}
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
            pooled[name]["fills"] += [run["fill_seconds"]] if run["fill_seconds"] else []
            pooled[name]["peaks"].append(run["peak_mib"])
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
            # the median run's peak: sampled RSS moves by ~100 MiB between identical runs, and the
            # median (unlike the highest) does not grow with the number of rounds
            "peak_mib": statistics.median(run["peaks"]),
            "peak_mib_runs": run["peaks"],
            "configuration": {**method_args, **train_args},
        }
        if run["fills"]:
            row["fill_seconds"] = statistics.median(run["fills"])
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


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))  # benchmarks.perf.distributed
    started = time.perf_counter()
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
    given = sys.argv[1:] if argv is None else list(argv)
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "benchmarks.perf.perf", *given]),
        "machine": {
            **machine_info(),
            "device": device.type,
            "memory": "CUDA peak allocated above the start"
            if device.type == "cuda"
            else "peak resident set size above the start, the median of a row's runs",
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
            "asu_temperature": args.asu_temperature,
        },
        "per_step": per_step,
        "ratios": {
            f"{a} / {b}": per_step[a]["step_seconds"] / per_step[b]["step_seconds"]
            for a, b in COMPARISONS
            if a in per_step and b in per_step
        },
        "memory_ratios": {
            f"{a} / {b}": per_step[a]["peak_mib"] / per_step[b]["peak_mib"]
            for a, b in COMPARISONS
            if a in per_step and b in per_step
        },
        "distributed": distributed,
        "simu": simu,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result, COMPARISONS)
    (args.out / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
