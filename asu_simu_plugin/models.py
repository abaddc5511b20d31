"""Model handlers for the harness's `model.model_handler` (registered as `open_unlearning.models`).

`TemperedCausalLM` loads any causal LM with a permanent attention temperature, so the harness's
`src/eval.py` can score ASU's forget-teacher itself with the harness's own metrics:

    python src/eval.py experiment=eval/tofu/default model=... \
        model.model_handler=TemperedCausalLM +model.model_args.temperature=2.3

`LoRACausalLM` loads it wrapped in LoRA adapters (needs `pip install asu-simu-plugin[peft]`),
for every trainer of the harness and ours:

    python src/train.py --config-name=unlearn.yaml experiment=unlearn/tofu/default trainer=ASU \
        ++model.model_handler=LoRACausalLM +model.model_args.lora_r=16
"""

from __future__ import annotations

from transformers import AutoModelForCausalLM

from asu_simu_plugin.attention import attention_temperature
from asu_simu_plugin.registry import register_component


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


class LoRACausalLM:
    """`from_pretrained` like `AutoModelForCausalLM`, returning the model wrapped in LoRA adapters.

    Select it in the harness with `++model.model_handler=LoRACausalLM`; LoRA settings come from
    `model.model_args` (defaults: the official ASU code's):

      lora_r (8), lora_alpha (32), lora_dropout (0.05),
      lora_target_modules ("all-linear": every linear layer but the output head; or a list of
        module names such as [q_proj, v_proj]),
      lora_save ("merged": `save_pretrained` writes a plain model with the adapters folded in,
        plus the adapter alone in the sub-folder `default/`; "adapter": the adapter only).
        Trainer's intermediate `checkpoint-N` folders always hold the adapter, which is what
        `resume_from_checkpoint` restores.

    Every trainer gets the peft model (only the adapters train); ours also use its base weights,
    adapters disabled, as the frozen reference and as ASU's teacher instead of a second copy.
    """

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path=None,
        *args,
        lora_r: int | None = None,
        lora_alpha: float | None = None,
        lora_dropout: float | None = None,
        lora_target_modules=None,
        lora_save: str = "merged",
        **kwargs,
    ):
        from asu_simu_plugin import lora

        config = lora.lora_config(lora_r, lora_alpha, lora_dropout, lora_target_modules)
        if lora_save not in lora.SAVE_MODES:  # before the (possibly long) load
            raise ValueError(f"lora_save={lora_save!r}; use one of {', '.join(lora.SAVE_MODES)}")
        model = AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        return lora.add_lora(model, config, save=lora_save)


register_component("model", "TemperedCausalLM", f"{__name__}:TemperedCausalLM")
register_component("model", "LoRACausalLM", f"{__name__}:LoRACausalLM")
