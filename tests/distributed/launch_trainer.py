"""One standalone training run, launched by the distributed tests (torchrun / accelerate launch).

    python launch_trainer.py OUT '{"method": ..., "method_args": {...}, "settings": {...}}'

Every rank writes OUT/rank<r>.json: sha256 of its parameters and of its optimizer state, the
logged history; rank 0 also writes OUT/final.safetensors (parameters and the Hessian EMA by
parameter name). `"argmax_labels": true` replaces Sophia-G's label sampling by the argmax, so
runs with different process counts see the same labels.
"""

import dataclasses
import hashlib
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from asu_simu_plugin import toy
from asu_simu_plugin.runner import RunSettings, build_trainer, close_distributed


def digest(tensors) -> str:
    sha = hashlib.sha256()
    for tensor in tensors:
        sha.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


def main(out: str, spec: dict) -> None:
    if spec.get("argmax_labels"):
        from asu_simu_plugin.methods.sophia import SophiaMixin

        SophiaMixin.sample_labels = staticmethod(lambda logits: logits.argmax(dim=-1))
    authors = toy.make_authors(4)
    tokenizer = toy.build_tokenizer(toy.corpus_texts(authors), vocab_size=600)
    torch.manual_seed(0)
    model = LlamaForCausalLM(toy.tiny_llama_config(len(tokenizer)))
    forget = authors[0].qa_pairs()
    retain = [qa for a in authors[1:] for qa in a.qa_pairs()]
    known = {f.name for f in dataclasses.fields(RunSettings)}
    given = {"logging_steps": 1, **spec["settings"]}
    extra = {**given.pop("extra", {}), **{k: given.pop(k) for k in list(given) if k not in known}}
    settings = RunSettings(**given, extra=extra)
    trainer = build_trainer(
        spec["method"], model, tokenizer, forget, retain, out, spec["method_args"], settings
    )
    trainer.train()
    rank = int(os.environ.get("RANK", 0))
    named = dict(trainer.model.named_parameters())
    optimizer = (
        trainer.optimizer_for_hessian() if hasattr(trainer, "optimizer_for_hessian") else None
    )
    state = []
    hessians = {}
    if optimizer is not None:
        for name, p in named.items():
            if p in optimizer.state:
                state += [optimizer.state[p][k] for k in ("exp_avg", "hessian")]
                hessians[name] = optimizer.state[p]["hessian"].detach().cpu().contiguous()
    record = {
        "params": digest(named.values()),
        "optimizer_state": digest(state),
        "log_history": trainer.state.log_history,
        "masks": {k: v.int().tolist() for k, v in getattr(trainer, "neuron_masks", {}).items()},
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(record, fh)
    if rank == 0:
        tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in named.items()}
        tensors.update({f"hessian/{n}": h for n, h in hessians.items()})
        save_file(tensors, os.path.join(out, "final.safetensors"))
    del trainer
    close_distributed()


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
