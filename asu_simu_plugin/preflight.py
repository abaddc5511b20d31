"""Method arguments checked before the harness loads a model.

The harness's `src/train.py` loads the model (`get_model(model_cfg)`) before it builds the
trainer, so a bad `trainer.method_args` value would otherwise surface only after the model loaded
(minutes, for a 7B model). When our Hydra plugin runs inside that script, `install()` wraps the
script's `get_model`: before it loads anything, the wrapper reads the composed config from the
calling frame (`main(cfg)`), and if `trainer.handler` is one of our methods builds its argument
dataclass — the same object and the same one-line messages as the trainer and the CLI — and checks
layer ids against the model's config. If the harness's script ever looks different (no `cfg` in
the caller), nothing is checked here and the trainer's own construction still refuses bad values.
"""

from __future__ import annotations

import functools
import logging
import sys

logger = logging.getLogger(__name__)

_WRAPPED = "__asu_simu_preflight__"


def check_config(cfg) -> None:
    """Build and check our method's arguments from a composed harness config (no-op otherwise)."""
    trainer = _get(cfg, "trainer")
    handler = _get(trainer, "handler")
    if not isinstance(handler, str):
        return
    from asu_simu_plugin.registry import methods

    method = methods().get(handler)
    if method is None or not method.offered_to_harness:
        return
    arguments = method.arguments.from_values(_get(trainer, "method_args") or {}, method.name)
    config = _model_config(
        _get(_get(_get(cfg, "model"), "model_args"), "pretrained_model_name_or_path")
    )
    if config is not None:
        arguments.check_model_config(config)


def _get(node, key):
    if node is None:
        return None
    try:
        return node.get(key)
    except Exception:  # not a mapping
        return None


def _model_config(path):
    """The model's config when it can be read without loading weights (else None)."""
    if not isinstance(path, str):
        return None
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path)
    except Exception:  # the harness's own loading reports a wrong path better
        return None


def install(main_module=None) -> bool:
    """Wrap the running script's `get_model` (the harness's `src/train.py`); True if wrapped."""
    main_module = main_module or sys.modules.get("__main__")
    get_model = getattr(main_module, "get_model", None)
    if get_model is None or getattr(get_model, _WRAPPED, False):
        return False

    @functools.wraps(get_model)
    def checked_get_model(*args, **kwargs):
        cfg = sys._getframe(1).f_locals.get("cfg")  # the harness's `main(cfg)`
        if cfg is not None:
            check_config(cfg)
        return get_model(*args, **kwargs)

    setattr(checked_get_model, _WRAPPED, True)
    main_module.get_model = checked_get_model
    return True
