"""Per-batch scores shared between evaluators (`asu_simu_plugin.metrics.reuse`): a stored result
comes back only for the same function, model weights, arguments and batch bytes."""

from __future__ import annotations

import types

import pytest
import torch
from omegaconf import OmegaConf

from asu_simu_plugin.metrics import reuse


def fake_memorization():
    """A stand-in for the harness's `evals.metrics.memorization`: its two per-batch functions
    with the harness's signatures, computing from the model's output and counting their calls."""
    module = types.SimpleNamespace(computed=0)

    def evaluate_probability(model, batch):
        module.computed += 1
        with torch.no_grad():
            out = model(batch["input_ids"].float()).sum(-1)
        return [{"prob": float(v), "avg_loss": float(-v)} for v in out]

    def eval_text_similarity(model, tokenizer, batch, generation_args):
        module.computed += 1
        n = generation_args["max_new_tokens"]
        with torch.no_grad():
            out = model(batch["input_ids"].float()).sum(-1)
        return [{"generation": f"{v:.6f}|{n}", "rougeL_recall": 0.5} for v in out]

    module.evaluate_probability = evaluate_probability
    module.eval_text_similarity = eval_text_similarity
    return module


def batch(*rows):
    ids = torch.tensor(rows, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.fixture
def shared(monkeypatch):
    monkeypatch.setattr(reuse, "_STORE", None)
    module = fake_memorization()
    store = reuse.share(module)
    return module, store


def test_the_same_batch_and_weights_are_computed_once_and_the_value_is_the_recomputed_one(shared):
    module, store = shared
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    first = module.evaluate_probability(model=model, batch=batch([1, 2, 3], [4, 5, 6]))
    again = module.evaluate_probability(model, batch([1, 2, 3], [4, 5, 6]))  # positional too
    assert module.computed == 1 and store.counts() == (1, 2)
    direct = module.evaluate_probability.__wrapped__(model, batch([1, 2, 3], [4, 5, 6]))
    assert again == first == direct
    expected = model(torch.tensor([[1.0, 2, 3], [4, 5, 6]])).sum(-1)
    assert [r["prob"] for r in again] == pytest.approx(expected.tolist(), abs=0)


def test_callers_may_edit_what_they_get_back(shared):
    module, _ = shared
    model = torch.nn.Linear(3, 2)
    first = module.evaluate_probability(model, batch([1, 2, 3]))
    first[0]["prob"] = -1.0
    first.append("extra")
    second = module.evaluate_probability(model, batch([1, 2, 3]))
    assert len(second) == 1 and second[0]["prob"] != -1.0


def test_any_changed_byte_weight_argument_or_model_is_computed_again(shared):
    module, store = shared
    model = torch.nn.Linear(3, 2)
    tokenizer = object()
    greedy = OmegaConf.create({"do_sample": False, "max_new_tokens": 8})
    module.eval_text_similarity(model, tokenizer, batch([1, 2, 3]), greedy)
    # the same settings as a plain dict in another order: the same call
    module.eval_text_similarity(
        model, tokenizer, batch([1, 2, 3]), {"max_new_tokens": 8, "do_sample": False}
    )
    assert module.computed == 1
    module.eval_text_similarity(model, tokenizer, batch([1, 2, 4]), greedy)  # one token
    module.eval_text_similarity(
        model, tokenizer, batch([1, 2, 3]), {"do_sample": False, "max_new_tokens": 9}
    )
    module.eval_text_similarity(model, object(), batch([1, 2, 3]), greedy)  # another tokenizer
    assert module.computed == 4
    lengths = batch([1, 2, 3])
    lengths["attention_mask"][0, 0] = 0  # padding differs
    module.eval_text_similarity(model, tokenizer, lengths, greedy)
    assert module.computed == 5
    before = module.eval_text_similarity(model, tokenizer, batch([1, 2, 3]), greedy)
    assert module.computed == 5
    # an optimizer step changes the weights in place: computed again, and the new value
    model.weight.grad = torch.ones_like(model.weight)
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    after = module.eval_text_similarity(model, tokenizer, batch([1, 2, 3]), greedy)
    assert module.computed == 6 and after != before
    other = torch.nn.Linear(3, 2)
    module.eval_text_similarity(other, tokenizer, batch([1, 2, 3]), greedy)
    assert module.computed == 7
    assert store.counts() == (2, 9)


def test_max_length_is_no_part_of_the_key_where_max_new_tokens_overrides_it(shared):
    """transformers' generate: with max_new_tokens set, max_length has no effect."""
    module, _ = shared
    model, tokenizer = torch.nn.Linear(3, 2), object()
    tofu = {"do_sample": False, "max_new_tokens": 8, "use_cache": True}
    module.eval_text_similarity(model, tokenizer, batch([1, 2, 3]), tofu)
    module.eval_text_similarity(model, tokenizer, batch([1, 2, 3]), {**tofu, "max_length": 200})
    assert module.computed == 1
    by_length = {"do_sample": False, "max_new_tokens": None, "use_cache": True}
    module.eval_text_similarity(
        model, tokenizer, batch([1, 2, 3]), {**by_length, "max_length": 200}
    )
    module.eval_text_similarity(
        model, tokenizer, batch([1, 2, 3]), {**by_length, "max_length": 100}
    )
    assert module.computed == 3


def test_a_buffer_changed_in_place_is_a_new_state(shared):
    module, _ = shared
    model = torch.nn.BatchNorm1d(3).eval()
    module.evaluate_probability(model, batch([1, 2, 3]))
    model.running_mean.add_(1.0)
    module.evaluate_probability(model, batch([1, 2, 3]))
    assert module.computed == 2


def test_a_zero3_partitioned_model_is_always_computed(shared):
    module, store = shared
    model = torch.nn.Linear(3, 2)
    model.weight.ds_id = 0  # what DeepSpeed ZeRO-3 sets on the parameters it partitions
    module.evaluate_probability(model, batch([1, 2, 3]))
    module.evaluate_probability(model, batch([1, 2, 3]))
    assert module.computed == 2 and store.counts() == (0, 2)


def test_sharing_wraps_once_and_stays_off_with_several_processes(monkeypatch):
    monkeypatch.setattr(reuse, "_STORE", None)
    module = fake_memorization()
    store = reuse.share(module)
    wrapped = module.evaluate_probability
    assert reuse.share(module) is store and module.evaluate_probability is wrapped
    monkeypatch.setattr(reuse, "_STORE", None)
    several = fake_memorization()
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    original = several.evaluate_probability
    assert reuse.share(several) is None and several.evaluate_probability is original
