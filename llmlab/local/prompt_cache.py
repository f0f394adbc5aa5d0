"""The torch engine's prompt cache: the KV states of recent prompts, for a prompt that starts the same way.

>>> _shared_prefix([1, 2, 3, 4], [1, 2, 9])
2

A request that re-sends the same system prompt and tools reads only what follows them. (The ONNX engine keeps
its own, in `engine_onnx`.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


def _shared_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` have in common."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0])


@dataclass
class _Prefix:
    adapter: str | None
    ids: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values (1, heads, len(ids), head_dim)


class PromptCache:
    """The KV states of the most recent prompts, for reuse by a prompt that starts with the same tokens.

    A tool-calling request re-sends the same ~500-token system prompt and tool list every time; with this
    cache only the new question is read. Entries are kept per adapter, least recently used first out, up to
    `budget` tokens in all (SmolLM2-135M holds 46 KB per token: 2,048 tokens are ~94 MB). A stored state is
    never changed: decoding appends to new tensors. Use it with the runtime's lock held.

    >>> cache = PromptCache(budget=1024)
    >>> cache.reusable(None, [1, 2, 3]), len(cache)
    (0, 0)
    """

    def __init__(self, budget: int = 2048, min_reuse: int = 16) -> None:
        self.budget, self.min_reuse = budget, min_reuse
        self._entries: list[_Prefix] = []

    def __len__(self) -> int:
        return len(self._entries)

    def _best(self, adapter: str | None, ids: list[int], limit: int) -> tuple[_Prefix | None, int]:
        best, length = None, 0
        for entry in self._entries:
            if entry.adapter == adapter:
                n = min(_shared_prefix(entry.ids, ids), limit)
                if n > length:
                    best, length = entry, n
        return (best, length) if length >= self.min_reuse else (None, 0)

    def reusable(self, adapter: str | None, ids: list[int], limit: int | None = None) -> int:
        """How many leading tokens of `ids` (at most `limit`) a `start` would not need to read."""
        return self._best(adapter, ids, len(ids) if limit is None else limit)[1]

    def start(self, config: Any, adapter: str | None, ids: list[int], limit: int) -> tuple[Any, int]:
        """A fresh `DynamicCache` holding the longest stored prefix of `ids` (at most `limit` tokens), and
        that prefix's length (0: nothing stored matches)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=config)
        entry, length = self._best(adapter, ids, limit)
        if entry is not None:
            for i, (keys, values) in enumerate(entry.layers):
                cache.update(keys[..., :length, :], values[..., :length, :], i)
            self._entries.remove(entry)
            self._entries.append(entry)
        return cache, length

    def keep(self, adapter: str | None, ids: list[int], cache: Any) -> None:
        """Remember the states of `ids`, which `cache` holds exactly (right after reading them)."""
        if not self.min_reuse <= len(ids) <= self.budget:
            return
        self._entries = [
            e for e in self._entries if e.adapter != adapter or _shared_prefix(e.ids, ids) < len(e.ids)
        ]  # an entry that is a prefix of this one adds nothing
        self._entries.append(_Prefix(adapter, list(ids), [(x.keys, x.values) for x in cache.layers]))
        while sum(len(e.ids) for e in self._entries) > self.budget:
            self._entries.pop(0)

    def forget(self, adapter: str | None) -> None:
        """Drop the entries of one adapter (its weights are gone or changed)."""
        self._entries = [e for e in self._entries if e.adapter != adapter]
