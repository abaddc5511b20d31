"""Our MUSE and WMDP experiments on the real harness's own MUSE / WMDP loaders and metrics.

MUSE-News runs read the shared offline copy (`muse-bench/MUSE-News` reachable from the checkout;
`sust/forget_2` stands in for MUSE's retain corpus `raw/retain1`, which is not shipped). WMDP
runs read a small stand-in of the gated `wmdp-corpora` that the test writes in the harness's
layout (`data/wmdp/wmdp-corpora/<split>-{forget,retain}-corpus.jsonl`, relative to the working
directory) into a temporary working directory.

What reaches the trainer is read from inside the harness process: a `sitecustomize` module on
PYTHONPATH wraps `transformers.Trainer.train` and dumps the constructed trainer's settings.
"""

from __future__ import annotations

import json

import pytest
import torch
from harness_support import (
    CPU_TRAIN_OVERRIDES,
    harness_paths,
    model_overrides,
    run_harness,
    save_tiny_harness_model,
)
from safetensors.torch import load_file

pytestmark = pytest.mark.harness

# The harness's CPU smoke overrides without the TOFU-only keys (MUSE / WMDP trainer args have no
# warmup_epochs; the splits are set per test).
CPU_OVERRIDES = [
    o
    for o in CPU_TRAIN_OVERRIDES
    if not o.startswith(("trainer.args.warmup_epochs", "forget_split", "retain_split"))
]
# MUSE-News offline: four forget articles, four of the retain stand-in, 32-token chunks.
MUSE_NEWS_DATA = [
    "data_split=News",
    'forget_split="forget[:4]"',
    'retain_split="forget_2[:4]"',
    "data.retain.MUSE_retain.args.hf_args.name=sust",
    "data.forget.MUSE_forget.args.max_length=32",
    "data.retain.MUSE_retain.args.max_length=32",
]
MUSE_PRESETS = {"News": (2.0, 0.35), "Books": (2.35, 0.001)}  # configs/experiment/unlearn/muse/asu

TRAINER_DUMP_HOOK = """
import json, os
import transformers

_train = transformers.Trainer.train


def _setting(obj, name):
    value = getattr(obj, name, None)
    return value if isinstance(value, (int, float, str, bool, list, type(None))) else repr(value)


def train(self, *args, **kwargs):
    out = _train(self, *args, **kwargs)
    teacher = getattr(self, "teacher_temperature", None)
    record = {
        "trainer": type(self).__name__,
        "teacher_temperature": getattr(teacher, "temperature", None),
        "trainable": [n for n, p in self.model.named_parameters() if p.requires_grad],
        "args": {k: _setting(self.args, k) for k in
                 ("learning_rate", "weight_decay", "lr_scheduler_type", "max_steps")},
    }
    for name in ("temperature", "gamma", "alpha", "retain_loss_type", "forget_loss_type",
                 "embed_layer"):
        record[name] = _setting(self, name)
    with open(os.environ["TRAINER_SETTINGS_DUMP"], "w") as fh:
        json.dump(record, fh)
    return out


transformers.Trainer.train = train
"""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_harness_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def trainer_settings(tmp_path, monkeypatch):
    """Path of the JSON the harness process writes with the settings its trainer ran with."""
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(TRAINER_DUMP_HOOK)
    monkeypatch.setenv("PYTHONPATH", str(hook_dir))
    dump = tmp_path / "trainer_settings.json"
    monkeypatch.setenv("TRAINER_SETTINGS_DUMP", str(dump))
    return dump


def train(model_dir, out, *overrides, model_config="Llama-2-7b-hf", cwd=None, steps=2):
    return run_harness(
        "train.py",
        [
            "--config-name=unlearn.yaml",
            *overrides,
            f"task_name={out.name}",
            *model_overrides(model_dir, model_config),
            *CPU_OVERRIDES,
            f"++trainer.args.max_steps={steps}",
            "trainer.args.logging_steps=1",
            f"paths.output_dir={out}",
        ],
        cwd=cwd,
    )


def logged(out, key):
    """The values of `key` in the training log lines, one per step (logging_steps=1)."""
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [line[key] for line in history if key in line]


def printed_config(result):
    """The config a `--cfg job` harness run printed, without the log lines deepspeed writes to
    stdout on import."""
    import yaml

    printed = "\n".join(line for line in result.stdout.splitlines() if not line.startswith("["))
    return yaml.safe_load(printed)


@pytest.mark.parametrize("split", ["News", "Books"])
def test_muse_asu_presets_compose_per_split(split):
    result = run_harness(
        "train.py",
        [
            "--config-name=unlearn.yaml",
            "experiment=unlearn/muse/asu",
            f"data_split={split}",
            "task_name=compose",
            "--cfg",
            "job",
            "--resolve",
        ],
        timeout=300,
    )
    trainer = printed_config(result)["trainer"]
    temperature, gamma = MUSE_PRESETS[split]
    assert trainer["handler"] == "ASU"
    assert trainer["method_args"]["temperature"] == temperature
    assert trainer["method_args"]["gamma"] == gamma
    assert trainer["args"]["lr_scheduler_type"] == "constant"  # the harness's MUSE schedule


