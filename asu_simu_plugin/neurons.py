"""SIMU's critical neurons: integrated-gradients attribution of MLP units, and per-layer masks.

A "neuron" k of layer l is the k-th MLP intermediate unit — the k-th input dimension of that
layer's `down_proj` (`act(gate_proj(x)) · up_proj(x)` for gated MLPs, the same position for
Phi-3's fused gate/up). For one layer, with β the observed activation and L the answer-token
log-likelihood (sum of log p over answer tokens, i.e. minus the summed NLL):

    Att(l, k) = Σ_examples Σ_positions β_k · (1/m) Σ_{j=1..m} ∂L/∂a_k |_{a = (j/m)·β}

a right Riemann sum (points j/m, j = 1..m, so α = 1 is included and α = 0 is not) with m =
`steps` points of the integral along the straight path from 0 to β. Positions are the real
tokens of each sequence (attention_mask = 1); padding contributes nothing.

Sign: L is a log-likelihood, so a positive attribution means the unit *supports* the answer
(removing it lowers the answer's probability); only positive units can be critical.

Per-layer definition: the path scales layer l's activation at every position at once, while
every other layer runs as usual (downstream layers see the consequences, no other layer is
scaled). So, by completeness, Σ_k Att(l, k) ≈ L(observed) − L(layer l's activation zeroed),
more closely as m grows. Each (layer, step) pair is one copy of the batch, and copies are
stacked along the batch dimension: a copy scales exactly one layer, so stacking copies of
different layers is still the per-layer definition. The model is frozen (eval mode, no
parameter gradient; gradients are taken with `torch.autograd.grad` on the scaled activations
only), and its training mode and `requires_grad` flags are restored afterwards.

Cost: layers below the shallowest layer a pass scales see unscaled inputs in every copy, so
their outputs are replayed from the observed pass instead of recomputed, and the backward
stops at the scaled layer; a pass for layer l runs only layers l and above.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from asu_simu_plugin.arch import decoder_layers, down_projection, resolve_layer_ids, unwrap_model
from asu_simu_plugin.losses import IGNORE_INDEX

MASK_MODES = ("dual", "forget_only")


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


def _answer_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ log p(answer token) over the batch; only answer positions are upcast (memory)."""
    targets = labels[:, 1:]
    answer = targets != IGNORE_INDEX
    return -F.cross_entropy(logits[:, :-1][answer].float(), targets[answer], reduction="sum")


def _observed_pass(model, projections, layers, inputs):
    """One plain forward: each attributed layer's MLP activation β, and each decoder layer's
    output below the deepest attributed layer (what `_reused_prefix` replays)."""
    activations, layer_outputs, handles = {}, {}, []
    for layer_id, proj in projections.items():

        def keep_activation(_module, args, layer_id=layer_id):
            activations[layer_id] = args[0].detach()

        handles.append(proj.register_forward_pre_hook(keep_activation))
    for layer_id in range(max(projections, default=0)):

        def keep_output(_module, _args, output, layer_id=layer_id):
            layer_outputs[layer_id] = output

        handles.append(layers[layer_id].register_forward_hook(keep_output))
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return activations, layer_outputs


def _replayable(output) -> bool:
    """A tensor, or a tuple of tensors and Nones (what decoder layers return without a cache)."""
    if isinstance(output, torch.Tensor):
        return True
    return isinstance(output, tuple) and all(
        part is None or isinstance(part, torch.Tensor) for part in output
    )


def _repeat_rows(output, copies):
    """A replayable layer output with every tensor repeated `copies` times along the batch."""
    if isinstance(output, torch.Tensor):
        return output.repeat(copies, *([1] * (output.dim() - 1)))
    return tuple(None if part is None else _repeat_rows(part, copies) for part in output)


