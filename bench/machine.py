"""What the benchmark ran on, and how fast this machine can stream weights from memory.

Decoding one token reads every weight of the language model once (the KV cache and activations are tiny next
to it), so at batch size 1 a decode step cannot beat `bytes of weights / memory bandwidth`. The bandwidth is
measured here the way a decode step uses it: one pass over a buffer far larger than the caches (2 GiB, about
a small model's weights), read with PyTorch's own vectorised, multi-threaded reductions at the benchmark's
thread count; the best kernel's median is the machine's weight-streaming bandwidth, and
`roofline tokens/s = bandwidth / bytes per token`.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch

from minisail.fast.packing import packing_support

# The instruction-set extensions that decide which kernels run (and how fast), as /proc/cpuinfo names them.
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "avx_vnni", "avx_ne_convert", "amx_tile", "amx_bf16", "amx_int8")  # fmt: skip


def _first_line_with(path: str, key: str) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def cpu_isa() -> list[str]:
    """The ISA_FLAGS this CPU reports (x86 Linux), in ISA_FLAGS order; on other machines the architecture name."""
    flags = _first_line_with("/proc/cpuinfo", "flags")
    if flags is None:
        return [platform.machine()]
    present = set(flags.split())
    return [flag for flag in ISA_FLAGS if flag in present]


def memory_available_bytes() -> int | None:
    value = _first_line_with("/proc/meminfo", "MemAvailable")
    return int(value.split()[0]) * 1024 if value else None


def machine_info() -> dict:
    total = _first_line_with("/proc/meminfo", "MemTotal")
    info = {
        "cpu": _first_line_with("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": round(int(total.split()[0]) * 1024 / 1e9, 1) if total else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "isa": cpu_isa(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_kernels": packing_support().reason,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    from bench.llama_side import llama_cpp_version

    info["llama_cpp"] = llama_cpp_version()  # llama-cpp-python's version, or None (not installed)
    return info


def streaming_bandwidth(gib: float = 2.0, repeats: int = 5) -> float:
    """Bytes per second of one read pass over a `gib` GiB buffer (best kernel, median of `repeats`)."""
    buffer = torch.ones(int(gib * 1024**3) // 4, dtype=torch.float32)  # ones: no denormals, no NaN
    kernels = {
        "sum fp32": lambda: buffer.sum(),
        "max int32": lambda: buffer.view(torch.int32).max(),
        "max int16": lambda: buffer.view(torch.int16).max(),
    }
    best = 0.0
    for kernel in kernels.values():
        kernel()  # warm: page-in and thread pool start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            kernel()
            times.append(time.perf_counter() - start)
        best = max(best, buffer.numel() * 4 / statistics.median(times))
    return best
