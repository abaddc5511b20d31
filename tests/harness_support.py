"""Running the real open-unlearning harness from tests (the `harness` tier).

The harness is found through OPEN_UNLEARNING_SRC (a checkout with TOFU reachable from its working
directory, e.g. built by `../shared/tools/harness-env DEST` then `source DEST/env.sh`) and run with
HARNESS_PY (a Python that has the harness's requirements and this package installed).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SKIP_REASON = (
    "harness tier: set OPEN_UNLEARNING_SRC to an open-unlearning checkout and HARNESS_PY to a "
    "Python with its requirements and this package installed (README: 'Harness tier')"
)

# The harness's documented CPU smoke overrides (float32, no bf16, no eval, no warm-up epochs).
CPU_TRAIN_OVERRIDES = [
    "~model.model_args.attn_implementation",
    "model.model_args.torch_dtype=float32",
    "trainer.args.bf16=false",
    "trainer.args.bf16_full_eval=false",
    "trainer.args.optim=adamw_torch",
    "trainer.args.warmup_epochs=0",
    "trainer.args.eval_on_start=false",
    "trainer.args.eval_strategy=no",
    "trainer.args.report_to=none",
    "trainer.args.do_eval=false",
    "trainer.args.save_strategy=no",
    "trainer.args.per_device_train_batch_size=2",
    "trainer.args.gradient_accumulation_steps=1",
    "forget_split=forget01",
    "retain_split=retain99",
]


def harness_paths() -> tuple[Path, str]:
    """(checkout, python) or skip the test with the reason."""
    src = os.environ.get("OPEN_UNLEARNING_SRC")
    python = os.environ.get("HARNESS_PY")
    if not src or not python:
        pytest.skip(SKIP_REASON)
    checkout = Path(src)
    if not (checkout / "src" / "train.py").is_file():
        pytest.fail(
            f"OPEN_UNLEARNING_SRC={src} has no src/train.py: not an open-unlearning checkout"
        )
    return checkout, python


def model_overrides(model_dir: Path) -> list[str]:
    return [
        "model=Llama-3.2-1B-Instruct",
        f"model.model_args.pretrained_model_name_or_path={model_dir}",
        f"model.tokenizer_args.pretrained_model_name_or_path={model_dir}",
    ]


def run_harness(script: str, args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    """Run `python src/<script> args...` in the checkout; fail with the log's tail on error."""
    checkout, python = harness_paths()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HYDRA_FULL_ERROR": "1",
    }
    result = subprocess.run(
        [python, f"src/{script}", *args],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-6000:]
        pytest.fail(f"src/{script} failed ({result.returncode}):\n{tail}")
    return result


TINY_MODEL_SCRIPT = """
import sys, torch
from transformers import LlamaForCausalLM
from asu_simu_plugin import toy
tokenizer = toy.build_tokenizer(toy.corpus_texts(toy.make_authors(12)), vocab_size=600)
torch.manual_seed(0)
config = toy.tiny_llama_config(len(tokenizer), hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, max_position_embeddings=512)
model = LlamaForCausalLM(config)
with torch.no_grad():  # peaked attention, so that the attention temperature visibly matters
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight.mul_(8.0)
        layer.self_attn.k_proj.weight.mul_(8.0)
model.save_pretrained(sys.argv[1])
tokenizer.save_pretrained(sys.argv[1])
"""


def save_tiny_harness_model(path: Path) -> Path:
    """A tiny random Llama + the toy chat tokenizer, saved by the harness's own transformers
    (a directory written by transformers 5.x is misread by 4.45)."""
    _, python = harness_paths()
    subprocess.run([python, "-c", TINY_MODEL_SCRIPT, str(path)], check=True, timeout=300)
    return path
