"""Model handlers for the harness's `model.model_handler` (registered as `open_unlearning.models`).

`TemperedCausalLM` loads any causal LM with a permanent attention temperature, so the harness's
`src/eval.py` can score ASU's forget-teacher itself with the harness's own metrics:

    python src/eval.py experiment=eval/tofu/default model=... \
        model.model_handler=TemperedCausalLM +model.model_args.temperature=2.3
"""

from __future__ import annotations

from transformers import AutoModelForCausalLM

from asu_simu_plugin.attention import attention_temperature


class TemperedCausalLM:
    """`from_pretrained` like `AutoModelForCausalLM`, plus `temperature` and `temperature_layers`.

    The returned model is a plain transformers model; its attention temperature handle is kept
    at `model.attention_temperature` (call `.remove()` on it to get the original back).
    """

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path=None,
        *args,
        temperature: float = 2.3,
        temperature_layers=None,
        **kwargs,
    ):
        model = AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model.attention_temperature = attention_temperature(model, temperature, temperature_layers)
        return model
