"""One standalone training run, launched by the distributed tests (torchrun / accelerate launch).

    python launch_trainer.py OUT '{"method": ..., "method_args": {...}, "settings": {...}}'

Every rank writes OUT/rank<r>.json: sha256 of its parameters and of its optimizer state, the
logged history; rank 0 also writes OUT/final.safetensors (parameters and the Hessian EMA by
parameter name). `"argmax_labels": true` replaces Sophia-G's label sampling by the argmax, so
runs with different process counts see the same labels. Other keys: `"partitioned_student"`
(the student loaded by `from_pretrained` under ZeRO-3's zero.Init), `"nan_gradient_at_step": k`
(optimizer step k gets NaN gradients while its loss stays finite; the run's
NonFiniteTrainingError is recorded, with the parameters' digest then and after every step),
`"nan_hessian_pass_at_step": k` (Sophia-G's Hessian pass after optimizer step k computes NaN
logits, so its sampled-label loss is NaN; recorded as for `nan_gradient_at_step`),
`"resume"` (a checkpoint folder to resume from), `"resume_attempts"` (folders to resume from
first, each with a fresh trainer: the UnsafeCheckpointError of each is recorded),
`"frozen_copy_trials": n` (with a partitioned student: the trainer built n times, each time
counting the frozen copy's parameters that differ from the student's), `"peaked_attention"`
(queries and keys ×8, so that the attention temperature matters).
"""

import atexit
import dataclasses
import gc
import hashlib
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM, TrainerCallback

from asu_simu_plugin import toy
from asu_simu_plugin.guards import NonFiniteTrainingError, UnsafeCheckpointError, close_distributed
from asu_simu_plugin.runner import RunSettings, build_trainer


def digest(tensors) -> str:
    sha = hashlib.sha256()
    for tensor in tensors:
        sha.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


def full_state(trainer):
    """({name: parameter}, {name: Hessian EMA}, {name: momentum}), whole, on every rank (under
    DeepSpeed gathered with its own accessors: collectives, so every rank calls them)."""
    model = trainer.model
    optimizer = getattr(trainer, "optimizer_for_hessian", lambda: None)()
    params, hessians, momenta = {}, {}, {}
    if not getattr(trainer, "is_deepspeed_enabled", False):
        for name, p in model.named_parameters():
            params[name] = p.detach().cpu().clone()
            if optimizer is not None and p in optimizer.state:
                hessians[name] = optimizer.state[p]["hessian"].detach().cpu().clone()
                momenta[name] = optimizer.state[p]["exp_avg"].detach().cpu().clone()
        return params, hessians, momenta
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    for name, p in model.named_parameters():
        if p.requires_grad:
            params[name] = safe_get_full_fp32_param(p).detach().cpu().clone()
            if optimizer is not None:
                hessians[name] = safe_get_full_optimizer_state(p, "hessian").detach().cpu()
                momenta[name] = safe_get_full_optimizer_state(p, "exp_avg").detach().cpu()
        else:
            with deepspeed.zero.GatheredParameters([p]):
                params[name] = p.detach().cpu().clone()
    return params, hessians, momenta


def nan_gradients_at(trainer, module, step: int) -> None:
    """Optimizer step `step` (1-based) back-propagates NaN through `module`'s output, whose
    value stays the same: where(True, y, sqrt(0·y)) has the gradient 0·inf = NaN."""

    def hook(_module, _args, output):
        if trainer.state.global_step != step - 1:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        poisoned = torch.where(
            torch.ones_like(hidden, dtype=torch.bool), hidden, (hidden * 0).sqrt()
        )
        return (poisoned, *output[1:]) if isinstance(output, tuple) else poisoned

    module.register_forward_hook(hook)


