"""How much memory this process may use, and where the kit trades speed for memory.

Binder and JupyterHub give a learner 1-2 GB for everything (they say so in `MEM_LIMIT` and the container's
cgroup); a laptop has many GB. Where the limit is tight (under 4 GiB):
- training recomputes activations (activation checkpointing: the same losses, ~30% more time per step, ~90 MB
  less per tutorial example); `LLMLAB_ACTIVATION_CHECKPOINTING` = `1` / `0` forces it on or off;
- the int8 ONNX engine serves only where a LoRA job beside it lets its frozen weights' pages go after each use
  (`pages_let_go`: Linux, fp32 training): Binder's scenario then peaks at 1,325 MB for all processes vs 1,475
  on torch (bench/bench_backend.py --memory-only); elsewhere torch serves, whose weights a job shares (the job's
  own copy beside ONNX would cost ~400 MB more); `LLMLAB_ENGINE` forces either
  (`llmlab.local.engine_onnx.engine_name`).

>>> checkpointing_wanted({"MEM_LIMIT": "2147483648"}), checkpointing_wanted({"LLMLAB_ACTIVATION_CHECKPOINTING": "0"})
(True, False)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

TIGHT_BYTES = 4 * 2**30  # under this limit memory is tight
_SWITCH = "LLMLAB_ACTIVATION_CHECKPOINTING"


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())  # cgroup v2 writes "max" when there is no limit: not an int
    except (OSError, ValueError):
        return None


def _mem_total(meminfo: Path) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_limit_bytes(
    environ: Mapping[str, str] = os.environ,
    cgroup: Path = Path("/sys/fs/cgroup"),
    meminfo: Path = Path("/proc/meminfo"),
) -> int | None:
    """The smallest of `MEM_LIMIT` (set by JupyterHub and Binder), the cgroup's limit (v2 or v1) and the
    machine's memory, in bytes; None when none is known.

    >>> memory_limit_bytes({"MEM_LIMIT": "1073741824"}, Path("/nonexistent"), Path("/nonexistent"))
    1073741824
    """
    candidates = [
        _read_int(cgroup / "memory.max"),
        _read_int(cgroup / "memory" / "memory.limit_in_bytes"),
        _mem_total(meminfo),
    ]
    if environ.get("MEM_LIMIT", "").strip().isdigit():
        candidates.append(int(environ["MEM_LIMIT"]))
    known = [value for value in candidates if value and value > 0]
    return min(known) if known else None


def checkpointing_wanted(environ: Mapping[str, str] = os.environ, **limit_sources: Path) -> bool:
    """Whether LoRA training should checkpoint activations: as `LLMLAB_ACTIVATION_CHECKPOINTING` says, or
    (`auto`) when the memory limit is under 4 GiB."""
    choice = environ.get(_SWITCH, "auto").strip().lower()
    if choice in ("1", "true", "on"):
        return True
    if choice in ("0", "false", "off"):
        return False
    if choice != "auto":
        raise ValueError(f"{_SWITCH} must be 1, 0 or auto, not {choice!r}")
    return memory_is_tight(environ, **limit_sources)


def memory_is_tight(environ: Mapping[str, str] = os.environ, **limit_sources: Path) -> bool:
    """Whether the memory limit (`memory_limit_bytes`) is under 4 GiB, as on Binder.

    >>> nowhere = {"cgroup": Path("/nonexistent"), "meminfo": Path("/nonexistent")}
    >>> memory_is_tight({"MEM_LIMIT": str(2 * 2**30)}, **nowhere), memory_is_tight({"MEM_LIMIT": str(8 * 2**30)}, **nowhere)
    (True, False)
    """
    limit = memory_limit_bytes(environ, **limit_sources)
    return limit is not None and limit < TIGHT_BYTES


def pages_let_go(environ: Mapping[str, str] = os.environ, platform: str = sys.platform) -> bool:
    """Whether a LoRA job beside the ONNX engine maps its frozen fp32 matrices from the weight cache and lets
    their pages go after each use (`training_model`, with Linux's `madvise`), holding about one matrix of them
    resident: on Linux, unless `LLMLAB_TRAINING_BF16=1` asks for bf16 copies.

    >>> pages_let_go({}, "linux"), pages_let_go({"LLMLAB_TRAINING_BF16": "1"}, "linux"), pages_let_go({}, "darwin")
    (True, False, False)
    """
    return platform.startswith("linux") and environ.get("LLMLAB_TRAINING_BF16") != "1"
