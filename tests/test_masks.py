"""SIMU's mask files: round trip, the model they record, and damaged files (one line naming
the file and the fix; nothing unpickled)."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from conftest import tiny_causal_lm
from safetensors.torch import save_file

from asu_simu_plugin.arguments import MethodArgumentError
from asu_simu_plugin.methods.simu import SIMUArguments
from asu_simu_plugin.methods.simu.masks import (
    check_masks,
    load_masks,
    mask_record,
    mask_summary,
    model_record,
    plot_mask_counts,
    save_masks,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIX = "rerun the attribution or point mask_path at another file"


def test_masks_round_trip_with_counts_and_pngs(tmp_path):
    masks = {0: torch.tensor([True, False, True]), 3: torch.tensor([False, False, True])}
    tensors, meta = save_masks(masks, tmp_path / "simu_masks", {"threshold": 0.3, "steps": 20})
    assert (tensors.name, meta.name) == ("simu_masks.safetensors", "simu_masks.json")
    for source in (tensors, tmp_path / "simu_masks", tmp_path):  # file, stem, directory
        loaded = load_masks(source)
        assert list(loaded) == [0, 3]
        assert all(
            loaded[k].dtype == torch.bool and torch.equal(loaded[k], masks[k]) for k in masks
        )
    record = json.loads(meta.read_text())
    assert record["threshold"] == 0.3 and record["steps"] == 20
    assert record["critical_per_layer"] == {"0": 2, "3": 1}
    assert record["critical_total"] == 3 and record["neurons_total"] == 6
    assert record["critical_fraction"] == pytest.approx(0.5)
    assert mask_summary(masks)["critical_per_layer"] == {0: 2, 3: 1}
    # A stem with a dot keeps it.
    dotted, _ = save_masks(masks, tmp_path / "masks_t0.3", {})
    assert dotted.name == "masks_t0.3.safetensors"
    assert torch.equal(load_masks(dotted)[0], masks[0])
    # Files written with uint8 masks load as bool.
    from safetensors.torch import save_file

    save_file(
        {"layer.5": torch.tensor([1, 0], dtype=torch.uint8)}, str(tmp_path / "u8.safetensors")
    )
    assert load_masks(tmp_path / "u8.safetensors")[5].tolist() == [True, False]
    for name, data in (
        ("sweep.png", {0.1: masks, 0.5: masks}),
        ("one.png", masks),
        ("counts.png", {0.3: {0: 2, 3: 1}}),
    ):
        png = plot_mask_counts(data, tmp_path / "plots" / name)
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000


def test_a_mask_file_records_its_model_and_refuses_any_other(tmp_path):
    model = tiny_causal_lm("llama")
    masks = {i: torch.tensor([True] + [False] * 47) for i in range(3)}
    settings = {"steps": 5, "threshold": 0.3, "attribution": "per_token"}
    tensors, meta = save_masks(masks, tmp_path / "simu_masks", settings, model=model)
    record = model_record(model)
    assert record["num_layers"] == 3 and record["mlp_width"] == 48
    assert len(record["fingerprint"]) == 16
    # The record travels inside the tensor file and is mirrored in the JSON.
    assert mask_record(tensors) == {**settings, "model": record}
    assert json.loads(meta.read_text())["model"] == record
    for loaded in (load_masks(tensors, model=model), load_masks(tmp_path, model=model)):
        assert all(torch.equal(loaded[i], masks[i]) for i in masks)
    # The same weights in bfloat16 have the same fingerprint (samples are rounded to bf16).
    assert model_record(tiny_causal_lm("llama").to(torch.bfloat16)) == record

    def refused(other, match, path=tensors):
        with pytest.raises(ValueError, match=match) as info:
            load_masks(path, model=other)
        assert "\n" not in str(info.value) and "attribute" in str(info.value)

    refused(tiny_causal_lm("llama", seed=1), "other weights")
    refused(tiny_causal_lm("llama", num_hidden_layers=4), "3 decoder layers, this one has 4")
    with pytest.raises(ValueError, match="MLP width 48, this model's is 64"):
        load_masks(tensors, model=tiny_causal_lm("llama", intermediate_size=64))
    # Extra / missing layers, a wrong width in one layer, no critical neuron at all.
    for name, bad, match in (
        ("extra", {**masks, 3: masks[0]}, r"layer\(s\) \[3\] this model lacks"),
        ("missing", {0: masks[0], 1: masks[1]}, r"none for layer\(s\) \[2\]"),
        ("narrow", {**masks, 1: masks[1][:40]}, r"layers \[1\] differ"),
        (
            "empty",
            {i: torch.zeros(48, dtype=torch.bool) for i in range(3)},
            "no neuron is critical",
        ),
    ):
        path, _ = save_masks(bad, tmp_path / name, settings, model=model)
        refused(model, match, path=path)
    # A file that records no model (older files, hand-made ones) is refused for training.
    bare, _ = save_masks(masks, tmp_path / "bare", settings)
    refused(model, "does not record the model", path=bare)
    with pytest.raises(ValueError, match="does not record"):
        check_masks(masks, model, None, "masks")


def test_a_missing_file_and_an_empty_plot_are_named(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_masks(tmp_path)
    assert str(info.value) == (
        f"{tmp_path / 'simu_masks.safetensors'}: no SIMU mask file (save_masks writes "
        "<stem>.safetensors; a directory is searched for simu_masks.safetensors)"
    )
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_mask_counts({}, tmp_path / "x.png")


class _Payload:
    """Unpickling it creates `marker`: proof that a loader unpickled the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _damaged(tmp_path, kind: str) -> bytes:
    """The bytes of a good mask file, cut or replaced."""
    model = tiny_causal_lm("llama")
    masks = {i: torch.tensor([True] * 5 + [False] * 43) for i in range(3)}
    good, _ = save_masks(masks, tmp_path / "good", {"threshold": 0.3}, model=model)
    data = good.read_bytes()
    return {
        "truncated_data": data[:-7],
        "truncated_header": data[:40],
        "eight_bytes": data[:8],
        "empty": b"",
        "garbage": bytes(range(256)) * 3,
        "pickle": pickle.dumps({"layer.0": _Payload(tmp_path / "unpickled")}),
        "torch_save": _torch_saved(tmp_path),
    }[kind]


