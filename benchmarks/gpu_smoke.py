"""GPU smoke: do the methods run, and run right, on a real-sized model in bf16 with SDPA?

    python -m benchmarks.gpu_smoke                 # Llama-3.2-1B's shape, random weights, CUDA
    python -m benchmarks.gpu_smoke --tiny          # a tiny Llama (CPU is fine): what CI runs
        [--steps 6] [--batch-size 8] [--tau 2.3] [--out benchmarks/results] [--name gpu_smoke]

Needs torch, transformers and peft only: the model is built from Llama-3.2-1B's config with
random weights (cost and exactness do not depend on them), the rows are the package's toy
authors, so nothing is downloaded and the harness is not used. In one process, on one device:

- checks, each with its numbers: the attention-temperature hook under SDPA in bf16 against an
  independent fp32 reference (the query projection divided by τ, exact for Llama), within
  bf16's own error (the same model untempered against fp32); τ = 1 bit-identical; ASU's cached
  and LoRA teachers against the live one (forget loss on one batch); SIMU's attribution finds
  critical neurons; every run's training loss finite;
- runs of `--steps` optimizer steps (the first untimed) from the same weights: GradDiff (NLL),
  ASU_GD with the live teacher (a frozen copy), with the teacher cache (no copy), with LoRA,
  SOGradDiff (grad2 and gnb, the Hessian refreshed every 2 steps) and SIMU (masks from the
  attribution above): median step time and peak memory (CUDA peak allocated above the weights)
  and their ratios to GradDiff's.

Writes <out>/<name>.md and .json; exits 1 when a check fails. ASU rows run at τ `--tau` on all
layers without the collapse guard (the automatic τ sweep is `benchmarks.tofu_mini`'s business).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from asu_simu_plugin import lora, toy
from asu_simu_plugin.attention import attention_temperature
from asu_simu_plugin.data import PadCollator, QADataset
from asu_simu_plugin.diagnostics import machine_info
from asu_simu_plugin.methods.base import model_inputs
from asu_simu_plugin.methods.simu import attribution as neurons
from asu_simu_plugin.methods.simu.masks import save_masks
from asu_simu_plugin.runner import RunSettings, build_trainer
from benchmarks.perf.measure import PeakMemory, StepTimer, mib, summary

# meta-llama/Llama-3.2-1B config.json (the shape only)
LLAMA_3_2_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    tie_word_embeddings=True,
)
ASU = {"temperature": None, "layers": None, "collapse_guard": False, "gamma": 0.1}
SOPHIA = {"alpha": 2.0, "betas": [0.9, 0.95], "rho": 0.04}
# name: (method, method arguments, wrap the model in LoRA)
ROWS = {
    "GradDiff (NLL)": ("graddiff", {}, False),
    "ASU_GD (live teacher)": ("asu", ASU, False),
    "ASU_GD + cache": ("asu", {**ASU, "teacher_cache": True}, False),
    "ASU_GD + LoRA": ("asu", ASU, True),
    "SOGradDiff (grad2)": ("sograddiff", SOPHIA, False),
    "SOGradDiff (gnb)": (
        "sograddiff",
        {**SOPHIA, "hessian_mode": "gnb", "hessian_interval": 2},
        False,
    ),
    "SIMU": ("simu", SOPHIA, False),
}
BASELINE = "GradDiff (NLL)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--tiny", action="store_true", help="a tiny Llama instead of Llama-3.2-1B's shape"
    )
    p.add_argument("--device", help="cuda (default when available) or cpu")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (first untimed)")
    p.add_argument("--batch-size", type=int, default=8, help="forget and retain rows per step")
    p.add_argument("--forget-size", type=int, default=16, help="forget rows")
    p.add_argument("--tau", type=float, default=2.3, help="ASU's τ (all layers)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--name", default="gpu_smoke", help="file stem of the results")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: all)")
    return p.parse_args(argv)


def build_model(args, tokenizer, device) -> tuple[LlamaForCausalLM, str]:
    if args.tiny:
        config = toy.tiny_llama_config(len(tokenizer), attn_implementation="sdpa")
        name = "tiny Llama (4 layers, hidden 64)"
    else:
        special = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
        config = LlamaConfig(**LLAMA_3_2_1B, **special, attn_implementation="sdpa")
        name = "Llama-3.2-1B shape (random weights)"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    # Random weights attend almost uniformly and predict almost uniformly, where a tempered
    # teacher differs from the model by nothing measurable: sharpen both, as training would.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4 if args.tiny else 2)
            layer.self_attn.k_proj.weight.mul_(4 if args.tiny else 2)
        model.model.norm.weight.mul_(20 if args.tiny else 4)
    return model.to(torch.bfloat16), name


# -- checks ------------------------------------------------------------------------------------
def hook_exactness(model, batch, tau: float) -> dict:
    """The hook (bf16, SDPA) against an fp32 copy whose q_proj is divided by τ: the difference
    must stay within bf16's own error (bf16 vs fp32 untempered), measured on attended tokens."""
    inputs = model_inputs(batch, with_labels=False)
    attended = inputs["attention_mask"].bool()
    with torch.device(next(model.parameters()).device):
        reference = LlamaForCausalLM(model.config)
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        plain = model(**inputs).logits.float()[attended]
        plain_fp32 = reference(**inputs).logits[attended]
        with attention_temperature(model, 1.0):
            identity = torch.equal(model(**inputs).logits.float()[attended], plain)
        with attention_temperature(model, tau):
            tempered = model(**inputs).logits.float()[attended]
        for layer in reference.model.layers:
            layer.self_attn.q_proj.weight.div_(tau)
        tempered_fp32 = reference(**inputs).logits[attended]
    del reference
    floor = (plain - plain_fp32).abs().max().item()
    error = (tempered - tempered_fp32).abs().max().item()
    effect = (tempered_fp32 - plain_fp32).abs().max().item()
    return {
        "ok": identity and error <= 2 * floor and effect > 2 * floor,
        "bf16 error, untempered (floor)": floor,
        "bf16 error, tempered": error,
        "what τ changes (fp32)": effect,
        "τ = 1 bit-identical": identity,
    }


