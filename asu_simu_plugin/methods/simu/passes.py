"""The forward/backward passes behind `attribution.neuron_attributions` (notation as there).

Cost of "per_token": by causality L_p depends only on the unperturbed prefix < p and on
position p's own path, which changes only from layer l's MLP upward. So one plain forward
records each layer's keys/values (the prefix), and each copy (layer l, step j) is a batch of
single-token queries — one per answer position — that attend to the cached prefix plus their
own key/value (a 4-D attention mask). Layers below l are replayed from the observed pass, the
backward stops at layer l, and the work grows linearly with answer tokens × layers × m (the
attention over the prefix adds a term in the prefix length). "sequence" replays layers below
the scaled one the same way but runs every position of every copy.

A pass scales one (layer, step) pair per copy of the batch; `observed_pass` records what every
copy shares, `reused_prefix` replays the layers below the scaled ones, and `sequence_pass` /
`AnswerQueries.run_pass` return each scaled layer's summed contribution (float64, not yet
divided over batches).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from asu_simu_plugin.arch import cache_argument, key_value_cache
from asu_simu_plugin.losses import IGNORE_INDEX


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for a float64 model (exactness checks)."""
    return torch.promote_types(dtype, torch.float32)


def _answer_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ log p(answer token) over the batch; only answer positions are upcast (memory)."""
    targets = labels[:, 1:]
    answer = targets != IGNORE_INDEX
    picked = logits[:, :-1][answer]
    return -F.cross_entropy(picked.to(_wide(picked.dtype)), targets[answer], reduction="sum")


def observed_pass(model, projections, layers, inputs, cache=None):
    """One plain forward: each attributed layer's MLP activation β, and each decoder layer's
    output below the deepest attributed layer (what `reused_prefix` replays). With `cache`
    (a key/value recorder) the forward also fills it with every layer's keys and values."""
    activations, layer_outputs, handles = {}, {}, []
    for layer_id, proj in projections.items():

        def keep_activation(_module, args, layer_id=layer_id):
            activations[layer_id] = args[0].detach()

        handles.append(proj.register_forward_pre_hook(keep_activation))
    for layer_id in range(max(projections, default=0)):

        def keep_output(_module, _args, output, layer_id=layer_id):
            layer_outputs[layer_id] = output

        handles.append(layers[layer_id].register_forward_hook(keep_output))
    extra = {"use_cache": False} if cache is None else cache_argument(model, cache)
    try:
        with torch.no_grad():
            model(**inputs, **extra)
    finally:
        for handle in handles:
            handle.remove()
    return activations, layer_outputs


def _replayable(output) -> bool:
    """A tensor, or a tuple whose first part is a tensor (what decoder layers return)."""
    if isinstance(output, torch.Tensor):
        return True
    return isinstance(output, tuple) and len(output) > 0 and isinstance(output[0], torch.Tensor)


def _with_hidden(output, hidden):
    """`output` (a layer's return value) with its hidden states replaced by `hidden`."""
    if isinstance(output, torch.Tensor):
        return hidden
    # Other parts (a cache object, attention weights) are never read for a replayed layer.
    return (hidden, *output[1:])


def _repeat_rows(tensor: torch.Tensor, copies: int) -> torch.Tensor:
    return tensor.repeat(copies, *([1] * (tensor.dim() - 1)))


@contextlib.contextmanager
def reused_prefix(layers, layer_outputs, first_scaled, copies, select=None):
    """Layers below the shallowest scaled one see unscaled inputs in every copy, so their
    outputs are the observed ones: replay them instead of running those layers again
    (a layer whose output is no tensor/tuple just runs). `select` maps an observed hidden
    state to the rows/positions of the pass (default: all of them)."""
    replaced = []

    def replay(output):
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        if select is not None:
            hidden = select(hidden)
        return _with_hidden(output, _repeat_rows(hidden, copies))

    try:
        for layer_id in range(first_scaled):
            output = layer_outputs[layer_id]
            if not _replayable(output):
                continue
            layer = layers[layer_id]
            # An instance-level forward (accelerate's device hooks) is put back afterwards.
            replaced.append((layer, layer.__dict__.get("forward")))
            # Repeated when called, so only the current layer's copies are alive (memory).
            layer.forward = lambda *args, output=output, **kwargs: replay(output)
        yield
    finally:
        for layer, own_forward in replaced:
            if own_forward is None:
                del layer.forward
            else:
                layer.forward = own_forward


