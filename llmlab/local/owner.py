"""Which process runs a fine-tuning job: a lock file its runner holds (`fcntl.flock`) for as long as it lives.

A server marks a job failed only when the job's owner is gone, so a second process on the same home never
fails the jobs another one is running; the kernel releases the lock when the owner dies, even by kill -9.

>>> import tempfile; home = Path(tempfile.mkdtemp())
>>> owner = Owner(home)
>>> owner_alive(home, owner.id), owner_alive(home, "run-gone"), owner_alive(home, None)
(True, False, False)
"""

from __future__ import annotations

import fcntl
import os
import secrets
from pathlib import Path

_FOLDER = "owners"  # under the llmlab home: one lock file per live (or dead, until checked) owner


class Owner:
    """This process's claim on the jobs it creates: `id` goes into each job; the lock lives as long as we do."""

    def __init__(self, home: Path) -> None:
        folder = Path(home) / _FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        self.id = f"run-{secrets.token_hex(8)}"
        self._fd = os.open(folder / f"{self.id}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def owner_alive(home: Path, owner_id: str | None) -> bool:
    """True while the process that holds `owner_id`'s lock lives (a dead owner's lock file is removed)."""
    if not owner_id or not owner_id.replace("-", "").isalnum():
        return False
    path = Path(home) / _FOLDER / f"{owner_id}.lock"
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    path.unlink(missing_ok=True)
    return False
