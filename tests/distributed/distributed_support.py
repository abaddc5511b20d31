"""Launching `launch_trainer.py` with several processes and reading what each rank wrote."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "launch_trainer.py"


def free_port() -> int:
    """A port nobody listens on, so parallel runs do not collide."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def quiet_env(**extra) -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **extra,
    }


def torchrun(out: Path, spec: dict, processes: int = 2, timeout: int = 600) -> list[dict]:
    """Run the spec under torchrun (DDP with gloo when processes > 1); each rank's record."""
    spec = {**spec, "settings": {**spec["settings"], "ddp_backend": "gloo"}}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={processes}",
        f"--master_port={free_port()}",
        str(SCRIPT),
        str(out),
        json.dumps(spec),
    ]
    return run(command, out, processes, timeout)


def run(command, out: Path, processes: int, timeout: int, env=None) -> list[dict]:
    result = subprocess.run(
        command, env=env or quiet_env(), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


def final_tensors(out: Path) -> dict:
    return load_file(out / "final.safetensors")