@contextlib.contextmanager
def _reused_prefix(layers, layer_outputs, first_scaled, copies):
    """Layers below the shallowest scaled one see unscaled inputs in every copy, so their
    outputs are the observed ones: replay them instead of running those layers again
    (a layer whose output is no plain tensor/tuple just runs)."""
    replaced = []
    try:
        for layer_id in range(first_scaled):
            output = layer_outputs[layer_id]
            if not _replayable(output):
                continue
            layer = layers[layer_id]
            # An instance-level forward (accelerate's device hooks) is put back afterwards.
            replaced.append((layer, layer.__dict__.get("forward")))
            # Repeated when called, so only the current layer's copies are alive (memory).
            layer.forward = lambda *args, output=output, **kwargs: _repeat_rows(output, copies)
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
    steps: int = 20,
    layers=None,
    *,
    progress: bool = True,
    chunk_size: int | None = None,
) -> dict[int, torch.Tensor]:
    """Integrated-gradients attribution of every MLP unit: {layer_id: float32 [d_ff] on CPU}.

    `batches`: iterable of dicts with `input_ids`, `attention_mask`, `labels` (-100 = not an
    answer token; logits at t predict token t+1). `layers`: 0-based decoder-layer ids (None =
    all). `steps`: m, the number of Riemann points. `chunk_size`: copies of the batch per
    forward/backward pass; the default, `steps`, is one pass per (batch, layer). A larger value
    stacks copies of several layers in one pass (faster on small models, same result), a smaller
    one saves memory. Batches whose labels are all -100 are skipped.
    """
    if int(steps) < 1:
        raise ValueError(f"steps must be an integer >= 1 (got {steps}); 20 is a usual choice")
    steps = int(steps)
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
    totals = {i: torch.zeros(p.in_features, dtype=torch.float32) for i, p in projections.items()}
    device = next(model.parameters()).device
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
            observed, layer_outputs = _observed_pass(model, projections, all_layers, inputs)
            for start in range(0, len(pairs), chunk):
                part = pairs[start : start + chunk]
                first_scaled = min(layer_id for layer_id, _ in part)
                with _reused_prefix(all_layers, layer_outputs, first_scaled, len(part)):
                    contributions = _integrated_gradients(
                        model, projections, observed, inputs, labels, part, steps
                    )
                for layer_id, contribution in contributions.items():
                    totals[layer_id] += contribution
    if batches_seen == 0:
        raise ValueError("empty forget set: `batches` yielded no batch to attribute")
    if batches_with_answers == 0:
        raise ValueError(
            f"no answer tokens in any of the {batches_seen} batch(es) (every label is -100): "
            "keep labels on the answers; check max_length truncation and the chat template"
        )
    return totals


def _integrated_gradients(model, projections, observed, inputs, labels, pairs, steps):
    """One forward/backward over len(pairs) copies; copy c scales only layer pairs[c][0]."""
    copies = len(pairs)
    batch_size = labels.shape[0]
    repeated = {k: v.repeat(copies, *([1] * (v.dim() - 1))) for k, v in inputs.items()}
    real_tokens = inputs["attention_mask"].bool().unsqueeze(-1)  # [B, T, 1]
    leaves, handles = {}, []
    for layer_id in sorted({layer for layer, _ in pairs}):
        copy_ids = [c for c, (layer, _) in enumerate(pairs) if layer == layer_id]
        alphas = torch.tensor([pairs[c][1] / steps for c in copy_ids], device=labels.device)
        beta = observed[layer_id]
        # The scaled activation is a fresh leaf, so gradients reach it and nothing upstream.
        leaf = (alphas.view(-1, 1, 1, 1).to(beta.dtype) * beta.unsqueeze(0)).requires_grad_(True)
        leaves[layer_id] = leaf
        rows = torch.cat([torch.arange(c * batch_size, (c + 1) * batch_size) for c in copy_ids])
        rows = rows.to(labels.device)

        def replace(_module, args, leaf=leaf, rows=rows):
            activation = args[0].clone()
            activation[rows] = leaf.reshape(-1, *leaf.shape[2:])
            return (activation, *args[1:])

        handles.append(projections[layer_id].register_forward_pre_hook(replace))
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
        # β is the same for every copy, so sum the copies' gradients first (memory).
        terms = observed[layer_id].float() * grad.float().sum(dim=0)
        # Padding is no position of the sum; where() also drops a stray NaN there.
        terms = torch.where(real_tokens, terms, 0.0)
        result[layer_id] = terms.sum(dim=(0, 1)).cpu() / steps
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


def _mask_paths(path) -> tuple[Path, Path]:
    """`<stem>.safetensors` and `<stem>.json` from a directory, a stem, or either file."""
    path = Path(path)
    if path.is_dir():
        path = path / "simu_masks"
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    # Append rather than with_suffix(): a stem such as "masks_t0.3" must keep its ".3".
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def save_masks(masks: dict[int, torch.Tensor], path, metadata: dict | None = None):
    """Write `<path>.safetensors` (keys `layer.<id>`, bool) and `<path>.json` (metadata + counts).

    `path` is a stem (suffix optional) or an existing directory (then `simu_masks` inside it).
    Returns (safetensors path, json path).
    """
    from safetensors.torch import save_file

    tensors_path, json_path = _mask_paths(path)
    tensors_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {f"layer.{int(k)}": v.to(torch.bool).contiguous().cpu() for k, v in masks.items()},
        str(tensors_path),
    )
    record = {**(metadata or {}), **mask_summary(masks)}
    json_path.write_text(json.dumps(record, indent=2, default=str))
    return tensors_path, json_path


def load_masks(path) -> dict[int, torch.Tensor]:
    """Masks saved by `save_masks` (give the .safetensors file, its stem, or its directory)."""
    from safetensors.torch import load_file

    tensors_path, _ = _mask_paths(path)
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
    return dict(sorted(masks.items()))


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
