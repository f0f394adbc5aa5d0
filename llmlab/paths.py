"""Where llmlab keeps things, and how it writes files safely.

>>> from llmlab.paths import llmlab_home
>>> llmlab_home().name  # doctest: +SKIP
'llmlab'
"""

from __future__ import annotations

import json
import os
import tempfile
from importlib.resources import files
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _data_dir() -> Path:
    """The kit's data: `llmlab/_data` in an installed wheel, else `data/` of the source tree (a checkout or an
    editable install, where the folder stays at the top of the repository).

    >>> (_data_dir() / "employees.csv").is_file()
    True
    """
    packaged = files("llmlab") / "_data"
    return Path(str(packaged)) if packaged.is_dir() else REPO_ROOT / "data"


DATA_DIR = _data_dir()


def read_data_jsonl(name: str) -> list[dict]:
    """The records of the JSONL file `name` in data/ (blank lines skipped): the kit's own, well-formed data.

    >>> read_data_jsonl("eval.jsonl")[0]["kind"]
    'paraphrase'
    """
    lines = (DATA_DIR / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def llmlab_home() -> Path:
    """The folder for uploaded files, jobs, adapters and caches: `$LLMLAB_HOME` or `~/.cache/llmlab`."""
    home = Path(os.environ.get("LLMLAB_HOME") or Path.home() / ".cache" / "llmlab").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, never half of one.

    >>> atomic_write_bytes("/tmp/llmlab-example.txt", b"hi").read_bytes()
    b'hi'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
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
