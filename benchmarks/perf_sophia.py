"""SophiaG's optimizer step against torch.optim.AdamW(foreach=True), and its GNB Hessian pass.

    python -m benchmarks.perf_sophia [--rounds 10] [--threads 1] [--layers 30]
        [--mask-fraction 0.5] [--gnb-steps 3] [--device cpu] [--out benchmarks/results]

1. Optimizer step. SmolLM2-135M's parameters (its architecture built from its config: random
   weights, fp32, nothing downloaded) with fixed random gradients. One AdamW (foreach=True) and
   one SophiaG (its defaults: the grad2 Hessian folded in by every step) update the same
   parameters. Rows: AdamW; SophiaG's per-parameter path and its multi-tensor path
   (``foreach``), each with the win-rate count on and off; ``update_hessian()`` (what Sophia-G's
   sampled-label pass adds per refresh); a step with SIMU-style column masks keeping
   --mask-fraction of every matrix's columns. After one untimed round (state allocation), each
   of --rounds rounds times one call of every row, in a rotated order, so that machine noise
   hits every row alike. Reported: median wall and process CPU seconds per call, the spread,
   and ratios of medians to AdamW's step.
2. GNB pass (--gnb-steps > 0): on a small Llama, one SophiaMixin Gauss-Newton-Bartlett pass
   (forward, label sampling, backward, fold) against one ordinary training step; with the
   default interval k = 10 the amortised overhead is ratio / k.

Threads default to 1: on a shared machine each elementwise operation of a multi-threaded run
ends with a barrier that waits for whichever thread another user's process descheduled, so the
timing measures the machine's load rather than the optimizer. Process CPU time is reported next
to wall time for the same reason. Writes <out>/perf_sophia.md and perf_sophia.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import time
from pathlib import Path

import torch

from asu_simu_plugin.diagnostics import machine_info
from asu_simu_plugin.methods.sophia.optimizer import SophiaG

ADAMW = "AdamW.step (foreach)"


def sophia_row(foreach: bool, wins: bool = True, device_type: str = "cpu") -> str:
    """A SophiaG step row's name; SophiaG's default path on the device is marked."""
    default = foreach == (device_type != "cpu")  # SophiaG's foreach=None
    return f"SophiaG.step, {'foreach' if foreach else 'loop'}{' (default)' if default else ''}" + (
        "" if wins else ", no win rate"
    )


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def smollm2_parameters(layers: int, device):
    """SmolLM2-135M's parameters (random weights), each with a fixed random gradient."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from benchmarks.perf.perf import SMOLLM2_135M

    torch.manual_seed(0)
    config = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers})
    params = list(AutoModelForCausalLM.from_config(config).to(device).parameters())
    gen = torch.Generator(device=device).manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=device) * 1e-3
    return params


def step_rows(params, mask_fraction, device):
    """[(name, prepare, call)]: `call` is timed, `prepare` (untimed) sets the optimizer up."""
    adamw = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    sophia = SophiaG(params, lr=1e-4)
    default_foreach = device.type != "cpu"  # SophiaG's foreach=None

    def configure(foreach, wins, masks=None):
        def prepare():
            for group in sophia.param_groups:
                group["foreach"] = foreach
            sophia.track_win_rate = wins
            for p in params:
                if p.dim() == 2:
                    sophia.set_mask(p, None if masks is None else masks[p.shape[1]])

        return prepare

    rows = [(ADAMW, None, adamw.step)]
    for foreach in (default_foreach, not default_foreach):
        for wins in (True, False):
            name = sophia_row(foreach, wins, device.type)
            rows.append((name, configure(foreach, wins), sophia.step))
    rows.append(("SophiaG.update_hessian", configure(default_foreach, True), sophia.update_hessian))
    if mask_fraction > 0:
        gen = torch.Generator(device=device).manual_seed(2)
        masks = {
            width: torch.rand(1, width, generator=gen, device=device) < mask_fraction
            for width in {p.shape[1] for p in params if p.dim() == 2}
        }
        name = f"{sophia_row(default_foreach)}, {mask_fraction:.0%} of columns masked in"
        rows.append((name, configure(default_foreach, True, masks), sophia.step))
    return rows


def interleaved(rows, rounds, device):
    """{name: {"wall": [...], "cpu": [...]}} over `rounds` rotated rounds (after one untimed)."""
    times = {name: {"wall": [], "cpu": []} for name, _, _ in rows}
    for index in range(rounds + 1):
        shift = index % len(rows)
        for name, prepare, call in rows[shift:] + rows[:shift]:
            if prepare is not None:
                prepare()
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            call()
            synchronize(device)
            if index:  # round 0 allocates the optimizers' state
                times[name]["wall"].append(time.perf_counter() - wall)
                times[name]["cpu"].append(time.process_time() - cpu)
    return times


def summary(values):
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "q1": quartiles[0],
        "q3": quartiles[2],
    }


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
    optimizer = SophiaG(model.parameters(), lr=1e-4, hessian_mode="gnb")

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
            self.state = argparse.Namespace(global_step=0)
            self.sophia_bs = None
            self._fixed_bs = False
            self._hessian_updates = 0

        def _any_rank(self, flag):
            return flag

    probe = Probe()
    rows = [
        ("training step (Llama)", None, train_step),
        (
            "GNB pass (Llama)",
            None,
            lambda: probe.gauss_newton_bartlett_update(model, {"forget": batch}),
        ),
    ]
    times = interleaved(rows, steps, device)
    seconds = {name: statistics.median(t["wall"]) for name, t in times.items()}
    return seconds, sum(p.numel() for p in model.parameters())