def sequence_pass(model, projections, observed, inputs, labels, steps):
    """Whole-sequence integrated gradients: copy c scales layer pairs[c][0] at every position."""
    batch_size = labels.shape[0]
    real_tokens = inputs["attention_mask"].bool().unsqueeze(-1)  # [B, T, 1]

    def run_pass(pairs, _first_scaled):
        copies = len(pairs)
        repeated = {k: _repeat_rows(v, copies) for k, v in inputs.items()}
        leaves, handles = {}, []
        for layer_id in sorted({layer for layer, _ in pairs}):
            copy_ids = [c for c, (layer, _) in enumerate(pairs) if layer == layer_id]
            alphas = torch.tensor([pairs[c][1] / steps for c in copy_ids], device=labels.device)
            beta = observed[layer_id]
            # The scaled activation is a fresh leaf, so gradients reach it and nothing upstream.
            leaf = alphas.view(-1, 1, 1, 1).to(beta.dtype) * beta.unsqueeze(0)
            leaves[layer_id] = leaf.requires_grad_(True)
            rows = _copy_rows(copy_ids, batch_size, labels.device)
            handles.append(projections[layer_id].register_forward_pre_hook(_replacer(leaf, rows)))
        try:
            with torch.enable_grad():
                logits = model(**repeated, use_cache=False).logits
                total = _answer_log_likelihood(logits, labels.repeat(copies, 1))
                grads = torch.autograd.grad(total, list(leaves.values()))
        finally:
            for handle in handles:
                handle.remove()
        result = {}
        for layer_id, grad in zip(leaves, grads, strict=True):
            beta = observed[layer_id]
            # β is the same for every copy, so sum the copies' gradients first (memory).
            terms = beta.to(_wide(beta.dtype)) * grad.to(_wide(beta.dtype)).sum(dim=0)
            # Padding is no position of the sum; where() also drops a stray NaN there.
            terms = torch.where(real_tokens, terms, 0.0)
            result[layer_id] = terms.sum(dim=(0, 1)).double() / steps
        return result

    return run_pass


def _copy_rows(copy_ids, batch_size, device):
    """Batch rows of the given copies (copy c holds rows c·B .. c·B + B − 1)."""
    rows = [torch.arange(c * batch_size, (c + 1) * batch_size) for c in copy_ids]
    return torch.cat(rows).to(device)


def _replacer(leaf, rows):
    """A down_proj pre-hook putting `leaf` ([copies, B, …]) into the given rows of its input."""

    def replace(_module, args):
        activation = args[0].clone()
        activation[rows] = leaf.reshape(-1, *leaf.shape[2:]).to(activation.dtype)
        return (activation, *args[1:])

    return replace


