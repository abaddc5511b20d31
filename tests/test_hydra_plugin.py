"""The Hydra plugin: our configs on the search path, registration only inside the harness."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from hydra_plugins.asu_simu_plugin_searchpath import running_harness_script

PLAIN_APP = textwrap.dedent(
    """
    import sys
    import hydra
    from omegaconf import OmegaConf

    @hydra.main(version_base=None, config_path="conf", config_name="config")
    def main(cfg):
        print("RESULT", OmegaConf.to_yaml(cfg).strip().replace(chr(10), " | "))
        print("HARNESS_IMPORTED", "asu_simu_plugin.harness" in sys.modules)
        print("TRAINER_IMPORTED", "trainer" in sys.modules)

    main()
    """
)


def make_app(directory: Path, script_name: str = "app.py") -> Path:
    (directory / "conf").mkdir(parents=True)
    (directory / "conf" / "config.yaml").write_text("greeting: hello\nnumber: 3\n")
    script = directory / script_name
    script.write_text(PLAIN_APP)
    return script


def run_app(script: Path, *overrides: str) -> str:
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "hydra.run.dir=.",
            "hydra.output_subdir=null",
            "hydra/job_logging=disabled",
            "hydra/hydra_logging=disabled",
            *overrides,
        ],
        cwd=script.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_plain_hydra_app_runs_unaffected(tmp_path):
    out = run_app(make_app(tmp_path), "number=5")
    assert "RESULT greeting: hello | number: 5" in out
    assert "HARNESS_IMPORTED False" in out
    assert "TRAINER_IMPORTED False" in out


def test_app_named_like_the_harness_outside_a_harness_is_untouched(tmp_path):
    # src/train.py, but no harness packages beside it: not the harness.
    script = make_app(tmp_path / "src", "train.py")
    out = run_app(script)
    assert "HARNESS_IMPORTED False" in out
    assert running_harness_script() is None  # pytest itself is not the harness either


def test_harness_detection(tmp_path, monkeypatch):
    src = tmp_path / "checkout" / "src"
    for package in ("trainer", "model"):
        (src / package).mkdir(parents=True)
        (src / package / "__init__.py").write_text("")
    (src / "train.py").write_text("")
    (src / "eval.py").write_text("")
    (src / "other.py").write_text("")
    for name, expected in (("train.py", True), ("eval.py", True), ("other.py", False)):
        monkeypatch.setattr(sys, "argv", [str(src / name)])
        assert (running_harness_script() is not None) is expected


def test_our_configs_are_on_the_search_path(tmp_path):
    """Hydra finds `trainer/ASU.yaml` etc. through the plugin, at the lowest priority."""
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "config.yaml").write_text("{}\n")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf), version_base=None):
            cfg = compose(config_name="config")
            loader = GlobalHydra.instance().config_loader()
            groups = loader.get_group_options("trainer")
            assert {"ASU", "SOGradDiff", "SONPO"} <= set(groups)
            experiments = loader.get_group_options("experiment/unlearn/tofu")
            assert {"asu", "sograddiff", "sonpo"} <= set(experiments)
            assert cfg == {}
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize(
    "name", ["trainer/ASU.yaml", "experiment/unlearn/tofu/asu.yaml", "trainer/SIMU.yaml"]
)
def test_config_dir_holds_the_configs(name):
    from asu_simu_plugin import config_dir

    assert (config_dir() / name).is_file()


@pytest.mark.slow
def test_the_wheel_ships_configs_and_the_hydra_plugin(tmp_path):
    root = Path(__file__).resolve().parent.parent
    source = tmp_path / "source"  # build from a copy: setuptools writes build/ beside the sources
    skip = (".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache")
    shutil.copytree(root, source, ignore=shutil.ignore_patterns(*skip))
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if build.returncode != 0 and "setuptools" in build.stderr:
        pytest.skip(f"cannot build a wheel here (no setuptools): {build.stderr[-300:]}")
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = tmp_path.glob("asu_simu_plugin-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "asu_simu_plugin/configs/trainer/ASU.yaml" in names
    assert "asu_simu_plugin/configs/experiment/unlearn/tofu/asu.yaml" in names
    assert "hydra_plugins/asu_simu_plugin_searchpath/__init__.py" in names
    assert "hydra_plugins/__init__.py" not in names  # a namespace package, shared with others
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[open_unlearning.trainers]" in text and "ASU = asu_simu_plugin.harness:ASU" in text


@pytest.mark.parametrize(
    "value, enabled", [(None, True), ("1", True), ("0", False), ("false", False), ("OFF", False)]
)
def test_registration_can_be_turned_off(monkeypatch, value, enabled):
    from hydra_plugins.asu_simu_plugin_searchpath import REGISTER_ENV, registration_enabled

    if value is None:
        monkeypatch.delenv(REGISTER_ENV, raising=False)
    else:
        monkeypatch.setenv(REGISTER_ENV, value)
    assert registration_enabled() is enabled
