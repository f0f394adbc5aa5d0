"""Parse JSON from outside (a file's line, a model's tool arguments) with one error type for every bad input.

`json.loads` raises `JSONDecodeError` for a syntax error, but `RecursionError` for text nested too deeply and a
plain `ValueError` for an integer of more than 4,300 digits: a reader that catches only the first one stops at
such a line. `loads` turns all three into `JSONTextError`.

>>> loads('{"a": [1, 2]}')
{'a': [1, 2]}
>>> loads("[" * 5000 + "]" * 5000)
Traceback (most recent call last):
llmlab.jsontext.JSONTextError: nested too deeply to read (more than ~1,000 levels of [ or {)
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["JSONTextError", "loads"]


class JSONTextError(ValueError):
    """Text that is not JSON Python can read: `reason`, and `column` (1-based) for a syntax error, else None."""

    def __init__(self, reason: str, column: int | None = None) -> None:
        super().__init__(reason if column is None else f"{reason} at column {column}")
        self.reason, self.column = reason, column


def loads(text: str) -> Any:
    """`json.loads`, raising `JSONTextError` (a `ValueError`) with a readable message for any unreadable text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise JSONTextError(e.msg, e.colno) from None
    except RecursionError:
        raise JSONTextError("nested too deeply to read (more than ~1,000 levels of [ or {)") from None
    except ValueError:  # an integer of more than sys.get_int_max_str_digits() digits
        raise JSONTextError(
            "a number has too many digits to read (Python reads up to 4,300 by default)"
        ) from None
