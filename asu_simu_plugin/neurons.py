"""SIMU's critical neurons: integrated-gradients attribution of MLP units, and per-layer masks.

A "neuron" k of layer l is the k-th MLP intermediate unit — the k-th input dimension of that
layer's `down_proj` (`act(gate_proj(x)) · up_proj(x)` for gated MLPs, the same position for
Phi-3's fused gate/up). For one layer, with β the observed activation and L the answer-token
log-likelihood (sum of log p over answer tokens; positive attribution = the unit supports the
answer):

    Att(l, k) = Σ_examples Σ_positions β_k · (1/m) Σ_{j=1..m} ∂L/∂a_k |_{a = (j/m)·β}

a right Riemann sum with m = `steps` points of the integral along the straight path from 0 to
β. The path scales layer l's activation at every position at once, while every other layer runs
as observed (downstream layers see the consequences); so, by completeness,
Σ_k Att(l, k) ≈ L(observed) − L(layer l's activation zeroed), more closely as m grows.

All (layer, step) pairs are evaluated as copies of the batch in one forward/backward (or in
chunks of `chunk_size` copies when memory is short); the model's parameters get no gradient.
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
    return -F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2),
        labels[:, 1:],
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def _observed_activations(model, projections, inputs) -> dict[int, torch.Tensor]:
    captured, handles = {}, []
    for layer_id, proj in projections.items():

        def keep(_module, args, layer_id=layer_id):
            captured[layer_id] = args[0].detach()

        handles.append(proj.register_forward_pre_hook(keep))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return captured


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
    answer token). `chunk_size`: copies of a batch per forward (default: all layers × steps).
    """
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    steps = int(steps)
    model = unwrap_model(model)
    all_layers = decoder_layers(model)
    layer_ids = resolve_layer_ids(layers, len(all_layers))
    projections = {i: down_projection(all_layers[i]) for i in layer_ids}
    pairs = [(layer_id, j) for layer_id in layer_ids for j in range(1, steps + 1)]
    chunk = int(chunk_size) if chunk_size else len(pairs)
    totals = {i: torch.zeros(p.in_features, dtype=torch.float32) for i, p in projections.items()}
    device = next(model.parameters()).device
    seen = 0
    with _frozen_eval(model):
        for batch in tqdm(batches, desc="neuron attribution", unit="batch", disable=not progress):
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask") if k in batch}
            labels = batch["labels"].to(device)
            if not bool((labels[:, 1:] != IGNORE_INDEX).any()):
                continue
            seen += 1
            observed = _observed_activations(model, projections, inputs)
            for start in range(0, len(pairs), chunk):
                part = pairs[start : start + chunk]
                for layer_id, contribution in _integrated_gradients(
                    model, projections, observed, inputs, labels, part, steps
                ).items():
                    totals[layer_id] += contribution
    if seen == 0:
        raise ValueError(
            "no batch with answer tokens: the forget set is empty (or every label is -100)"
        )
    return totals


def _integrated_gradients(model, projections, observed, inputs, labels, pairs, steps):
    """One forward/backward over len(pairs) copies; copy c scales only layer pairs[c][0]."""
    copies = len(pairs)
    batch_size = labels.shape[0]
    repeated = {k: v.repeat(copies, *([1] * (v.dim() - 1))) for k, v in inputs.items()}
    leaves, handles = {}, []
    for layer_id in sorted({layer for layer, _ in pairs}):
        copy_ids = [c for c, (layer, _) in enumerate(pairs) if layer == layer_id]
        alphas = torch.tensor([pairs[c][1] / steps for c in copy_ids], device=labels.device)
        beta = observed[layer_id]
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
            logits = model(**repeated).logits
            total = _answer_log_likelihood(logits, labels.repeat(copies, 1))
            grads = torch.autograd.grad(total, list(leaves.values()))
    finally:
        for handle in handles:
            handle.remove()
    result = {}
    for layer_id, grad in zip(leaves, grads, strict=True):
        beta = observed[layer_id].unsqueeze(0)
        result[layer_id] = (beta.float() * grad.float()).sum(dim=(0, 1, 2)).cpu() / steps
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
        raise ValueError(f"threshold must be in (0, 1] (got {threshold}); 0.3 is a usual choice")
    if mode not in MASK_MODES:
        raise ValueError(f"mode={mode!r}; use one of {', '.join(MASK_MODES)}")
    if mode == "forget_only" and retain_attributions is None:
        raise ValueError("mode='forget_only' needs retain_attributions (attribute the retain set)")

    def critical(att: torch.Tensor) -> torch.Tensor:
        top = att.max()
        if top <= 0:
            return torch.zeros_like(att, dtype=torch.bool)
        return att > threshold * top

    masks = {}
    for layer_id, att in attributions.items():
        mask = critical(att.float())
        if mode == "forget_only":
            mask &= ~critical(retain_attributions[layer_id].float())
        masks[layer_id] = mask
    return masks


def mask_summary(masks: dict[int, torch.Tensor]) -> dict:
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
    path = Path(path)
    if path.is_dir():
        path = path / "simu_masks"
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_suffix(".safetensors"), path.with_suffix(".json")


def save_masks(masks: dict[int, torch.Tensor], path, metadata: dict | None = None):
    """Write `<path>.safetensors` (keys `layer.<id>`, bool) and `<path>.json` (settings, counts)."""
    from safetensors.torch import save_file

    tensors_path, json_path = _mask_paths(path)
    tensors_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {f"layer.{k}": v.to(torch.bool).contiguous().cpu() for k, v in masks.items()},
        str(tensors_path),
    )
    record = {**(metadata or {}), **mask_summary(masks)}
    json_path.write_text(json.dumps(record, indent=2))
    return tensors_path, json_path


def load_masks(path) -> dict[int, torch.Tensor]:
    """Masks saved by `save_masks` (give the .safetensors file, its stem, or its directory)."""
    from safetensors.torch import load_file

    tensors_path, _ = _mask_paths(path)
    if not tensors_path.is_file():
        raise FileNotFoundError(
            f"{tensors_path}: no SIMU mask file (written as simu_masks.safetensors)"
        )
    loaded = load_file(str(tensors_path))
    return {int(k.split(".", 1)[1]): v.to(torch.bool) for k, v in sorted(loaded.items())}


def plot_mask_counts(masks_or_sweep, path) -> Path:
    """PNG of critical neurons per layer; given {threshold: masks}, one line per threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(masks_or_sweep.values()))
    sweep = masks_or_sweep if isinstance(first, dict) else {None: masks_or_sweep}
    fig, ax = plt.subplots(figsize=(7, 4))
    for threshold, masks in sweep.items():
        layers = sorted(masks)
        counts = [int(masks[i].sum()) for i in layers]
        label = f"t = {threshold:g}" if threshold is not None else None
        if threshold is None:
            ax.bar(layers, counts, color="tab:blue")
        else:
            ax.plot(layers, counts, marker="o", label=label)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("critical neurons")
    ax.set_title("SIMU critical neurons per layer")
    if len(sweep) > 1 or None not in sweep:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
