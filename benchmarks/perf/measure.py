"""Step time and peak memory of a training run, the same way for every benchmark."""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import threading
import time

import torch
from transformers import TrainerCallback


class PeakMemory:
    """Peak memory over a block: CUDA allocator peak, or sampled RSS above the starting level."""

    def __init__(self, device):
        self.device = device
        self.peak_bytes = 0

    @staticmethod
    def rss():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        release_memory()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.start = self.rss()
        self.highest = self.start
        self.running = True

        def sample():
            while self.running:
                self.highest = max(self.highest, self.rss())
                time.sleep(0.002)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated() - self.start
        else:
            self.running = False
            self.thread.join()
            self.peak_bytes = max(self.highest, self.rss()) - self.start
        return False


def release_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:  # glibc keeps freed blocks; hand them back so the next RSS baseline is honest
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (all micro-batches, backward and optimizer update)."""

    def __init__(self, device):
        self.device = device
        self.times = []

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self.started)


def summary(times: list[float]) -> dict:
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {
        "step_seconds": statistics.median(times),
        "mean_seconds": statistics.mean(times),
        "min_seconds": min(times),
        "max_seconds": max(times),
        "iqr_seconds": [quartiles[0], quartiles[2]],
        "timed_steps": len(times),
    }


def mib(memory):
    return round(memory.peak_bytes / 2**20, 1)


def spread(row) -> str:
    low, high = row["iqr_seconds"]
    return f"{row['min_seconds']:.2f}–{row['max_seconds']:.2f} (IQR {low:.2f}–{high:.2f})"
