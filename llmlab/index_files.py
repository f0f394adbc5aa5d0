"""The folder a `VectorIndex` is saved in: written atomically, read back with every part checked.

A saved index is a directory holding ``manifest.json`` (format, version, dim, metric, backend, params,
count), ``vectors.npy``, ``records.json`` (ids, texts, metadata) and the backend's own files (hnsw:
``hnsw.bin``). Anything missing, corrupted or foreign is an `IndexFormatError` naming the folder.

>>> home = tempfile.TemporaryDirectory()
>>> def write(tmp):
...     (tmp / "manifest.json").write_text('{"format": "llmlab.VectorIndex", "version": 1, "dim": 2}')
>>> folder = write_folder(Path(home.name) / "idx", write)
>>> read_manifest(folder, dim=3)  # doctest: +ELLIPSIS
Traceback (most recent call last):
llmlab.index_files.IndexFormatError: .../idx holds dim=2, expected dim=3
>>> home.cleanup()
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llmlab import jsontext
from llmlab.paths import remove_orphans

FORMAT = "llmlab.VectorIndex"
FORMAT_VERSION = 1


class IndexFormatError(ValueError):
    """A save directory that is missing, corrupted, foreign, or does not match what was asked for."""


def whole(value: Any) -> bool:
    """A count or label read from JSON: a non-negative int (not a bool)."""
    return type(value) is int and value >= 0


def _copies(path: Path, kind: str) -> str:
    """A `remove_orphans` pattern for the copies that `write_folder` writes ("tmp") or moves aside ("old") next
    to `path`: ``.<name>.tmp-<pid>-<random>`` and ``.<name>.old-<pid>-<thread>`` (older versions: no pid in tmp).
    """
    return rf"\.{re.escape(path.name)}\.{kind}-(?:(?P<pid>\d+)-)?\w+"


def _moved_aside(path: Path) -> Path | None:
    """The copy of a saved index that a save killed between its two moves left next to `path`, if any."""
    try:
        found = [p for p in path.parent.iterdir() if re.fullmatch(_copies(path, "old"), p.name)]
    except OSError:
        return None
    found = [p for p in found if (p / "manifest.json").is_file()]
    return max(found, key=lambda p: p.stat().st_ctime) if found else None  # ctime: when it was moved


def write_folder(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Let `write(tmp)` fill a new folder next to `path`, then put it in the place of `path`.

    Killed at any moment, it leaves the old index or the new one: the old one is moved aside and the new one
    moved in; `read_manifest` finds the old copy if a kill came between the two moves. Copies that killed
    saves left behind are deleted by the next save. A `path` that holds something else is never overwritten.
    """
    path = Path(path)
    if (
        path.exists()
        and not (path / "manifest.json").is_file()
        and (not path.is_dir() or any(path.iterdir()))
    ):
        raise IndexFormatError(f"{path} exists and is not a saved VectorIndex: refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path.parent, _copies(path, "tmp"))
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-"))
    try:
        write(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}-{threading.get_ident()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        remove_orphans(path.parent, _copies(path, "old"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def checked_manifest(path: Path, filename: str, fmt: str, version: int, rebuild: str = "") -> dict:
    """The JSON manifest `filename` of the saved folder `path`, whose `format` must be `fmt` (a saved thing of
    another kind is refused) and `version` this llmlab's; any fault is an `IndexFormatError` naming the file.
    `rebuild` ends the message for a version this llmlab cannot read (what to do instead).

    >>> checked_manifest(Path("/nonexistent"), "manifest.json", FORMAT, FORMAT_VERSION)
    Traceback (most recent call last):
    llmlab.index_files.IndexFormatError: no saved VectorIndex at /nonexistent: it has no manifest.json
    """
    what = fmt.rpartition(".")[2]  # "llmlab.VectorIndex" -> "VectorIndex"
    try:
        manifest = jsontext.loads((path / filename).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexFormatError(f"no saved {what} at {path}: it has no {filename}") from None
    except (OSError, ValueError) as e:  # ValueError: not UTF-8 or not JSON
        raise IndexFormatError(f"{path}/{filename} is corrupted: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise IndexFormatError(f"{path} is not a saved {what} (its format is not {fmt!r})")
    if manifest.get("version") != version:
        raise IndexFormatError(
            f"{path} was saved in format version {manifest.get('version')!r}; this llmlab reads version "
            f"{version}{rebuild}"
        )
    return manifest


def read_manifest(
    path: str | os.PathLike, dim: int | None = None, metric: str | None = None
) -> tuple[Path, dict]:
    """The folder really read (`path`, or the copy an interrupted save moved aside, with a warning) and its
    checked manifest; `dim`/`metric`, when given, must match what was saved."""
    path = Path(path)
    if not path.is_dir():
        aside = _moved_aside(path)
        if aside is None:
            raise IndexFormatError(f"no saved VectorIndex at {path}: not a directory")
        warnings.warn(
            f"{path} is missing: loading the copy that an interrupted save left in {aside.name} "
            "(save the index again to put it back in place)",
            stacklevel=3,
        )
        path = aside
    manifest = checked_manifest(path, "manifest.json", FORMAT, FORMAT_VERSION)
    for key, want in (("dim", dim), ("metric", metric)):
        if want is not None and manifest.get(key) != want:
            raise IndexFormatError(f"{path} holds {key}={manifest.get(key)!r}, expected {key}={want!r}")
    if not (whole(manifest.get("count")) and whole(manifest.get("next_auto_id", 0))):
        raise IndexFormatError(
            f"{path}/manifest.json is corrupted: count and next_auto_id must be whole numbers"
        )
    return path, manifest


def read_records(path: Path, n: int, dim: int) -> tuple[np.ndarray, dict]:
    """The `n` vectors of `path` and its records (ids, texts, metadata, and what the backend added), checked."""
    try:
        vecs = np.load(path / "vectors.npy", allow_pickle=False)
        records = jsontext.loads((path / "records.json").read_text(encoding="utf-8"))
        ids, texts, metas = records["ids"], records["texts"], records["metadata"]
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise IndexFormatError(f"{path} is corrupted: {type(e).__name__}: {e}") from None
    if vecs.dtype != np.float32 or vecs.shape != (n, dim) or not np.isfinite(vecs).all():
        raise IndexFormatError(
            f"{path}/vectors.npy is corrupted: expected finite float32 ({n}, {dim}), got {vecs.dtype} {vecs.shape}"
        )
    if not (
        all(type(column) is list and len(column) == n for column in (ids, texts, metas))
        and all(type(i) is str for i in ids)
        and len(set(ids)) == n
        and all(t is None or type(t) is str for t in texts)
        and all(type(m) is dict for m in metas)
    ):
        raise IndexFormatError(
            f"{path}/records.json is corrupted: it does not hold {n} records with distinct string ids, "
            "string or null texts, and metadata objects"
        )
    return vecs, records
