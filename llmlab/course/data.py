"""The course's data files: `data/` at the top of the repository, carried in the wheel as `llmlab/_data`.

>>> (DATA_DIR / "handbook" / "leave.md").is_file()
True
>>> read_jsonl("eval.jsonl")[0]["kind"]
'paraphrase'
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

__all__ = ["DATA_DIR", "read_jsonl"]


def _data_dir() -> Path:
    """`llmlab/_data` of an installed wheel, else `data/` of the source tree (a checkout or an editable
    install, where the folder stays at the top of the repository and `llmlab._data` cannot be imported).

    >>> (_data_dir() / "employees.csv").is_file()
    True
    """
    packaged = files("llmlab") / "_data"
    return Path(str(packaged)) if packaged.is_dir() else Path(__file__).resolve().parents[2] / "data"


DATA_DIR = _data_dir()


def read_jsonl(name: str) -> list[dict]:
    """The records of the JSONL file `name` in the data (blank lines skipped): the course's own, well-formed data.

    >>> len(read_jsonl("tools_eval.jsonl")) > 0
    True
    """
    lines = (DATA_DIR / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]
