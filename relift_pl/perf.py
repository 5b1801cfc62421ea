"""Throughput and memory figures logged every step (``perf/*``): what verl and OpenRLHF users
read first when a run is slow or close to running out of memory."""

from __future__ import annotations

import resource
import sys

import torch

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s per device, from the vendors' data sheets.
_PEAK_BF16_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "H800": 989e12,
                    "A800": 312e12, "L40S": 362e12, "B200": 2250e12}


def device_peak_flops(device: torch.device) -> float | None:
    """The bf16 peak of a CUDA device by its name, or None (CPU, or a device not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in _PEAK_BF16_FLOPS.items() if key in name), None)


def training_flops(num_params: int, tokens: int, gradient_checkpointing: bool) -> float:
    """Model FLOPs of training on ``tokens`` tokens: 6 N per token (forward 2 N, backward 4 N),
    plus 2 N for the forward that activation checkpointing recomputes. Attention's own FLOPs and
    the no-grad log-prob passes are left out (the usual MFU convention: an underestimate)."""
    per_token = 6 + (2 if gradient_checkpointing else 0)
    return per_token * num_params * tokens


def peak_memory_gb(device: torch.device) -> tuple[str, float]:
    """(``perf/peak_memory_gb`` on CUDA since the last reset, else ``perf/peak_rss_gb``)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return "perf/peak_memory_gb", peak
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return "perf/peak_rss_gb", rss / (2**30 if sys.platform == "darwin" else 2**20)
