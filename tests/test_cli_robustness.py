"""`asu-simu` with bad inputs, unsafe outputs, interruptions and divergence: nothing lost, nothing
silently wrong (each test is one finding of issue 13)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from cli_support import last_error_line, one_error_line, unlearn
from safetensors.torch import load_file
from transformers import TrainerCallback

from asu_simu_plugin import __version__, output, registry, runner
from asu_simu_plugin.cli import main
from asu_simu_plugin.output import RESUME_FILE, RUN_FILE

pytestmark = pytest.mark.usefixtures("single_thread")


# -- 1. outputs -------------------------------------------------------------------------------------
def test_existing_output_is_refused_untouched(files, tmp_path, capsys, no_model_loading):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert unlearn(files, out) == 2
    line = one_error_line(capsys)
    assert "exists and is not empty: add --overwrite" in line
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("where", ["same", "inside", "symlink"])
def test_output_over_the_model_is_refused(files, tmp_path, capsys, no_model_loading, where):
    model_dir = files[0]
    out = {"same": model_dir, "inside": model_dir / "sub"}.get(where)
    if where == "symlink":
        out = tmp_path / "link"
        out.symlink_to(model_dir)
    before = sorted(p.name for p in model_dir.iterdir())
    assert unlearn(files, out, "--overwrite") == 2
    assert "the model folder" in one_error_line(capsys)
    assert sorted(p.name for p in model_dir.iterdir()) == before


def test_unwritable_output_is_found_before_training(files, tmp_path, capsys, no_model_loading):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert unlearn(files, blocker / "out") == 2
    assert "cannot write the output" in one_error_line(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent_is_found_before_training(files, tmp_path, capsys, no_model_loading):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert unlearn(files, parent / "out") == 2
    finally:
        parent.chmod(0o755)
    assert "cannot write the output" in one_error_line(capsys)


class Interrupt(TrainerCallback):
    """Ctrl-C right after optimizer step `at` (its checkpoint is written first)."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        control.should_save = True  # the step's checkpoint, then the interrupt
        return control

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt


