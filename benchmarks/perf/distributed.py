"""The 2-process rows of `benchmarks.perf.perf --distributed`: each row's processes run
`python -m benchmarks.perf.perf --worker SPEC` (DDP through torchrun, DeepSpeed ZeRO-2 through
accelerate) from the repository root."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers

from asu_simu_plugin.runner import build_trainer
from benchmarks.perf.measure import StepTimer, summary

REPO = Path(__file__).resolve().parents[2]

# 2-process rows (--distributed): name: (launcher, RUNS entry)
DISTRIBUTED_RUNS = {
    "GradDiff (NLL), DDP ×2": ("ddp", "GradDiff (NLL)"),
    "SOGradDiff, DDP ×2": ("ddp", "SOGradDiff"),
    "GradDiff (NLL), ZeRO-2 ×2": ("zero2", "GradDiff (NLL)"),
    "SOGradDiff, ZeRO-2 ×2": ("zero2", "SOGradDiff"),
}
ZERO2_CONFIG = REPO / "tests" / "distributed" / "zero2.yaml"


def distributed_rows(args, workdir) -> dict:
    """Per-step time of 2-process runs (each process half the batch), launched as workers."""
    rows = {}
    for name, (launcher, row) in DISTRIBUTED_RUNS.items():
        if launcher == "zero2" and importlib.util.find_spec("deepspeed") is None:
            print(f"{name}: skipped (deepspeed is not importable here)")
            continue
        out = workdir / f"worker-{len(rows)}.json"
        spec = json.dumps({"row": row, "out": str(out), "argv": _worker_argv(args)})
        script = ["-m", "benchmarks.perf.perf", "--worker", spec]
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
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
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
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def worker(spec: dict) -> None:
    """One process of a 2-process row: time its steps; rank 0 writes the summary."""
    from benchmarks.perf.perf import (
        load_model_and_tokenizer,
        parse_args,
        qa_rows,
        run_steps,
        settings_for,
        shipped_configuration,
    )

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