def _torch_saved(tmp_path) -> bytes:
    target = tmp_path / "payload.pt"
    torch.save({"layer.0": _Payload(tmp_path / "unpickled")}, target)
    return target.read_bytes()


@pytest.mark.parametrize(
    "kind",
    [
        "truncated_data",
        "truncated_header",
        "eight_bytes",
        "empty",
        "garbage",
        "pickle",
        "torch_save",
    ],
)
def test_a_damaged_mask_file_is_one_line_naming_it_and_the_fix(tmp_path, kind):
    """load_masks / mask_record and SIMU's `mask_path` (built before any model work on both
    routes) refuse it in one line; a pickle planted in its place is never unpickled."""
    folder = tmp_path / "run"
    folder.mkdir()
    path = folder / "simu_masks.safetensors"
    path.write_bytes(_damaged(tmp_path, kind))
    start = f"{path} is not a readable safetensors file ("
    end = f"; truncated, or not a mask file?): {FIX}"
    for read in (load_masks, mask_record):
        for given in (path, folder, folder / "simu_masks", folder / "simu_masks.json"):
            with pytest.raises(ValueError) as info:
                read(given)
            message = str(info.value)
            assert message.startswith(start) and message.endswith(end), message
            assert "\n" not in message
    with pytest.raises(MethodArgumentError) as info:
        SIMUArguments(mask_path=str(folder))
    assert str(info.value).startswith(f"mask_path: {start}")
    assert str(info.value).endswith(end)
    assert not (tmp_path / "unpickled").exists()


def test_a_mask_file_with_a_bad_record_or_tensor_is_named(tmp_path):
    path = tmp_path / "simu_masks.safetensors"
    save_file({"layer.0": torch.ones(4, dtype=torch.bool)}, str(path), {"simu_masks": "{cut"})
    assert load_masks(path)[0].tolist() == [True] * 4  # the tensors are fine
    with pytest.raises(ValueError) as info:
        mask_record(path)
    assert str(info.value) == f"{path}: its settings record is not a JSON object: {FIX}"
    save_file({"layer.0": torch.ones(2, 4)}, str(path))
    with pytest.raises(ValueError) as info:
        load_masks(path)
    assert str(info.value) == (
        f"{path}: layer.0 is a (2, 4) torch.float32 tensor, not a bool vector over the MLP "
        f"width: {FIX}"
    )
    save_file({"model.layers.0.mlp.down_proj.weight": torch.ones(4)}, str(path))
    with pytest.raises(ValueError) as info:
        SIMUArguments(mask_path=str(path))
    assert str(info.value) == (
        f"mask_path: {path}: unexpected key 'model.layers.0.mlp.down_proj.weight'; mask keys "
        f"are 'layer.<id>': {FIX}"
    )


def test_the_json_beside_the_tensors_is_never_read(tmp_path):
    """The .json is for people; a damaged one changes nothing (the record is in the tensors)."""
    model = tiny_causal_lm("llama")
    masks = {i: torch.tensor([True] * 3 + [False] * 45) for i in range(3)}
    tensors, meta = save_masks(masks, tmp_path / "simu_masks", {"threshold": 0.3}, model=model)
    for damage in (meta.read_bytes()[:10], b"\x00\xff garbage"):
        meta.write_bytes(damage)
        loaded = load_masks(meta, model=model)  # the .json path names the pair
        assert all(torch.equal(loaded[i], masks[i]) for i in masks)
        assert mask_record(tmp_path)["threshold"] == 0.3
        assert SIMUArguments(mask_path=str(meta)).mask_path == str(meta)


def test_simu_refuses_an_empty_mask_file_before_the_model(tmp_path):
    empty = {i: torch.zeros(48, dtype=torch.bool) for i in range(3)}
    tensors, _ = save_masks(empty, tmp_path / "simu_masks", {"threshold": 0.9})
    with pytest.raises(MethodArgumentError) as info:
        SIMUArguments(mask_path=str(tmp_path))
    assert str(info.value) == (
        f"mask_path: {tensors}: no neuron is critical in any layer: lower the threshold, check "
        "that the forget set has answer tokens, or attribute again"
    )
    with pytest.raises(MethodArgumentError) as info:
        SIMUArguments(mask_path=str(tmp_path / "nowhere"))
    assert str(info.value) == f"mask_path: {tmp_path / 'nowhere.safetensors'} is not a file"
    with pytest.raises(MethodArgumentError) as info:
        SIMUArguments(mask_path=3)
    assert str(info.value) == "mask_path must be a file path (got 3)"
