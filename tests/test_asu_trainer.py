"""The ASU trainer (standalone base): one frozen copy, exact loss, forgetting, clean output."""

from __future__ import annotations

import copy
import csv
import json
import types

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from asu_simu_plugin import attention, losses, toy
from asu_simu_plugin.attention import attention_temperature
from asu_simu_plugin.data import PadCollator, QADataset
from asu_simu_plugin.demo import finetune
from asu_simu_plugin.diagnostics import answer_probability
from asu_simu_plugin.methods.asu import ASUArguments
from asu_simu_plugin.output import RUN_FILE
from asu_simu_plugin.runner import RunSettings, build_trainer, run_unlearning

EMBED = {"forget_loss_type": "EMBED_MSE", "retain_loss_type": "EMBED_MSE", "embed_layer": 1}


pytestmark = pytest.mark.usefixtures("single_thread")


def toy_llama(tokenizer, peaked: bool = True):
    torch.manual_seed(0)
    model = LlamaForCausalLM(toy.tiny_llama_config(len(tokenizer)))
    if peaked:  # peaked attention and outputs, so that the temperature changes the output a lot
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(4)
                layer.self_attn.k_proj.weight.mul_(4)
            model.lm_head.weight.mul_(20)
    return model


@pytest.fixture
def world(toy_authors, toy_tokenizer):
    forget = toy_authors[0].qa_pairs()
    retain = [qa for a in toy_authors[1:3] for qa in a.qa_pairs()]
    return toy_llama(toy_tokenizer), toy_tokenizer, forget, retain


def asu(world, out, settings=None, **method_args):
    model, tokenizer, forget, retain = world
    settings = settings or RunSettings(epochs=1, batch_size=5, learning_rate=1e-3)
    return build_trainer("asu", model, tokenizer, forget, retain, out, method_args, settings)


def steps(n: int, **kwargs) -> RunSettings:
    extra = {"max_steps": n, "disable_tqdm": True}
    return RunSettings(epochs=1, batch_size=5, learning_rate=1e-3, extra=extra, **kwargs)


def reachable_float_bytes(root) -> int:
    """Bytes of distinct floating-point tensor storage reachable from `root`.

    Follows instance attributes, containers, bound methods and closures (not classes, modules
    or globals), so a model copy hidden anywhere in the trainer's object graph is counted.
    """
    seen, storages, stack = set(), {}, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point():
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, type | types.ModuleType | str | bytes | int | float):
            continue
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
        elif isinstance(obj, types.MethodType):
            stack.append(obj.__self__)
        elif isinstance(obj, types.FunctionType):
            for cell in obj.__closure__ or ():
                try:
                    stack.append(cell.cell_contents)
                except ValueError:  # an empty cell
                    pass
        else:
            try:
                stack.append(vars(obj))
            except TypeError:  # no __dict__ (C objects)
                pass
    return sum(storages.values())


def float_bytes(model) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t.is_floating_point())


def forward_hooks(model) -> dict[str, int]:
    return {name: len(m._forward_hooks) for name, m in model.named_modules() if m._forward_hooks}


def tempering(model) -> dict[str, str]:
    """Where an attention temperature sits: forward hooks (the query route) or an attention
    module whose `scaling` is no longer 1/√head_dim (the scaling route, transformers >= 4.48)."""
    found = {name: "hook" for name in forward_hooks(model)}
    for name, module in model.named_modules():
        scaling = vars(module).get("scaling")
        if isinstance(scaling, float) and scaling != module.head_dim**-0.5:
            found[name] = "scaling"
    return found


def tempered(layers) -> dict[str, str]:
    """What `tempering` finds on a teacher tempered on `layers` (by transformers version)."""
    if attention.SCALING_ROUTE:
        return {f"model.layers.{i}.self_attn": "scaling" for i in layers}
    return {f"model.layers.{i}.self_attn.q_proj": "hook" for i in layers}


