"""ASU's output caches: same loss as the live teacher / reference (to storage precision), one
pass, no frozen copy."""

from __future__ import annotations

import pytest
import torch
from test_asu_trainer import float_bytes, reachable_float_bytes, tempering, toy_llama
from transformers import LlamaForCausalLM

from asu_simu_plugin import toy
from asu_simu_plugin.data import PadCollator
from asu_simu_plugin.methods.asu import teacher_cache
from asu_simu_plugin.methods.asu.teacher_cache import (
    MissingRowsError,
    TeacherCache,
    answer_positions,
    row_key,
)
from asu_simu_plugin.runner import RunSettings, build_trainer

# Bounds on the relative difference of the forget loss on one batch, cached vs live teacher.
# Measured on this toy model (three batches): float32 <= 1.1e-6 (float rounding: the cache pass
# batches rows differently), float16 <= 1.7e-4, bfloat16 <= 1.9e-3. Over the 2-epoch runs below
# the logged losses differ by 0 (float32) and <= 1.4e-5 (float16).
TOLERANCE = {"float32": 3e-6, "float16": 1e-3, "bfloat16": 1e-2}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def world(toy_authors, toy_tokenizer):
    forget = [qa for a in toy_authors[:2] for qa in a.qa_pairs()]
    retain = [qa for a in toy_authors[2:4] for qa in a.qa_pairs()]
    return toy_tokenizer, forget, retain


def trainer_for(world, out, settings=None, model=None, **method_args):
    tokenizer, forget, retain = world
    model = toy_llama(tokenizer) if model is None else model
    settings = settings or RunSettings(
        epochs=2, batch_size=4, learning_rate=1e-3, logging_steps=1, extra={"disable_tqdm": True}
    )
    args = {"temperature": 2.0, **method_args}
    return build_trainer("asu", model, tokenizer, forget, retain, out, args, settings)


def count_teacher_rows(trainer) -> list[int]:
    """Patch the trainer's teacher to record how many rows each call runs."""
    calls, live = [], trainer.teacher_logits

    def counted(inputs):
        calls.append(inputs["input_ids"].shape[0])
        return live(inputs)

    trainer.teacher_logits = counted
    return calls


def collate(trainer, rows):
    return trainer.data_collator([trainer.train_dataset[i] for i in rows])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cached_loss_equals_the_live_teachers_to_storage_precision(world, tmp_path, dtype):
    trainer = trainer_for(world, tmp_path, teacher_cache=True, teacher_cache_dtype=dtype)
    live = trainer_for(world, tmp_path)
    calls = count_teacher_rows(trainer)
    batch = collate(trainer, [3, 0, 7, 5])
    cached_loss = trainer.compute_loss(trainer.model, batch)
    assert calls[0] == 4 and sum(calls) == len(trainer.train_dataset.forget)  # one full pass
    live_loss = live.compute_loss(live.model, batch)
    relative = ((cached_loss - live_loss).abs() / live_loss.abs()).item()
    assert relative < TOLERANCE[dtype]
    # the forget term alone (the only one the cache touches) is the same to that precision too
    assert trainer._loss_components["asu/forget_loss"][-1] == pytest.approx(
        live._loss_components["asu/forget_loss"][-1], rel=TOLERANCE[dtype]
    )
    trainer.compute_loss(trainer.model, collate(trainer, [1, 2]))
    assert len(calls) == len(range(0, len(trainer.train_dataset.forget), 4))  # no more teacher runs


