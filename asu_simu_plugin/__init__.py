"""ASU, SIMU and Sophia unlearning for the open-unlearning harness (and plain transformers).

Usable on their own: `attention_temperature` (the exact attention-temperature hook) and
`SophiaG` (the optimizer), imported from here on first use.
"""

from pathlib import Path

__version__ = "0.1.0"

# public name -> module that defines it (imported lazily: `import asu_simu_plugin` stays cheap)
_PUBLIC = {
    "attention_temperature": "asu_simu_plugin.attention",
    "AttentionTemperature": "asu_simu_plugin.attention",
    "SophiaG": "asu_simu_plugin.methods.sophia.optimizer",
}
__all__ = ["config_dir", "__version__", *_PUBLIC]


def config_dir() -> Path:
    """Our Hydra configs: inside the installed package (wheel), else the source checkout's."""
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
