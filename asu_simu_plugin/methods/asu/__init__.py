"""ASU — Attention Smoothing Unlearning (Zare Zade et al., ICLR 2026).

The student is distilled on forget data towards a "forget-teacher": the frozen original model
with its attention softmax temperature raised to τ > 1 on the selected layers (`trainer`).
Parts: the argument dataclass (`arguments`), the teacher-output cache (`teacher_cache`), the
automatic choice of τ and layers (`temperature`), the collapse guard (`collapse`) and the τ
diagnostic behind `asu-simu tau-sweep` (`sweep`).
"""

from asu_simu_plugin.methods.asu.arguments import ASUArguments
from asu_simu_plugin.methods.asu.trainer import ASUMixin
from asu_simu_plugin.registry import register_method

register_method(
    "ASU",
    mixin=ASUMixin,
    arguments=ASUArguments,
    config="ASU",
    summary="Attention Smoothing Unlearning: distil towards the attention-smoothed original",
)

__all__ = ["ASUArguments", "ASUMixin"]