@pytest.mark.parametrize("accumulation", [1, 2])
def test_two_epochs_match_the_uncached_run(world, tmp_path, accumulation):
    settings = RunSettings(
        epochs=2,
        batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        gradient_accumulation_steps=accumulation,
        extra={"disable_tqdm": True},
    )
    cached = trainer_for(world, tmp_path / "c", settings, teacher_cache=True)
    live = trainer_for(world, tmp_path / "l", settings)
    calls = count_teacher_rows(cached)
    cached.train()
    live.train()
    losses_cached = [h["loss"] for h in cached.state.log_history if "loss" in h]
    losses_live = [h["loss"] for h in live.state.log_history if "loss" in h]
    assert len(losses_cached) == len(losses_live) >= 2
    assert losses_cached == pytest.approx(losses_live, rel=2e-3, abs=1e-5)  # float16 storage
    # one pass over the forget set, then only cache hits across both (shuffled) epochs
    assert sum(calls) == len(cached.train_dataset.forget)
    assert cached.teacher_cache.misses == 0
    if accumulation == 1:  # (with accumulation, transformers may skip an epoch's last batch)
        assert cached.teacher_cache.hits == 2 * len(cached.train_dataset.forget)


def test_rows_are_found_whatever_the_padding_and_batch(world, tmp_path):
    trainer = trainer_for(world, tmp_path, teacher_cache=True, teacher_cache_dtype="float32")
    trainer.build_teacher_cache()
    items = [trainer.train_dataset.forget[i] for i in (4, 1, 6)]
    pad = world[0].pad_token_id
    right = PadCollator(pad)(items)
    # the same rows left-padded, with extra padding
    width = right["input_ids"].shape[1] + 3
    left = {}
    for key, value in (("input_ids", pad), ("attention_mask", 0), ("labels", -100)):
        rows = [torch.cat([torch.full((width - len(i[key]),), value), i[key]]) for i in items]
        left[key] = torch.stack(rows)
    for batch in (right, left):
        cached = trainer.teacher_cache.teacher_logits(batch, trainer.teacher_logits)
        fresh = trainer.teacher_logits({k: batch[k] for k in ("input_ids", "attention_mask")})
        positions = answer_positions(batch["labels"])
        expected = torch.log_softmax(fresh[positions], dim=-1)
        assert (cached[positions] - expected).abs().max() < 1e-5
        assert not cached[~positions].any()
    assert trainer.teacher_cache.misses == 0


def test_a_changed_teacher_empties_the_cache(world, tmp_path):
    trainer = trainer_for(world, tmp_path, teacher_cache=True)
    trainer.build_teacher_cache()
    assert len(trainer.teacher_cache) == len(trainer.train_dataset.forget)
    trainer.teacher_cache.check(trainer.teacher_fingerprint())
    assert len(trainer.teacher_cache) == len(trainer.train_dataset.forget)
    trainer.teacher_cache.check((*trainer.teacher_fingerprint()[:2], 3.0, (0,)))
    assert len(trainer.teacher_cache) == 0 and not trainer.teacher_cache.built


@pytest.mark.parametrize(
    "args, message",
    [
        ({"teacher_cache": "yes"}, "true or false"),
        ({"teacher_cache": True, "forget_loss_type": "EMBED_MSE", "embed_layer": 1}, "KL"),
        ({"teacher_cache": True, "teacher_cache_dtype": "int8"}, "teacher_cache_dtype"),
    ],
)
def test_conflicting_options_are_refused_at_init(world, tmp_path, args, message):
    with pytest.raises(ValueError, match=message):
        trainer_for(world, tmp_path, **args)


def test_cache_on_a_lora_model(world, tmp_path):
    pytest.importorskip("peft")
    from asu_simu_plugin import lora

    tokenizer = world[0]
    model = lora.add_lora(toy_llama(tokenizer))
    trainer = trainer_for(world, tmp_path, model=model, teacher_cache=True)
    live = trainer_for(world, tmp_path, model=lora.add_lora(toy_llama(tokenizer)))
    batch = collate(trainer, [0, 1, 2, 3])
    cached_loss = trainer.compute_loss(trainer.model, batch)
    live_loss = live.compute_loss(live.model, batch)
    assert cached_loss.item() == pytest.approx(live_loss.item(), rel=TOLERANCE["float16"])


def test_storage_is_answer_positions_only():
    cache = TeacherCache(fingerprint=None, dtype="float16")
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, 8, 9, 2]])
    logits = torch.randn(2, 5, 11)
    cache._store(["a", "b"], labels, logits)
    assert cache.rows["a"].shape == (2, 11) and cache.rows["b"].shape == (4, 11)
    assert cache.rows["a"].dtype == torch.float16
    expected = torch.log_softmax(logits[0, 1:3], dim=-1)
    assert (cache.rows["a"].float() - expected).abs().max() < 2e-3


