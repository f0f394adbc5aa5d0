"""A fresh llmlab home for a benchmark, sharing the user's weight cache (no second dequantization).

>>> home = fresh_home()  # doctest: +SKIP
>>> (home / "weights").is_symlink()  # doctest: +SKIP
True
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path


def fresh_home() -> Path:
    """A temporary `LLMLAB_HOME`, removed at exit, whose `weights/` links to `~/.cache/llmlab/weights`."""
    home = Path(tempfile.mkdtemp(prefix="llmlab-bench-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    weights = Path.home() / ".cache" / "llmlab" / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    (home / "weights").symlink_to(weights, target_is_directory=True)
    return home