@pytest.mark.parametrize(
    "args",
    [
        {"retain_loss_type": "NLL"},
        {"retain_loss_type": "KL"},
        {"retain_loss_type": "KL_ALL"},
        {"forget_loss_type": "EMBED_MSE", "embed_layer": 1},
        EMBED,
    ],
    ids=["NLL", "KL", "KL_ALL", "EMBED_MSE-forget", "EMBED_MSE-both"],
)
def test_one_frozen_copy_serves_teacher_and_reference(world, tmp_path, args):
    trainer = asu(world, tmp_path, **args)
    model, teacher = trainer.model, trainer.ref_model
    n = sum(p.numel() for p in model.parameters())
    modules = [m for m in vars(trainer).values() if isinstance(m, torch.nn.Module)]
    held = {p.data_ptr(): p.numel() for m in modules for p in m.parameters()}
    assert sum(held.values()) == 2 * n  # the student and exactly one copy
    assert {id(m) for m in modules} == {id(model), id(teacher)}
    assert trainer.teacher_temperature._model is teacher  # the temperature sits on that copy

    # Nothing else in the trainer holds a third copy (scan of its whole object graph); the scan
    # itself does find one when a copy is tucked away.
    assert reachable_float_bytes(trainer) == 2 * float_bytes(model)
    trainer.__dict__["hidden"] = {"x": [copy.deepcopy(model)]}
    assert reachable_float_bytes(trainer) == 3 * float_bytes(model)
    del trainer.__dict__["hidden"]

    assert not any(p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    assert tempering(model) == {}  # the student always runs at τ = 1
    assert tempering(teacher) == tempered(range(4))
    assert trainer.layers == [0, 1, 2, 3]  # None = all layers


def separate_logits(model, inputs, temperature=None, layers=None, hidden_layer=None):
    """Logits (or hidden states leaving `hidden_layer`) of `model`, optionally tempered."""
    kwargs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    if hidden_layer is not None:
        kwargs["output_hidden_states"] = True
    with torch.no_grad():
        if temperature is None:
            out = model(**kwargs)
        else:
            with attention_temperature(model, temperature, layers):
                out = model(**kwargs)
    # hidden_states[0] is the embedding output, so layer i's output is hidden_states[i + 1]
    return out.logits if hidden_layer is None else out.hidden_states[hidden_layer + 1]


@pytest.mark.parametrize("retain_loss_type", ["NLL", "KL", "KL_ALL", "EMBED_MSE"])
def test_loss_equals_a_hand_recomputation(world, tmp_path, retain_loss_type):
    original = copy.deepcopy(world[0])  # built apart from the trainer
    args = EMBED if retain_loss_type == "EMBED_MSE" else {"retain_loss_type": retain_loss_type}
    trainer = asu(world, tmp_path, temperature=3.0, gamma=0.7, alpha=1.3, **args)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a student some way into training, so every term is non-zero
        for p in trainer.model.parameters():
            p.add_(0.003 * torch.randn(p.shape, generator=generator))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    forget, retain = batch["forget"], batch["retain"]
    loss = trainer.compute_loss(trainer.model, batch)
    student = trainer.model
    assert tempering(student) == {}  # the embedding capture leaves no hook behind

    embed = retain_loss_type == "EMBED_MSE"

    def forget_term(teacher_temperature):
        if embed:
            return losses.masked_hidden_mse(
                separate_logits(student, forget, hidden_layer=1),
                separate_logits(original, forget, teacher_temperature, hidden_layer=1),
                forget["attention_mask"],
            ).item()
        return losses.asu_distillation_loss(
            separate_logits(student, forget),
            separate_logits(original, forget, teacher_temperature),
            forget["labels"],
        ).item()

    if embed:
        retain_loss = losses.masked_hidden_mse(
            separate_logits(student, retain, hidden_layer=1),
            separate_logits(original, retain, hidden_layer=1),
            retain["attention_mask"],
        )
    elif retain_loss_type == "NLL":
        with torch.no_grad():
            retain_loss = student(**retain).loss
    else:
        retain_loss = losses.retain_kl_loss(
            separate_logits(student, retain),
            separate_logits(original, retain),
            retain["labels"],
            answer_tokens_only=retain_loss_type == "KL",
        )
    forget_loss, retain_loss = forget_term(3.0), retain_loss.item()
    assert loss.item() == pytest.approx(0.7 * forget_loss + 1.3 * retain_loss, rel=1e-6)
    assert trainer._loss_components == {
        "asu/forget_loss": [pytest.approx(forget_loss, rel=1e-6)],
        "asu/retain_loss": [pytest.approx(retain_loss, rel=1e-6)],
    }
    # The numbers tell the teachers apart: an untempered teacher gives another forget loss.
    assert abs(forget_term(None) - forget_loss) > 0.01 * forget_loss


def test_evaluation_batches_get_the_plain_language_model_loss(world, tmp_path):
    trainer = asu(world, tmp_path, retain_loss_type="KL")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])["forget"]
    loss = trainer.compute_loss(trainer.model, batch)  # no "forget" key: an evaluation batch
    with torch.no_grad():
        logits = trainer.model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    by_hand = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1)
    )
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert trainer._loss_components == {}  # nothing tracked for evaluation


