"""SIMU — Selective Influence Machine Unlearning (Agarwal et al., 2025).

Integrated-gradients attribution finds the MLP neurons that carry the forget set
(`attribution`); second-order (Sophia) GradDiff then updates only those neurons plus the
attention projections (`trainer`).
"""

from asu_simu_plugin.methods.simu.arguments import SIMUArguments
from asu_simu_plugin.methods.simu.trainer import SIMUMixin
from asu_simu_plugin.registry import register_method

register_method(
    "SIMU",
    mixin=SIMUMixin,
    arguments=SIMUArguments,
    config="SIMU",
    summary="Selective Influence Machine Unlearning: Sophia GradDiff on critical neurons",
)

__all__ = ["SIMUArguments", "SIMUMixin"]
