"""Launching `launch_trainer.py` with several processes and reading what each rank wrote."""

from __future__ import annotations

import functools
import json
import os
import shutil
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


ACCELERATE_CONFIGS = {stage: HERE / f"zero{stage}.yaml" for stage in (1, 2, 3)}


@functools.cache
def deepspeed_python() -> str | None:
    """A Python that can import deepspeed (and this package): ASU_SIMU_DEEPSPEED_PY, HARNESS_PY
    (the harness's requirements include deepspeed), or this one."""
    candidates = [os.environ.get("ASU_SIMU_DEEPSPEED_PY"), os.environ.get("HARNESS_PY")]
    for python in [c for c in candidates if c] + [sys.executable]:
        probe = [python, "-c", "import deepspeed, asu_simu_plugin"]
        if subprocess.run(probe, capture_output=True, env=quiet_env()).returncode == 0:
            return python
    return None


def require_deepspeed() -> str:
    import pytest

    python = deepspeed_python()
    if python is None:
        pytest.skip(
            "DeepSpeed tier: no Python with deepspeed and asu_simu_plugin (set "
            "ASU_SIMU_DEEPSPEED_PY or HARNESS_PY; `pip install asu-simu-plugin[deepspeed]`)"
        )
    return python


def accelerate_config(stage: int, dest: Path) -> Path:
    """tests/distributed/zero<stage>.yaml with its DeepSpeed JSON path made absolute."""
    text = ACCELERATE_CONFIGS[stage].read_text()
    text = text.replace(f"tests/distributed/zero{stage}.json", str(HERE / f"zero{stage}.json"))
    config = dest / f"zero{stage}.yaml"
    config.write_text(text)
    return config


def deepspeed_launch(
    out: Path, spec: dict, stage: int, timeout: int = 900, env: dict | None = None
) -> list[dict]:
    """The spec in 2 processes under accelerate + DeepSpeed ZeRO-<stage> (gloo on CPU); `env`:
    extra environment variables."""
    python = require_deepspeed()
    out.mkdir(parents=True, exist_ok=True)
    command = [
        python,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(accelerate_config(stage, out)),
        "--main_process_port",
        str(free_port()),
        str(SCRIPT),
        str(out),
        json.dumps(spec),
    ]
    return run(command, out, 2, timeout, env=quiet_env(**(env or {})))


def single_process(out: Path, spec: dict, python: str | None = None, timeout: int = 900):
    command = [python or sys.executable, str(SCRIPT), str(out), json.dumps(spec)]
    out.mkdir(parents=True, exist_ok=True)
    return run(command, out, 1, timeout)


def numactl_available() -> bool:
    return shutil.which("numactl") is not None
