"""Constrained decoding's matchers: JSON schemas and Lark grammars compiled by llguidance, kept for reuse.

>>> _grammar_error("at 1(5): failed to compile JSON schema: Pointer '/x' does not exist")
"failed to compile JSON schema: Pointer '/x' does not exist"

Compiling a tool-call grammar takes milliseconds to tens of milliseconds; a request that repeats a schema gets
a copy of the matcher compiled for the first one. The runtime masks each step's logits with a matcher.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

# JSON output on one line with readable separators; no free whitespace (small models may loop on it)
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A JSON schema or grammar that constrained decoding cannot take."""


def _grammar_error(error: str) -> str:
    """llguidance's compile error without its position prefix and grammar listing.

    >>> _grammar_error("at 2(7): failed to compile JSON schema: Pointer '/x' does not exist\\n   1 | start")
    "failed to compile JSON schema: Pointer '/x' does not exist"
    """
    first = error.strip().splitlines()[0] if error.strip() else "invalid grammar"
    return re.sub(r"^at \d+\(\d+\): ", "", first)


class Matchers:
    """The compiled llguidance matchers of the schemas and grammars seen last (up to `keep`), for the
    tokenizer that `tokenizer()` gives (llguidance's `LLTokenizer`, asked for on first compile). Thread-safe.

    >>> Matchers(runtime._llguidance_tokenizer).matcher({"type": "object"}, None)  # doctest: +SKIP
    <LLMatcher ...>
    """

    def __init__(self, tokenizer: Callable[[], Any], keep: int = 64) -> None:
        self._tokenizer, self.keep = tokenizer, keep
        self._lock = threading.Lock()
        self._compiled: OrderedDict[tuple[str, str], Any] = OrderedDict()

    def matcher(self, json_schema: dict | None, lark_grammar: str | None) -> Any:
        """A fresh matcher for the schema or grammar (compiled once, then copied), or None for neither;
        `GrammarError` with llguidance's reason when it cannot compile."""
        if json_schema is None and lark_grammar is None:
            return None
        return self.compiled(json_schema, lark_grammar).deep_copy()

    def compiled(self, json_schema: dict | None, lark_grammar: str | None) -> Any:
        """The kept matcher of the schema or grammar, compiled now if it is not kept (do not consume it)."""
        import llguidance

        if json_schema is not None:
            key = ("json", json.dumps(json_schema, sort_keys=True))
        else:
            key = ("lark", lark_grammar)
        ll_tokenizer = self._tokenizer()
        with self._lock:
            template = self._compiled.get(key)
            if template is None:
                try:
                    if json_schema is not None:
                        grammar = llguidance.LLMatcher.grammar_from_json_schema(
                            json_schema, defaults=_JSON_STYLE
                        )
                    else:
                        grammar = llguidance.LLMatcher.grammar_from_lark(lark_grammar)
                except ValueError as exc:
                    raise GrammarError(_grammar_error(str(exc))) from exc
                template = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
                if template.is_error():
                    raise GrammarError(_grammar_error(template.get_error()))
                self._compiled[key] = template
                if len(self._compiled) > self.keep:
                    self._compiled.popitem(last=False)
            self._compiled.move_to_end(key)
        return template
