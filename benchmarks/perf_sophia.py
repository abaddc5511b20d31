"""SophiaG cost, measured in one process: optimizer step time vs AdamW, and the GNB pass.

    python benchmarks/perf_sophia.py [--params 100e6] [--steps 5] [--dtype fp32|bf16]
        [--mask-fraction 0.5] [--gnb-steps 3] [--device cpu|cuda] [--out results.json]

1. Optimizer step: the same ~N parameters (a stack of square matrices) with the same random
   gradients, timed for `SophiaG.step()` and `torch.optim.AdamW.step()` (torch's default
   implementation for the device), and `SophiaG.update_hessian()`; with --mask-fraction also
   `SophiaG.step()` with SIMU-style column masks keeping that fraction of the columns.
2. GNB pass: on a small Llama (built from a config, no download), one SophiaMixin Gauss-Newton-
   Bartlett pass (forward, label sampling, backward, `update_hessian`) vs one ordinary training
   step (forward, backward, optimizer step) at the same batch. With the default interval k = 10
   the amortised overhead is ratio / k. --gnb-steps 0 skips it.

Prints a table of median times; writes nothing unless --out (JSON) is given. The defaults take
about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from asu_simu_plugin.methods.sophia.optimizer import SophiaG

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats, device):
    """Median wall time of `repeats` calls, after one untimed call (state allocation, caches)."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def optimizer_steps(n_params, width, steps, dtype, mask_fraction, device):
    """{name: seconds} for the optimizer-step rows, and the parameter count."""
    count = max(1, round(n_params / width**2))
    gen = torch.Generator(device=device).manual_seed(0)
    params = [
        torch.nn.Parameter(
            (torch.randn(width, width, generator=gen, device=device) * 0.02).to(dtype)
        )
        for _ in range(count)
    ]
    for p in params:
        p.grad = (torch.randn(width, width, generator=gen, device=device) * 1e-3).to(dtype)
    rows = {}
    sophia = SophiaG(params, lr=1e-4)
    rows["SophiaG.update_hessian"] = timed(sophia.update_hessian, steps, device)
    rows["SophiaG.step"] = timed(sophia.step, steps, device)
    if mask_fraction > 0:
        columns = torch.rand(1, width, generator=gen, device=device) < mask_fraction
        for p in params:
            sophia.set_mask(p, columns)
        rows[f"SophiaG.step, {mask_fraction:.0%} columns"] = timed(sophia.step, steps, device)
    del sophia
    adamw = torch.optim.AdamW(params, lr=1e-4)
    rows["AdamW.step"] = timed(adamw.step, steps, device)
    return rows, sum(p.numel() for p in params)


def gnb_overhead(steps, device):
    """{name: seconds} for one training step and one GNB pass on a small Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from asu_simu_plugin.methods.sophia.trainer import SophiaMixin

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=8000,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config).to(device)
    ids = torch.randint(0, 8000, (4, 128), device=device)
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
            self._fixed_bs = False
            self._hessian_updates = 0

    probe = Probe()
    rows = {
        "training step (Llama)": timed(train_step, steps, device),
        "GNB pass (Llama)": timed(
            lambda: probe.gauss_newton_bartlett_update(model, {"forget": batch}), steps, device
        ),
    }
    return rows, sum(p.numel() for p in model.parameters())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=float, default=100e6, help="parameters in the stack")
    parser.add_argument("--width", type=int, default=2048, help="side of each square matrix")
    parser.add_argument("--steps", type=int, default=5, help="timed calls per row (median)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument(
        "--mask-fraction",
        type=float,
        default=0.5,
        help="also time a step with column masks keeping this fraction (0: skip)",
    )
    parser.add_argument("--gnb-steps", type=int, default=3, help="timed GNB passes (0: skip)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.params < 1 or args.width < 1 or not 0 <= args.mask_fraction <= 1:
        parser.error("--steps, --params and --width must be >= 1, --mask-fraction in [0, 1]")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device: {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    rows, total = optimizer_steps(
        args.params, args.width, args.steps, DTYPES[args.dtype], args.mask_fraction, device
    )
    ratios = {key: value / rows["AdamW.step"] for key, value in rows.items()}
    print(f"\n{total / 1e6:.1f}M {args.dtype} parameters, median of {args.steps}")
    print(f"{'':34s} {'ms':>10s} {'vs AdamW.step':>14s}")
    for key, seconds in rows.items():
        print(f"{key:34s} {seconds * 1e3:10.1f} {ratios[key]:14.2f}")
    results = {
        "device": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "params": total,
        "dtype": args.dtype,
        "steps": args.steps,
        "seconds": rows,
        "ratio_to_adamw": ratios,
    }

    if args.gnb_steps > 0:
        gnb_rows, n = gnb_overhead(args.gnb_steps, device)
        ratio = gnb_rows["GNB pass (Llama)"] / gnb_rows["training step (Llama)"]
        print(f"\n{n / 1e6:.1f}M-parameter Llama, batch 4 x 128 tokens, median of {args.gnb_steps}")
        for key, seconds in gnb_rows.items():
            print(f"{key:34s} {seconds * 1e3:10.1f}")
        print(f"GNB pass / training step {ratio:.2f}; every 10 steps: +{10 * ratio:.0f}% per step")
        results.update(gnb_seconds=gnb_rows, gnb_ratio=ratio)

    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
