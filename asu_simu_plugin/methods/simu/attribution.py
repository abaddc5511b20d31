"""SIMU's critical neurons: integrated-gradients attribution of MLP units, and per-layer masks.

A "neuron" k of layer l is the k-th MLP intermediate unit — the k-th input dimension of that
layer's `down_proj` (`act(gate_proj(x)) · up_proj(x)` for gated MLPs, the same position for
Phi-3's fused gate/up). Integrated gradients use a right Riemann sum with m = `steps` points
(α = j/m, j = 1..m: α = 1 is included, α = 0 is not) along the straight path from 0 to the
observed activation β.

Two definitions (`attribution=`):

- "per_token" (default; the SIMU paper and knowledge-neuron attribution): every forget pair is
  expanded into next-token samples, one per answer token. Sample (sequence, position p) — the
  position whose logits predict answer token p+1 — scales unit k's activation *at position p
  only* and attributes that one token's log-probability L_p = log p(y_{p+1} | tokens ≤ p):

      Att(l, k) = Σ_samples β_{p,k} · (1/m) Σ_{j=1..m} ∂L_p/∂a_{p,k} |_{a_p = (j/m)·β_p}

- "sequence": one sample per sequence; the path scales layer l's activation at every position
  at once and attributes the summed answer log-likelihood L = Σ_p L_p. Question and template
  positions are scaled too, and every answer token's gradient reaches every earlier position,
  so the scores mix all positions' influence on all later tokens; the per-layer masks differ
  from the per-token ones (on a tiny float64 Llama, m = 6, t = 0.3: Jaccard 0.56 / 0.71 / 1.0).

Sign: L is a log-likelihood, so a positive attribution means the unit *supports* the answer
(removing it lowers the answer's probability); only positive units can be critical. Each copy
scales exactly one layer while every other layer runs as usual, so by completeness the
per-token Σ_k Att(l, k) ≈ Σ_p [L_p(observed) − L_p(layer l's activation zeroed at p)], and the
sequence one ≈ L(observed) − L(layer l zeroed everywhere), more closely as m grows. The model
is frozen (eval mode, no parameter gradient; gradients are taken with `torch.autograd.grad` on
the scaled activations only); its training mode and `requires_grad` flags are restored.

Cost of "per_token": by causality L_p depends only on the unperturbed prefix < p and on
position p's own path, which changes only from layer l's MLP upward. So one plain forward
records each layer's keys/values (the prefix), and each copy (layer l, step j) is a batch of
single-token queries — one per answer position — that attend to the cached prefix plus their
own key/value (a 4-D attention mask). Layers below l are replayed from the observed pass, the
backward stops at layer l, and the work grows linearly with answer tokens × layers × m (the
attention over the prefix adds a term in the prefix length). "sequence" replays layers below
the scaled one the same way but runs every position of every copy.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from asu_simu_plugin.arch import (
    cache_argument,
    decoder_layers,
    down_projection,
    key_value_cache,
    resolve_layer_ids,
    sliding_window,
    unwrap_model,
)
from asu_simu_plugin.losses import IGNORE_INDEX

MASK_MODES = ("dual", "forget_only")
ATTRIBUTIONS = ("per_token", "sequence")


@contextlib.contextmanager
def _frozen_eval(model):
    """Eval mode and no parameter gradients for the duration; restored afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for a float64 model (exactness checks)."""
    return torch.promote_types(dtype, torch.float32)


def _answer_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ log p(answer token) over the batch; only answer positions are upcast (memory)."""
    targets = labels[:, 1:]
    answer = targets != IGNORE_INDEX
    picked = logits[:, :-1][answer]
    return -F.cross_entropy(picked.to(_wide(picked.dtype)), targets[answer], reduction="sum")