# -- no frozen copy: the caches are filled from the student before its first update ---------------
def dropout_llama(tokenizer):
    """A toy model with attention dropout: a teacher pass in training mode would differ."""
    torch.manual_seed(0)
    config = toy.tiny_llama_config(len(tokenizer), attention_dropout=0.5)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize(
    "args",
    [{}, {"retain_loss_type": "KL", "reference_cache": True}],
    ids=["ASU_GD", "ASU_KL"],
)
def test_the_cache_needs_no_frozen_copy(world, tmp_path, args):
    trainer = trainer_for(world, tmp_path, teacher_cache=True, **args)
    assert trainer.teacher_source == "student" and trainer.ref_model is None
    model_bytes = float_bytes(trainer.model)
    assert reachable_float_bytes(trainer) == model_bytes  # the student's weights and nothing else
    trainer.ensure_caches()
    cached = sum(cache.nbytes() for cache in trainer.caches())
    assert cached > 0 and reachable_float_bytes(trainer) == model_bytes + cached
    assert trainer.ref_model is None
    # the hook was on only for the fill, and the student is back in training mode
    assert all(m.training for m in trainer.model.modules())
    assert tempering(trainer.model) == {}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_the_students_cache_equals_the_copys(world, tmp_path, dtype):
    """The cache filled from the student (hook on, eval mode: no dropout, no grad) holds what
    the one filled from the frozen copy holds."""
    tokenizer = world[0]
    student = trainer_for(
        world,
        tmp_path,
        model=dropout_llama(tokenizer),
        teacher_cache=True,
        teacher_cache_dtype=dtype,
    )
    copy = trainer_for(
        world,
        tmp_path,
        model=dropout_llama(tokenizer),
        teacher_cache=True,
        teacher_cache_dtype=dtype,
        retain_loss_type="KL",  # a KL reference: the copy is built
    )
    assert (student.teacher_source, copy.teacher_source) == ("student", "copy")
    student.build_teacher_cache()
    copy.build_teacher_cache()
    assert student.teacher_cache.rows.keys() == copy.teacher_cache.rows.keys()
    for key, row in student.teacher_cache.rows.items():
        # same weights, same batches, both in eval mode: bit-identical (within any tolerance)
        assert torch.equal(row, copy.teacher_cache.rows[key])


def test_ASU_KL_with_both_caches_matches_the_live_run(world, tmp_path):
    # SGD: at the first step the live reference IS the student (a KL gradient of exactly 0),
    # the cached one equals it to float rounding; Adam would turn that ~1e-8 gradient into full
    # steps on the parameters nothing else moves (retain-only token embeddings).
    settings = RunSettings(
        epochs=2,
        batch_size=4,
        learning_rate=0.05,
        logging_steps=1,
        extra={"disable_tqdm": True, "optim": "sgd"},
    )
    kl = {"retain_loss_type": "KL"}
    cached = trainer_for(
        world,
        tmp_path / "c",
        settings,
        teacher_cache=True,
        reference_cache=True,
        teacher_cache_dtype="float32",
        **kl,
    )
    live = trainer_for(world, tmp_path / "l", settings, **kl)
    assert cached.ref_model is None and live.ref_model is not None
    cached.train()
    live.train()
    for key in ("loss", "asu/retain_loss", "asu/forget_loss"):
        values_cached = [h[key] for h in cached.state.log_history if key in h]
        values_live = [h[key] for h in live.state.log_history if key in h]
        assert len(values_cached) == len(values_live) >= 4
        assert values_cached == pytest.approx(values_live, rel=1e-5, abs=1e-7)
    assert cached.reference_cache.misses == 0 and cached.teacher_cache.misses == 0
    # the standalone dataset pairs each forget row with one retain row: only those are cached
    drawn = {int(i) for i in cached.train_dataset.retain_index}
    assert len(cached.reference_cache) == len(drawn) < len(cached.train_dataset.retain)


