"""Safety rails every trainer of ours carries: stop on non-finite training, read checkpoints safely.

Non-finite training. A NaN / inf loss or gradient ruins the weights in one optimizer step, and
transformers keeps going (its logging even shows such a loss as the window's mean, 0.0 when every
step is NaN), so a run could end "successfully" with a model full of NaN. `NonFiniteGuardMixin`
checks, before every optimizer step, the losses of the step and (without a mixed-precision
scaler, which skips such steps itself) the gradients, and the trained weights before each
checkpoint; the first failure raises `NonFiniteTrainingError` naming the step, the loss and the
likely fix. The exception leaves `train()` before that checkpoint and before any final save, so
the last good checkpoint stays and no finished model is written; `save_model` refuses
non-finite weights too (the harness saves after `train()` returns). DeepSpeed steps inside
`accelerator.backward`, before transformers' pre-step hook, and keeps ZeRO's gradients in its own
partitions (`p.grad` is None): there the check runs inside DeepSpeed's step, on its partitions
(`asu_simu_plugin.zero.check_before_each_step`), still before the weights change.

Safe loading. Resuming reads `optimizer.pt`, `scheduler.pt`, `rng_state*.pth`, `scaler.pt` with
`torch.load`; transformers < 4.50 does so with torch's default, which is a full unpickler on
torch < 2.6 (or with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD), so a planted checkpoint could run code.
`weights_only_loading()` makes every such read `weights_only=True`, allowing only the numpy
types of the RNG state (what transformers >= 4.50 allows). DeepSpeed reads its own checkpoint
files (`global_step*/`) from the training loop itself; `zero.weights_only_checkpoint_reads()`
gives those reads the same treatment, allowing DeepSpeed's few plain-data record classes.

Clean exit. A process group left open to interpreter shutdown lets gloo's worker thread free a
finished collective's tensors after Python stopped serving the GIL, which aborts a rank at random
("terminate called without an active exception", SIGABRT) after the model was saved, so a good
run exits non-zero. `close_distributed()` closes it; scripts that never do (the harness's
`src/train.py`) get it closed at exit once training succeeded (`TrainerCompatMixin.train`).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import math
import pickle

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint


class NonFiniteTrainingError(RuntimeError):
    """Training produced a non-finite loss, gradient or weight."""


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds objects that a weights-only load refuses."""


def _nonfinite_names(named_tensors) -> list[str]:
    """Names of the tensors holding a NaN or inf (one device sync for all of them)."""
    named = [(n, t.detach()) for n, t in named_tensors if t is not None and t.numel()]
    if not named:
        return []
    device = named[0][1].device
    # A fp32 norm per tensor is finite iff every element is (sums of squares of a working
    # model's values are far from fp32's range), and costs one reduction kernel per tensor.
    norms = torch.stack(
        [torch.linalg.vector_norm(t, dtype=torch.float32).to(device) for _, t in named]
    )
    finite = torch.isfinite(norms)
    if bool(finite.all()):
        return []
    return [name for (name, _), ok in zip(named, finite.tolist(), strict=True) if not ok]


def nonfinite_parameters(model, trainable_only: bool = False) -> list[str]:
    """Names of the parameters holding a NaN or inf; of a ZeRO-3 model this rank's pieces only
    (outside a gather its parameters are empty placeholders)."""
    return _nonfinite_names(
        (n, getattr(p, "ds_tensor", p))
        for n, p in model.named_parameters()
        if p.requires_grad or not trainable_only
    )


def nonfinite_gradients(model) -> list[str]:
    return _nonfinite_names((n, p.grad) for n, p in model.named_parameters() if p.requires_grad)