@pytest.mark.parametrize("retain_loss_type", ["NLL", "KL"])
def test_the_teacher_never_trains(world, tmp_path, retain_loss_type):
    initial = {k: v.clone() for k, v in world[0].state_dict().items()}
    trainer = asu(world, tmp_path, retain_loss_type=retain_loss_type)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(5)])
    trainer.compute_loss(trainer.model, batch).backward()
    assert all(p.grad is None for p in trainer.ref_model.parameters())
    torch.optim.SGD(trainer.model.parameters(), lr=0.1).step()
    for name, value in trainer.ref_model.state_dict().items():
        assert torch.equal(value, initial[name]), name
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, initial[n])]
    assert len(changed) == len(initial)  # the student did move, every tensor of it


def test_asu_steps_lower_the_kl_and_forget_probability(toy_authors, toy_tokenizer, tmp_path):
    tokenizer, pad = toy_tokenizer, toy_tokenizer.pad_token_id
    forget, retain = toy_authors[0].qa_pairs(), toy_authors[1].qa_pairs()
    model = toy_llama(tokenizer, peaked=False)
    finetune(model, tokenizer, forget + retain, epochs=60, lr=5e-3, seed=0, progress=False)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    forget_set, retain_set = QADataset(forget, tokenizer), QADataset(retain, tokenizer)
    forget_before = answer_probability(model, forget_set, pad)
    retain_before = answer_probability(model, retain_set, pad)
    assert forget_before > 0.8 and retain_before > 0.8  # the target knows the facts

    temperature = 10.0
    teacher = copy.deepcopy(model)
    with attention_temperature(teacher, temperature):
        teacher_probability = answer_probability(teacher, forget_set, pad)
    batch = PadCollator(pad)(list(forget_set))

    def distillation_kl(student):
        return losses.asu_distillation_loss(
            separate_logits(student.eval(), batch),
            separate_logits(teacher, batch, temperature),
            batch["labels"],
        ).item()

    kl_before = distillation_kl(model)
    trainer = build_trainer(
        "asu",
        model,
        tokenizer,
        forget,
        retain,
        tmp_path,
        {"temperature": temperature, "retain_loss_type": "KL"},
        steps(20),
    )
    trainer.train()
    student = trainer.model.eval()
    assert distillation_kl(student) < 0.2 * kl_before
    forget_after = answer_probability(student, forget_set, pad)
    retain_after = answer_probability(student, retain_set, pad)
    assert forget_after < forget_before - 0.02  # the forget answers became less likely
    assert abs(forget_after - teacher_probability) < abs(forget_before - teacher_probability)
    assert retain_after > retain_before - 0.05  # the retain answers did not collapse
    assert forget_before - forget_after > retain_before - retain_after
    assert not trainer.ref_model.training  # training switched the student only
    for name, value in trainer.ref_model.state_dict().items():  # the teacher never trained
        assert torch.equal(value, initial[name]), name


