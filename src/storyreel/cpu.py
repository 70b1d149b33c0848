"""What the CPU this process runs on can give: usable cores and native bfloat16.

Both services that run torch on a CPU (the in-process LLM and the diffusion
service) size their thread pools here. torch's default is one thread per core
of the *host*; in a container limited to 2 CPUs on a 64-core node that is 64
threads time-sliced onto 2 CPUs, many times slower than 2 threads. The usable
count is the smallest of the cores this process may run on (its affinity) and
the cgroup's CPU quota (``cpu.max`` in cgroup v2, ``cpu.cfs_quota_us`` in v1),
rounded up.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

#: Where the cgroup files are read; a parameter so tests can point it at a folder.
CGROUP_ROOT = Path("/sys/fs/cgroup")
#: CPU flags that mean bfloat16 matrix math runs natively (AVX-512 BF16, Intel AMX).
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs the cgroup quota allows (2.5 for "250000 100000"), or None when unlimited."""
    try:  # cgroup v2
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def usable_cpus(root: Path = CGROUP_ROOT) -> int:
    """Cores this process can keep busy: its affinity, capped by the cgroup quota (>= 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cores = min(cores, math.ceil(limit))
    return max(1, cores)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (Linux), empty where they cannot be read."""
    try:
        with cpuinfo.open() as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether bfloat16 matrix math is native here (not emulated, which is slower than fp32)."""
    return bool(BF16_FLAGS & (cpu_flags() if flags is None else flags))


def torch_threads(configured: int) -> int:
    """The thread count to give torch: the setting, or 0 for :func:`usable_cpus`."""
    return configured or usable_cpus()
