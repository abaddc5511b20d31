"""Optimizers as offered to the harness's optimizer registry (`trainer.optimizer.handler`)."""

from __future__ import annotations

from asu_simu_plugin.methods.sophia import optimizer as sophia

HESSIAN_SOURCES = ("grad2",)


class SophiaG(sophia.SophiaG):
    """`asu_simu_plugin.sophia.SophiaG` with a Hessian source by default.

    A trainer that only calls ``step()`` never refreshes the Hessian, and SophiaG would then
    silently be sign momentum. Here the Hessian source is ``hessian_source="grad2"`` (SOUL's: the
    EMA of the loss gradient squared, folded in by every ``step()``), and a configuration that
    leaves nothing to refresh it is refused. For Sophia-G's sampled-label estimate use the
    SOGradDiff / SONPO trainers with ``hessian_mode: gnb``.
    """

    def __init__(self, params, *args, hessian_source: str = "grad2", **kwargs):
        if hessian_source not in HESSIAN_SOURCES or kwargs.get("auto_hessian") is False:
            raise ValueError(
                f"SophiaG from the optimizer registry needs a Hessian source (got "
                f"hessian_source={hessian_source!r}, auto_hessian={kwargs.get('auto_hessian')!r}): "
                "keep hessian_source: grad2, or use trainer=SOGradDiff / SONPO with "
                "hessian_mode: gnb for the sampled-label (Gauss-Newton-Bartlett) estimate"
            )
        kwargs["auto_hessian"] = True
        super().__init__(params, *args, **kwargs)
