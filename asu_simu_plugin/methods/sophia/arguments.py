"""The Sophia trainers' arguments (SophiaG settings on GradDiff / NPO): their input and checks."""

from __future__ import annotations

from dataclasses import dataclass, field

from asu_simu_plugin.arguments import (
    MethodArgumentError,
    MethodArguments,
    check_bool,
    check_choice,
    check_integer,
    check_number,
    help_text,
)


@dataclass
class SophiaArguments(MethodArguments):
    """`SophiaMixin`'s SophiaG settings (lr and weight decay are training settings)."""

    HESSIAN_MODES = ("gnb", "grad2")

    betas: tuple[float, float] = field(
        default=(0.965, 0.99), metadata=help_text("SophiaG (beta1, beta2), each in [0, 1)")
    )
    rho: float = field(default=0.04, metadata=help_text("SophiaG clipping scale (> 0)"))
    hessian_mode: str = field(
        default="gnb", metadata=help_text("gnb (Sophia-G, sampled labels) | grad2 (SOUL)")
    )
    hessian_interval: int = field(
        default=10, metadata=help_text("gnb: refresh the Hessian every k optimizer steps (>= 1)")
    )
    soul_compat: bool = field(default=False, metadata=help_text("SOUL's quirks (grad2 only)"))
    sophia_bs: int | None = field(
        default=None,
        metadata=help_text("Sophia bs; null = sampled label tokens (gnb) / 5120 (grad2)"),
    )

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.betas, list | tuple) or len(self.betas) != 2:
            raise MethodArgumentError(f"betas must be two numbers [b1, b2] (got {self.betas!r})")
        for beta in self.betas:
            check_number("betas entry", beta, 0)
            if not beta < 1:
                raise MethodArgumentError(f"betas entries must be < 1 (got {self.betas!r})")
        check_number("rho", self.rho, above=0)
        check_choice("hessian_mode", self.hessian_mode, self.HESSIAN_MODES)
        check_integer("hessian_interval", self.hessian_interval, 1)
        check_bool("soul_compat", self.soul_compat)
        if self.soul_compat and self.hessian_mode != "grad2":
            raise MethodArgumentError("soul_compat=true reproduces SOUL, which uses grad2")
        check_integer("sophia_bs", self.sophia_bs, 1, optional=True)
