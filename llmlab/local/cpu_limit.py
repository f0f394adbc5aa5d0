"""How many CPU cores this process may use, how many threads the ONNX engine reads a prompt with, and how
many torch threads a training step runs on.

A laptop lends the kit all its cores; Binder and JupyterHub containers see the host's cores but get a CPU
quota in their cgroup (often 1 core), where more threads than the quota only wait for each other.

>>> engine_threads({"LLMLAB_THREADS": "3"})
3
>>> training_threads(decoding=True, environ={})
1
>>> 1 <= available_cpus() <= (os.cpu_count() or 1)
True
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

MAX_ENGINE_THREADS = 4  # a 135M model gains little from more: its matrices are small


def _quota(cgroup: Path) -> float | None:
    """Cores the cgroup's CPU quota allows (v2 `cpu.max`, else v1 `cpu.cfs_quota_us`), None when unlimited."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may run on (its affinity), fewer when the cgroup's CPU quota allows fewer."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _quota(cgroup)
    return max(1, min(cores, math.floor(quota) if quota is not None else cores))


def engine_threads(environ: Mapping[str, str] = os.environ, cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The ONNX engine's intra-op threads: `$LLMLAB_THREADS`, else the available cores (at most 4).

    Unlike torch's OpenMP teams (one thread each, `runtime.torch_threads`), ONNX Runtime's pool does not spin
    here (`session.intra_op.allow_spinning` is off), so its threads leave a busy machine's cores to others.
    """
    return max(1, int(environ.get("LLMLAB_THREADS") or min(MAX_ENGINE_THREADS, available_cpus(cgroup))))


def training_threads(
    decoding: bool, environ: Mapping[str, str] = os.environ, cgroup: Path = Path("/sys/fs/cgroup")
) -> int:
    """Torch threads for the next LoRA training step: `$LLMLAB_THREADS`, else one while the server decodes
    (torch's OpenMP team spins at its barriers and would take the cores the decoding needs), else the
    available cores (`engine_threads`): a job alone trains ~1.5x faster on two cores than on one.
    """
    if decoding and not environ.get("LLMLAB_THREADS"):
        return 1
    return engine_threads(environ, cgroup)
