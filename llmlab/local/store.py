"""The local server's store: uploaded files, fine-tuning jobs, their events and checkpoints, on disk.

Layout under the llmlab home (every JSON document written atomically, so a crash never leaves half a file;
a record that cannot be read all the same — torn by another tool, edited by hand — is skipped with a
warning naming it, never overwritten, and the rest is served)::

    files/<file-id>            the uploaded bytes, exactly as received
    files/<file-id>.json       the FileObject as a dict
    jobs/<job-id>/job.json     the FineTuningJob as a dict (plus private keys starting with "_")
    jobs/<job-id>/events.jsonl one FineTuningJobEvent per line, oldest first
    jobs/<job-id>/checkpoints.json
    adapters/<job-id>/         the trained LoRA adapter and its per-epoch checkpoints

>>> import tempfile; store = Store(Path(tempfile.mkdtemp()))
>>> f = store.add_file(b'{"a": 1}\\n', "data.jsonl", "fine-tune")
>>> store.file_content(f["id"])
b'{"a": 1}\\n'
"""

from __future__ import annotations

import json
import logging
import secrets
import string
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

from llmlab.openai_facts import FINISHED_JOB_STATUSES
from llmlab.paths import atomic_write_bytes, atomic_write_text

_ALPHABET = string.ascii_letters + string.digits
_log = logging.getLogger(__name__)


def new_id(prefix: str, length: int = 24) -> str:
    """A random OpenAI-style id such as ``file-Ab3…``.

    >>> new_id("file-").startswith("file-")
    True
    """
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(length))


def public(record: dict) -> dict:
    """`record` without the store's private keys (those starting with "_")."""
    return {k: v for k, v in record.items() if not k.startswith("_")}


def paginate(items: list[dict], after: str | None, limit: int) -> tuple[list[dict], bool]:
    """The page of `items` that follows the item whose id is `after`, and whether more remain.

    >>> paginate([{"id": "a"}, {"id": "b"}, {"id": "c"}], "a", 1)
    ([{'id': 'b'}], True)
    """
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    return items[:limit], len(items) > limit


