"""GradDiff and NPO: the harness's own trainers, which the standalone route also offers (on
`asu_simu_plugin.standalone`'s bases). Registered without a mixin: the harness keeps its names."""

from asu_simu_plugin.arguments import GradDiffArguments, NPOArguments
from asu_simu_plugin.registry import register_method

register_method(
    "GradDiff",
    arguments=GradDiffArguments,
    summary="gradient difference: gamma * (-NLL on forget) + alpha * retain loss (baseline)",
)
register_method(
    "NPO",
    arguments=NPOArguments,
    base="NPO",
    summary="negative preference optimisation on forget + retain loss (baseline)",
)
