"""What the operating system says about this machine: the memory it reports as available.

Read by the KV-cache check (llm/decoder.py), the background read-ahead (fast/readahead.py) and the default dtype
(fast/packing.py's `cpu_default_dtype`, via loading.py), so that each decides against the same number.
"""

from __future__ import annotations


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
