"""The machine a benchmark ran on, in one line for BENCHMARKS.md (imported by the scripts
beside it: `python benchmarks/<script>.py` puts this folder on sys.path)."""

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory() -> str:
    try:
        kb = next(
            int(x.split()[1])
            for x in Path("/proc/meminfo").read_text().splitlines()
            if x.startswith("MemTotal")
        )
    except (OSError, StopIteration):
        return "RAM unknown"
    return f"{kb / 2**20:.0f} GiB RAM"


def describe(*extra: str) -> str:
    """CPU, cores, RAM, OS, Python, then `extra` (library versions, thread counts)."""
    parts = [
        f"{cpu_name()}, {os.cpu_count()} cores, {memory()}",
        f"{platform.system()} {platform.release()}",
        f"Python {platform.python_version()}",
        *extra,
    ]
    return "; ".join(parts)
