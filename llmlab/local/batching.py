"""Continuous batching for the ONNX engine: one decode thread advances every running sequence together.

>>> scheduler = Scheduler(session, lock, layers=30, kv_heads=3, head_size=64)  # doctest: +SKIP
>>> sequence = scheduler.sequence(adapter=None, kv=prompt_kv, length=len(ids))  # doctest: +SKIP
>>> sequence(token).shape  # the logits after one more token; batch-mates are read in the same pass
torch.Size([49152])

A request's thread samples its own next token (penalties, grammar mask, stop strings stay in `ChatRuntime`)
and hands it to `Sequence.__call__`, which waits for the decode thread. That thread waits until every running
sequence has handed its token in (or `GRACE` seconds for a slow one), then reads them all in one forward pass
per adapter: the KV states of one adapter's sequences are one buffer (rows, kv_heads, capacity, head_size),
written in place (ONNX Runtime's GroupQueryAttention takes each row's own length from its attention mask, so
rows of different lengths share it). A sequence that joins copies its prompt's KV states into a free row; one
that ends (finished, or its stream closed by a hung-up client) gives its row back and the others go on.

Numerics: each row of a batched decode step gets exactly the logits it gets alone (int8 MatMulNBits quantizes
activations per row; checked in `tests/test_engine.py`), so batching changes no answer. A sequence that is
late (`GRACE`) rides along with a padding token written where its next token will go, and its logits are
dropped.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

GRACE = 0.2  # seconds the decode thread waits for a sequence's next token before stepping without it
PAD = 2  # a token fed to a late row; its KV slot is overwritten by the row's real next token
CHUNK = 128  # the capacity of a batch's KV buffer grows in steps of this many tokens


@dataclass(eq=False)
class _Row:
    adapter: Any
    kv: list[np.ndarray] | None  # its prompt's KV states until it is placed in a batch
    length: int  # tokens in its KV states
    slot: int = -1  # its row in its batch's buffers; -1: not placed yet
    token: int | None = None  # handed in, not read yet
    late: bool = False
    closed: bool = False
    result: torch.Tensor | Exception | None = None
    done: threading.Event = field(default_factory=threading.Event)


class Sequence:
    """One running sequence: `sequence(token)` reads `token` and gives the next-token logits, (vocab,);
    `close()` (or dropping it) gives its row back."""

    def __init__(self, scheduler: Scheduler, row: _Row) -> None:
        self._row = row
        self.close = weakref.finalize(self, scheduler.release, row)
        self._advance = scheduler.advance

    def __call__(self, token: int) -> torch.Tensor:
        return self._advance(self._row, token)


class _Batch:
    """The rows of one adapter and their KV states: key, value per layer, (rows, kv_heads, capacity, head)."""

    def __init__(self, adapter: dict[str, Any], shape: tuple[int, int, int]) -> None:
        self.adapter = adapter  # its LoRA inputs (`run_with_iobinding` ignores a RunOptions' active adapter)
        self.rows: list[_Row] = []
        self.capacity = 0
        self.buffers: list[np.ndarray] = []
        self._shape = shape  # (layers, kv_heads, head_size)

    def reserve(self, rows: int, tokens: int) -> None:
        """Room for `rows` rows of `tokens` tokens (grown by copying, capacity by half at least)."""
        have = self.buffers[0].shape[0] if self.buffers else 0
        if rows <= have and tokens <= self.capacity:
            return
        capacity = self.capacity
        if tokens > capacity:
            capacity = -(-max(tokens, capacity * 3 // 2) // CHUNK) * CHUNK
        layers, heads, size = self._shape
        grown = [np.zeros((max(rows, have), heads, capacity, size), np.float32) for _ in range(2 * layers)]
        for old, new in zip(self.buffers, grown, strict=False):
            new[:have, :, : self.capacity] = old
        self.buffers, self.capacity = grown, capacity

    def place(self, row: _Row) -> None:
        self.reserve(len(self.rows) + 1, row.length + 1)
        row.slot = len(self.rows)
        for buffer, states in zip(self.buffers, row.kv or [], strict=True):
            buffer[row.slot, :, : states.shape[2]] = states[0]
        row.kv = None
        self.rows.append(row)

    def remove(self, row: _Row) -> None:
        last = self.rows.pop()
        if last is not row:  # the last row moves into the freed one
            for buffer in self.buffers:
                buffer[row.slot] = buffer[last.slot]
            last.slot = row.slot
            self.rows[row.slot] = last
        if not self.rows:
            self.buffers, self.capacity = [], 0


class Scheduler:
    """The decode thread of one ONNX model and its batches of running sequences, one batch per adapter.

    `session`: the model's `InferenceSession`; `lock`: held around every run of it (prompt reads run in the
    request's thread). `peak`: the most sequences read in one decode step so far (for tests and benches)."""

    def __init__(
        self, session: Any, lock: threading.Lock, layers: int, kv_heads: int, head_size: int
    ) -> None:
        self._session, self._run_lock = session, lock
        self._shape = (layers, kv_heads, head_size)
        self.past_names = [f"past_key_values.{i}.{part}" for i in range(layers) for part in ("key", "value")]
        self.present_names = [f"present.{i}.{part}" for i in range(layers) for part in ("key", "value")]
        self._cond = threading.Condition()
        self._joining: list[_Row] = []
        self._leaving: list[_Row] = []
        self._batches: dict[int, _Batch] = {}  # id of its adapter's LoRA inputs -> the batch
        self._thread: threading.Thread | None = None
        self.peak = 0

    def sequence(self, adapter: dict[str, Any], kv: list[np.ndarray], length: int) -> Sequence:
        """A sequence whose prompt (`length` tokens) has the KV states `kv` (key, value per layer,
        (1, kv_heads, length, head_size)), to be decoded with the LoRA inputs `adapter` ({}: the base model)."""
        return Sequence(self, _Row(adapter, kv, length))

    def advance(self, row: _Row, token: int) -> torch.Tensor:
        """Hand in `row`'s next token; the logits after it, once the decode thread has read it."""
        with self._cond:
            if row.closed:
                raise RuntimeError("decoding failed: the sequence was closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="llmlab-decode", daemon=True)
                self._thread.start()
            if row.slot < 0 and row not in self._joining:
                self._joining.append(row)
            row.token, row.late, row.result = token, False, None
            row.done.clear()
            self._cond.notify_all()
        row.done.wait()
        if isinstance(row.result, Exception):
            raise RuntimeError(f"decoding failed: {row.result}") from row.result
        return row.result

    def running(self) -> int:
        """How many sequences are decoding (have handed in a token and not ended)."""
        with self._cond:
            return sum(len(b.rows) for b in self._batches.values()) - len(self._leaving) + len(self._joining)

    def release(self, row: _Row) -> None:
        """Give a row back (its stream ended or was closed): the decode thread drops it before its next step;
        its batch-mates go on."""
        with self._cond:
            row.closed = True
            if row in self._joining:
                self._joining.remove(row)
            elif row.slot >= 0:
                self._leaving.append(row)
                self._cond.notify_all()

    # -- the decode thread -----------------------------------------------------------------------------------
    def _arrange(self) -> None:
        """Drop the rows that left, place the rows that joined (holding the condition)."""
        for row in self._leaving:
            batch = self._batches[id(row.adapter)]
            batch.remove(row)
            if not batch.rows:
                del self._batches[id(row.adapter)]
        self._leaving.clear()
        for row in self._joining:
            if id(row.adapter) not in self._batches:
                self._batches[id(row.adapter)] = _Batch(row.adapter, self._shape)
            self._batches[id(row.adapter)].place(row)
        self._joining.clear()

    def _due(self) -> list[_Batch]:
        """Wait (holding the condition) until every row has handed in its token, or `GRACE` seconds after the
        first did (the others are late: not waited for until they hand theirs in); the batches to step."""
        deadline = None
        while True:
            self._arrange()
            rows = [r for b in self._batches.values() for r in b.rows]
            due = [r for r in rows if r.token is not None]
            awaited = [r for r in rows if r.token is None and not r.late]
            if due and awaited:
                deadline = deadline or time.monotonic() + GRACE
                if time.monotonic() >= deadline:
                    for row in awaited:
                        row.late = True
                    awaited = []
            if due and not awaited:
                return [b for b in self._batches.values() if any(r.token is not None for r in b.rows)]
            self._cond.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _loop(self) -> None:
        while True:
            with self._cond:
                work = []
                for batch in self._due():
                    batch.reserve(len(batch.rows), max(r.length for r in batch.rows) + 1)
                    work.append((batch, list(batch.rows), [r.token for r in batch.rows]))
            for batch, rows, tokens in work:
                try:
                    logits, error = self._step(batch, rows, tokens), None
                except Exception as exc:  # handed to each sequence of this batch
                    logits, error = None, exc
                with self._cond:
                    due = [(i, r) for i, r in enumerate(rows) if tokens[i] is not None]
                    self.peak = max(self.peak, len(due))
                    for i, row in due:
                        if logits is not None:
                            row.length += 1
                            row.result = torch.from_numpy(logits[i, -1].astype(np.float32, copy=True))
                        else:
                            row.result = error
                        row.token = None
                        row.done.set()

    def _step(self, batch: _Batch, rows: list[_Row], tokens: list[int | None]) -> np.ndarray:
        """One forward pass over a batch's rows, their KV states updated in place; logits (rows, 1, vocab)."""
        import onnxruntime as ort

        n = len(rows)
        mask = np.zeros((n, batch.capacity), np.int64)
        for i, row in enumerate(rows):
            mask[i, : row.length + 1] = 1  # a late row's pad token goes where its next token will
        binding = self._session.io_binding()
        ids = np.asarray([PAD if t is None else t for t in tokens], np.int64)[:, None]
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        for past, present, buffer in zip(self.past_names, self.present_names, batch.buffers, strict=True):
            value = ort.OrtValue.ortvalue_from_numpy(buffer[:n])  # a view: written in place
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        for name, value in batch.adapter.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits")
        with self._run_lock:
            self._session.run_with_iobinding(binding)
        return binding.get_outputs()[-1].numpy()