def test_interrupted_run_leaves_no_model_and_resumes_only_the_same_run(
    files, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    build = runner.build_trainer

    def interrupted(*args, callbacks=None, **kwargs):
        return build(*args, callbacks=[*(callbacks or []), Interrupt(at=1)], **kwargs)

    monkeypatch.setattr(runner, "build_trainer", interrupted)
    assert unlearn(files, out, "--save-steps", "1") == 130
    monkeypatch.setattr(runner, "build_trainer", build)
    assert last_error_line(capsys) == "asu-simu unlearn: interrupted"
    partial = tmp_path / "out.partial"
    assert not out.exists()  # no half-written model where the model goes
    assert not (partial / "model.safetensors").exists()
    recorded = json.loads((partial / "checkpoint-1" / RESUME_FILE).read_text())
    assert recorded["method"] == "asu" and recorded["settings"]["learning_rate"] == 1e-3
    assert len(recorded["forget_data"]) == 64  # a sha256

    # rerun without saying what to do, or over another method's / settings' checkpoint: refused
    assert unlearn(files, out, "--save-steps", "1") == 2
    assert "holds an interrupted run: add --resume" in one_error_line(capsys)
    assert unlearn(files, out, "--save-steps", "1", "--resume", method="graddiff") == 2
    assert "method ('asu' then, 'graddiff' now)" in one_error_line(capsys)
    assert unlearn(files, out, "--save-steps", "1", "--resume", "--set", "gamma=0.5") == 2
    assert "method_args.gamma (1.0 then, 0.5 now)" in one_error_line(capsys)
    # the same run resumes, saying so, and ends in place
    assert unlearn(files, out, "--save-steps", "1", "--resume") == 0
    assert "resuming from" in capsys.readouterr().err
    assert not partial.exists()
    record = json.loads((out / RUN_FILE).read_text())
    assert record["log_history"][-1]["step"] == 3  # 5 forget rows, batch 2: 3 steps in all
    assert all(bool(torch.isfinite(t).all()) for t in load_file(out / "model.safetensors").values())
    # resuming a finished run with the same settings does nothing; another run is refused
    before = (out / "model.safetensors").read_bytes()
    assert unlearn(files, out, "--save-steps", "1", "--resume") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert unlearn(files, out, "--save-steps", "1", "--resume", "--lr", "1e-4") == 2
    assert "exists and is not empty" in one_error_line(capsys)
    assert (out / "model.safetensors").read_bytes() == before


def test_overwrite_replaces_the_output_only_at_the_end(files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old run")
    assert unlearn(files, out, "--overwrite", method="graddiff") == 0
    assert not (out / "old.txt").exists()
    assert (out / "model.safetensors").is_file() and (out / RUN_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == ["out"]


# -- 2. non-finite training ---------------------------------------------------------------------
def test_float16_divergence_fails_and_saves_nothing(files, tmp_path, capsys):
    out = tmp_path / "out"
    code = unlearn(files, out, "--dtype", "float16", "--lr", "1000", method="graddiff")
    assert code == 1
    line = last_error_line(capsys)
    assert "training diverged at optimizer step" in line
    assert "lower the learning rate (now 1000)" in line and "instead of float16" in line
    assert not out.exists() and not (tmp_path / "out.partial").exists()


# -- 3. inputs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "alpha=NaN"], "alpha must be a finite number (got nan)"),
        (["--set", "temperature=Infinity"], "temperature must be a finite number"),
        (["--set", 'layers=["1"]'], "layers entry must be an integer (got '1')"),
        (["--set", "layers=[1.0]"], "layers entry must be an integer (got 1.0)"),
        (["--set", "layers=[true]"], "layers entry must be an integer (got True)"),
        (["--set", "layers=0,1"], "layers must be a list of 0-based layer ids"),
        (["--set", "layers=[9]"], "no layer 9 in this model, which has 4 decoder layers"),
        (["--set", "temprature=2"], "unknown method argument temprature for ASU; valid: alpha"),
        (["--set", "gamma"], "--set expects KEY=VALUE"),
        (["--epochs", "0"], "argument --epochs: must be > 0, got 0"),
        (["--lr", "inf"], "argument --lr: expected a finite number"),
        (["--lr", "nan"], "argument --lr: expected a finite number"),
        (["--batch-size", "0"], "argument --batch-size: must be >= 1"),
        (["--batch-size", "2.5"], "argument --batch-size: expected an integer"),
        (["--max-length", "-1"], "argument --max-length: must be >= 1"),
        (["--overwrite", "--resume"], "not allowed with argument --overwrite"),
    ],
)
def test_bad_arguments_are_one_line_usage_errors_before_loading(
    files, tmp_path, capsys, no_model_loading, extra, message
):
    assert unlearn(files, tmp_path / "out", *extra) == 2
    line = one_error_line(capsys)
    assert line.startswith("asu-simu unlearn: error: ")
    assert message in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_unknown_set_key_lists_the_simu_keys(files, tmp_path, capsys, no_model_loading):
    assert unlearn(files, tmp_path / "out", "--set", "threshhold=0.2", method="simu") == 2
    line = one_error_line(capsys)
    for key in ("threshold", "steps", "mode", "hessian_mode", "gamma"):
        assert key in line


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"question": "q", "answer": "a"}]', "forget.jsonl:1: a JSON array; expected JSON lines"),
        (
            '{"question": "q", "answer": "a"}\n\n{"question": "q2", answer: "a"}\n',
            "forget.jsonl:3: not valid JSON",
        ),
        (
            '{"question": "q", "answer": "a"}\n{"question": "q2", "answer": null}\n',
            "forget.jsonl:2: 'answer' is null; expected text",
        ),
        ('{"question": "q", "answer": ["a"]}\n', "forget.jsonl:1: 'answer' is list"),
        ('"just a string"\n', "forget.jsonl:1: a JSON str; expected an object"),
        ('{"q": "q", "a": "a"}\n', "forget.jsonl:1 lacks ['question', 'answer']"),
    ],
)
def test_bad_data_files_name_file_and_line(
    files, tmp_path, capsys, no_model_loading, content, message
):
    files[1].write_text(content)
    assert unlearn(files, tmp_path / "out") == 2
    assert message in one_error_line(capsys)