def test_the_reference_cache_costs_vocabulary_times_answer_tokens_times_two_bytes(world, tmp_path):
    trainer = trainer_for(world, tmp_path, retain_loss_type="KL", reference_cache=True)
    assert trainer.teacher_source == "copy"  # the live teacher still needs the copy
    trainer.build_reference_cache()
    retain = trainer.train_dataset.retain
    answers = sum(
        int((retain[i]["labels"] != -100).sum())
        for i in set(trainer.train_dataset.retain_index.tolist())
    )
    vocabulary = trainer.model.config.vocab_size
    assert trainer.reference_cache.nbytes() == vocabulary * answers * 2


@pytest.mark.parametrize(
    "args, message",
    [
        ({"reference_cache": True}, "reference_cache needs retain_loss_type KL"),
        ({"reference_cache": True, "retain_loss_type": "KL_ALL"}, "KL_ALL reads every position"),
        ({"reference_cache": 1, "retain_loss_type": "KL"}, "reference_cache must be true or"),
    ],
)
def test_the_reference_cache_is_refused_where_it_cannot_serve(world, tmp_path, args, message):
    with pytest.raises(ValueError, match=message):
        trainer_for(world, tmp_path, **args)


def test_a_resumed_run_fills_its_cache_from_the_original(world, tmp_path):
    """A resume loads the checkpoint into the student: the cache is filled before that."""
    tokenizer = world[0]
    steps = RunSettings(
        epochs=1, batch_size=4, learning_rate=1e-2, save_steps=1, extra={"disable_tqdm": True}
    )
    first = trainer_for(world, tmp_path / "run", steps, teacher_cache=True)
    first.train()
    checkpoint = sorted((tmp_path / "run").glob("checkpoint-*"))[0]
    resumed = trainer_for(world, tmp_path / "on", steps, toy_llama(tokenizer), teacher_cache=True)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    fresh = trainer_for(world, tmp_path / "fresh", steps, toy_llama(tokenizer), teacher_cache=True)
    fresh.build_teacher_cache()
    for key, row in fresh.teacher_cache.rows.items():
        assert torch.equal(resumed.teacher_cache.rows[key], row)
    assert resumed.teacher_cache.misses == 0


def test_a_cache_emptied_after_the_first_update_cannot_be_refilled(world, tmp_path):
    steps = RunSettings(
        epochs=1, batch_size=4, learning_rate=1e-3, extra={"disable_tqdm": True, "max_steps": 1}
    )
    trainer = trainer_for(world, tmp_path, steps, teacher_cache=True)
    trainer.train()
    trainer.temperature = 3.0  # a new teacher: the cache is emptied, the original is gone
    batch = collate(trainer, [0, 1])
    with pytest.raises(RuntimeError, match="build the trainer again from the original model"):
        trainer.compute_loss(trainer.model, batch)


# -- the key: content and positions ----------------------------------------------------------------
def shifted_answer_pair(trainer):
    """Two rows with the same attended ids and the same answer-label values at other positions
    (the same text split differently between question and answer)."""
    item = trainer.train_dataset.forget[0]
    ids = item["input_ids"].clone()
    ids[-4:] = ids[-4]  # four equal tokens at the end
    first, second = torch.full_like(ids, -100), torch.full_like(ids, -100)
    first[-3:-1] = ids[-3:-1]
    second[-2:] = ids[-2:]
    mask = torch.ones_like(ids)
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": labels} for labels in (first, second)
    ]