def nan_hessian_pass_at(trainer, module, step: int) -> None:
    """The Hessian pass that follows optimizer step `step` sees NaN outputs of `module`."""
    inside = []
    update = trainer.gauss_newton_bartlett_update

    def poisoned_update(*args, **kwargs):
        inside.append(trainer.state.global_step == step)
        try:
            return update(*args, **kwargs)
        finally:
            inside.pop()

    def hook(_module, _args, output):
        if not (inside and inside[-1]):
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        nan = hidden * float("nan")
        return (nan, *output[1:]) if isinstance(output, tuple) else nan

    trainer.gauss_newton_bartlett_update = poisoned_update
    module.register_forward_hook(hook)


class StepDigests(TrainerCallback):
    """The parameters' digest after every optimizer step (index 0: before training)."""

    def __init__(self, model):
        self.digests = [digest(p for _, p in model.named_parameters())]
        self.hessians = [None]  # the Hessian EMA's digest after every step (Sophia)
        self.trainer = None

    def on_step_end(self, args, state, control, **kwargs):
        params, hessians, _ = full_state(self.trainer)
        self.digests.append(digest(params.values()))
        self.hessians.append(digest(hessians[k] for k in sorted(hessians)) if hessians else None)


def frozen_copy_mismatches(make_trainer, method_args, folder) -> int:
    """Build the trainer on a fresh partitioned student (ZeRO-3): how many parameters of its
    frozen copy differ from the student's (each gathered on its own)."""
    import deepspeed

    student = LlamaForCausalLM.from_pretrained(folder)
    trainer = make_trainer(student, method_args)
    mismatches = 0
    pairs = zip(student.parameters(), trainer.ref_model.module.parameters(), strict=True)
    for mine, theirs in pairs:
        with deepspeed.zero.GatheredParameters([mine]):
            expected = mine.detach().clone()
        with deepspeed.zero.GatheredParameters([theirs]):
            mismatches += not torch.equal(theirs.detach(), expected)
    del trainer
    gc.collect()
    return mismatches