def test_saved_model_is_a_plain_transformers_model(world, tmp_path):
    original = copy.deepcopy(world[0])
    trainer = asu(world, tmp_path / "run", temperature=2.0, settings=steps(1))
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    keys = set(load_file(str(tmp_path / "saved" / "model.safetensors")))
    assert keys == set(original.state_dict())  # nothing of ours, nothing missing
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids = torch.randint(4, 500, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = trainer.model.eval()(ids).logits
        torch.testing.assert_close(loaded(ids).logits, trained, rtol=0, atol=0)
        assert not torch.allclose(original(ids).logits, trained)  # the student, not the original
    assert tempering(loaded) == {}


def test_layers_select_the_tempered_layers(world, tmp_path):
    original = copy.deepcopy(world[0])
    trainer = asu(world, tmp_path, layers=[1], temperature=3.0)
    assert trainer.teacher_temperature.layers == [1] and trainer.layers == [1]
    assert tempering(trainer.ref_model) == tempered([1])
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])["forget"]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    teacher = trainer.teacher_logits(inputs)
    torch.testing.assert_close(teacher, separate_logits(original, inputs, 3.0, [1]))
    assert not torch.allclose(teacher, separate_logits(original, inputs, 3.0))
    # the same copy, paused, is the untouched original (the KL retain reference)
    torch.testing.assert_close(trainer.reference_logits(inputs), separate_logits(original, inputs))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"layers": [4]}, r"valid ids are 0\.\.3"),
        ({"layers": [-1]}, "layers entry must be >= 0"),
        ({"temperature": 0}, "temperature must be > 0"),
        ({"temperature": -2.0}, "temperature must be > 0"),
        ({"temperature": float("inf")}, "temperature must be a finite number"),
        ({"temperature": "hot"}, "finite number > 0 or 'auto'"),
        ({"layers": "15"}, "layers must be a list of 0-based layer ids.*auto"),
        ({"layers": [1.0]}, "layers entry must be an integer"),
        ({"teacher_eos": "drop"}, "teacher_eos='drop' is not supported; use one of keep, suppress"),
        ({**EMBED, "layers": "auto"}, "'auto' chooses them for the KL forget loss"),
        ({"tau_sweep": {"sampel": 4}}, "tau_sweep: .*sampel.*known keys: sample"),
        ({"tau_sweep": {"taus": [0.5, 2]}}, r"tau_sweep.taus must be > 1"),
        ({"collapse_guard": {"max_empty_share": -1}}, r"collapse_guard.max_empty_share"),
        ({"forget_loss_type": "GA"}, "forget_loss_type='GA'.*KL, EMBED_MSE"),
        ({"retain_loss_type": "DPO"}, "retain_loss_type='DPO'.*NLL, KL, KL_ALL, EMBED_MSE"),
        ({**EMBED, "embed_layer": 4}, r"valid ids are 0\.\.3"),
        ({"trainable_params_regex": [r"no\.such"]}, "no parameter name matches"),
    ],
)
def test_bad_arguments_are_refused(world, tmp_path, args, message):
    with pytest.raises(ValueError, match=message):
        asu(world, tmp_path, **args)


def test_embedding_variant_trains_only_the_selected_parameters(world, tmp_path):
    original = {n: p.detach().clone() for n, p in world[0].named_parameters()}
    target = "model.layers.1.mlp.down_proj.weight"
    trainer = asu(
        world,
        tmp_path,
        **EMBED,
        temperature=100.0,
        trainable_params_regex=[r"model\.layers\.1\.mlp\.down_proj\.weight"],
        settings=steps(2),
    )
    trainer.train()
    assert trainer.state.global_step == 2
    for name, p in trainer.model.named_parameters():
        if name == target:
            assert not torch.equal(p.detach(), original[name])
        else:
            assert torch.equal(p.detach(), original[name]), name
    for name, p in trainer.ref_model.named_parameters():
        assert torch.equal(p, original[name]), name


def test_no_empty_parameter_group_when_only_some_weights_train(world, tmp_path):
    """Only decayed weights train: the no-decay group would be empty. DeepSpeed drops empty groups
    after the learning-rate schedule was built for them (its first step then fails with "zip()
    argument 2 is longer"), so the optimizer is built without them."""
    trainer = asu(
        world,
        tmp_path,
        **EMBED,
        temperature=100.0,
        trainable_params_regex=[r"model\.layers\.(0|1)\.mlp\.down_proj\.weight"],
        settings=steps(2, weight_decay=0.1),
    )
    groups = trainer.create_optimizer().param_groups
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(2, 0.1)]


def test_run_record(world, tmp_path):
    model, tokenizer, forget, retain = world
    method_args = {"temperature": 2.5, "layers": [0, 2], "retain_loss_type": "KL"}
    run_unlearning(
        "asu", model, tokenizer, forget, retain, tmp_path, method_args, steps(2, logging_steps=1)
    )
    record = json.loads((tmp_path / RUN_FILE).read_text())
    assert record["method"] == "asu"
    assert record["method_args"] == ASUArguments(**method_args).to_dict()
    logged = [h for h in record["log_history"] if "asu/forget_loss" in h]
    assert len(logged) == 2
    assert all(h["asu/forget_loss"] >= 0 and h["asu/retain_loss"] >= 0 for h in logged)
    assert (tmp_path / "model.safetensors").is_file()


