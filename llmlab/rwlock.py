"""A read-write lock: many readers at once, or one writer alone.

`VectorIndex` takes the read side to search, get and save, and the write side to add, upsert and delete.
Searches then run in parallel (numpy and hnswlib release the GIL), and no search sees a half-done write:
hnswlib itself can crash the process when items are added while it answers a query (its maintainers say
so; Chroma wraps its index in the same kind of lock), and a search must not read rows a delete is moving.

>>> lock = RWLock()
>>> with lock.read():
...     pass  # other readers may hold it too; a writer waits
>>> with lock.write():
...     pass  # alone
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class RWLock:
    """Many readers or one writer; a waiting writer keeps new readers out (so writers are not starved).

    `read()` and `write()` return plain context-manager objects rather than `@contextmanager` generators:
    every search takes the read side, so its cost adds to each query.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()  # taken with its C-level `with`: cheaper than the Condition's
        self._cond = threading.Condition(self._mutex)
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._read = _Held(self._acquire_read, self._release_read)
        self._write = _Held(self._acquire_write, self._release_write)

    def read(self) -> _Held:
        """The shared side, as a context manager."""
        return self._read

    def write(self) -> _Held:
        """The exclusive side, as a context manager."""
        return self._write

    def _acquire_read(self) -> None:
        with self._mutex:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def _release_read(self) -> None:
        with self._mutex:
            self._readers -= 1
            if not self._readers and self._writers_waiting:
                self._cond.notify_all()

    def _acquire_write(self) -> None:
        with self._mutex:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True

    def _release_write(self) -> None:
        with self._mutex:
            self._writer = False
            self._cond.notify_all()


class _Held:
    """One side of an `RWLock` as a context manager."""

    __slots__ = ("_acquire", "_release")

    def __init__(self, acquire: Callable[[], None], release: Callable[[], None]) -> None:
        self._acquire, self._release = acquire, release

    def __enter__(self) -> None:
        self._acquire()

    def __exit__(self, *exc: object) -> None:
        self._release()