def test_missing_and_unreadable_data_files(files, tmp_path, capsys, no_model_loading):
    model_dir, forget, retain = files
    assert unlearn((model_dir, tmp_path / "nope.jsonl", retain), tmp_path / "out") == 2
    assert "nope.jsonl: no such file" in one_error_line(capsys)
    assert unlearn((model_dir, tmp_path, retain), tmp_path / "out") == 2
    assert "is not a file" in one_error_line(capsys)
    assert unlearn((tmp_path / "no_model", forget, retain), tmp_path / "out") == 2
    assert "no_model: no such model folder" in one_error_line(capsys)


def test_truncated_answers_are_reported_and_left_out(files, tmp_path, capsys, caplog):
    model_dir, forget, retain = files
    rows = [json.loads(line) for line in retain.read_text().splitlines()]
    for row in rows[:3]:
        row["question"] = "Tell me, please, " * 40 + row["question"]
    retain.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    assert unlearn(files, out, "--max-length", "64", method="graddiff") == 0
    assert "3 of 10 retain examples have no answer token left after truncation to 64" in (
        caplog.text
    )
    record = json.loads((out / RUN_FILE).read_text())
    assert record["retain_examples"] == 7
    train_loss = record["log_history"][-1]["train_loss"]
    assert train_loss == train_loss  # no NaN from a batch of truncated rows


def test_no_answer_token_left_is_an_error_before_training(files, tmp_path, capsys):
    assert unlearn(files, tmp_path / "out", "--max-length", "4") == 2
    line = one_error_line(capsys)
    assert "no forget example keeps an answer token after truncation to 4 tokens" in line
    assert not (tmp_path / "out.partial").exists()


# -- neurons and tau-sweep -------------------------------------------------------------------------
def test_neurons_checks_thresholds_and_out_before_attribution(
    files, tmp_path, capsys, no_model_loading
):
    model_dir, forget, _ = files
    common = ["neurons", "--model", str(model_dir), "--data", str(forget)]
    assert main([*common, "--thresholds", "0.2,1.5", "--out", str(tmp_path / "n")]) == 2
    assert one_error_line(capsys) == (
        f"asu-simu neurons: error: --thresholds must be in (0, 1), got 1.5{NEVER_CRITICAL}"
    )
    assert main([*common, "--thresholds", "0.2,x", "--out", str(tmp_path / "n")]) == 2
    assert "--thresholds must be comma-separated numbers" in one_error_line(capsys)
    assert main([*common, "--save", "0", "--out", str(tmp_path / "n")]) == 2
    assert one_error_line(capsys) == (
        "asu-simu neurons: error: --save must be in (0, 1), got 0: use e.g. 0.3"
    )
    assert main([*common, "--mode", "forget_only", "--out", str(tmp_path / "n")]) == 2
    assert "needs --retain" in one_error_line(capsys)
    (tmp_path / "n").mkdir()
    (tmp_path / "n" / "neurons.csv").write_text("mine")
    assert main([*common, "--out", str(tmp_path / "n")]) == 2
    assert "already holds neurons.csv: add --overwrite" in one_error_line(capsys)
    assert (tmp_path / "n" / "neurons.csv").read_text() == "mine"


NEVER_CRITICAL = (
    " (a neuron is critical when its attribution exceeds threshold × its layer's maximum, so none "
    "would be): use e.g. 0.3"
)


