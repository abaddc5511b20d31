"""Hydra plugin of asu-simu-plugin.

Hydra imports every `hydra_plugins.*` module at start-up, in every Hydra application. This one
1. appends our configs (`trainer/ASU.yaml`, `experiment/unlearn/tofu/asu.yaml`, ...) to the search
   path at the lowest priority, so they can never shadow a harness file; and
2. registers our trainers, model handlers, optimizers, metrics and evaluator (the ASU paper's
   measures, `eval=asu_paper`) into the harness registries, but only when the
   running program is open-unlearning's own `src/train.py` or `src/eval.py`. Any other Hydra
   application is left untouched, and nothing here may break one (errors become warnings).
   In `src/train.py` it also checks our trainers' method arguments before the model loads
   (`asu_simu_plugin.preflight`).
   `ASU_SIMU_PLUGIN_REGISTER=0` turns this part off: a harness that reads entry points (the
   patch in `patches/`) then finds our classes through them alone.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

logger = logging.getLogger(__name__)

HARNESS_SCRIPTS = ("train.py", "eval.py")
REGISTER_ENV = "ASU_SIMU_PLUGIN_REGISTER"


def running_harness_script() -> Path | None:
    """The harness's `src/train.py` / `src/eval.py` if that is the program running, else None."""
    if not sys.argv or not sys.argv[0]:
        return None
    script = Path(sys.argv[0]).resolve()
    src = script.parent
    is_harness = (
        script.name in HARNESS_SCRIPTS
        and src.name == "src"
        and (src / "trainer" / "__init__.py").is_file()
        and (src / "model" / "__init__.py").is_file()
    )
    return script if is_harness else None


class AsuSimuSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from asu_simu_plugin import config_dir

        # A file path works for wheels, editable installs and source checkouts alike.
        search_path.append(provider="asu-simu-plugin", path=f"file://{config_dir()}")


def registration_enabled() -> bool:
    return os.environ.get(REGISTER_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _register_with_harness() -> None:
    script = running_harness_script()
    if not registration_enabled() or script is None:
        return
    try:
        from asu_simu_plugin.harness import register

        register()
        if script.name == "train.py":  # our method arguments checked before the model loads
            from asu_simu_plugin.preflight import install

            install()
            from asu_simu_plugin.harness import RECORD_ENV, REFERENCE_ENV, use_reference_model

            if os.environ.get(REFERENCE_ENV):  # continual unlearning's --reference original
                use_reference_model(os.environ[REFERENCE_ENV], os.environ.get(RECORD_ENV))
    except Exception as error:  # never break the harness because of us
        warnings.warn(
            f"asu-simu-plugin could not register its trainers with open-unlearning ({error!r}); "
            f"trainer={'/'.join(_offered_names())} and the ASU paper's metrics (eval=asu_paper) "
            "will be unavailable in this run",
            stacklevel=1,
        )


def _offered_names() -> list[str]:
    try:
        from asu_simu_plugin.registry import harness_methods

        return [m.name for m in harness_methods()]
    except Exception:  # the registry itself failed to load
        return ["<asu-simu-plugin's trainers>"]


_register_with_harness()