# -- temperature: auto, layers: auto, teacher_eos, collapse guard ---------------------------------
AUTO_SETTINGS = {"sample": 5, "taus": [2.0, 4.0], "layer_parts": [2], "progress": False}


def test_auto_temperature_and_layers_are_chosen_on_the_forget_set(world, tmp_path):
    from asu_simu_plugin.methods.asu.temperature import auto_temperature

    model, tokenizer, forget, _ = world
    apart = copy.deepcopy(model)
    out = tmp_path / "run"
    trainer = asu(
        world, out, temperature="auto", layers="auto", tau_sweep=AUTO_SETTINGS, collapse_guard=False
    )
    # The same pass called on its own, on a copy, gives the same choice.
    tau, layers, record = auto_temperature(
        apart, QADataset(forget, tokenizer), tokenizer, settings=AUTO_SETTINGS
    )
    assert trainer.temperature == tau
    assert trainer.layers == (layers if layers is not None else [0, 1, 2, 3])
    saved = json.loads((out / "asu_temperature.json").read_text())
    assert (saved["temperature"], saved["layers"]) == (tau, layers)
    assert saved["searched"] == ["temperature", "layers"]
    # baseline + 2 taus x (all layers, 2 halves)
    with (out / "asu_tau_sweep.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(float(r["tau"]), r["layers"]) for r in rows] == [
        (1.0, "all"),
        (2.0, "all"),
        (4.0, "all"),
        (2.0, "0-1"),
        (4.0, "0-1"),
        (2.0, "2-3"),
        (4.0, "2-3"),
    ]
    assert sum(r["chosen"] == "True" for r in rows) == 1
    assert (out / "asu_tau_sweep.png").stat().st_size > 10_000
    # The teacher runs at the chosen setting.
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])["forget"]
    torch.testing.assert_close(
        trainer.teacher_logits(
            {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        ),
        separate_logits(apart, batch, tau, layers),
    )


def test_an_auto_run_saves_the_sweep_beside_the_model(world, tmp_path):
    model, tokenizer, forget, retain = world
    method_args = {"temperature": "auto", "layers": "auto", "tau_sweep": AUTO_SETTINGS}
    out = tmp_path / "out"
    run_unlearning("asu", model, tokenizer, forget, retain, out, method_args, steps(1))
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "asu_tau_sweep.csv", "asu_tau_sweep.png"} <= names
    chosen = json.loads((out / "asu_temperature.json").read_text())
    assert chosen["temperature"] in (2.0, 4.0) and chosen["reason"]
    recorded = json.loads((out / RUN_FILE).read_text())["method_args"]
    assert recorded == ASUArguments(**method_args).to_dict()


def test_paper_settings_run_no_sweep(world, tmp_path):
    trainer = asu(world, tmp_path, temperature=2.3, layers=None, collapse_guard=False)
    assert (trainer.temperature, trainer.layers) == (2.3, [0, 1, 2, 3])
    assert not (tmp_path / "asu_tau_sweep.csv").exists()
    # Only the layers searched: τ stays as given.
    trainer = asu(world, tmp_path, temperature=3.0, layers="auto", tau_sweep=AUTO_SETTINGS)
    assert trainer.temperature == 3.0
    with (tmp_path / "asu_tau_sweep.csv").open() as handle:
        assert {float(r["tau"]) for r in csv.DictReader(handle)} == {1.0, 3.0}


def silent_llama(tokenizer, eos_bias: float = 12.0):
    """A model that puts extra mass on eos everywhere (almost all of it by default: collapsed)."""
    model = toy_llama(tokenizer)
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight / 20)
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = eos_bias
    model.lm_head = head
    return model