@pytest.mark.parametrize(
    ("experiment", "model", "summary_metric"),
    [
        ("eval/muse/asu_teacher", "Llama-2-7b-hf", "forget_verbmem_ROUGE"),
        ("eval/tofu/asu_teacher", "SmolLM2-135M-Instruct", "forget_quality"),
    ],
)
def test_teacher_evaluations_keep_the_tempered_handler_under_a_model_choice(
    experiment, model, summary_metric
):
    """What the mini benchmarks run to score an ASU row's teacher: a `model=` choice on the
    command line must not drop the experiment's model handler or its temperature settings."""
    result = run_harness(
        "eval.py",
        [
            f"experiment={experiment}",
            f"model={model}",
            "model.model_args.temperature=4.0",
            "model.model_args.temperature_layers=[20,21]",
            "task_name=compose",
            "--cfg",
            "job",
        ],
        timeout=300,
    )
    config = printed_config(result)
    assert config["model"]["model_handler"] == "TemperedCausalLM"
    assert config["model"]["model_args"]["temperature"] == 4.0
    assert config["model"]["model_args"]["temperature_layers"] == [20, 21]
    (benchmark,) = config["eval"].values()  # the experiment's own metrics, unchanged
    assert summary_metric in benchmark["metrics"]


@pytest.mark.parametrize("retain_loss_type", ["NLL", "KL"])
def test_muse_news_asu_trains_with_the_news_preset(
    tiny_model, tmp_path, trainer_settings, retain_loss_type
):
    out = tmp_path / f"asu_{retain_loss_type}"
    train(
        tiny_model,
        out,
        "experiment=unlearn/muse/asu",
        *MUSE_NEWS_DATA,
        f"trainer.method_args.retain_loss_type={retain_loss_type}",
    )
    settings = json.loads(trainer_settings.read_text())
    temperature, gamma = MUSE_PRESETS["News"]
    assert settings["trainer"] == "ASU"
    assert settings["teacher_temperature"] == temperature  # the hook on the teacher
    assert settings["temperature"] == temperature
    assert settings["gamma"] == gamma and settings["alpha"] == 1.0
    assert settings["retain_loss_type"] == retain_loss_type
    assert settings["args"]["learning_rate"] == 1e-5
    assert settings["args"]["lr_scheduler_type"] == "constant"
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    forget, retain = logged(out, "asu/forget_loss"), logged(out, "asu/retain_loss")
    assert len(forget) == 2 and all(v > 0 for v in forget)  # τ = 2 teacher ≠ student
    if retain_loss_type == "KL":
        # step 1: the student is still the original, so KL(original ‖ student) is exactly 0
        assert retain[0] == pytest.approx(0.0, abs=1e-6) and retain[1] > 0
    else:
        assert retain[0] > 1.0  # LM loss of a random model on news text
    assert (out / "model.safetensors").is_file()


def test_muse_news_simu_trains(tiny_model, tmp_path, trainer_settings):
    out = tmp_path / "simu"
    train(
        tiny_model,
        out,
        "experiment=unlearn/muse/simu",
        *MUSE_NEWS_DATA,
        "trainer.method_args.steps=2",
    )
    settings = json.loads(trainer_settings.read_text())
    assert settings["trainer"] == "SIMU"
    assert settings["args"]["learning_rate"] == 5e-6 and settings["args"]["weight_decay"] == 0.1
    assert settings["args"]["lr_scheduler_type"] == "constant"
    record = json.loads((out / "simu_masks.json").read_text())
    assert record["steps"] == 2 and record["critical_total"] > 0
    assert (out / "simu_masks.safetensors").is_file()


