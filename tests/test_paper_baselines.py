"""The ASU paper's baselines (ME, IDK with GD/KL/AP, LLMU): each loss on fixed inputs against an
independent implementation written from the official definitions (`trainer/losses.py` of the
ASU code), and each trainer's total loss assembled by hand."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import LlamaForCausalLM, TrainingArguments

from asu_simu_plugin import registry, standalone, toy
from asu_simu_plugin.arguments import MethodArgumentError
from asu_simu_plugin.methods.idk import IDKArguments, answer_preservation_loss
from asu_simu_plugin.methods.llmu import mismatch_batch
from asu_simu_plugin.methods.maximum_entropy import MEArguments, uniform_kl_loss

V = 40


# -- the official definitions, restated (plain torch, no code of ours) -----------------------------
def official_batch_loss(logits, labels):
    """`get_batch_loss`: summed answer-token NLL per sequence."""
    loss = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="none")
    return loss(logits[..., :-1, :].transpose(-1, -2), labels[..., 1:]).sum(dim=-1)


def official_me_loss(logits, labels):
    """`get_me_loss`: KL(uniform ‖ softmax) over the positions whose label is not -100, pooled."""
    labels, logits = labels[:, 1:], logits[:, :-1, :]
    soft = F.softmax(logits, dim=-1).view(-1, logits.shape[-1])
    uniform = torch.full_like(soft, 1.0 / logits.shape[-1])
    mask = (labels != -100).reshape(-1)
    kl = F.kl_div((soft + 1e-12).log(), uniform, reduction="none").sum(-1)
    return (kl * mask).sum() / mask.sum()


def official_ap_loss(retain_logits, retain_labels, idk_logits, idk_labels, beta):
    loss = official_batch_loss(retain_logits, retain_labels)
    loss_idk = official_batch_loss(idk_logits, idk_labels)
    return -F.logsigmoid(beta * (loss_idk - loss)).mean() / beta


def official_kl_all(logits, ref_logits):
    """The second (effective) `kl_loss`: every position, batchmean over B·T rows."""
    probs = F.log_softmax(logits, dim=-1).view(-1, logits.shape[-1])
    ref = F.log_softmax(ref_logits, dim=-1).view(-1, ref_logits.shape[-1])
    return F.kl_div(probs, ref, reduction="batchmean", log_target=True)


# -- fixed inputs ----------------------------------------------------------------------------------
def fixed_logits(seed, shape=(3, 7, V)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2.0


LABELS = torch.tensor(
    [
        [-100, -100, -100, 5, 6, 7, -100],
        [-100, -100, 9, 10, 11, 12, 13],
        [-100, -100, -100, -100, 4, -100, -100],
    ]
)


def test_me_loss_over_every_position_matches_the_official_mask_false():
    logits = fixed_logits(0)
    every = torch.ones_like(LABELS)  # official mask=false: labels are the whole padded input
    expected = official_me_loss(logits, every)
    assert uniform_kl_loss(logits, LABELS, "all") == pytest.approx(expected.item(), rel=1e-5)
    assert uniform_kl_loss(logits, LABELS, "answer") == pytest.approx(
        official_me_loss(logits, LABELS).item(), rel=1e-5
    )
    # uniform predictions: KL 0; one-hot-like predictions: about log V
    assert uniform_kl_loss(torch.zeros(1, 3, V)).item() == pytest.approx(0.0, abs=1e-6)


def test_ap_loss_matches_the_official_definition():
    answer, refusal = fixed_logits(1), fixed_logits(2)
    refusal_labels = LABELS.roll(1, dims=0)
    for beta in (0.1, 1.0):
        ours = answer_preservation_loss(answer, LABELS, refusal, refusal_labels, beta)
        expected = official_ap_loss(answer, LABELS, refusal, refusal_labels, beta)
        assert ours.item() == pytest.approx(expected.item(), rel=1e-6)


def test_mismatch_batch_pairs_each_forget_prompt_with_the_retain_answer_beside_it():
    forget = {
        "input_ids": torch.tensor([[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]]),
        "labels": torch.tensor([[-100, -100, -100, 4, 5, -100], [-100, -100, 8, 9, -100, -100]]),
    }
    retain = {
        "input_ids": torch.tensor([[11, 12, 13, 14, 15], [16, 17, 18, 19, 20]]),
        "attention_mask": torch.ones(2, 5, dtype=torch.long),
        "labels": torch.tensor([[-100, -100, 13, 14, 15], [-100, -100, -100, -100, 20]]),
    }
    batch = mismatch_batch(forget, retain, pad_token_id=0)
    # row 0: forget prompt [1, 2, 3] + retain answer [13, 14, 15]; row 1: [6, 7] + [20]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 13, 14, 15], [6, 7, 20, 0, 0, 0]]
    assert batch["labels"].tolist() == [
        [-100, -100, -100, 13, 14, 15],
        [-100, -100, 20, -100, -100, -100],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]


# -- the trainers' total losses --------------------------------------------------------------------
@pytest.fixture
def tiny(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(toy.tiny_llama_config(V))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    return model, args


def qa(seed, batch=2, length=6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (batch, length), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def nll(model, batch):
    return model(**batch).loss


def test_me_trainer_total_loss(tiny):
    model, args = tiny
    trainer = standalone.ME(model=model, args=args, retain_loss_type="NLL")
    forget, retain = qa(1), qa(2)
    loss = trainer.compute_loss(model, {"forget": forget, "retain": retain})
    logits = model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"]).logits
    every = official_me_loss(logits, torch.ones_like(forget["labels"]))
    assert trainer.gamma == 0.1  # the official ME forget weight is the default
    assert loss.item() == pytest.approx((0.1 * every + nll(model, retain)).item(), rel=1e-5)


@pytest.mark.parametrize("retain_loss_type", ["NLL", "AP"])
def test_idk_trainer_total_loss(tiny, retain_loss_type):
    model, args = tiny
    trainer = standalone.IDK(model=model, args=args, retain_loss_type=retain_loss_type)
    forget = {"original": qa(1), "alternate": qa(3)}
    retain = {"original": qa(2), "alternate": qa(4)}
    loss = trainer.compute_loss(model, {"forget": forget, "retain": retain})
    if retain_loss_type == "NLL":
        retain_term = nll(model, retain["original"])
    else:
        retain_term = official_ap_loss(
            model(**retain["original"]).logits,
            retain["original"]["labels"],
            model(**retain["alternate"]).logits,
            retain["alternate"]["labels"],
            0.1,
        )
    expected = 1.0 * nll(model, forget["alternate"]) + retain_term
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_idk_without_refusals_says_what_data_it_needs(tiny):
    model, args = tiny
    trainer = standalone.IDK(model=model, args=args)
    with pytest.raises(ValueError, match="QAwithIdkDataset"):
        trainer.compute_loss(model, {"forget": qa(1), "retain": qa(2)})


def test_llmu_trainer_total_loss(tiny):
    model, args = tiny
    reference = copy.deepcopy(model)
    trainer = standalone.LLMU(model=model, args=args)
    assert trainer.retain_loss_type == "KL_ALL"
    forget, retain = qa(1), qa(2)
    with torch.no_grad():  # move the model off its frozen original, so that the KL is not 0
        model.model.embed_tokens.weight.add_(0.01)
    loss = trainer.compute_loss(model, {"forget": forget, "retain": retain})
    # the mismatched pairs by hand: forget prompt (3 tokens) + retain answer (3 tokens)
    mismatch_ids = torch.cat([forget["input_ids"][:, :3], retain["input_ids"][:, 3:]], dim=1)
    mismatch_labels = mismatch_ids.clone()
    mismatch_labels[:, :3] = -100
    mismatch = {"input_ids": mismatch_ids, "labels": mismatch_labels}
    kl = official_kl_all(
        model(input_ids=retain["input_ids"]).logits, reference(input_ids=retain["input_ids"]).logits
    )
    expected = -nll(model, forget) + nll(model, mismatch) + kl
    assert kl.item() > 0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_baseline_arguments_are_checked():
    assert IDKArguments(retain_loss_type="AP").beta == 0.1
    with pytest.raises(MethodArgumentError, match="retain_loss_type='AP' is not supported"):
        MEArguments(retain_loss_type="AP")  # AP needs refusals: IDK only
    with pytest.raises(MethodArgumentError, match="positions='prompt' is not supported"):
        MEArguments(positions="prompt")
    with pytest.raises(MethodArgumentError, match="beta must be > 0"):
        IDKArguments(beta=0)


# -- the presets -----------------------------------------------------------------------------------
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER = CONFIGS / "experiment" / "unlearn" / "tofu" / "paper"
OFFICIAL_FORGET_WEIGHT = {"ASU": 0.1, "ME": 0.1, "IDK": 1.0, "LLMU": 1.0}
RETAIN = {"GD": "NLL", "KL": "KL_ALL", "AP": "AP"}


def load(path):
    """A config as Hydra reads it (OmegaConf: 1e-5 is a number), interpolations unresolved."""
    return OmegaConf.to_container(OmegaConf.load(path))


def test_tofu_presets_carry_the_official_settings():
    setting = load(PAPER / "setting.yaml")["trainer"]["args"]
    assert (setting["learning_rate"], setting["num_train_epochs"]) == (1e-5, 5)
    assert (setting["per_device_train_batch_size"], setting["gradient_accumulation_steps"]) == (
        4,
        4,
    )
    assert (setting["weight_decay"], setting["seed"]) == (0.01, 1001)
    asu = load(CONFIGS / "experiment" / "unlearn" / "tofu" / "asu_paper.yaml")["trainer"]
    assert asu["method_args"]["temperature"] == 2.3 and asu["method_args"]["layers"] is None
    presets = sorted(p.stem for p in PAPER.glob("*.yaml") if p.stem != "setting")
    assert presets == ["ASU_GD", "ASU_KL", "IDK_AP", "IDK_GD", "IDK_KL", "LLMU", "ME_GD", "ME_KL"]
    for name in presets:
        config = load(PAPER / f"{name}.yaml")
        if name.startswith("ASU"):
            args = {**asu["method_args"], **(config.get("trainer") or {}).get("method_args", {})}
        else:
            args = config["trainer"]["method_args"]
            trainer = next(d["override /trainer"] for d in config["defaults"] if isinstance(d, dict) and "override /trainer" in d)  # fmt: skip
            assert trainer == name.split("_")[0]
            registry.get_method(trainer).arguments.from_values(args, trainer)  # all valid
        method, _, retain = name.partition("_")
        assert args["gamma"] == OFFICIAL_FORGET_WEIGHT[method]
        assert args["retain_loss_type"] == RETAIN.get(retain, "KL_ALL")  # LLMU: KL_ALL


def test_real_world_presets_carry_the_official_settings():
    config = load(CONFIGS / "experiment" / "unlearn" / "real_world" / "asu_paper.yaml")
    args, method = config["trainer"]["args"], config["trainer"]["method_args"]
    assert (method["temperature"], method["layers"], method["gamma"]) == (2.7, None, 0.05)
    assert (args["learning_rate"], args["num_train_epochs"]) == (5e-6, 5)
    assert config["eval"]["lm_eval"]["tasks"] == [
        "arc_challenge",
        "mmlu",
        "truthfulqa_mc1",
        "gsm8k",
    ]
    metrics_cfg = load(CONFIGS / "eval" / "asu_paper_real_world.yaml")["metrics"]
    assert len(metrics_cfg["paper_model_utility"]["pre_compute"]) == 6
    assert {metrics_cfg[f"{s}_Entailment_Score"]["direction"] for s in ("neighbor", "forget")} == {
        "answer_to_reference"
    }
    assert metrics_cfg["forget_Truth_Ratio"]["forget"] is True
