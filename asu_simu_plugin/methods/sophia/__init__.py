"""Second-order (Sophia) unlearning: the GradDiff and NPO losses optimised with SophiaG (as SOUL),
the `SophiaG` optimizer itself (`optimizer`), and the trainer logic (`trainer.SophiaMixin`)."""

from dataclasses import dataclass

from asu_simu_plugin.arguments import GradDiffArguments, NPOArguments
from asu_simu_plugin.methods.sophia.arguments import SophiaArguments
from asu_simu_plugin.methods.sophia.trainer import SophiaMixin
from asu_simu_plugin.registry import register_component, register_method


@dataclass
class SOGradDiffArguments(SophiaArguments, GradDiffArguments):
    """Second-order GradDiff: GradDiff's arguments plus Sophia's."""


@dataclass
class SONPOArguments(SophiaArguments, NPOArguments):
    """Second-order NPO: NPO's arguments plus Sophia's."""


register_method(
    "SOGradDiff",
    mixin=SophiaMixin,
    arguments=SOGradDiffArguments,
    config="SOGradDiff",
    summary="second-order GradDiff (SOUL): GradDiff's loss optimised with SophiaG",
)
register_method(
    "SONPO",
    mixin=SophiaMixin,
    arguments=SONPOArguments,
    base="NPO",
    config="SONPO",
    summary="second-order NPO (SOUL): NPO's loss optimised with SophiaG",
)
# the harness's optimizer registry (`trainer.optimizer.handler: SophiaG`, with patches/)
register_component("optimizer", "SophiaG", "asu_simu_plugin.methods.sophia.optimizer:SophiaG")

__all__ = ["SOGradDiffArguments", "SONPOArguments", "SophiaArguments", "SophiaMixin"]
