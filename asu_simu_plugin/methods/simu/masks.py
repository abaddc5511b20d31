"""SIMU's mask files: save, load, the model they were made for, and a plot of the counts.

`save_masks` writes `<stem>.safetensors` (one bool vector per decoder layer, keys `layer.<id>`,
with the settings and `model_record` in its metadata) and `<stem>.json` (the same record plus
the counts, for people: nothing reads it back). `load_masks` reads the tensor file only, never
unpickles anything, and answers a damaged file with one line naming it and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from asu_simu_plugin.arch import decoder_layers, down_projection, unwrap_model
from asu_simu_plugin.zero import whole_parameters

FIX = "rerun the attribution or point mask_path at another file"


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
    with whole_parameters([proj.weight for proj in projections]):
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


def _read(tensors_path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata of a safetensors file; a damaged one is a one-line ValueError."""
    from safetensors import SafetensorError, safe_open

    if not tensors_path.is_file():
        raise FileNotFoundError(
            f"{tensors_path}: no SIMU mask file (save_masks writes <stem>.safetensors; "
            "a directory is searched for simu_masks.safetensors)"
        )
    try:
        with safe_open(str(tensors_path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        reason = reason.removeprefix("Error while deserializing header: ")
        raise ValueError(
            f"{tensors_path} is not a readable safetensors file ({reason}; truncated, or not a mask file?): "
            f"{FIX}"
        ) from None
    return tensors, metadata


def mask_record(path) -> dict | None:
    """The settings and model record stored in a mask file (None for files without one)."""
    tensors_path, _ = mask_files(path)
    _, metadata = _read(tensors_path)
    if "simu_masks" not in metadata:
        return None
    try:
        record = json.loads(metadata["simu_masks"])
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict):
        raise ValueError(f"{tensors_path}: its settings record is not a JSON object: {FIX}")
    return record


def load_masks(path, model=None) -> dict[int, torch.Tensor]:
    """Masks saved by `save_masks` (give the .safetensors file, its stem, or its directory).

    With `model`, masks made for another model are refused (`check_masks`): a different layer
    count, MLP width or weight fingerprint, extra or missing layers, or no critical neuron.
    """
    tensors_path, _ = mask_files(path)
    tensors, _ = _read(tensors_path)
    masks = {}
    for key, value in tensors.items():
        prefix, _, layer_id = key.partition(".")
        if prefix != "layer" or not layer_id.isdigit():
            raise ValueError(
                f"{tensors_path}: unexpected key {key!r}; mask keys are 'layer.<id>': {FIX}"
            )
        if value.dim() != 1 or value.dtype not in (torch.bool, torch.uint8):
            raise ValueError(
                f"{tensors_path}: {key} is a {tuple(value.shape)} {value.dtype} tensor, not a "
                f"bool vector over the MLP width: {FIX}"
            )
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