def test_muse_eval_cut_down_scores_the_tiny_model(tiny_model, tmp_path):
    m = "eval.muse.metrics"
    mia = f"{m}.privleak.pre_compute.mia_min_k.datasets"
    out = tmp_path / "muse_eval"
    run_harness(
        "eval.py",
        [
            "experiment=eval/muse/default",
            "data_split=News",
            f"task_name={out.name}",
            *model_overrides(tiny_model, "Llama-2-7b-hf"),
            "~model.model_args.attn_implementation",
            "model.model_args.torch_dtype=float32",
            "model.model_args.device_map=cpu",
            f"paths.output_dir={out}",
            f'{m}.forget_knowmem_ROUGE.datasets.MUSE_forget_knowmem.args.hf_args.split="forget_qa[:3]"',
            f'{m}.retain_knowmem_ROUGE.datasets.MUSE_retain_knowmem.args.hf_args.split="retain_qa[:3]"',
            f'{m}.forget_verbmem_ROUGE.datasets.MUSE_forget_verbmem.args.hf_args.split="forget[:3]"',
            f"{m}.forget_verbmem_ROUGE.datasets.MUSE_forget_verbmem.args.max_length=8",
            f'{m}.extraction_strength.datasets.MUSE_forget_verbmem.args.hf_args.split="forget[:3]"',
            f"{m}.extraction_strength.datasets.MUSE_forget_verbmem.args.max_length=8",
            f'{mia}.MUSE_MIA_forget.args.hf_args.split="forget[:3]"',
            f'{mia}.MUSE_MIA_holdout.args.hf_args.split="holdout[:3]"',
            f"{mia}.MUSE_MIA_forget.args.max_length=64",
            f"{mia}.MUSE_MIA_holdout.args.max_length=64",
            f"{m}.forget_knowmem_ROUGE.generation_args.max_new_tokens=4",
            f"{m}.retain_knowmem_ROUGE.generation_args.max_new_tokens=4",
            f"{m}.forget_verbmem_ROUGE.generation_args.max_new_tokens=8",
        ],
    )
    summary = json.loads((out / "MUSE_SUMMARY.json").read_text())
    per_item = json.loads((out / "MUSE_EVAL.json").read_text())
    for metric in (
        "forget_knowmem_ROUGE",
        "retain_knowmem_ROUGE",
        "forget_verbmem_ROUGE",
        "extraction_strength",
    ):
        assert 0.0 <= summary[metric] <= 1.0
        assert len(per_item[metric]["value_by_index"]) == 3  # the cut-down rows, no more
    # privleak = (AUC_ref − AUC) / (1 − AUC_ref) · 100 with the default reference AUC 0.5
    auc = per_item["mia_min_k"]["agg_value"]
    assert summary["privleak"] == pytest.approx((0.5 - auc) / 0.5 * 100, abs=1e-6)


def write_wmdp_stand_in(root, split="cyber", rows=8):
    """`data/wmdp/wmdp-corpora/<split>-{forget,retain}-corpus.jsonl` under `root`, the layout
    `setup_data.py --wmdp` unpacks; a stand-in for the gated corpora (one JSON object a line)."""
    from asu_simu_plugin import toy

    texts = toy.corpus_texts(toy.make_authors(12))
    folder = root / "data" / "wmdp" / "wmdp-corpora"
    folder.mkdir(parents=True)
    for part, chunk in (("forget", texts[:rows]), ("retain", texts[rows : 2 * rows])):
        lines = [json.dumps({"text": t}) for t in chunk]
        (folder / f"{split}-{part}-corpus.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_wmdp_asu_embedding_variant_moves_only_the_named_down_proj(
    tmp_path_factory, tmp_path, trainer_settings
):
    # eight layers: the variant reads layer 7 and trains down_proj of layers 5-7
    source = save_tiny_harness_model(tmp_path_factory.mktemp("tiny8") / "model", num_layers=8)
    workdir = tmp_path / "wmdp_cwd"
    write_wmdp_stand_in(workdir)
    out = tmp_path / "wmdp_asu"
    train(
        source,
        out,
        "experiment=unlearn/wmdp/asu",
        "data_split=cyber",
        "data.forget.WMDP_forget.args.max_length=32",
        "data.retain.WMDP_retain.args.max_length=32",
        "trainer.args.learning_rate=1e-2",  # large, so that 2 steps visibly move the weights
        model_config="zephyr-7b-beta",
        cwd=workdir,
    )
    named = [f"model.layers.{i}.mlp.down_proj.weight" for i in (5, 6, 7)]
    settings = json.loads(trainer_settings.read_text())
    assert settings["trainer"] == "ASU"
    assert settings["forget_loss_type"] == settings["retain_loss_type"] == "EMBED_MSE"
    assert settings["teacher_temperature"] == 100.0 and settings["embed_layer"] == 7
    assert sorted(settings["trainable"]) == named
    before = load_file(source / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    moved = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert moved == named  # every other weight bit-identical to the source model
    loss = logged(out, "asu/forget_loss")
    assert len(loss) == 2 and all(v > 0 for v in loss)


def test_wmdp_stand_in_layout_matches_the_harness_configs(tmp_path):
    """The stand-in's file names are the ones the harness's WMDP configs point at."""
    checkout, _ = harness_paths()
    folder = write_wmdp_stand_in(tmp_path)
    for part in ("forget", "retain"):
        config = (checkout / "configs" / "data" / "datasets" / f"WMDP_{part}.yaml").read_text()
        expected = f"data/wmdp/wmdp-corpora/cyber-{part}-corpus.jsonl"
        assert expected in config
        assert (tmp_path / expected) == folder / f"cyber-{part}-corpus.jsonl"
        assert (tmp_path / expected).is_file()
