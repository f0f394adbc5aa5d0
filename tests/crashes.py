"""Crash a fresh Python at the worst moment of a save: SIGKILL just before its n-th `os.replace`.

>>> killed_at_replace("from llmlab.paths import atomic_write_text; atomic_write_text('/tmp/x', 'hi')", 1)  # doctest: +SKIP
"""

import signal
import subprocess
import sys

_PRELUDE = """
import os, signal
_replace, _calls = os.replace, [0]
def _replace_or_die(*args, **kwargs):
    _calls[0] += 1
    if _calls[0] == {nth}:
        os.kill(os.getpid(), signal.SIGKILL)
    return _replace(*args, **kwargs)
os.replace = _replace_or_die
"""


def killed_at_replace(code: str, nth: int) -> None:
    """Run `code` in a new interpreter that is killed (SIGKILL, no clean-up) at its `nth` os.replace call."""
    proc = subprocess.run(
        [sys.executable, "-c", _PRELUDE.format(nth=nth) + code], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, f"not killed at os.replace #{nth}: {proc.stderr[-2000:]}"
