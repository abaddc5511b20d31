"""`asu-simu unlearn` at its edges: inputs inside the output, two runs at once, runs that would do
nothing, limits of the model, damaged files, resuming after a failed checkpoint write (each test
is one finding of issue 23, points 7-10)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_support import last_error_line, one_error_line, unlearn
from safetensors.torch import load_file

from asu_simu_plugin import output, runner
from asu_simu_plugin.data import DataFormatError
from asu_simu_plugin.output import RESUME_FILE, RUN_FILE
from asu_simu_plugin.registry import methods

pytestmark = pytest.mark.usefixtures("single_thread")
REPO = Path(__file__).resolve().parents[1]


def moved(files, tmp_path, folder: str):
    """The `files` fixture with forget.jsonl and retain.jsonl moved into tmp_path/folder."""
    model_dir, forget, retain = files
    target = tmp_path / folder
    target.mkdir(parents=True)
    return model_dir, forget.rename(target / forget.name), retain.rename(target / retain.name)


# -- 7. the output may not hold an input; one run at a time -----------------------------------------
@pytest.mark.parametrize(
    "data, out, what",
    [
        ("data", "data", "--forget file"),  # the folder holding both files
        ("runs/data", "runs", "--forget file"),  # a parent of it
        ("out.partial", "out", "--forget file"),  # the work folder --overwrite clears
    ],
)
def test_output_holding_the_data_files_is_refused_untouched(
    files, tmp_path, capsys, no_model_loading, data, out, what
):
    files = moved(files, tmp_path, data)
    (tmp_path / data / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in (tmp_path / data).iterdir()}
    assert unlearn(files, tmp_path / out, "--overwrite") == 2
    line = one_error_line(capsys)
    assert f"overlaps the {what} {files[1]}: choose an --output outside it" in line
    assert {p: p.read_bytes() for p in (tmp_path / data).iterdir()} == before
    assert not (tmp_path / f"{out}.lock").exists()


def test_a_mask_file_given_with_set_is_protected(tmp_path):
    from argparse import Namespace

    import torch

    from asu_simu_plugin.cli.unlearn import input_paths
    from asu_simu_plugin.methods.simu.masks import save_masks

    masks = tmp_path / "masks"
    masks.mkdir()
    mask, _ = save_masks({0: torch.tensor([True, False])}, masks / "simu_masks")
    args = Namespace(forget="f.jsonl", retain="r.jsonl")
    simu = runner.method_arguments("simu", {"mask_path": str(mask)})
    inputs = input_paths(args, simu)
    assert inputs == {
        "--forget file": "f.jsonl",
        "--retain file": "r.jsonl",
        "mask_path file": str(mask),
    }
    with pytest.raises(output.OutputError, match="overlaps the mask_path file"):
        output.prepare_output(masks, inputs=inputs, overwrite=True)
    assert mask.exists() and not (tmp_path / "masks.lock").exists()


def test_a_second_run_into_the_same_output_is_refused(files, tmp_path, capsys):
    out = tmp_path / "out"
    first = output.prepare_output(out)  # a run holding the output
    assert (tmp_path / "out.lock").read_text().startswith("process ")
    assert unlearn(files, out) == 2
    line = one_error_line(capsys)
    assert f"the output folder {out} is in use by another run (process " in line
    assert line.endswith(": wait for it to end, or choose another --output")
    first.abandon()  # the first run ends: the output is free again
    assert not (tmp_path / "out.lock").exists()
    assert unlearn(files, out, method="graddiff") == 0
    record = json.loads((out / RUN_FILE).read_text())
    # --max-length was not given: its default (512) is lowered to the model's 256 positions
    assert record["settings"]["max_length"] == 256
    assert not (tmp_path / "out.lock").exists() and not (tmp_path / "out.partial").exists()
    output.prepare_output(tmp_path / "other")  # a plan dropped unfinished frees its output
    output.prepare_output(tmp_path / "other").abandon()
    assert not (tmp_path / "other.lock").exists() and not (tmp_path / "other.partial").exists()


def test_the_lock_of_another_process_blocks_until_it_dies(files, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from asu_simu_plugin.output import prepare_output; "
            "plan = prepare_output(sys.argv[1]); print('locked', flush=True); time.sleep(120)",
            str(out),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert unlearn(files, out) == 2
        assert f"in use by another run (process {holder.pid} on " in one_error_line(capsys)
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "out.lock").exists()  # left behind by the killed process: blocks nobody
    assert unlearn(files, out, method="graddiff") == 0
    assert not (tmp_path / "out.lock").exists()


# -- 8. runs that would do nothing ------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--set", "gamma=0", "--set", "alpha=0"],
            "gamma=0 and alpha=0 switch off both losses, so training would not change the model: "
            "set gamma > 0 (forget loss) or alpha > 0 (retain loss)",
        ),
        (
            ["--set", "temperature=1"],
            "temperature=1 leaves the attention as it is, so the forget-teacher is the model "
            "itself and nothing is unlearned",
        ),
        (["--max-length", "257"], "--max-length 257 is beyond the model's 256 positions"),
    ],
)
def test_runs_that_would_do_nothing_or_overflow_are_refused_before_loading(
    files, tmp_path, capsys, no_model_loading, extra, message
):
    assert unlearn(files, tmp_path / "out", *extra) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("name", sorted(methods()))
def test_no_method_trains_with_both_losses_off(name):
    arguments = methods()[name].arguments
    with pytest.raises(ValueError, match="gamma=0 and alpha=0 switch off both losses"):
        arguments(gamma=0, alpha=0)
    assert arguments(gamma=0, alpha=0.5).alpha == 0.5  # retain-only stays allowed
    assert arguments(gamma=0.5, alpha=0).gamma == 0.5


def test_lora_alpha_zero_is_refused_before_loading(no_model_loading):
    pytest.importorskip("peft")
    from asu_simu_plugin.lora import lora_config
    from asu_simu_plugin.models import LoRACausalLM

    message = r"lora_alpha must be > 0 \(got 0\): the adapters' update is scaled by lora_alpha"
    with pytest.raises(ValueError, match=message):
        lora_config(alpha=0)
    with pytest.raises(ValueError, match=message):  # the harness's model handler
        LoRACausalLM.from_pretrained("any/model", lora_alpha=0)
    assert lora_config(alpha=16).lora_alpha == 16.0


@pytest.mark.parametrize("answer", ["", "   "])
def test_an_empty_answer_is_refused_with_file_and_line(
    files, tmp_path, capsys, no_model_loading, answer
):
    model_dir, forget, retain = files
    rows = forget.read_text().splitlines()
    rows.insert(1, json.dumps({"question": "Who?", "answer": answer}))
    forget.write_text("\n".join(rows))
    assert unlearn(files, tmp_path / "out") == 2
    assert one_error_line(capsys) == (
        f"asu-simu unlearn: error: {forget}:2: 'answer' is empty; training and attribution "
        "would see only the template's closing tokens: give every question its answer, or "
        "leave the row out"
    )
    rows_in_python = [{"question": "a", "answer": "b"}, {"question": "c", "answer": answer}]
    with pytest.raises(DataFormatError, match=r"retain example 1 \(0-based\) has an empty answer"):
        runner.qa_datasets(None, rows_in_python[:1], rows_in_python, runner.RunSettings())


# -- 9. damaged files name the file and the fix -------------------------------------------------------
def test_damaged_model_files_name_the_file_and_the_fix(files, tmp_path, capsys, no_model_loading):
    model_dir = files[0]
    weights = model_dir / "model.safetensors"
    full = weights.read_bytes()
    weights.write_bytes(full[: len(full) - 100])
    assert unlearn(files, tmp_path / "out") == 2
    assert one_error_line(capsys) == (
        f"asu-simu unlearn: error: {weights} is damaged (it holds {len(full) - 100} bytes where "
        f"its header announces {len(full)}): copy or download the model again (or save it again "
        "with save_pretrained)"
    )
    weights.write_bytes(full)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).unlink()
    assert unlearn(files, tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert f"{model_dir} has no tokenizer files (tokenizer.json, tokenizer_config.json" in line
    assert "save the tokenizer into it (tokenizer.save_pretrained(" in line


def test_file_problem_finds_truncated_and_corrupt_files(tmp_path):
    from safetensors.torch import save_file

    tensors = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(10)}, str(tensors))
    pickled = tmp_path / "optimizer.pt"
    torch.save({"state": {0: torch.zeros(100)}}, pickled)
    state = tmp_path / "trainer_state.json"
    state.write_text('{"global_step": 3}')
    assert [output.file_problem(p) for p in (tensors, pickled, state)] == [None, None, None]
    size = tensors.stat().st_size
    tensors.write_bytes(tensors.read_bytes()[:-8])
    assert (
        output.file_problem(tensors)
        == f"it holds {size - 8} bytes where its header announces {size}"
    )
    tensors.write_bytes(b"\xff" * 16)
    assert output.file_problem(tensors).startswith("its header announces ")
    tensors.write_bytes(b"abc")
    assert output.file_problem(tensors) == "it holds 3 bytes, not even a safetensors header"
    pickled.write_bytes(pickled.read_bytes()[:300])
    assert output.file_problem(pickled) == (
        "it is not a complete torch.save file (no zip directory: truncated?)"
    )
    state.write_text('{"global_step": ')
    assert output.file_problem(state).startswith("it does not parse (JSONDecodeError: ")


# -- 10. resuming after a failed checkpoint write; how many checkpoints are kept ---------------------
def disk_full_at(step: int, monkeypatch):
    """The checkpoint write of `step` fails half-way (optimizer.pt truncated, then ENOSPC)."""
    build = runner.build_trainer

    def failing(*args, **kwargs):
        trainer = build(*args, **kwargs)
        save = trainer._save_optimizer_and_scheduler

        def save_or_fail(output_dir):
            if trainer.state.global_step != step:
                return save(output_dir)
            Path(output_dir, "optimizer.pt").write_bytes(b"PK\x03\x04 half")
            raise OSError(28, "No space left on device")

        trainer._save_optimizer_and_scheduler = save_or_fail
        return trainer

    monkeypatch.setattr(runner, "build_trainer", failing)
    return build


def test_resume_after_a_failed_checkpoint_write_uses_the_newest_complete_one(
    files, tmp_path, capsys, monkeypatch
):
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    build = disk_full_at(2, monkeypatch)
    assert unlearn(files, out, "--save-steps", "1") == 1
    assert "No space left on device" in last_error_line(capsys)
    monkeypatch.setattr(runner, "build_trainer", build)
    assert (partial / "checkpoint-1" / RESUME_FILE).is_file()
    assert not (partial / "checkpoint-2" / RESUME_FILE).exists()
    # a different --save-total-limit does not make it another run
    assert unlearn(files, out, "--save-steps", "1", "--resume", "--save-total-limit", "1") == 0
    err = capsys.readouterr().err
    assert (
        f"resuming from {partial / 'checkpoint-1'}, the newest complete checkpoint (same method, "
        "data and settings); checkpoint-2 did not finish writing: removed"
    ) in err
    record = json.loads((out / RUN_FILE).read_text())
    assert [e["step"] for e in record["log_history"]][-1] == 3
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert all(bool(torch.isfinite(t).all()) for t in load_file(out / "model.safetensors").values())


def test_a_damaged_optimizer_state_names_the_file_and_the_fix(files, tmp_path, capsys, monkeypatch):
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    disk_full_at(3, monkeypatch)
    assert unlearn(files, out, "--save-steps", "1") == 1
    capsys.readouterr()
    optimizer_file = partial / "checkpoint-2" / "optimizer.pt"
    optimizer_file.write_bytes(optimizer_file.read_bytes()[:1000])
    assert unlearn(files, out, "--save-steps", "1", "--resume") == 2
    assert one_error_line(capsys) == (
        f"asu-simu unlearn: error: {optimizer_file} is damaged (it is not a complete torch.save "
        "file (no zip directory: truncated?)): delete checkpoint-2 to resume from checkpoint-1, "
        "or add --overwrite to start over"
    )
    assert (partial / "checkpoint-3").is_dir()  # nothing removed by a refused resume


@pytest.mark.parametrize("limit, kept", [(None, [2, 3]), ("1", [3]), ("0", [1, 2, 3])])
def test_save_total_limit_keeps_the_newest_checkpoints(files, tmp_path, limit, kept):
    out = tmp_path / "out"
    extra = ["--save-total-limit", limit] if limit else []
    assert unlearn(files, out, "--save-steps", "1", *extra, method="graddiff") == 0
    found = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert found == kept
    record = json.loads((out / RUN_FILE).read_text())
    assert record["settings"]["save_total_limit"] == (int(limit) if limit else 2)
