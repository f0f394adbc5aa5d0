"""Continuous batching for the ONNX engine: the running sequences advance together, one forward pass a step.

>>> scheduler = Scheduler(session, lock, layers=30, kv_heads=3, head_size=64)  # doctest: +SKIP
>>> sequence = scheduler.sequence(adapter={}, kv=prompt_kv, length=len(ids))  # doctest: +SKIP
>>> sequence(token).shape  # the logits after one more token; batch-mates are read in the same pass
torch.Size([49152])

A request's thread samples its own next token (penalties, grammar mask, stop strings stay in `ChatRuntime`)
and hands it to `Sequence.__call__`. The thread that hands in the last awaited token (or that has waited
`GRACE` seconds for a slow batch-mate) runs the step for all: no thread of its own, so a request alone decodes
in its own thread as before, with no hand-over per token. A step reads every due sequence, one forward pass
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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

GRACE = 0.2  # seconds a due sequence waits for a batch-mate's next token before stepping without it
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
    """The running sequences of one ONNX model, in batches (one per adapter), stepped together.

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
        self._stepping = False
        self.peak = 0

    def sequence(self, adapter: dict[str, Any], kv: list[np.ndarray], length: int) -> Sequence:
        """A sequence whose prompt (`length` tokens) has the KV states `kv` (key, value per layer,
        (1, kv_heads, length, head_size)), to be decoded with the LoRA inputs `adapter` ({}: the base model)."""
        return Sequence(self, _Row(adapter, kv, length))

    def running(self) -> int:
        """How many sequences are decoding (have handed in a token and not ended)."""
        with self._cond:
            return sum(len(b.rows) for b in self._batches.values()) - len(self._leaving) + len(self._joining)

    def advance(self, row: _Row, token: int) -> torch.Tensor:
        """Hand in `row`'s next token; the logits after it, once a step has read it (run by this thread if
        it is the last one awaited)."""
        with self._cond:
            if row.closed:
                raise RuntimeError("decoding failed: the sequence was closed")
            if row.slot < 0 and row not in self._joining:
                self._joining.append(row)
            row.token, row.late, row.result = token, False, None
            self._cond.notify_all()
        deadline = time.monotonic() + GRACE
        while True:
            with self._cond:
                work = None
                while work is None and row.result is None:
                    if row.closed:
                        raise RuntimeError("decoding failed: the sequence was closed")
                    if self._stepping:
                        self._cond.wait()
                    else:
                        work = self._due(deadline)
                if row.result is not None:
                    result, row.result = row.result, None
                    if isinstance(result, Exception):
                        raise RuntimeError(f"decoding failed: {result}") from result
                    return result
                self._stepping = True
            try:
                self._run(work)
            finally:
                with self._cond:
                    self._stepping = False
                    self._arrange()
                    self._cond.notify_all()

    def release(self, row: _Row) -> None:
        """Give a row back (its stream ended or was closed): dropped before the next step; its batch-mates go
        on."""
        with self._cond:
            row.closed = True
            if row in self._joining:
                self._joining.remove(row)
            elif row.slot >= 0:
                self._leaving.append(row)
                if not self._stepping:
                    self._arrange()
                self._cond.notify_all()

    # -- stepping (holding the condition, except for the forward passes) --------------------------------------
    def _arrange(self) -> None:
        """Drop the rows that left, place the rows that joined."""
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

    def _due(self, deadline: float) -> list[tuple[_Batch, list[_Row], list[int | None]]] | None:
        """The step to run now, or None after waiting a while: a step is due when every row has handed in its
        token, or at `deadline` (the rows still awaited are then late: not waited for until they hand theirs
        in)."""
        self._arrange()
        rows = [r for b in self._batches.values() for r in b.rows]
        awaited = [r for r in rows if r.token is None and not r.late]
        if awaited and time.monotonic() < deadline:
            self._cond.wait(deadline - time.monotonic())
            return None
        for row in awaited:
            row.late = True
        work = []
        for batch in self._batches.values():
            if any(r.token is not None for r in batch.rows):
                batch.reserve(len(batch.rows), max(r.length for r in batch.rows) + 1)
                work.append((batch, list(batch.rows), [r.token for r in batch.rows]))
        return work

    def _run(self, work: list[tuple[_Batch, list[_Row], list[int | None]]]) -> None:
        """Run the steps of `work`, then hand each due row its logits (or the error)."""
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
