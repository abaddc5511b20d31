"""Running the real open-unlearning harness from tests (the `harness` tier).

The harness is found through OPEN_UNLEARNING_SRC (a checkout with TOFU reachable from its working
directory, e.g. built by `../shared/tools/harness-env DEST` then `source DEST/env.sh`) and run with
HARNESS_PY (a Python that has the harness's requirements and this package installed).
"""

from __future__ import annotations

import os
import shutil
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


def model_overrides(model_dir: Path, config: str = "Llama-3.2-1B-Instruct") -> list[str]:
    return [
        f"model={config}",
        f"model.model_args.pretrained_model_name_or_path={model_dir}",
        f"model.tokenizer_args.pretrained_model_name_or_path={model_dir}",
    ]


def run_harness(
    script: str,
    args: list[str],
    timeout: int = 900,
    cwd: Path | None = None,
    python: str | None = None,
    checkout: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run `python src/<script> args...` in the checkout (or in `cwd`, where the harness's
    relative data paths then resolve); fail with the log's tail on error. `python`, `checkout`
    and `env` (extra variables) replace HARNESS_PY, OPEN_UNLEARNING_SRC and add to the
    environment."""
    default_checkout, default_python = harness_paths()
    checkout = checkout or default_checkout
    python = python or default_python
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HYDRA_FULL_ERROR": "1",
        **(env or {}),
    }
    result = subprocess.run(
        [python, str(checkout / "src" / script), *args],
        cwd=cwd or checkout,
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
                               num_hidden_layers=int(sys.argv[2]), max_position_embeddings=512)
model = LlamaForCausalLM(config)
with torch.no_grad():  # peaked attention, so that the attention temperature visibly matters
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight.mul_(8.0)
        layer.self_attn.k_proj.weight.mul_(8.0)
model.save_pretrained(sys.argv[1])
tokenizer.save_pretrained(sys.argv[1])
"""


def save_tiny_harness_model(path: Path, num_layers: int = 2) -> Path:
    """A tiny random Llama + the toy chat tokenizer, saved by the harness's own transformers
    (a directory written by transformers 5.x is misread by 4.45)."""
    _, python = harness_paths()
    subprocess.run(
        [python, "-c", TINY_MODEL_SCRIPT, str(path), str(num_layers)], check=True, timeout=300
    )
    return path


REPO_ROOT = Path(__file__).resolve().parent.parent
OUR_DIST = "asu_simu_plugin"
# Build leftovers and caches never belong in a copy of the sources.
SOURCE_IGNORE = (
    ".git",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
)


def copy_sources(dest: Path) -> Path:
    """This repository's files (as they are now), without build leftovers."""
    shutil.copytree(REPO_ROOT, dest, ignore=shutil.ignore_patterns(*SOURCE_IGNORE))
    return dest


def _is_ours(name: str) -> bool:
    return name.startswith((OUR_DIST, f"__editable__.{OUR_DIST}", f"__editable___{OUR_DIST}"))


def venv_without_us(dest: Path) -> str:
    """A fresh venv that sees every package of HARNESS_PY's venv except this one.

    HARNESS_PY's site-packages entries are linked in one by one (seconds, no copy of torch),
    leaving out asu-simu-plugin (installed or editable) and our `hydra_plugins` portion, so that
    whatever is then installed into the new venv is the only copy of us it sees. Returns its
    python.
    """
    _, python = harness_paths()
    query = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.check_output([python, "-c", query], text=True).strip())
    subprocess.run([python, "-m", "venv", "--without-pip", str(dest)], check=True)
    new_python = str(dest / "bin" / "python")
    new_site = Path(subprocess.check_output([new_python, "-c", query], text=True).strip())
    for entry in site.iterdir():
        if _is_ours(entry.name):
            continue
        if entry.name == "hydra_plugins":  # a namespace other plugins share: link theirs only
            (new_site / entry.name).mkdir()
            for plugin in entry.iterdir():
                if not _is_ours(plugin.name):
                    (new_site / entry.name / plugin.name).symlink_to(plugin)
            continue
        (new_site / entry.name).symlink_to(entry)
    return new_python


def install_into_fresh_venv(dest: Path, editable: bool) -> str:
    """`pip install [-e] <copy of this repo>` into `venv_without_us`; returns its python.

    The dependencies are HARNESS_PY's (linked), so pip installs only us (`--no-deps`); the
    build uses the venv's own setuptools (`--no-build-isolation`: offline, seconds).
    """
    python = venv_without_us(dest / "venv")
    source = copy_sources(dest / "source")
    target = ["-e", str(source)] if editable else [str(source)]
    for isolation in (["--no-build-isolation"], []):  # isolated (PyPI) if setuptools is too old
        command = [python, "-m", "pip", "install", "-q", "--no-deps", *isolation, *target]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode == 0:
            return python
    pytest.fail(f"{' '.join(command[1:])} failed:\n{result.stderr[-4000:]}")
