"""Where llmlab keeps things, and how it writes files safely.

>>> from llmlab.paths import llmlab_home
>>> llmlab_home().name  # doctest: +SKIP
'llmlab'
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

_CHUNK_BYTES = 1 << 20
# The source tree (a checkout or an editable install), for tests and benchmarks; the course's data files are
# found through llmlab.course.data.
REPO_ROOT = Path(__file__).resolve().parent.parent


def llmlab_home() -> Path:
    """The folder for uploaded files, jobs, adapters and caches: `$LLMLAB_HOME` or `~/.cache/llmlab`."""
    home = Path(os.environ.get("LLMLAB_HOME") or Path.home() / ".cache" / "llmlab").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def atomic_write_bytes(path: str | os.PathLike, data: bytes | BinaryIO) -> Path:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, never half of one.

    `data` may be a binary file object: it is copied in chunks, never held in memory whole.

    >>> atomic_write_bytes("/tmp/llmlab-example.txt", b"hi").read_bytes()
    b'hi'
    >>> import io; atomic_write_bytes("/tmp/llmlab-example.txt", io.BytesIO(b"streamed")).read_bytes()
    b'streamed'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes | bytearray | memoryview):
                f.write(data)
            else:
                shutil.copyfileobj(data, f, _CHUNK_BYTES)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write_bytes` for text, encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def temp_names(name: str | None = None) -> str:
    """A `remove_orphans` pattern for the temp files of `atomic_write_bytes` to `name` (to any name if None)."""
    return rf"\.{re.escape(name) if name else '.+'}\.(?:(?P<pid>\d+)-)?\w+\.tmp"


def remove_orphans(folder: str | os.PathLike, pattern: str) -> list[Path]:
    """Delete the temp files and folders in `folder` left by killed writers; returns what was deleted.

    `pattern` is a regex for the whole temp name; its group `pid`, the writer's process id, tells whether the
    writer is still running (its temp file is then left alone). A name without a pid is an orphan.

    >>> remove_orphans("/tmp", temp_names("llmlab-example.txt"))  # doctest: +SKIP
    [PosixPath('/tmp/.llmlab-example.txt.4242-k3j_x9a1.tmp')]
    """
    try:
        entries = list(Path(folder).iterdir())
    except FileNotFoundError:
        return []
    removed = []
    for entry in entries:
        match = re.fullmatch(pattern, entry.name)
        if match is None or (match["pid"] and _running(int(match["pid"]))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _running(pid: int) -> bool:
    """Whether process `pid` exists (True when unsure: on Windows, os.kill would end it)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process, or no pid at all: keep its file
        return True
    return True