class AnswerQueries:
    """Per-answer-token integrated gradients as single-token queries over a cached prefix.

    Query q of row b stands for answer sample (b, p = positions[b, q]): the token at p, at
    position id p, attending to the row's real tokens before p (their keys/values come from
    the observed pass) and to its own slot, appended after the prefix — never to other
    queries. Rows with fewer answer tokens are padded with queries that see only themselves
    and count nowhere.
    """

    def __init__(self, model, projections, observed, cache, inputs, labels, steps):
        self.model, self.projections, self.observed = model, projections, observed
        self.steps = steps
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        batch_size, length = input_ids.shape
        answer = labels[:, 1:] != IGNORE_INDEX  # [B, T-1]: position p predicts answer p+1
        counts = answer.sum(dim=1)
        width = int(counts.max())
        device = input_ids.device
        slot = torch.arange(width, device=device)
        self.valid = slot.unsqueeze(0) < counts.unsqueeze(1)  # [B, A]
        # Answer positions of each row, in order, padded with position 0.
        order = torch.argsort((~answer).to(torch.int8), dim=1, stable=True)[:, :width]
        self.positions = torch.where(self.valid, order, 0)
        self.rows = torch.arange(batch_size, device=device).unsqueeze(1)
        self.targets = torch.where(self.valid, labels[self.rows, self.positions + 1], 0)
        self.tokens = input_ids[self.rows, self.positions]
        # Key k < T is visible to query q iff it is a real token before position p; key T + q'
        # (a query's own slot) iff q' == q.
        keys = torch.arange(length, device=device)
        prefix = (keys.view(1, 1, -1) < self.positions.unsqueeze(-1)) & attention_mask.bool()[
            :, None, :
        ]
        own = torch.eye(width, dtype=torch.bool, device=device).expand(batch_size, -1, -1)
        visible = torch.cat([prefix & self.valid.unsqueeze(-1), own], dim=-1)
        dtype = next(iter(observed.values())).dtype
        self.mask = torch.zeros(visible.shape, dtype=dtype, device=device)
        self.mask.masked_fill_(~visible, torch.finfo(dtype).min)
        self.mask = self.mask.unsqueeze(1)  # [B, 1, A, T + A]
        # {layer_idx: (keys, values)} of the observed pass. Padding is masked, but a padded
        # query row can hold NaN (all its keys masked), and 0 · NaN is NaN: zero it.
        real = attention_mask.bool()[:, None, :, None]
        self.prefix = {
            i: (torch.where(real, k, 0.0), torch.where(real, v, 0.0))
            for i, (k, v) in cache.recorded.items()
        }
        self.batch_size = batch_size

    def select(self, hidden):
        """An observed [B, T, …] tensor at the queries' positions: [B, A, …]."""
        return hidden[self.rows, self.positions]

    def run_pass(self, pairs, first_scaled):
        copies, batch_size = len(pairs), self.batch_size
        cache = key_value_cache()
        for layer_idx in sorted(self.prefix):
            keys, values = self.prefix[layer_idx]
            if layer_idx < first_scaled:  # replayed: no attention runs there
                keys, values = keys[:, :, :0], values[:, :, :0]
            cache.update(_repeat_rows(keys, copies), _repeat_rows(values, copies), layer_idx)
        leaves, handles = {}, []
        for layer_id in sorted({layer for layer, _ in pairs}):
            copy_ids = [c for c, (layer, _) in enumerate(pairs) if layer == layer_id]
            beta = self.select(self.observed[layer_id])  # [B, A, d_ff]
            alphas = torch.tensor(
                [pairs[c][1] for c in copy_ids], dtype=beta.dtype, device=beta.device
            )
            leaf = (alphas / self.steps).view(-1, 1, 1, 1) * beta.unsqueeze(0)
            leaves[layer_id] = leaf.requires_grad_(True)
            rows = _copy_rows(copy_ids, batch_size, beta.device)
            handles.append(
                self.projections[layer_id].register_forward_pre_hook(_replacer(leaf, rows))
            )
        try:
            with torch.enable_grad():
                valid = _repeat_rows(self.valid, copies)
                head = self.model.get_output_embeddings()
                if head is not None:
                    # The output layer sees the real queries only ([1, N, d]): padding slots
                    # would cost a vocabulary-wide projection each.
                    handles.append(
                        head.register_forward_pre_hook(
                            lambda _m, args: (args[0][valid].unsqueeze(0), *args[1:])
                        )
                    )
                logits = self.model(
                    input_ids=_repeat_rows(self.tokens, copies),
                    position_ids=_repeat_rows(self.positions, copies),
                    attention_mask=_repeat_rows(self.mask, copies),
                    **cache_argument(self.model, cache),
                ).logits
                logits = logits[0] if head is not None else logits[valid]
                targets = _repeat_rows(self.targets, copies)[valid]
                total = -F.cross_entropy(logits.to(_wide(logits.dtype)), targets, reduction="sum")
                grads = torch.autograd.grad(total, list(leaves.values()))
        finally:
            for handle in handles:
                handle.remove()
        result = {}
        for layer_id, grad in zip(leaves, grads, strict=True):
            beta = self.select(self.observed[layer_id])
            wide = _wide(beta.dtype)
            terms = beta.to(wide) * grad.to(wide).sum(dim=0)  # copies share β: sum first
            terms = torch.where(self.valid.unsqueeze(-1), terms, 0.0)
            result[layer_id] = terms.sum(dim=(0, 1)).double() / self.steps
        return result