def _observed_pass(model, projections, layers, inputs, cache=None):
    """One plain forward: each attributed layer's MLP activation β, and each decoder layer's
    output below the deepest attributed layer (what `_reused_prefix` replays). With `cache`
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
def _reused_prefix(layers, layer_outputs, first_scaled, copies, select=None):
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


def neuron_attributions(
    model,
    batches,
    steps: int = 5,
    layers=None,
    *,
    attribution: str = "per_token",
    progress: bool = True,
    chunk_size: int | None = None,
    distributed: bool = False,
) -> dict[int, torch.Tensor]:
    """Integrated-gradients attribution of every MLP unit: {layer_id: float32 [d_ff] on CPU}.

    `batches`: iterable of dicts with `input_ids`, `attention_mask`, `labels` (-100 = not an
    answer token; logits at t predict token t+1). `layers`: 0-based decoder-layer ids (None =
    all). `steps`: m, the number of Riemann points (the SIMU paper uses 5). `attribution`:
    "per_token" (one sample per answer token, the paper's definition) or "sequence" (the whole
    sequence scaled at once; see the module docstring). `chunk_size`: copies of the batch per
    forward/backward pass, one copy per (layer, step); the default, `steps`, is one pass per
    (batch, layer). A larger value stacks copies of several layers in one pass (same result),
    a smaller one saves memory. Batches whose labels are all -100 are skipped.

    `distributed=True` (torch.distributed initialised): `batches` is this rank's share of the
    data; the scores and counts are summed over ranks (all_reduce), so every rank returns the
    attribution of the whole set and raises the same errors.
    """
    if int(steps) < 1:
        raise ValueError(f"steps must be an integer >= 1 (got {steps}); the SIMU paper uses 5")
    steps = int(steps)
    if attribution not in ATTRIBUTIONS:
        raise ValueError(f"attribution={attribution!r}; use one of {', '.join(ATTRIBUTIONS)}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(
            f"chunk_size must be >= 1 copies of the batch per pass (got {chunk_size}); "
            "leave it None for one pass per layer"
        )
    chunk = int(chunk_size) if chunk_size is not None else steps
    model = unwrap_model(model)
    all_layers = decoder_layers(model)
    layer_ids = resolve_layer_ids(layers, len(all_layers))
    projections = {i: down_projection(all_layers[i]) for i in layer_ids}
    pairs = [(layer_id, j) for layer_id in layer_ids for j in range(1, steps + 1)]
    device = next(model.parameters()).device
    # Accumulated in float64: the sum over samples (and ranks) then hardly depends on order.
    totals = {
        i: torch.zeros(p.in_features, dtype=torch.float64, device=device)
        for i, p in projections.items()
    }
    window = sliding_window(model)
    batches_seen = batches_with_answers = 0
    with _frozen_eval(model):
        for batch in tqdm(batches, desc="neuron attribution", unit="batch", disable=not progress):
            batches_seen += 1
            labels = batch["labels"].to(device)
            if not bool((labels[:, 1:] != IGNORE_INDEX).any()):
                continue
            batches_with_answers += 1
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch.get("attention_mask")
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask.to(device)}
            if attribution == "sequence":
                observed, layer_outputs = _observed_pass(model, projections, all_layers, inputs)
                run_pass = _sequence_pass(model, projections, observed, inputs, labels, steps)
                select = None
            else:
                if window is not None and input_ids.shape[1] > window:
                    raise ValueError(
                        f"sequences of {input_ids.shape[1]} tokens exceed the model's sliding "
                        f"attention window ({window}): use attribution='sequence' or a "
                        f"max_length <= {window}"
                    )
                cache = key_value_cache(record=True)
                observed, layer_outputs = _observed_pass(
                    model, projections, all_layers, inputs, cache
                )
                queries = _AnswerQueries(model, projections, observed, cache, inputs, labels, steps)
                run_pass, select = queries.run_pass, queries.select
            for start in range(0, len(pairs), chunk):
                part = pairs[start : start + chunk]
                first_scaled = min(layer_id for layer_id, _ in part)
                with _reused_prefix(all_layers, layer_outputs, first_scaled, len(part), select):
                    contributions = run_pass(part, first_scaled)
                for layer_id, contribution in contributions.items():
                    totals[layer_id] += contribution
    if distributed:
        totals, batches_seen, batches_with_answers = _summed_over_ranks(
            totals, batches_seen, batches_with_answers
        )
    if batches_seen == 0:
        raise ValueError("empty forget set: `batches` yielded no batch to attribute")
    if batches_with_answers == 0:
        raise ValueError(
            f"no answer tokens in any of the {batches_seen} batch(es) (every label is -100): "
            "keep labels on the answers; check max_length truncation and the chat template"
        )
    return {i: total.float().cpu() for i, total in totals.items()}


def _summed_over_ranks(totals, batches_seen, batches_with_answers):
    """Scores and batch counts summed over every rank (one all_reduce)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return totals, batches_seen, batches_with_answers
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    layer_ids = list(totals)
    counts = torch.tensor([batches_seen, batches_with_answers], dtype=torch.float64)
    flat = torch.cat([counts, *(totals[i].cpu() for i in layer_ids)]).to(device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.cpu()
    summed, offset = {}, 2
    for i in layer_ids:
        width = totals[i].numel()
        summed[i] = flat[offset : offset + width]
        offset += width
    return summed, int(flat[0]), int(flat[1])


def _sequence_pass(model, projections, observed, inputs, labels, steps):
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


class _AnswerQueries:
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


def critical_neuron_masks(
    attributions: dict[int, torch.Tensor],
    threshold: float,
    retain_attributions: dict[int, torch.Tensor] | None = None,
    mode: str = "dual",
) -> dict[int, torch.Tensor]:
    """Per layer, neuron k is critical iff Att(l, k) > threshold · max_k Att(l, k).

    mode "dual" keeps forget-critical neurons whatever the retain set says (the paper's better
    variant, "including dual neurons"); "forget_only" drops those also critical on the retain
    set (needs `retain_attributions`). A layer whose maximum is ≤ 0 has no critical neuron.
    """
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(
            f"threshold must be in (0, 1] (got {threshold}): critical means Att > t · (layer max); "
            "0.3 is a usual choice"
        )
    if mode not in MASK_MODES:
        raise ValueError(f"mode={mode!r}; use one of {', '.join(MASK_MODES)}")
    if mode == "forget_only":
        if retain_attributions is None:
            raise ValueError(
                "mode='forget_only' needs retain_attributions (attribute the retain set with "
                "neuron_attributions), or use mode='dual'"
            )
        missing = sorted(set(attributions) - set(retain_attributions))
        if missing:
            raise ValueError(
                f"retain_attributions lacks layer(s) {missing}: attribute the retain set on the "
                "same layers as the forget set"
            )

    def critical(att: torch.Tensor, layer_id, which: str) -> torch.Tensor:
        att = att.float()
        if not bool(torch.isfinite(att).all()):
            raise ValueError(
                f"{which} attributions of layer {layer_id} are not finite (NaN/inf): attribute "
                "in float32 or with fewer steps per pass"
            )
        top = att.max()
        if top <= 0:  # nothing supports the answer in this layer
            return torch.zeros_like(att, dtype=torch.bool)
        return att > threshold * top

    masks = {}
    for layer_id, att in attributions.items():
        mask = critical(att, layer_id, "forget")
        if mode == "forget_only":
            retain = retain_attributions[layer_id]
            if retain.shape != att.shape:
                raise ValueError(
                    f"layer {layer_id}: retain attributions have shape {tuple(retain.shape)}, "
                    f"forget ones {tuple(att.shape)}; both must come from the same model"
                )
            mask &= ~critical(retain, layer_id, "retain")
        masks[layer_id] = mask
    return masks


def mask_summary(masks: dict[int, torch.Tensor]) -> dict:
    """Critical neurons per layer, in total, and as a fraction of all attributed neurons."""
    per_layer = {int(k): int(v.sum()) for k, v in sorted(masks.items())}
    neurons = sum(int(v.numel()) for v in masks.values())
    total = sum(per_layer.values())
    return {
        "critical_per_layer": per_layer,
        "critical_total": total,
        "neurons_total": neurons,
        "critical_fraction": total / neurons if neurons else 0.0,
    }


def mask_files(path) -> tuple[Path, Path]:
    """`<stem>.safetensors` and `<stem>.json` from a directory, a stem, or either file."""
    path = Path(path)
    if path.is_dir():
        path = path / "simu_masks"
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    # Append rather than with_suffix(): a stem such as "masks_t0.3" must keep its ".3".
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


@contextlib.contextmanager
def full_parameters(params):
    """Whole parameters for the duration: under DeepSpeed ZeRO-3 (parameters partitioned across
    ranks) they are gathered with `deepspeed.zero.GatheredParameters`, read-only; otherwise, and
    when deepspeed is not installed, nothing happens (peft's `gather_params_ctx` pattern)."""
    params = list(params)
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


FINGERPRINT_SAMPLES = 16


def model_record(model) -> dict:
    """What a mask file records of the model it was made for: decoder-layer count, MLP width
    (per layer if they differ) and a weight fingerprint.

    The fingerprint is the first 16 hex digits of a SHA-256 over each layer's `down_proj`
    weight shape and 16 of its entries at evenly spaced flat indices, rounded to bfloat16 (so
    a float32 and a bfloat16 load of one checkpoint agree; any fine-tuning step changes it).
    """
    import hashlib

    model = unwrap_model(model)
    projections = [down_projection(layer) for layer in decoder_layers(model)]
    widths = [proj.in_features for proj in projections]
    digest = hashlib.sha256()
    with full_parameters(proj.weight for proj in projections):
        for proj in projections:
            weight = proj.weight.detach()
            flat = weight.reshape(-1)
            index = torch.linspace(0, flat.numel() - 1, FINGERPRINT_SAMPLES).round().long()
            sample = flat[index.to(flat.device)].to(torch.bfloat16).float().cpu()
            digest.update(str(tuple(weight.shape)).encode())
            digest.update(sample.numpy().tobytes())
    return {
        "num_layers": len(projections),
        "mlp_width": widths[0] if len(set(widths)) == 1 else widths,
        "fingerprint": digest.hexdigest()[:16],
    }


def require_critical_neurons(masks: dict[int, torch.Tensor], source: str) -> None:
    """Refuse a mask with no critical neuron at all (SIMU would train attention only)."""
    if not any(bool(mask.any()) for mask in masks.values()):
        raise ValueError(
            f"{source}: no neuron is critical in any layer: lower the threshold, check that "
            "the forget set has answer tokens, or attribute again"
        )


def check_masks(masks: dict[int, torch.Tensor], model, record: dict | None, source: str) -> None:
    """Refuse masks made for another model (record from the mask file; see `model_record`)."""
    fix = "attribute on this model (leave mask_path unset) or give the mask file made for it"
    if not record:
        raise ValueError(
            f"{source} does not record the model it was made for (no layer count, MLP width or "
            f"weight fingerprint): {fix}"
        )
    here = model_record(model)
    if record.get("num_layers") != here["num_layers"]:
        raise ValueError(
            f"{source} was made for a model with {record.get('num_layers')} decoder layers, this "
            f"one has {here['num_layers']}: {fix}"
        )
    extra = sorted(set(masks) - set(range(here["num_layers"])))
    missing = sorted(set(range(here["num_layers"])) - set(masks))
    if extra or missing:
        raise ValueError(
            f"{source} has masks for layer(s) {extra} this model lacks and none for layer(s) "
            f"{missing}; a mask needs every decoder layer 0..{here['num_layers'] - 1}: {fix}"
        )
    widths = here["mlp_width"]
    widths = widths if isinstance(widths, list) else [widths] * here["num_layers"]
    wrong = [i for i in masks if masks[i].numel() != widths[i]]
    if record.get("mlp_width") != here["mlp_width"] or wrong:
        raise ValueError(
            f"{source} was made for MLP width {record.get('mlp_width')}, this model's is "
            f"{here['mlp_width']} (layers {wrong or 'all'} differ): {fix}"
        )
    if record.get("fingerprint") != here["fingerprint"]:
        raise ValueError(
            f"{source} was made for other weights (fingerprint {record.get('fingerprint')}, this "
            f"model's is {here['fingerprint']}): {fix}"
        )
    require_critical_neurons(masks, source)


def save_masks(masks: dict[int, torch.Tensor], path, metadata: dict | None = None, model=None):
    """Write `<path>.safetensors` (keys `layer.<id>`, bool) and `<path>.json` (metadata + counts).

    `path` is a stem (suffix optional) or an existing directory (then `simu_masks` inside it).
    With `model`, both files also record `model_record(model)`, which `load_masks(...,
    model=)` checks. Returns (safetensors path, json path).
    """
    from safetensors.torch import save_file

    tensors_path, json_path = mask_files(path)
    tensors_path.parent.mkdir(parents=True, exist_ok=True)
    record = {**(metadata or {})}
    if model is not None:
        record["model"] = model_record(model)
    save_file(
        {f"layer.{int(k)}": v.to(torch.bool).cpu().clone() for k, v in masks.items()},
        str(tensors_path),
        # The settings travel inside the tensor file too, where a copied file keeps them.
        metadata={"simu_masks": json.dumps(record, default=str)},
    )
    record = {**record, **mask_summary(masks)}
    json_path.write_text(json.dumps(record, indent=2, default=str))
    return tensors_path, json_path


def mask_record(path) -> dict | None:
    """The settings and model record stored in a mask file (None for files without one)."""
    from safetensors import safe_open

    tensors_path, _ = mask_files(path)
    with safe_open(str(tensors_path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return json.loads(metadata["simu_masks"]) if "simu_masks" in metadata else None


def load_masks(path, model=None) -> dict[int, torch.Tensor]:
    """Masks saved by `save_masks` (give the .safetensors file, its stem, or its directory).

    With `model`, masks made for another model are refused (`check_masks`): a different layer
    count, MLP width or weight fingerprint, extra or missing layers, or no critical neuron.
    """
    from safetensors.torch import load_file

    tensors_path, _ = mask_files(path)
    if not tensors_path.is_file():
        raise FileNotFoundError(
            f"{tensors_path}: no SIMU mask file (save_masks writes <stem>.safetensors; "
            "a directory is searched for simu_masks.safetensors)"
        )
    loaded = load_file(str(tensors_path))
    masks = {}
    for key, value in loaded.items():
        prefix, _, layer_id = key.partition(".")
        if prefix != "layer" or not layer_id.isdigit():
            raise ValueError(f"{tensors_path}: unexpected key {key!r}; mask keys are 'layer.<id>'")
        masks[int(layer_id)] = value.to(torch.bool)  # uint8 files load too
    masks = dict(sorted(masks.items()))
    if model is not None:
        record = mask_record(tensors_path) or {}
        check_masks(masks, model, record.get("model"), str(tensors_path))
    return masks


def _counts(masks_or_counts: dict) -> dict[int, int]:
    return {
        int(k): int(v.sum()) if isinstance(v, torch.Tensor) else int(v)
        for k, v in sorted(masks_or_counts.items())
    }


def plot_mask_counts(masks_or_counts_by_threshold: dict, path) -> Path:
    """PNG of critical neurons per layer.

    Accepts one set of masks ({layer: bool mask} or {layer: count}, drawn as bars) or a sweep
    {threshold: masks or counts} (one line per threshold).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not masks_or_counts_by_threshold:
        raise ValueError("nothing to plot: give {layer: mask} or {threshold: {layer: mask}}")
    first = next(iter(masks_or_counts_by_threshold.values()))
    sweep = (
        masks_or_counts_by_threshold
        if isinstance(first, dict)
        else {None: masks_or_counts_by_threshold}
    )
    # A bare Figure on the Agg canvas: no pyplot state, no change to the session's backend.
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for threshold, masks in sweep.items():
        counts = _counts(masks)
        if threshold is None:
            ax.bar(list(counts), list(counts.values()), color="tab:blue")
        else:
            ax.plot(list(counts), list(counts.values()), marker="o", label=f"t = {threshold:g}")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("critical neurons")
    ax.set_title("SIMU critical neurons per layer")
    if None not in sweep:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