def markdown(results) -> str:
    m = results["machine"]
    adamw = results["rows"][ADAMW]
    lines = [
        "# SophiaG's optimizer step vs AdamW",
        "",
        f"Generated by `python -m benchmarks.perf_sophia` on {results['date']}: {m['cpu']}, "
        f"{m['cpu_cores']} cores ({m['torch_threads']} torch threads), device "
        f"{results['device']}; torch {results['torch']}; load average {results['load_before']} "
        f"before, {results['load_after']} after (a shared machine). "
        f"{results['params'] / 1e6:.1f}M fp32 parameters (SmolLM2-135M shape, "
        f"{results['layers']} layers, random weights and gradients); {results['rounds']} "
        "interleaved rounds of one call per row after an untimed one. SophiaG runs its defaults "
        "(grad2 Hessian folded in by every step); `loop` is its per-parameter path, `foreach` "
        "its multi-tensor path.",
        "",
        "| row | median wall s | wall min–max (IQR) | median CPU s | wall vs AdamW | CPU vs AdamW |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in results["rows"].items():
        wall, cpu = row["wall"], row["cpu"]
        lines.append(
            f"| {name} | {wall['median']:.3f} | {wall['min']:.3f}–{wall['max']:.3f} "
            f"({wall['q1']:.3f}–{wall['q3']:.3f}) | {cpu['median']:.3f} | "
            f"**{wall['median'] / adamw['wall']['median']:.2f}×** | "
            f"{cpu['median'] / adamw['cpu']['median']:.2f}× |"
        )
    ratio = results["ratio_to_adamw"]
    lines += [
        "",
        f"SophiaG's default step (`{results['default_row']}`) / AdamW's: **{ratio['wall']:.2f}×** wall, "
        f"{ratio['cpu']:.2f}× CPU time (goal ≤ 1.2×).",
    ]
    for path, cost in results["win_rate_cost"].items():
        lines.append(
            f"Win-rate count ({path}): +{cost['cpu_seconds']:.3f} s CPU per step, "
            f"{cost['cpu_fraction']:.0%} of that path's step with it."
        )
    if "gnb_seconds" in results:
        gnb = results["gnb_seconds"]
        lines += [
            "",
            f"GNB pass on a {results['gnb_params'] / 1e6:.1f}M-parameter Llama (batch 4 × 128): "
            f"{gnb['GNB pass (Llama)']:.3f} s vs a training step {gnb['training step (Llama)']:.3f}"
            f" s = {results['gnb_ratio']:.2f}×; every 10 steps: +"
            f"{10 * results['gnb_ratio']:.0f}% per step.",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed calls per row (>= 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2: 30)")
    parser.add_argument(
        "--mask-fraction",
        type=float,
        default=0.5,
        help="also time a step with column masks keeping this fraction (0: skip)",
    )
    parser.add_argument("--gnb-steps", type=int, default=3, help="timed GNB passes (0: skip)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.threads < 1 or args.layers < 1:
        parser.error("--rounds, --threads and --layers must be >= 1")
    if not 0 <= args.mask_fraction <= 1:
        parser.error("--mask-fraction must be in [0, 1]")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_before = [round(x, 2) for x in os.getloadavg()]

    params = smollm2_parameters(args.layers, device)
    times = interleaved(step_rows(params, args.mask_fraction, device), args.rounds, device)
    rows = {name: {kind: summary(v) for kind, v in t.items()} for name, t in times.items()}

    def median(name, kind="cpu"):
        return rows[name][kind]["median"]

    default = sophia_row(device.type != "cpu", device_type=device.type)
    win_cost = {}
    for foreach in (False, True):
        name = sophia_row(foreach, device_type=device.type)
        extra = median(name) - median(name + ", no win rate")
        path = "foreach" if foreach else "loop"
        win_cost[path] = {"cpu_seconds": extra, "cpu_fraction": extra / median(name)}
    results = {
        "date": dt.date.today().isoformat(),
        "machine": machine_info(),
        "device": str(device),
        "torch": torch.__version__,
        "load_before": load_before,
        "params": sum(p.numel() for p in params),
        "layers": args.layers,
        "rounds": args.rounds,
        "rows": rows,
        "default_row": default,
        "ratio_to_adamw": {
            kind: median(default, kind) / median(ADAMW, kind) for kind in ("wall", "cpu")
        },
        "win_rate_cost": win_cost,
        "times": times,
    }
    del params
    if args.gnb_steps > 0:
        gnb, count = gnb_overhead(args.gnb_steps, device)
        ratio = gnb["GNB pass (Llama)"] / gnb["training step (Llama)"]
        results.update(gnb_seconds=gnb, gnb_params=count, gnb_ratio=ratio)
    results["load_after"] = [round(x, 2) for x in os.getloadavg()]

    text = markdown(results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "perf_sophia.md").write_text(text)
    (args.out / "perf_sophia.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out / 'perf_sophia.md'} and perf_sophia.json")


if __name__ == "__main__":
    main()
