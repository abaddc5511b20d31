"""SophiaG cost, measured in one process: optimizer step time vs AdamW, and the GNB pass.

    python benchmarks/perf_sophia.py [--params 100e6] [--steps 10] [--device cpu|cuda]

1. Optimizer step: the same ~N parameters (a stack of square fp32 matrices) with the same random
   gradients, timed for `SophiaG.step()` and `torch.optim.AdamW.step()` (torch's default
   implementation for the device); prints both and their ratio, and the cost of
   `update_hessian()`.
2. GNB pass: on a small Llama (built from a config, no download), one SophiaMixin Gauss-Newton-
   Bartlett pass (forward, label sampling, backward, `update_hessian`) vs one ordinary training
   step (forward, backward, optimizer step) at the same batch; prints the ratio. With the
   default interval k = 10 the amortised overhead is ratio / k.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from asu_simu_plugin.sophia import SophiaG


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats, device):
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def optimizer_steps(n_params: float, steps: int, device):
    width = 2048
    count = max(1, round(n_params / width**2))
    params = [
        torch.nn.Parameter(torch.randn(width, width, device=device) * 0.02) for _ in range(count)
    ]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    total = sum(p.numel() for p in params)
    sophia = SophiaG(params, lr=1e-4)
    sophia.update_hessian()
    sophia.step()  # warm-up: state allocation
    sophia_time = timed(sophia.step, steps, device)
    hessian_time = timed(sophia.update_hessian, steps, device)
    del sophia
    adamw = torch.optim.AdamW(params, lr=1e-4)
    adamw.step()
    adamw_time = timed(adamw.step, steps, device)
    return total, sophia_time, adamw_time, hessian_time


def gnb_overhead(steps: int, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    from asu_simu_plugin.methods.sophia import SophiaMixin

    config = LlamaConfig(
        vocab_size=8000,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config).to(device)
    ids = torch.randint(0, 8000, (8, 128), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    optimizer = SophiaG(model.parameters(), lr=1e-4)

    def train_step():
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    class Probe(SophiaMixin):  # only what the GNB pass touches
        def __init__(self):
            self.optimizer = optimizer
            self.args = argparse.Namespace(max_grad_norm=1.0)
            self.accelerator = argparse.Namespace(num_processes=1)
            self.sophia_bs = None
            self._hessian_updates = 0

    probe = Probe()
    train_step()
    step_time = timed(train_step, steps, device)
    gnb_time = timed(
        lambda: probe.gauss_newton_bartlett_update(model, {"forget": batch}), steps, device
    )
    return sum(p.numel() for p in model.parameters()), step_time, gnb_time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(
        f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    total, sophia_time, adamw_time, hessian_time = optimizer_steps(args.params, args.steps, device)
    print(f"optimizer step over {total / 1e6:.1f}M fp32 parameters (median of {args.steps}):")
    print(f"  SophiaG.step          {sophia_time * 1e3:9.1f} ms")
    print(f"  AdamW.step            {adamw_time * 1e3:9.1f} ms")
    print(f"  SophiaG/AdamW ratio   {sophia_time / adamw_time:9.2f}")
    print(f"  update_hessian        {hessian_time * 1e3:9.1f} ms")
    n, step_time, gnb_time = gnb_overhead(args.steps, device)
    print(f"GNB pass on a {n / 1e6:.1f}M-parameter Llama, batch 8 x 128 tokens:")
    print(f"  training step         {step_time * 1e3:9.1f} ms")
    print(f"  GNB pass              {gnb_time * 1e3:9.1f} ms")
    print(
        f"  GNB / step ratio      {gnb_time / step_time:9.2f}  "
        f"(every 10 steps: +{100 * gnb_time / step_time / 10:.0f}% per step)"
    )


if __name__ == "__main__":
    main()
