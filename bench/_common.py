"""Shared by the benchmark scripts: a description of the machine for the result JSON."""
from __future__ import annotations

import os
import platform


def machine() -> dict:
    """CPU model, core count and torch version (DESIGN.md "Benchmarks")."""
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__}
