"""Per-batch scores shared between the evaluators of one process.

`src/eval.py eval=[tofu,asu_paper]` scores the same model twice: the harness's TOFU evaluator and
the ASU paper's evaluator both compute answer probabilities (answer, paraphrase, perturbed
answers) and greedy answers on the same rows. `BatchScores` wraps the harness's two per-batch
functions, `evaluate_probability(model, batch)` and `eval_text_similarity(model, tokenizer,
batch, generation_args)`, and returns a stored result when everything that determines it is the
same as before: the function, the model object and the version counters of all its parameters
(any in-place update, e.g. an optimizer step, changes them), the tokenizer, every other argument
(generation settings included) and the batch's tensors byte for byte. Anything else is computed
as before. A hit is therefore the value a recomputation would return, not an approximation; rows
that differ (another `max_length` truncating them, another batch size) simply miss.

It stays off in a multi-process run, and for a model whose weights DeepSpeed ZeRO-3 partitions:
there the version counters of the parameters do not follow the weights.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import weakref

import torch


def _tensor_digest(tensor: torch.Tensor) -> tuple:
    data = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()
    return str(data.dtype), tuple(data.shape), digest


def _plain(value):
    """A hashable, order-independent stand-in for an argument (DictConfigs resolved)."""
    if isinstance(value, torch.Tensor):
        return _tensor_digest(value)
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with the harness
        pass
    if isinstance(value, dict):
        return tuple(sorted((str(k), _plain(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    return ("object", id(value))  # tokenizers and other objects: by identity


def effective_generation(generation_args) -> dict:
    """Generation settings as `generate` applies them: with `max_new_tokens` set, `max_length` has
    no effect (transformers: "max_new_tokens will take precedence"), so it is not part of the key
    (the paper's evaluator sets both, the TOFU evaluator only the first)."""
    settings = dict(_plain(generation_args))
    if settings.get("max_new_tokens") is not None:
        settings.pop("max_length", None)
    return settings


def weights_version(model) -> tuple:
    """The model's identity and the version counters of its parameters and buffers (a tensor's
    `_version` grows with every in-place change)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return id(model), tuple((id(t), t._version) for t in tensors)  # compared whole: no hash


def partitioned(model) -> bool:
    """ZeRO-3 keeps each weight in a flat partition and leaves the parameter an empty
    placeholder whose version counter an optimizer step does not move: never shared."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


class BatchScores:
    """A store of per-batch results, and the wrapper that consults it (see the module)."""

    def __init__(self):
        self._results: dict[tuple, object] = {}
        self._models: dict[int, weakref.ref] = {}
        self.calls = 0
        self.hits = 0

    def key(self, name: str, arguments: inspect.BoundArguments) -> tuple:
        model = arguments.arguments["model"]
        self._models.setdefault(id(model), weakref.ref(model))
        if self._models[id(model)]() is not model:  # a new model at a reused address
            self._models[id(model)] = weakref.ref(model)
            self._results = {k: v for k, v in self._results.items() if k[1][0] != id(model)}
        rest = {k: v for k, v in arguments.arguments.items() if k != "model"}
        if rest.get("generation_args") is not None:
            rest["generation_args"] = effective_generation(rest["generation_args"])
        return name, weights_version(model), _plain(rest)

    def wrap(self, function):
        if getattr(function, "_asu_simu_shared", None) is self:
            return function
        signature = inspect.signature(function)

        @functools.wraps(function)
        def shared(*args, **kwargs):
            self.calls += 1
            arguments = signature.bind(*args, **kwargs)
            arguments.apply_defaults()
            if partitioned(arguments.arguments["model"]):
                return function(*args, **kwargs)
            key = self.key(function.__qualname__, arguments)
            if key in self._results:
                self.hits += 1
            else:
                self._results[key] = function(*args, **kwargs)
            return copy.deepcopy(self._results[key])  # callers pop and edit their results

        shared._asu_simu_shared = self
        shared.__wrapped__ = function
        return shared

    def counts(self) -> tuple[int, int]:
        """(hits, calls) so far."""
        return self.hits, self.calls


# the harness module and the names in it whose per-batch functions are shared
SHARED_FUNCTIONS = ("evaluate_probability", "eval_text_similarity")
_STORE: BatchScores | None = None


def share(module) -> BatchScores | None:
    """Wrap the per-batch functions `module` (the harness's `evals.metrics.memorization`) calls,
    once per process; None (nothing wrapped) in a multi-process run."""
    global _STORE
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            return None
    if _STORE is None:
        _STORE = BatchScores()
    for name in SHARED_FUNCTIONS:
        setattr(module, name, _STORE.wrap(getattr(module, name)))
    return _STORE
