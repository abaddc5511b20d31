"""One standalone training run, launched by the distributed tests (torchrun / accelerate launch).

    python launch_trainer.py OUT '{"method": ..., "method_args": {...}, "settings": {...}}'

Every rank writes OUT/rank<r>.json: sha256 of its parameters and of its optimizer state, the
logged history; rank 0 also writes OUT/final.safetensors (parameters and the Hessian EMA by
parameter name). `"argmax_labels": true` replaces Sophia-G's label sampling by the argmax, so
runs with different process counts see the same labels.
"""

import atexit
import dataclasses
import hashlib
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from asu_simu_plugin import toy
from asu_simu_plugin.guards import close_distributed
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


def main(out: str, spec: dict) -> None:
    if spec.get("argmax_labels"):
        from asu_simu_plugin.methods.sophia.trainer import SophiaMixin

        SophiaMixin.sample_labels = staticmethod(lambda logits: logits.argmax(dim=-1))
    authors = toy.make_authors(4)
    tokenizer = toy.build_tokenizer(toy.corpus_texts(authors), vocab_size=600)
    torch.manual_seed(0)
    model = LlamaForCausalLM(toy.tiny_llama_config(len(tokenizer)))
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
    trainer = build_trainer(
        spec["method"], model, tokenizer, forget, retain, out, spec["method_args"], settings
    )
    rank = int(os.environ.get("RANK", 0))
    if spec.get("leave_group_open"):
        # as the harness's src/train.py, which never closes its process group: record whether
        # it is still open at exit, after the handlers `train()` registered (atexit is LIFO)
        atexit.register(record_group_at_exit, os.path.join(out, f"exit{rank}.json"))
    trainer.train()
    named, hessians, momenta = full_state(trainer)
    state = [t for name in sorted(hessians) for t in (momenta[name], hessians[name])]
    record = {
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
    if spec.get("save"):
        trainer.save_model(os.path.join(out, "model"))
    del trainer
    if not spec.get("leave_group_open"):
        close_distributed()


def record_group_at_exit(path: str) -> None:
    with open(path, "w") as fh:
        json.dump({"group_open": torch.distributed.is_initialized()}, fh)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