def test_teacher_eos_suppress_loss_equals_a_hand_recomputation(world, tmp_path):
    _, tokenizer, forget_rows, retain_rows = world
    world = (silent_llama(tokenizer, eos_bias=5.0), tokenizer, forget_rows, retain_rows)
    original = copy.deepcopy(world[0])
    trainer = asu(world, tmp_path, temperature=3.0, teacher_eos="suppress", collapse_guard=False)
    eos = world[1].eos_token_id
    assert trainer.end_token_ids == [eos]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    forget = batch["forget"]
    assert (forget["labels"] == eos).sum() == 3  # each answer ends with it
    forget_loss, _ = trainer.forget_objective(trainer.model, forget)
    teacher = separate_logits(original, forget, 3.0)
    # By hand: the tempered teacher's probabilities without eos, renormalised, where the answer
    # goes on; unchanged from the position that predicts the closing eos on (the template's
    # newline after it included).
    probs = torch.softmax(teacher.double(), -1)
    student = torch.log_softmax(separate_logits(trainer.model, forget).double(), -1)
    per_sequence = []
    for b in range(3):
        positions = [
            t for t in range(forget["labels"].shape[1] - 1) if forget["labels"][b, t + 1] != -100
        ]
        terms, ended = [], False
        for t in positions:
            p = probs[b, t].clone()
            ended = ended or bool(forget["labels"][b, t + 1] == eos)
            if not ended:
                p[eos] = 0
                p = p / p.sum()
            nonzero = p > 0
            terms.append(float((p[nonzero] * (p[nonzero].log() - student[b, t][nonzero])).sum()))
        per_sequence.append(sum(terms) / len(terms))
    # (the loss runs in fp32 against this float64 sum: a few 1e-5 relative)
    assert forget_loss.item() == pytest.approx(sum(per_sequence) / 3, rel=3e-4)
    keep = asu(world, tmp_path, temperature=3.0, collapse_guard=False)
    kept_loss, _ = keep.forget_objective(keep.model, forget)
    assert abs(kept_loss.item() - forget_loss.item()) > 0.05 * forget_loss.item()  # eos mattered


def test_collapse_guard_warns_with_the_numbers_and_the_fix(world, tmp_path):
    _, tokenizer, forget, retain = world
    silent = (silent_llama(tokenizer), tokenizer, forget, retain)
    with pytest.warns(
        UserWarning, match=r"collapse guard.*temperature 2\.3, layers all.*5/5 sampled"
    ) as record:
        trainer = asu(silent, tmp_path, temperature=2.3, collapse_guard={"sample": 5})
    message = str(record[0].message)
    assert "teacher_eos=suppress" in message and "temperature=auto" in message
    stats = trainer.collapse_stats
    assert stats["empty_share"] == 1.0 and stats["end_probability"] > 0.9
    assert f"{stats['end_probability']:.2f} of its first answer token" in message
    # With suppression on, the fix no longer proposes it.
    with pytest.warns(UserWarning, match="collapse guard") as record:
        asu(silent, tmp_path, temperature=2.3, teacher_eos="suppress", collapse_guard={"sample": 5})
    assert "teacher_eos=suppress" not in str(record[0].message)


def test_collapse_guard_skips_the_embedding_variant(world, tmp_path, recwarn):
    """EMBED_MSE matches hidden states, not the teacher's answer distribution: a silent teacher
    cannot teach silence there, so the guard neither measures nor warns."""
    _, tokenizer, forget, retain = world
    silent = (silent_llama(tokenizer), tokenizer, forget, retain)
    trainer = asu(silent, tmp_path, temperature=2.3, collapse_guard={"sample": 5}, **EMBED)
    assert trainer.collapse_stats is None
    assert not [w for w in recwarn if "collapse guard" in str(w.message)]


def test_collapse_guard_is_quiet_on_a_speaking_teacher(world, tmp_path, recwarn):
    trainer = asu(world, tmp_path, temperature=2.3, collapse_guard={"sample": 5})
    assert trainer.collapse_stats["warning"] is None
    assert trainer.collapse_stats["empty_share"] <= 0.2
    assert not [w for w in recwarn if "collapse guard" in str(w.message)]
    off = asu(world, tmp_path, temperature=2.3, collapse_guard=False)
    assert off.collapse_stats is None


def test_teacher_eos_suppress_with_the_teacher_cache(world, tmp_path):
    """Suppression applies to the teacher's output wherever it comes from (live or cached)."""
    _, tokenizer, forget_rows, retain_rows = world
    world = (silent_llama(tokenizer, eos_bias=5.0), tokenizer, forget_rows, retain_rows)
    args = {"temperature": 3.0, "teacher_eos": "suppress", "collapse_guard": False}
    live = asu(world, tmp_path / "live", **args)
    cached = asu(
        world, tmp_path / "cached", teacher_cache=True, teacher_cache_dtype="float32", **args
    )
    batch = live.data_collator([live.train_dataset[i] for i in range(3)])["forget"]
    live_loss, _ = live.forget_objective(live.model, batch)
    cached_loss, _ = cached.forget_objective(cached.model, batch)
    assert cached_loss.item() == pytest.approx(live_loss.item(), rel=1e-5)
