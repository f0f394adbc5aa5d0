"""Chunking for retrieval: cut a document into pieces of at most N tokens that overlap and end at natural breaks.

`llmlab.rag` chunks every document it adds with `chunk` (and re-exports it: `llmlab.rag.chunk`).

>>> chunk_spans("One. Two.\\n\\nThree four five.", max_tokens=5, overlap=0)
[(0, 9), (11, 27)]
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right

from llmlab.openai_facts import EMBEDDING_MODEL
from llmlab.tokens import count_tokens, encoding_for

TOKEN_MODEL = EMBEDDING_MODEL  # chunk sizes are counted in this model's tokens (cl100k_base)
_TITLE = re.compile(r"^#\s+(.+?)\s*#*\s*$", re.MULTILINE)
_PARAGRAPH, _SENTENCE, _WORD = 3, 2, 1


def _boundaries(text: str) -> tuple[list[int], list[int]]:
    """Positions where a chunk may end (the start of each word, and the end), with their break strength."""
    positions, strengths = [], []
    for m in re.finditer(r"\s+", text):
        run = m.group()
        if run.count("\n") >= 2 or m.end() == len(text):
            strength = _PARAGRAPH
        elif "\n" in run or text[max(0, m.start() - 3) : m.start()].rstrip("\"')]").endswith((".", "!", "?")):
            strength = _SENTENCE
        else:
            strength = _WORD
        positions.append(m.end())
        strengths.append(strength)
    if not positions or positions[-1] != len(text):
        positions.append(len(text))
        strengths.append(_PARAGRAPH)
    return positions, strengths


def _hard_split(text: str, start: int, stop: int, max_tokens: int, model: str) -> int:
    """The end of the longest run of whole tokens from `start` (within text[start:stop]) that fits."""
    enc = encoding_for(model)
    piece = text[start:stop]
    _, offsets = enc.decode_with_offsets(enc.encode_ordinary(piece))
    n = min(max_tokens, len(offsets) - 1)
    while n > 1 and (offsets[n] == 0 or count_tokens(piece[: offsets[n]], model) > max_tokens):
        n -= 1
    return start + max(offsets[n], 1)


def chunk_spans(
    text: str, max_tokens: int = 200, overlap: int = 30, model: str = TOKEN_MODEL
) -> list[tuple[int, int]]:
    """(start, end) character spans of `chunk(text, ...)`; ``text[start:end]`` is each chunk."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not 0 <= overlap < max_tokens:
        raise ValueError(f"overlap must be >= 0 and smaller than max_tokens ({max_tokens}), got {overlap}")
    positions, strengths = _boundaries(text)

    def fits(start: int, end: int, limit: int) -> bool:
        return count_tokens(text[start:end].rstrip(), model) <= limit

    spans: list[tuple[int, int]] = []
    start, last_end = len(text) - len(text.lstrip()), 0
    while start < len(text) and text[start:].strip():
        first = bisect_right(positions, max(start, last_end))  # the chunk must reach past the previous one
        lo, hi, step = first, first - 1, 1
        if fits(start, positions[first], max_tokens):  # gallop, then bisect: cost grows with the chunk only
            while lo + step < len(positions) and fits(start, positions[lo + step], max_tokens):
                lo, step = lo + step, step * 2
            hi = min(lo + step, len(positions)) - 1
        while lo < hi:  # the farthest boundary whose chunk fits
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(start, positions[mid], max_tokens) else (lo, mid - 1)
        if hi < first:  # not even one more word fits
            if start < last_end:  # drop the overlap and try again
                start = last_end
                continue
            end = _hard_split(text, start, positions[first], max_tokens, model)
        elif positions[hi] == len(text):
            end = len(text)
        else:  # the strongest break in the last half of the window, the later one on ties
            floor = start + (positions[hi] - start) // 2
            candidates = [j for j in range(first, hi + 1) if positions[j] >= floor] or [hi]
            best = max(candidates, key=lambda j: (strengths[j], j))
            end = positions[best]
        spans.append((start, start + len(text[start:end].rstrip())))
        if end >= len(text) or not text[end:].strip():
            break
        start, last_end = _overlap_start(text, positions, strengths, start, end, overlap, fits), end
    return spans


def _overlap_start(text, positions, strengths, start, end, overlap, fits) -> int:
    """Where the next chunk starts: the earliest sentence break (else word break) within `overlap` tokens of `end`."""
    lo, hi = bisect_right(positions, start), bisect_left(positions, end)  # breaks strictly inside the chunk
    if overlap == 0 or lo >= hi or not fits(positions[hi - 1], end, overlap):
        return end
    while lo < hi - 1:  # the earliest break that fits (fewer tokens the later it is)
        mid = (lo + hi - 1) // 2
        lo, hi = (lo, mid + 1) if fits(positions[mid], end, overlap) else (mid + 1, hi)
    inside = range(lo, bisect_left(positions, end))
    strong = [j for j in inside if strengths[j] >= _SENTENCE]
    return positions[strong[0] if strong else lo]


def chunk(text: str, max_tokens: int = 200, overlap: int = 30, model: str = TOKEN_MODEL) -> list[str]:
    """Split `text` into chunks of at most `max_tokens` tokens, each repeating up to `overlap` tokens of
    the previous one; chunks end at paragraph breaks when they can, else at sentence breaks, else between
    words (a word longer than a chunk is split between tokens). Every chunk is a piece of `text`.

    >>> chunk("One. Two.\\n\\nThree four five.", max_tokens=5, overlap=0)
    ['One. Two.', 'Three four five.']
    """
    return [text[a:b] for a, b in chunk_spans(text, max_tokens, overlap, model)]


def document_title(text: str) -> str | None:
    """The first Markdown ``# Title`` of a document, if any.

    >>> document_title("# Annual Leave\\n\\nEvery employee ...")
    'Annual Leave'
    """
    m = _TITLE.search(text)
    return m.group(1) if m else None
