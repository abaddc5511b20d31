"""Running `asu-simu unlearn` in-process on the `files` fixture (a tiny model, forget and retain)."""

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