def main(out: str, spec: dict) -> None:
    if spec.get("argmax_labels"):
        from asu_simu_plugin.methods.sophia.trainer import SophiaMixin

        SophiaMixin.sample_labels = staticmethod(lambda logits: logits.argmax(dim=-1))
    authors = toy.make_authors(4)
    tokenizer = toy.build_tokenizer(toy.corpus_texts(authors), vocab_size=600)

    def new_model():
        torch.manual_seed(0)
        model = LlamaForCausalLM(toy.tiny_llama_config(len(tokenizer)))
        if spec.get("peaked_attention"):  # so that the attention temperature visibly matters
            with torch.no_grad():
                for layer in model.model.layers:
                    layer.self_attn.q_proj.weight.mul_(8.0)
                    layer.self_attn.k_proj.weight.mul_(8.0)
        return model

    model = new_model()
    if spec.get("save") and int(os.environ.get("RANK", 0)) == 0:
        os.makedirs(out, exist_ok=True)
        initial = {n: p.detach().clone().contiguous() for n, p in model.named_parameters()}
        save_file(initial, os.path.join(out, "initial.safetensors"))
    split = spec.get("forget_authors", 1)  # 5 QA pairs each
    forget = [qa for a in authors[:split] for qa in a.qa_pairs()]
    retain = [qa for a in authors[split:] for qa in a.qa_pairs()]
    known = {f.name for f in dataclasses.fields(RunSettings)}
    given = {"logging_steps": 1, **spec["settings"]}
    extra = {**given.pop("extra", {}), **{k: given.pop(k) for k in list(given) if k not in known}}
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        extra["use_cpu"] = False  # DeepSpeed picks its CPU accelerator itself
    settings = RunSettings(**given, extra=extra)
    rank = int(os.environ.get("RANK", 0))
    if spec.get("partitioned_student"):
        # as a script that makes its TrainingArguments first: under ZeRO-3 `from_pretrained`
        # then runs inside DeepSpeed's zero.Init and the student arrives partitioned
        arguments = settings.training_arguments(out)  # noqa: F841 (keeps DeepSpeed's config alive)
        folder = os.path.join(out, f"student{rank}")
        model.save_pretrained(folder)
        model = LlamaForCausalLM.from_pretrained(folder)
        assert all(hasattr(p, "ds_id") for p in model.parameters()), "not partitioned"

    def make_trainer(student, method_args, callbacks=None):
        return build_trainer(
            spec["method"],
            student,
            tokenizer,
            forget,
            retain,
            out,
            method_args,
            settings,
            callbacks,
        )

    trial_args = {
        **spec["method_args"],
        "temperature": 2.0,
        "layers": None,
        "collapse_guard": False,
    }
    copy_mismatches = [
        frozen_copy_mismatches(make_trainer, trial_args, folder)
        for _ in range(spec.get("frozen_copy_trials", 0))
    ]
    refusals = {}
    for folder in spec.get("resume_attempts", []):  # each refused, or None when it trained
        attempt = make_trainer(new_model(), spec["method_args"])
        try:
            attempt.train(resume_from_checkpoint=folder)
            refusals[folder] = None
        except UnsafeCheckpointError as refused:
            refusals[folder] = str(refused)
        del attempt
        gc.collect()
    poisoned = spec.get("nan_gradient_at_step") or spec.get("nan_hessian_pass_at_step")
    steps = StepDigests(model) if poisoned else None
    trainer = make_trainer(model, spec["method_args"], [steps] if steps else None)
    if steps:
        steps.trainer = trainer
    if spec.get("nan_gradient_at_step"):
        nan_gradients_at(trainer, model.model.layers[0].mlp, spec["nan_gradient_at_step"])
    if spec.get("nan_hessian_pass_at_step"):
        nan_hessian_pass_at(trainer, model.model.layers[0].mlp, spec["nan_hessian_pass_at_step"])
    if spec.get("leave_group_open"):
        # as the harness's src/train.py, which never closes its process group: record whether
        # it is still open at exit, after the handlers `train()` registered (atexit is LIFO)
        atexit.register(record_group_at_exit, os.path.join(out, f"exit{rank}.json"))
    error = None
    try:
        trainer.train(resume_from_checkpoint=spec.get("resume"))
    except NonFiniteTrainingError as stopped:
        if steps is None:
            raise
        error = str(stopped)
    named, hessians, momenta = full_state(trainer)
    state = [t for name in sorted(hessians) for t in (momenta[name], hessians[name])]
    record = {
        "error": error,
        "frozen_copy_mismatches": copy_mismatches,
        "refusals": refusals,
        "step_params": steps.digests if steps else None,
        "step_hessians": steps.hessians if steps else None,
        "hessian": digest(hessians[k] for k in sorted(hessians)) if hessians else None,
        "params": digest(named.values()),
        "optimizer_state": digest(state),
        "log_history": trainer.state.log_history,
        "masks": {k: v.int().tolist() for k, v in getattr(trainer, "neuron_masks", {}).items()},
        # ASU: the teacher's setting (chosen on rank 0 when `auto`) and the collapse check
        "teacher": {
            k: getattr(trainer, k, None) for k in ("temperature", "layers", "collapse_stats")
        },
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(record, fh)
    if rank == 0:
        tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in named.items()}
        tensors.update({f"exp_avg/{n}": h.contiguous() for n, h in momenta.items()})
        tensors.update({f"hessian/{n}": h.contiguous() for n, h in hessians.items()})
        save_file(tensors, os.path.join(out, "final.safetensors"))
    if spec.get("save") and error is None:
        trainer.save_model(os.path.join(out, "model"))
    del trainer
    if not spec.get("leave_group_open"):
        close_distributed()


def record_group_at_exit(path: str) -> None:
    with open(path, "w") as fh:
        json.dump({"group_open": torch.distributed.is_initialized()}, fh)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
