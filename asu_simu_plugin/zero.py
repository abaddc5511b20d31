"""DeepSpeed ZeRO: where our optimizer state, masks and gradients live once DeepSpeed partitions them.

Under ZeRO-1/2/3 `SophiaG` is DeepSpeed's client optimizer: DeepSpeed replaces its parameter groups
by flat fp32 partitions (one 1-D tensor per group and rank), so every per-parameter quantity of
ours (SIMU's masks, the GNB Hessian gradient) has to be laid out the same way. DeepSpeed itself
says where each parameter's piece is: its ``_hp_mapping`` fragment addresses (ZeRO-1/2) and
``safe_get_local_fp32_param`` (ZeRO-3) give views into those flat tensors; gradients come from
``safe_get_full_grad`` (ZeRO-1/2) / ``safe_get_local_grad`` (ZeRO-3). Nothing here partitions
anything itself. The frozen reference copy under ZeRO-3 is built with transformers' own
``zero.Init`` path and filled slice by slice (`frozen_copy`).

Only this module (and the DeepSpeed-aware parts of `methods/`) knows about DeepSpeed.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


def zero_stage(trainer) -> int:
    """0 without DeepSpeed, else the ZeRO stage of the trainer's DeepSpeed plugin."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return 0
    plugin = trainer.accelerator.state.deepspeed_plugin
    return int(plugin.zero_stage or 0)


def offloads_optimizer(trainer) -> bool:
    config = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in (None, "none")


def honour_max_grad_norm(trainer) -> None:
    """Make DeepSpeed clip at `max_grad_norm` when its config does not say.

    transformers hands `max_grad_norm` to DeepSpeed only through `"gradient_clipping": "auto"`;
    a config without the key (the harness's `zero_stage3_offload_config.json`) silently trains
    unclipped. Called before DeepSpeed is initialised (at trainer construction).
    """
    if not getattr(trainer, "is_deepspeed_enabled", False) or not trainer.args.max_grad_norm:
        return
    config = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
    if "gradient_clipping" not in config:
        config["gradient_clipping"] = float(trainer.args.max_grad_norm)
        logger.warning(
            "the DeepSpeed config has no gradient_clipping: clipping at max_grad_norm=%s as "
            'without DeepSpeed (add "gradient_clipping": "auto" to the config to say so)',
            trainer.args.max_grad_norm,
        )


# -- the non-finite guard and safe resume under DeepSpeed -----------------------------------------
def check_before_each_step(engine, check) -> None:
    """Call `check()` inside DeepSpeed's step, right before its optimizer changes the weights
    (DeepSpeed steps inside `accelerator.backward`, where no trainer hook runs). Once per engine."""
    optimizer = engine.optimizer
    if getattr(optimizer, "_unguarded_step", None) is not None:
        return
    step = optimizer.step

    def guarded_step(*args, **kwargs):
        check()
        return step(*args, **kwargs)

    optimizer._unguarded_step = step
    optimizer.step = guarded_step  # the engine calls `self.optimizer.step()` at each boundary


def nonfinite_gradients(trainer) -> list[str]:
    """Names of the trainable parameters whose reduced gradient holds a NaN or inf, before
    DeepSpeed's step; [] when all are finite. A collective: every rank calls it at the step.

    ZeRO keeps gradients in its partitions (`p.grad` is None): its own overflow check (which
    DeepSpeed runs only for fp16) reads them and agrees over the ranks; the names come from
    DeepSpeed's gradient accessors, only when something is non-finite. Under fp16 DeepSpeed's
    loss scaler skips such steps itself, so nothing is reported.
    """
    engine = engine_of(trainer)
    if engine.fp16_enabled():
        return []
    optimizer = engine.optimizer
    if hasattr(optimizer, "has_overflow"):  # the ZeRO-1/2/3 optimizers
        found = bool(optimizer.has_overflow(partition_gradients=True))
    else:  # without ZeRO: whole gradients (bf16: DeepSpeed's fp32 copies)
        local = getattr(optimizer, "fp32_groups_gradients_flat", None) or [
            p.grad for p in engine.module.parameters() if p.grad is not None
        ]
        flag = torch.tensor(
            float(any(not bool(torch.isfinite(g).all()) for g in local)), device=engine.device
        )
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        found = bool(flag.item())
    if not found:
        return []
    return _nonfinite_gradient_names(engine.module) or ["some parameters"]