def test_neurons_refuses_a_threshold_of_one_before_attribution(
    files, tmp_path, capsys, no_model_loading
):
    """Critical means > t · (layer max): at t = 1 the mask is empty, which SIMU refuses; the
    sweep and --save say so before the model is loaded, and write nothing."""
    model_dir, forget, _ = files
    common = ["neurons", "--model", str(model_dir), "--data", str(forget)]
    out = tmp_path / "n"
    assert main([*common, "--thresholds", "1", "--out", str(out)]) == 2
    line = f"asu-simu neurons: error: --thresholds must be in (0, 1), got 1{NEVER_CRITICAL}"
    assert one_error_line(capsys) == line
    assert main([*common, "--thresholds", "0.3,0.5", "--save", "1", "--out", str(out)]) == 2
    line = f"asu-simu neurons: error: --save must be in (0, 1), got 1{NEVER_CRITICAL}"
    assert one_error_line(capsys) == line
    assert not out.exists()


def test_neurons_saves_no_empty_mask(files, tmp_path, capsys, monkeypatch):
    """Below 1 a mask is still empty when no neuron supports the answers in any layer: the
    sweep is written, the mask is not, exit status 1."""
    from asu_simu_plugin.methods.simu import attribution

    def nothing_supports(model, *args, **kwargs):
        return {i: -torch.arange(1.0, 65.0) for i in range(2)}

    monkeypatch.setattr(attribution, "neuron_attributions", nothing_supports)
    model_dir, forget, _ = files
    out = tmp_path / "n"
    args = ["neurons", "--model", str(model_dir), "--data", str(forget), "--out", str(out)]
    assert main([*args, "--thresholds", "0.2,0.5", "--save", "0.5"]) == 1
    assert last_error_line(capsys) == (
        "asu-simu neurons: error: --save 0.5: no neuron is critical in any layer, so no mask "
        "was saved (SIMU refuses an empty one): save a lower threshold, see "
        f"{out / 'neurons.csv'} (--debug or ASU_SIMU_DEBUG=1 shows the traceback)"
    )
    assert sorted(p.name for p in out.iterdir()) == ["neurons.csv", "neurons.png"]
    rows = (out / "neurons.csv").read_text().splitlines()
    assert rows[1:] == ["0.2,0,0,0,0.000000", "0.5,0,0,0,0.000000"]


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unlearn_simu_refuses_a_damaged_mask_before_the_model(
    files, tmp_path, capsys, no_model_loading, damage
):
    from asu_simu_plugin.methods.simu.masks import save_masks

    masks = tmp_path / "masks"
    tensors, _ = save_masks({0: torch.tensor([True, False])}, masks / "simu_masks", {})
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x80\x04junk" * 9)
    out = tmp_path / "out"
    assert unlearn(files, out, "--set", f"mask_path={masks}", method="simu") == 2
    line = one_error_line(capsys)
    assert line.startswith(
        f"asu-simu unlearn: error: mask_path: {tensors} is not a readable safetensors file ("
    )
    assert line.endswith(
        "; truncated, or not a mask file?): rerun the attribution or point mask_path at another "
        "file"
    )
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    assert unlearn(files, out, "--set", "threshold=1", method="simu") == 2
    assert one_error_line(capsys) == (
        f"asu-simu unlearn: error: threshold must be in (0, 1), got 1{NEVER_CRITICAL}"
    )


def test_tau_sweep_checks_out_before_the_sweep(files, tmp_path, capsys, no_model_loading):
    model_dir, forget, _ = files
    target = tmp_path / "file.csv"
    target.write_text("")
    args = ["tau-sweep", "--model", str(model_dir), "--data", str(forget), "--out", str(target)]
    assert main(args) == 2
    line = one_error_line(capsys)
    assert f"--out {target} is a file; give a folder" in line
    assert main([*args[:-1], str(tmp_path / "s"), "--layers", "0,7"]) == 2
    assert "no layer 7" in one_error_line(capsys)