def _shorten(names: list[str], limit: int = 3) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class _NonFiniteCallback(TrainerCallback):
    """Runs the trainer's checks at the two points of each optimizer step."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not _uses_deepspeed(self.trainer):  # DeepSpeed has stepped by now: checked inside
            self.trainer._check_before_optimizer_step()

    def on_step_end(self, args, state, control, **kwargs):
        # Before a checkpoint is written (the flow callback, registered first, has decided);
        # other steps need no pass over the weights: a non-finite weight makes the next loss
        # non-finite, and `save_model` checks the final weights.
        self.trainer._nonfinite_loss = None
        if control.should_save:
            self.trainer._check_after_optimizer_step()


def _uses_deepspeed(trainer) -> bool:
    return bool(getattr(trainer, "is_deepspeed_enabled", False))


class NonFiniteGuardMixin:
    """Ends training with `NonFiniteTrainingError` at the first non-finite loss, gradient or weight."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Never average a NaN step away in the logged loss (transformers' default does).
        self.args.logging_nan_inf_filter = False
        self._nonfinite_loss: float | None = None
        self.add_callback(_NonFiniteCallback(self))
        if _uses_deepspeed(self):
            self._guard_deepspeed_backward()

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        self._note_loss(loss)
        return loss

    def _note_loss(self, loss) -> None:
        if self._nonfinite_loss is None and torch.is_tensor(loss):
            value = float(loss.detach().float().mean())
            if not math.isfinite(value):
                self._nonfinite_loss = value

    def _guard_deepspeed_backward(self) -> None:
        """Under DeepSpeed the step is taken inside `accelerator.backward` (at the last
        micro-batch of a step): note the loss before it, and check inside DeepSpeed's step."""
        from asu_simu_plugin import zero

        backward = self.accelerator.backward

        def guarded_backward(loss, *args, **kwargs):
            self._note_loss(loss)
            zero.check_before_each_step(zero.engine_of(self), self._check_before_optimizer_step)
            return backward(loss, *args, **kwargs)

        self.accelerator.backward = guarded_backward

    # -- the checks ------------------------------------------------------------------------------
    def _any_rank(self, flag: bool) -> bool:
        """Every rank takes the same decision (one rank raising alone would hang the others)."""
        if self.accelerator.num_processes == 1:
            return flag
        tensor = torch.tensor(float(flag), device=self.accelerator.device)
        return bool(self.accelerator.reduce(tensor, reduction="sum").item() > 0)

    def _check_before_optimizer_step(self) -> None:
        loss = self._nonfinite_loss
        if self._any_rank(loss is not None):
            raise NonFiniteTrainingError(
                self._message(f"the loss is {loss if loss is not None else 'non-finite'}")
            )
        if _uses_deepspeed(self):
            from asu_simu_plugin import zero

            bad = zero.nonfinite_gradients(self)  # every rank: DeepSpeed's check is collective
        elif getattr(self.accelerator, "scaler", None) is not None:
            return  # fp16 loss scaling: the scaler skips overflowing steps and lowers its scale
        else:
            bad = nonfinite_gradients(self.model)
        if bad:
            raise NonFiniteTrainingError(
                self._message(f"gradients of {_shorten(bad)} are non-finite")
            )

    def _check_after_optimizer_step(self) -> None:
        bad = self._nonfinite_weights(trainable_only=True)
        if bad:
            raise NonFiniteTrainingError(
                self._message(
                    f"the optimizer step made {_shorten(bad)} non-finite",
                    step=self.state.global_step,  # already counted at on_step_end
                )
            )

    def _message(self, what: str, step: int | None = None) -> str:
        step = self.state.global_step + 1 if step is None else step
        fixes = [f"lower the learning rate (now {self.args.learning_rate:g})"]
        if self.args.fp16 or _parameter_dtype(self.model) == torch.float16:
            fixes.append("train in bfloat16 or float32 instead of float16 (fp16 overflows)")
        fixes.append("check the method arguments (weights, temperature) for extreme values")
        checkpoint = _last_checkpoint(self.args.output_dir)
        kept = f"; the last good checkpoint is {checkpoint}" if checkpoint else ""
        return (
            f"training diverged at optimizer step {step}: {what}. Stopped without saving a "
            f"model{kept}. Likely fix: " + "; or ".join(fixes)
        )

    # -- saving ------------------------------------------------------------------------------------
    def _nonfinite_weights(self, trainable_only: bool = False) -> list[str]:
        bad = nonfinite_parameters(self.model, trainable_only)
        # ZeRO-3: each rank sees its own pieces, so the ranks decide together (save_model and
        # the checkpoint check run on every rank there)
        if self.accelerator.num_processes > 1 and _zero3_partitioned(self.model):
            bad = _union_over_ranks(bad)
        return bad

    def save_model(self, output_dir=None, _internal_call=False):
        bad = self._nonfinite_weights()
        if bad:
            raise NonFiniteTrainingError(
                f"refusing to save a model with non-finite weights ({_shorten(bad)})"
            )
        return super().save_model(output_dir, _internal_call)


def _zero3_partitioned(model) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _union_over_ranks(names: list[str]) -> list[str]:
    """Every rank's names (in first-seen order); a collective."""
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, names)
    return list(dict.fromkeys(n for part in gathered for n in part))


def _parameter_dtype(model):
    return next((p.dtype for p in model.parameters()), None)


def _last_checkpoint(output_dir) -> str | None:
    try:
        return get_last_checkpoint(output_dir)
    except (OSError, TypeError):
        return None


# -- loading checkpoints -------------------------------------------------------------------------
def numpy_rng_globals() -> list:
    """The numpy objects inside a checkpoint's RNG state (`np.random.get_state()`)."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


@contextlib.contextmanager
def weights_only_loading(allowed=()):
    """Within the block every `torch.load` is `weights_only=True` (numpy RNG state and the
    classes in `allowed` permitted)."""
    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True  # overrides a caller's False: checkpoints are data only
        try:
            return original(*args, **kwargs)
        except pickle.UnpicklingError as error:
            source = args[0] if args else kwargs.get("f")
            raise UnsafeCheckpointError(
                f"{source} holds objects that a weights-only load refuses, so it is not read "
                "(a checkpoint written by transformers or DeepSpeed holds only tensors, numbers, "
                "the numpy RNG state and DeepSpeed's records; reading the latter two safely "
                "needs torch >= 2.4). Resume from a checkpoint you trust, or start over. "
                f"Detail: {_refusal(error)}"
            ) from None

    allow = getattr(torch.serialization, "safe_globals", None)
    permitted = numpy_rng_globals() + list(allowed)
    scope = allow(permitted) if allow is not None else contextlib.nullcontext()
    torch.load = load
    try:
        with scope:
            yield
    finally:
        torch.load = original


def _refusal(error: Exception) -> str:
    """The line of torch's refusal that names what was refused (without its advice to allow it)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = next((x for x in lines if "WeightsUnpickler error" in x), lines[0] if lines else "")
    return line.split(" Please use ")[0]


def close_distributed(barrier: bool = True) -> None:
    """Tear down the process group a torchrun / accelerate launch opened.

    Call it after the trainer is released; `barrier` waits until every rank got here first.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    gc.collect()  # drop trainer/DDP references so the group really closes below
    if barrier:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _close_distributed_at_exit() -> None:
    close_distributed(barrier=False)


def close_distributed_at_exit() -> None:
    """Close the process group when the interpreter exits, while Python still runs (atexit), for
    scripts that never close it. Without a barrier: by then this rank ran every collective of
    the script, and a rank that failed must not leave the others waiting at exit."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        atexit.unregister(_close_distributed_at_exit)  # registered once however often we train
        atexit.register(_close_distributed_at_exit)