class Store:
    """Files, jobs, events and checkpoints under `home`; safe to use from several threads."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.files_dir = self.home / "files"
        self.jobs_dir = self.home / "jobs"
        self.adapters_dir = self.home / "adapters"
        for folder in (self.files_dir, self.jobs_dir, self.adapters_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._warned: set[tuple[Path, float]] = set()

    def _read(self, path: Path, required: tuple[str, ...] = ()) -> Any:
        """The JSON record at `path`, or None (with one warning per version of the file) when it is unreadable
        or lacks a `required` key."""
        try:
            record = json.loads(path.read_bytes())
            if required and not (isinstance(record, dict) and all(k in record for k in required)):
                raise ValueError(f"not a record with {', '.join(required)}")
            return record
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError) as exc:
            try:
                key = (path, path.stat().st_mtime)
            except OSError:
                key = (path, 0.0)
            if key not in self._warned:
                self._warned.add(key)
                _log.warning("llmlab: skipping the unreadable record %s (%s); it is left as it is", path, exc)
            return None

    # -- files -------------------------------------------------------------------------------------
    def add_file(self, data: bytes | BinaryIO, filename: str, purpose: str) -> dict:
        """Store `data` (bytes, or a binary file copied in chunks) and return its FileObject dict."""
        file_id = new_id("file-")
        stored = atomic_write_bytes(self.files_dir / file_id, data)
        record = {
            "id": file_id,
            "object": "file",
            "bytes": stored.stat().st_size,
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "_created_ns": time.time_ns(),
        }
        atomic_write_text(self.files_dir / f"{file_id}.json", json.dumps(record))
        return record

    def get_file(self, file_id: str) -> dict | None:
        return self._read(self.files_dir / f"{file_id}.json", _FILE_KEYS) if _safe_id(file_id) else None

    def file_path(self, file_id: str) -> Path | None:
        return self.files_dir / file_id if self.get_file(file_id) else None

    def file_content(self, file_id: str) -> bytes | None:
        path = self.file_path(file_id)
        return path.read_bytes() if path else None

    def list_files(self, purpose: str | None = None) -> list[dict]:
        """All files, newest first."""
        records = [self._read(p, _FILE_KEYS) for p in self.files_dir.glob("file-*.json")]
        records = [r for r in records if r is not None and (purpose is None or r["purpose"] == purpose)]
        return sorted(records, key=lambda r: r["_created_ns"], reverse=True)

    def delete_file(self, file_id: str) -> bool:
        if not self.get_file(file_id):
            return False
        (self.files_dir / f"{file_id}.json").unlink(missing_ok=True)
        (self.files_dir / file_id).unlink(missing_ok=True)
        return True

    # -- jobs --------------------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def save_job(self, job: dict) -> dict:
        with self._lock:
            atomic_write_text(self.job_dir(job["id"]) / "job.json", json.dumps(job))
        return job

    def update_job(self, job_id: str, **changes: Any) -> dict:
        """Apply `changes` to the stored job and return it; a finished job never changes again."""
        with self._lock:
            job = self.get_job(job_id)
            if job is None:
                raise KeyError(job_id)
            if job["status"] in FINISHED_JOB_STATUSES:
                return job
            job.update(changes)
            return self.save_job(job)

    def transition_job(self, job_id: str, from_status: str, **changes: Any) -> bool:
        """Apply `changes` only while the job's status is `from_status` (compare and set, under the store's lock);
        whether it did. A job cancelled meanwhile is left as it is.

        >>> import tempfile; store = Store(Path(tempfile.mkdtemp()))
        >>> _ = store.job_dir("ftjob-1").mkdir()
        >>> _ = store.save_job({"id": "ftjob-1", "status": "cancelled", "_created_ns": 0})
        >>> store.transition_job("ftjob-1", "validating_files", status="queued"), store.get_job("ftjob-1")["status"]
        (False, 'cancelled')
        """
        with self._lock:
            job = self.get_job(job_id)
            if job is None or job["status"] != from_status:
                return False
            job.update(changes)
            self.save_job(job)
            return True

    def get_job(self, job_id: str) -> dict | None:
        return self._read(self.job_dir(job_id) / "job.json", _JOB_KEYS) if _safe_id(job_id) else None

    def list_jobs(self) -> list[dict]:
        """All jobs, newest first."""
        records = [self._read(p, _JOB_KEYS) for p in self.jobs_dir.glob("*/job.json")]
        return sorted((r for r in records if r is not None), key=lambda r: r["_created_ns"], reverse=True)

    # -- events and checkpoints ----------------------------------------------------------------------
    def add_event(
        self, job_id: str, message: str, *, level: str = "info", type: str = "message", data: Any = None
    ) -> dict:
        event = {
            "id": new_id("ftevent-"),
            "object": "fine_tuning.job.event",
            "created_at": int(time.time()),
            "level": level,
            "message": message,
            "type": type,
            "data": data,
        }
        with self._lock, open(self.job_dir(job_id) / "events.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")
        return event

    def list_events(self, job_id: str) -> list[dict]:
        """The job's events, newest first (a torn last line after a crash is skipped)."""
        path = self.job_dir(job_id) / "events.jsonl"
        if not path.is_file():
            return []
        events = []
        for line in path.read_bytes().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:  # not JSON, or not UTF-8
                continue
        return [e for e in events if isinstance(e, dict)][::-1]

    def add_checkpoint(self, job_id: str, checkpoint: dict) -> dict:
        with self._lock:
            checkpoints = self.list_checkpoints(job_id)[::-1] + [checkpoint]
            atomic_write_text(self.job_dir(job_id) / "checkpoints.json", json.dumps(checkpoints))
        return checkpoint

    def list_checkpoints(self, job_id: str) -> list[dict]:
        """The job's checkpoints, newest first."""
        checkpoints = self._read(self.job_dir(job_id) / "checkpoints.json") if _safe_id(job_id) else None
        return [c for c in checkpoints if isinstance(c, dict)][::-1] if isinstance(checkpoints, list) else []


_FILE_KEYS = ("id", "purpose", "filename", "_created_ns")
_JOB_KEYS = ("id", "status", "_created_ns")


def _safe_id(value: str) -> bool:
    """True for ids made only of letters, digits, '-' and '_' (so an id can never escape the store)."""
    return bool(value) and all(c in _ALPHABET or c in "-_" for c in value)