def test_the_key_holds_the_answer_positions(world, tmp_path):
    trainer = trainer_for(world, tmp_path, teacher_cache=True, teacher_cache_dtype="float32")
    pair = shifted_answer_pair(trainer)
    keys = [row_key(r["input_ids"], r["attention_mask"], r["labels"]) for r in pair]
    assert keys[0] != keys[1]
    # left padding moves every position alike: the same key
    padded = {
        k: torch.cat([torch.full((2,), v), pair[0][k]])
        for k, v in (("input_ids", 3), ("attention_mask", 0), ("labels", -100))
    }
    assert row_key(padded["input_ids"], padded["attention_mask"], padded["labels"]) == keys[0]
    trainer.build_teacher_cache()
    for row in pair:  # each row gets its own teacher distributions (misses, before the update)
        batch = PadCollator(3)([row])
        positions, cached = trainer.teacher_cache.lookup(batch, trainer.teacher_logits)
        live = trainer.teacher_logits({k: batch[k] for k in ("input_ids", "attention_mask")})
        expected = torch.log_softmax(live[positions], dim=-1)
        assert (cached - expected).abs().max() < 1e-5
    assert trainer.teacher_cache.misses == 2


# -- misses after the build ------------------------------------------------------------------------
def with_a_new_row(batch):
    """The batch with its first forget row's last answer label dropped: a row of no forget set."""
    labels = batch["forget"]["labels"][0]
    labels[int((labels != -100).nonzero().max())] = -100
    return batch


def test_a_miss_after_the_first_update_is_a_clear_error(world, tmp_path):
    steps = RunSettings(
        epochs=1, batch_size=4, learning_rate=1e-3, extra={"disable_tqdm": True, "max_steps": 1}
    )
    trainer = trainer_for(world, tmp_path, steps, teacher_cache=True)
    trainer.train()
    batch = with_a_new_row(collate(trainer, [0, 1]))
    with pytest.raises(MissingRowsError, match="Run with teacher_cache=false"):
        trainer.compute_loss(trainer.model, batch)


@pytest.mark.parametrize("lora", [False, True], ids=["copy", "lora"])
def test_a_miss_is_computed_while_the_original_exists(world, tmp_path, lora):
    if lora:
        pytest.importorskip("peft")
    from asu_simu_plugin import lora as lora_module

    steps = RunSettings(
        epochs=1, batch_size=4, learning_rate=1e-3, extra={"disable_tqdm": True, "max_steps": 1}
    )
    model = toy_llama(world[0])
    model = lora_module.add_lora(model) if lora else model
    args = {} if lora else {"retain_loss_type": "KL"}  # the KL reference keeps the copy
    trainer = trainer_for(world, tmp_path, steps, model, teacher_cache=True, **args)
    trainer.train()
    batch = with_a_new_row(collate(trainer, [0, 1]))
    trainer.compute_loss(trainer.model, batch)
    assert trainer.teacher_cache.misses == 1


class Ranks:
    """Stands in for the other ranks: the most missing rows any rank reports."""

    def __init__(self, most):
        self.most = most

    def __call__(self, count, device):
        return max(count, self.most)


@pytest.mark.parametrize("collective", [True, False])
def test_under_zero3_every_rank_runs_the_model_when_any_misses(monkeypatch, collective):
    """ZeRO-3 gathers weights in every forward: a rank that lacks no row still runs the model
    once (on a stand-in row) when another rank misses one; without ZeRO-3 it does not."""
    monkeypatch.setattr(teacher_cache, "_distributed", lambda: True)
    monkeypatch.setattr(teacher_cache, "_most_on_any_rank", Ranks(most=2))
    cache = TeacherCache(None, "float32")
    cache.collective = collective
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, 8, 9, 2]])
    batch = {"input_ids": labels.clamp_min(0), "attention_mask": torch.ones_like(labels)}
    batch["labels"] = labels
    cache._store(cache.keys(batch), labels, torch.randn(2, 5, 11))
    calls = []

    def compute(inputs):
        calls.append(inputs["input_ids"].shape[0])
        return torch.randn(inputs["input_ids"].shape[0], 5, 11)

    positions, rows = cache.lookup(batch, compute)
    assert calls == ([1] if collective else [])  # one forward on one stand-in row
    assert len(cache) == 2 and rows.shape == (6, 11) and cache.misses == 0
    # and when no model can compute the missing rows, every rank raises (none waits)
    with pytest.raises(MissingRowsError, match="forget cache lacks rows"):
        cache.lookup(batch, None)
