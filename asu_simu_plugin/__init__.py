"""ASU, SIMU and Sophia unlearning for the open-unlearning harness (and plain transformers)."""

from pathlib import Path

__version__ = "0.1.0"


def config_dir() -> Path:
    """Our Hydra configs: inside the installed package (wheel), else the source checkout's."""
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"
