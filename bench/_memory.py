"""Peak resident memory of a benchmark's processes, in MB: the one reader every benchmark uses.

It reads VmHWM (Linux's `/proc/<pid>/status`), not `ru_maxrss`: the latter keeps the parent's high-water
mark across fork + exec, so a child started by a big benchmark process would report its parent's peak.

>>> peak_mb() > 0
True
"""

from __future__ import annotations

from pathlib import Path


def peak_mb(pid: int | str = "self") -> float:
    """The peak resident memory (VmHWM) of process `pid` (default: this one) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")