def test_tau_sweep_says_plainly_when_no_setting_is_admissible(files, tmp_path, capsys):
    model_dir, forget, _ = files
    out = tmp_path / "s"
    args = ["tau-sweep", "--model", str(model_dir), "--data", str(forget), "--out", str(out)]
    assert main([*args, "--taus", "2,4", "--max-end-probability", "1e-9", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "no setting keeps function-token NLL rise <= 0.5 and P(end) <= 1e-09" in printed
    assert "the least violating one is taken" in printed
    assert (out / "tau_sweep.csv").is_file()


# -- 5. the command line itself ---------------------------------------------------------------------
def test_debug_flag_and_variable_show_the_traceback(files, tmp_path, monkeypatch, capsys):
    with pytest.raises(Exception, match="unknown method argument"):
        unlearn(files, tmp_path / "o", "--set", "nope=1", "--debug")
    monkeypatch.setenv("ASU_SIMU_DEBUG", "1")
    with pytest.raises(Exception, match="unknown method argument"):
        unlearn(files, tmp_path / "o", "--set", "nope=1")


def test_help_documents_every_flag_and_the_method_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["unlearn", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--epochs", "--lr", "--batch-size", "--save-steps", "--overwrite", "--resume"):
        assert flag in text
    assert "(default: 5.0)" in text and "(default: 1e-05)" in text
    for method in registry.methods().values():
        assert f"--method {method.cli_name}:" in text
        for name, _default, _help in method.arguments.describe():
            assert f"    {name} (default " in text
    for command in ("demo", "tau-sweep", "neurons"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "(default: " in capsys.readouterr().out


def test_version_and_unknown_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"asu-simu {__version__}"
    assert main(["unlern"]) == 2
    assert "invalid choice: 'unlern'" in one_error_line(capsys)


def test_prepare_output_refusals(tmp_path, monkeypatch):
    identity = {"method": "asu"}
    foreign = tmp_path / "out.partial" / "checkpoint-3"
    foreign.mkdir(parents=True)
    with pytest.raises(output.OutputError, match="has no asu_simu_resume.json"):
        output.prepare_output(tmp_path / "out", identity=identity, resume=True)
    (foreign / RESUME_FILE).write_text("{not json")
    with pytest.raises(output.OutputError, match="is not valid JSON"):
        output.prepare_output(tmp_path / "out", identity=identity, resume=True)
    monkeypatch.chdir(tmp_path)
    for dangerous in (tmp_path, tmp_path.parent, Path.home()):
        with pytest.raises(output.OutputError, match="choose a dedicated --output"):
            output.prepare_output(dangerous, overwrite=True)
    with pytest.raises(output.OutputError, match="exclude each other"):
        output.prepare_output(tmp_path / "x", overwrite=True, resume=True)
    (tmp_path / "plain.txt").write_text("")
    with pytest.raises(output.OutputError, match="is a file"):
        output.prepare_output(tmp_path / "plain.txt")


def test_demo_refuses_a_non_empty_output_before_finetuning(tmp_path, capsys, monkeypatch):
    from asu_simu_plugin import demo

    def refuse(*args, **kwargs):
        raise AssertionError("fine-tuning started before the output was checked")

    monkeypatch.setattr(demo, "finetune", refuse)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    assert main(["demo", "--output", str(tmp_path / "out"), "--quiet"]) == 2
    assert "exists and is not empty: add --overwrite" in one_error_line(capsys)
    assert main(["demo", "--finetune-epochs", "0"]) == 2
    assert "argument --finetune-epochs: must be >= 1" in one_error_line(capsys)
    # ASU's arguments too, before fine-tuning
    assert main(["demo", "--output", str(tmp_path / "d"), "--gamma", "0", "--alpha", "0"]) == 2
    assert "gamma=0 and alpha=0 switch off both losses" in one_error_line(capsys)
    assert main(["demo", "--output", str(tmp_path / "d"), "--temperature", "1"]) == 2
    assert "temperature=1 leaves the attention as it is" in one_error_line(capsys)
    assert not (tmp_path / "d").exists() and not (tmp_path / "d.partial").exists()