def teacher_agreement(model, tokenizer, forget, retain, args, workdir) -> dict:
    """ASU's forget loss on one batch with the live teacher, the cache and LoRA's teacher."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    values = {}
    for label, cache, use_lora in (
        ("live", False, False),
        ("cache", True, False),
        ("LoRA", False, True),
    ):
        model.load_state_dict(state)
        student = lora.add_lora(model) if use_lora else model
        trainer = build_trainer(
            "asu",
            student,
            tokenizer,
            forget,
            retain,
            workdir / "agreement",
            {**ASU, "temperature": args.tau, "teacher_cache": cache},
            settings(args, 1),
        )
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(args.batch_size)])
        batch = {k: v.to(trainer.args.device) for k, v in batch["forget"].items()}
        trainer.ensure_caches()
        with torch.no_grad():
            values[label] = trainer.forget_objective(trainer.model, batch)[0].item()
        if use_lora:
            trainer.model.unload()
        del trainer
    relative = {k: abs(v - values["live"]) / abs(values["live"]) for k, v in values.items()}
    return {
        "ok": all(math.isfinite(v) for v in values.values())
        and max(relative.values()) <= 2e-2,  # bf16 logits, float16 storage
        **{f"forget loss, {k}": v for k, v in values.items()},
        "largest relative difference": max(relative.values()),
    }


def simu_masks(model, tokenizer, forget, args, workdir) -> tuple[dict, str]:
    dataset = QADataset(forget, tokenizer)
    collate = PadCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    batches = [
        {
            k: v.to(device)
            for k, v in collate(
                [dataset[i] for i in range(s, min(s + args.batch_size, len(dataset)))]
            ).items()
        }
        for s in range(0, len(dataset), args.batch_size)
    ]
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        scores = neurons.neuron_attributions(model, batches, steps=5, progress=False)
        seconds = time.perf_counter() - start
    masks = neurons.critical_neuron_masks(scores, 0.3)
    path = workdir / "simu_masks.safetensors"
    save_masks(masks, path, model=model)
    critical = sum(int(m.sum()) for m in masks.values())
    check = {
        "ok": critical > 0,
        "critical neurons": critical,
        "seconds": seconds,
        "peak MiB": mib(memory),
    }
    return check, str(path)


# -- runs --------------------------------------------------------------------------------------
def settings(args, steps: int) -> RunSettings:
    return RunSettings(
        epochs=1000,
        batch_size=args.batch_size,
        learning_rate=1e-5,
        logging_steps=steps,  # one log line, at the end: no printing inside the timed steps
        extra={"max_steps": steps, "disable_tqdm": True},
    )


def run_row(name, model, state, tokenizer, forget, retain, args, workdir, extra) -> dict:
    method, method_args, use_lora = ROWS[name]
    if method == "asu":
        method_args = {**method_args, "temperature": args.tau}
    model.load_state_dict(state)
    model.requires_grad_(True)
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
            {**method_args, **extra},
            settings(args, args.steps),
        )
        trainer.add_callback(timer)
        trainer.train()
    losses = [h[k] for h in trainer.state.log_history for k in ("loss", "train_loss") if k in h]
    if use_lora:
        trainer.model.unload()
        model.disable_input_require_grads()
    del trainer
    times = timer.times[1:]
    print(f"{name:24s} {statistics.median(times):8.4f} s/step  {mib(memory):9.0f} MiB", flush=True)
    return {
        **summary(times),
        "peak_mib": mib(memory),
        "losses": losses,
        "finite": all(map(math.isfinite, losses)),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.tiny and args.device is None:
        raise SystemExit(
            "no CUDA device: Llama-3.2-1B's shape needs one (or --tiny, or --device cpu)"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    authors = toy.make_authors(24)
    tokenizer = toy.build_tokenizer(toy.corpus_texts(authors))
    rows = [qa for author in authors for qa in author.qa_pairs()]
    forget, retain = rows[: args.forget_size], rows[args.forget_size :]
    model, model_name = build_model(args, tokenizer, device)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    collate = PadCollator(tokenizer.pad_token_id)
    dataset = QADataset(forget, tokenizer)
    batch = {
        k: v.to(device) for k, v in collate([dataset[i] for i in range(args.batch_size)]).items()
    }
    checks = {"attention hook, bf16 SDPA vs fp32": hook_exactness(model, batch, args.tau)}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        checks["ASU teachers agree (live, cache, LoRA)"] = teacher_agreement(
            model, tokenizer, forget, retain, args, workdir
        )
        model.load_state_dict(state)
        checks["SIMU attribution"], mask_path = simu_masks(model, tokenizer, forget, args, workdir)
        # a first run warms up the device and the libraries; its numbers are not kept
        run_row(BASELINE, model, state, tokenizer, forget, retain, args, workdir, {})
        runs = {}
        for name in ROWS:
            extra = {"mask_path": mask_path} if name == "SIMU" else {}
            runs[name] = run_row(
                name, model, state, tokenizer, forget, retain, args, workdir, extra
            )
    checks["every training loss finite"] = {
        "ok": all(r["finite"] for r in runs.values()),
        **{name: r["finite"] for name, r in runs.items()},
    }
    base = runs[BASELINE]
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(
            ["python", "-m", "benchmarks.gpu_smoke", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": {**machine_info(), "device": str(device), "device_name": device_name(device)},
        "versions": versions(),
        "settings": {
            "model": model_name,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": "bfloat16",
            "attention": model.config._attn_implementation,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "tau": args.tau,
        },
        "checks": checks,
        "runs": runs,
        "ratios": {
            name: {
                "time": r["step_seconds"] / base["step_seconds"],
                "memory": r["peak_mib"] / base["peak_mib"] if base["peak_mib"] else None,
            }
            for name, r in runs.items()
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (args.out / f"{args.name}.md").write_text(text)
    print(text)
    return 0 if all(c["ok"] for c in checks.values()) else 1


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def versions() -> dict:
    import peft

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def markdown(result) -> str:
    m, s = result["machine"], result["settings"]
    lines = [
        "# GPU smoke: the methods on a real-sized model, bf16, SDPA",
        "",
        f"Generated by `{result['command']}` on {result['date'][:10]}: device {m['device']} "
        f"({m['device_name']}); torch {result['versions']['torch']}, transformers "
        f"{result['versions']['transformers']}, peft {result['versions']['peft']}. Model: "
        f"{s['model']} ({s['parameters'] / 1e6:.1f}M parameters, {s['dtype']}, "
        f"{s['attention']} attention). Batch {s['batch_size']} forget + {s['batch_size']} retain "
        f"rows of toy authors; {s['steps']} steps a run, the first untimed; ASU τ {s['tau']:g} "
        "on all layers. Memory: peak allocated above the weights (on CPU: resident set size).",
        "",
        "| check | result | numbers |",
        "|---|---|---|",
    ]
    for name, check in result["checks"].items():
        numbers = "; ".join(f"{k}: {fmt(v)}" for k, v in check.items() if k != "ok")
        lines.append(f"| {name} | {'ok' if check['ok'] else '**FAILED**'} | {numbers} |")
    lines += [
        "",
        f"| run | median s / step | spread (s) | peak MiB | time vs {BASELINE} | memory vs {BASELINE} |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in result["runs"].items():
        ratio = result["ratios"][name]
        memory = "—" if ratio["memory"] is None else f"{ratio['memory']:.2f}×"
        lines.append(
            f"| {name} | {run['step_seconds']:.4f} | {run['min_seconds']:.4f}–"
            f"{run['max_seconds']:.4f} | {run['peak_mib']:.0f} | **{ratio['time']:.2f}×** | {memory} |"
        )
    lines.append("")
    return "\n".join(lines)


def fmt(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
