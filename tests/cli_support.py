"""Running `asu-simu unlearn` in-process on the `files` fixture (a tiny model, forget and retain),
and reading its one-line errors."""

from __future__ import annotations

from asu_simu_plugin.cli import main


def unlearn(files, output, *extra, method="asu"):
    """One epoch at lr 1e-3, batch 2; `extra` adds or repeats options. Returns the exit code."""
    model_dir, forget, retain = files
    return main(
        [
            "unlearn",
            "--method",
            method,
            "--model",
            str(model_dir),
            "--forget",
            str(forget),
            "--retain",
            str(retain),
            "--output",
            str(output),
            "--epochs",
            "1",
            "--lr",
            "1e-3",
            "--batch-size",
            "2",
            *extra,
        ]
    )


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def last_error_line(capsys) -> str:
    """After training: the progress bar comes first (on stderr too), then the one error line."""
    err = capsys.readouterr().err.strip().splitlines()
    line = err[-1][err[-1].find("asu-simu") :]
    assert line.startswith("asu-simu") and all("error" not in e for e in err[:-1]), err
    return line