def _nonfinite_gradient_names(model) -> list[str]:
    from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

    names = []
    for name, param in model.named_parameters():  # same order on every rank: collectives
        if not param.requires_grad:
            continue
        # ZeRO-3: this rank's piece; ZeRO-1/2: the whole gradient (all-reduced)
        grad = safe_get_local_grad(param) if hasattr(param, "ds_id") else safe_get_full_grad(param)
        if grad is not None and grad.numel() and not bool(torch.isfinite(grad).all()):
            names.append(name)
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, names)
    return list(dict.fromkeys(n for part in gathered for n in part))


def checkpoint_classes() -> list:
    """DeepSpeed's plain-data record classes inside its own checkpoint files (the loss scaler's
    settings, the ZeRO stage, where each parameter sits in a partition): a weights-only load of
    a ZeRO checkpoint needs them, and they run no code when rebuilt."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_checkpoint_reads():
    """Inside the block every DeepSpeed engine's `load_checkpoint` (transformers calls it from
    its training loop to resume, outside any method of the trainer) reads each file of the
    checkpoint (`global_step*/*model_states.pt`, `*optim_states.pt`) weights-only, and refuses
    a file that would need unpickling (`UnsafeCheckpointError`)."""
    from deepspeed import DeepSpeedEngine

    from asu_simu_plugin.guards import weights_only_loading

    original = DeepSpeedEngine.load_checkpoint

    def load_checkpoint(engine, *args, **kwargs):
        with weights_only_loading(checkpoint_classes()):
            return original(engine, *args, **kwargs)

    DeepSpeedEngine.load_checkpoint = load_checkpoint
    try:
        yield
    finally:
        DeepSpeedEngine.load_checkpoint = original


@contextlib.contextmanager
def whole_parameters(model_or_params):
    """Inside the block every ZeRO-3-partitioned parameter of a model (one loaded under
    zero.Init, before DeepSpeed's engine wraps it) or of a list is whole on every rank, read-only,
    so a plain forward works; a collective. Other parameters (and None) are left as they are.

    One parameter per gather: DeepSpeed 0.15's gather of several parameters at once launches an
    asynchronous all-gather for each and waits only for the last, which over gloo (CPU) returns
    before the others finished (the weights then hold whatever memory they got, NaN at times).
    """
    if hasattr(model_or_params, "parameters"):
        model_or_params = model_or_params.parameters()
    params = [p for p in model_or_params or () if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with contextlib.ExitStack() as stack:
        for param in params:
            stack.enter_context(deepspeed.zero.GatheredParameters([param]))
        yield


def engine_of(trainer):
    """The DeepSpeedEngine that wraps the trainer's model (after accelerate prepared it)."""
    wrapped = getattr(trainer.accelerator, "deepspeed_engine_wrapped", None)
    if wrapped is not None:
        return wrapped.engine
    return trainer.model_wrapped


def innermost_optimizer(optimizer):
    """The client optimizer behind accelerate's and DeepSpeed's wrappers."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def flat_partitions(trainer) -> list[list[torch.Tensor]]:
    """This rank's flat fp32 partitions, per parameter group of the client optimizer.

    ZeRO-1/2 leave them in the optimizer's groups; ZeRO-3 puts one sub-group at a time into a
    group for its step and empties the groups in between, so they come from its optimizer.
    """
    optimizer = innermost_optimizer(trainer.optimizer)
    groups = [list(group["params"]) for group in optimizer.param_groups]
    if zero_stage(trainer) == 3:
        zero3 = engine_of(trainer).optimizer
        groups = [[] for _ in optimizer.param_groups]
        for index, flat in enumerate(zero3.fp32_partitioned_groups_flat):
            groups[zero3.sub_group_to_group_id[index]].append(flat)
    return groups


@contextlib.contextmanager
def all_partitions_in_groups(trainer):
    """The client optimizer's groups hold every flat partition of this rank inside the block
    (what ZeRO-3 does for one sub-group around each step), so per-parameter calls of ours
    (`init_state`, `set_mask`, `update_hessian`) see them all."""
    optimizer = innermost_optimizer(trainer.optimizer)
    saved = [group["params"] for group in optimizer.param_groups]
    for group, flats in zip(optimizer.param_groups, flat_partitions(trainer), strict=True):
        group["params"] = flats
    try:
        yield optimizer
    finally:
        for group, params in zip(optimizer.param_groups, saved, strict=True):
            group["params"] = params


@dataclass
class Fragment:
    """This rank's piece of one parameter inside a flat fp32 partition of the optimizer."""

    flat: torch.Tensor  # the 1-D tensor in the client optimizer's param_groups
    offset: int  # where the piece starts in `flat`
    start: int  # where it starts in the parameter, flattened
    numel: int  # entries of the piece that belong to the parameter (no padding)


def _flat_holding(view: torch.Tensor, flats: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    pointer = view.untyped_storage().data_ptr()
    for flat in flats:
        if flat.untyped_storage().data_ptr() == pointer:
            return flat, view.storage_offset() - flat.storage_offset()
    raise LookupError("DeepSpeed's fp32 partition of a parameter is not in the optimizer")


def fragments(trainer, named_parameters) -> dict[str, Fragment]:
    """{name: this rank's Fragment} of every trainable parameter that has a piece on this rank."""
    from deepspeed.utils import safe_get_local_fp32_param

    flats = [p for group in flat_partitions(trainer) for p in group]
    rank = torch.distributed.get_rank()
    result = {}
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        if hasattr(param, "ds_id"):  # ZeRO-3: rank r holds entries [r·n, (r+1)·n), padded
            view = safe_get_local_fp32_param(param)
            start = rank * view.numel()
            numel = max(0, min(view.numel(), param.ds_numel - start))
        else:  # ZeRO-1/2
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is None:
                continue
            view = mapping.get_hp_fragment()
            start, numel = mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel
        if numel == 0:
            continue
        flat, offset = _flat_holding(view, flats)
        result[name] = Fragment(flat, offset, start, numel)
    return result


def install_masks(trainer, model, masks: dict[str, torch.Tensor]) -> None:
    """Give each flat partition the mask of its pieces (True where training may change it).

    `masks` maps a parameter name to a boolean mask broadcastable to it (SIMU's down_proj
    columns); parameters without one are trained fully.
    """
    named = dict(model.named_parameters())
    flat_masks = {}
    for name, piece in fragments(trainer, named.items()).items():
        if name not in masks:
            continue
        flat_mask = flat_masks.get(id(piece.flat))
        if flat_mask is None:
            flat_mask = torch.ones(piece.flat.shape, dtype=torch.bool, device=piece.flat.device)
            flat_masks[id(piece.flat)] = (piece.flat, flat_mask)
        else:
            flat_mask = flat_mask[1]
        full = masks[name].to(piece.flat.device).expand(tuple(param_shape(named[name])))
        flat_mask[piece.offset : piece.offset + piece.numel] = full.reshape(-1)[
            piece.start : piece.start + piece.numel
        ]
    with all_partitions_in_groups(trainer) as optimizer:
        for flat, flat_mask in flat_masks.values():
            optimizer.set_mask(flat, flat_mask)


def param_shape(param: torch.Tensor) -> torch.Size:
    """The parameter's real shape (ZeRO-3 leaves an empty placeholder outside gathers)."""
    return getattr(param, "ds_shape", param.shape)


def hessian_gradients(trainer, model) -> dict[int, torch.Tensor]:
    """{id(flat partition): the gradient DeepSpeed just reduced, laid out like that partition}."""
    from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    pieces = fragments(trainer, named)
    grads = {}
    for name, param in named:  # every rank, same order: the ZeRO-1/2 read is a collective
        if hasattr(param, "ds_id"):
            local = safe_get_local_grad(param).reshape(-1) if name in pieces else None
        else:
            full = safe_get_full_grad(param)
            local = None if name not in pieces else full.reshape(-1)[pieces[name].start :]
        if name not in pieces:
            continue
        piece = pieces[name]
        flat_grad = grads.get(id(piece.flat))
        if flat_grad is None:
            flat_grad = grads[id(piece.flat)] = torch.zeros_like(piece.flat)
        flat_grad[piece.offset : piece.offset + piece.numel] = local[: piece.numel].to(
            flat_grad.dtype
        )
    return grads


def discard_gradients(engine) -> None:
    """Clear the gradients of a backward that no step consumes, as DeepSpeed's step does.

    ZeRO-1/2 sum every reduced backward into `averaged_gradients` until its step() empties it
    (its `zero_grad` leaves them); ZeRO-3's `zero_grad` restarts its accumulation itself.
    """
    optimizer = engine.optimizer
    optimizer.zero_grad(set_to_none=True)
    averaged = getattr(optimizer, "averaged_gradients", None)
    if isinstance(averaged, dict):  # in place: DeepSpeed's parameter mappings hold this dict
        for group in averaged:
            averaged[group] = None


def frozen_copy(trainer, model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of `model` for DeepSpeed runs (the reference / teacher).

    ZeRO-3 partitions parameters at load time (`zero3_init_flag`), and a deep copy of such a
    model keeps hooks and gather closures of the original: it computes with the live weights.
    So under ZeRO-3 a fresh model is built from the config through transformers' own
    `zero.Init` path, filled parameter by parameter, and wrapped by `deepspeed.initialize` for
    inference (as the harness does for its reference models). A partitioned source (loaded
    under zero.Init, e.g. TrainingArguments made before `from_pretrained`) has the very same
    layout, so each rank copies its own slices without any communication; a whole source is
    written into the copy from rank 0, one parameter per gather (see `whole_parameters`: gathering
    source and copy together corrupted the copy in about one run in five on CPU). Other stages
    keep whole parameters on every rank: a deep copy on the device suffices.
    """
    import deepspeed

    source = model.module if hasattr(model, "module") else model
    if zero_stage(trainer) != 3:
        ref = copy.deepcopy(source).to(trainer.accelerator.device)
        ref.eval()
        for param in ref.parameters():
            param.requires_grad_(False)
        return ref
    config = copy.deepcopy(trainer.accelerator.state.deepspeed_plugin.deepspeed_config)
    dtype = next(source.parameters()).dtype
    ref = type(source)._from_config(source.config, torch_dtype=dtype)
    pairs = list(zip(source.parameters(), ref.parameters(), strict=True))
    rank = torch.distributed.get_rank()
    for mine, theirs in pairs:
        if hasattr(mine, "ds_id") and mine.ds_tensor.shape == theirs.ds_tensor.shape:
            theirs.ds_tensor.data.copy_(mine.ds_tensor.data)  # this rank's slice of both
            continue
        with whole_parameters([mine]), deepspeed.zero.GatheredParameters([theirs], 0):
            if rank == 0:
                theirs.data.copy_(mine.data)
    for src_buffer, dst_buffer in zip(source.buffers(), ref.buffers(), strict=True):
        dst_buffer.data.copy_(src_buffer.data)
    for param in ref.parameters():
        param.requires_grad_(False)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    ref, *_ = deepspeed.initialize(model=ref, config=config)
    ref.eval()
    return ref
