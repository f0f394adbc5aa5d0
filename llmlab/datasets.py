"""The JSONL chat dataset for fine-tuning: build it, check it line by line, count its tokens, price it.

One example per line, OpenAI's supervised chat format: ``{"messages": [...], "tools"?: [...]}``.

>>> ds = ChatDataset.from_pairs([("What is our leave policy?", "25 days a year.")] * 2, system="You are HR.")
>>> len(ds), ds[0]["messages"][-1]
(2, {'role': 'assistant', 'content': '25 days a year.'})
>>> report = ds.validate()
>>> bool(report), [p.code for p in report.errors + report.warnings]
(False, ['too_few_examples', 'duplicate_example'])

Only supervised chat examples are validated: a DPO line (``input``/``preferred_output``) or a legacy
``prompt``/``completion`` line is reported as an error that names its format.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmlab import jsontext, tokens
from llmlab.openai_facts import FINETUNE_MODEL
from llmlab.paths import atomic_write_text, remove_orphans, temp_names
from llmlab.tokens import default_epochs

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "ChatDataset",
    "CostEstimate",
    "Problem",
    "TokenStats",
    "ValidationReport",
    "default_epochs",
    "validate_file",
]

MIN_EXAMPLES = 10  # OpenAI rejects training files with fewer examples
ROLES = {"system", "user", "assistant", "tool", "function"}
MESSAGE_KEYS = {"role", "content", "name", "weight", "function_call", "tool_calls", "tool_call_id", "refusal"}
EXAMPLE_KEYS = {"messages", "tools", "parallel_tool_calls", "functions"}


@dataclass(frozen=True)
class Problem:
    """One problem: its 1-based line in the file (None when not from a file), class, fix, and example index."""

    line: int | None
    code: str
    message: str
    example: int | None = None

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else "dataset"
        return f"{where}: [{self.code}] {self.message}"


# ------------------------------------------------------------------------------------------ parsing


def _parse_line(raw: bytes, line: int) -> tuple[dict | None, Problem | None]:
    """One JSONL line (bytes, no newline) -> (example, None) or (None, problem); blank lines are problems."""
    raw = raw.rstrip(b"\r")
    if line == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte-order mark some editors add; JSON parsers reject it
    if not raw.strip():
        return None, Problem(
            line, "blank_line", "Blank line: delete it (JSONL has one JSON object per line)."
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        byte = raw[e.start : e.start + 1].hex()
        return None, Problem(
            line,
            "invalid_utf8",
            f"Byte 0x{byte} at byte {e.start + 1} is not UTF-8 ({e.reason}): re-save the file as UTF-8.",
        )
    try:
        example = jsontext.loads(text)
    except jsontext.JSONTextError as e:
        message = (
            f"Invalid JSON at column {e.column}: {e.reason}. Fix the quoting/commas here."
            if e.column
            else f"Unreadable JSON: {e.reason}. Simplify or remove this line."
        )
        return None, Problem(line, "invalid_json", message)
    if not isinstance(example, dict):
        kind = type(example).__name__
        return None, Problem(
            line,
            "data_type",
            f"Each line must be a JSON object {{...}}, not a {kind}: wrap it as {{'messages': [...]}}.",
        )
    return example, None


def _share_strings(example: dict, pool: dict[str, str]) -> dict:
    """Make repeated keys, roles and system prompts one shared string each (about 20% less memory per example)."""
    messages = example.get("messages")
    for i, m in enumerate(messages if isinstance(messages, list) else ()):
        if type(m) is dict:
            shared = m.get("role") == "system"
            messages[i] = {
                pool.setdefault(k, k): pool.setdefault(v, v)
                if type(v) is str and (k == "role" or shared)
                else v
                for k, v in m.items()
            }
    return example


def _read_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """Lines of a file as bytes (split on \\n, each decoded later on its own so one bad line loses nothing)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            yield number, raw.rstrip(b"\n")


# ---------------------------------------------------------------------------------------- validation


def _declared_tools(example: Mapping) -> set[str] | None:
    tools = example.get("tools", example.get("functions"))
    if not isinstance(tools, list):
        return None
    names = set()
    for tool in tools:
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            names.add(function["name"])
    return names


def _check_tools(example: Mapping) -> Iterator[tuple[str, str]]:
    tools = example.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            yield (
                "invalid_tools",
                "`tools` must be a list of {'type': 'function', 'function': {'name': ...}}.",
            )
            return
        for i, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
                yield (
                    "invalid_tools",
                    f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': {{...}}}}}}.",
                )
            elif "parameters" in function and not isinstance(function["parameters"], dict):
                yield "invalid_tools", f"tools[{i}].function.parameters must be a JSON schema object."
    if "parallel_tool_calls" in example and not isinstance(example["parallel_tool_calls"], bool):
        yield "invalid_parallel_tool_calls", "`parallel_tool_calls` must be true or false."


def _check_tool_calls(message: Mapping, i: int, declared: set[str] | None) -> Iterator[tuple[str, str]]:
    calls = message["tool_calls"]
    if message.get("role") != "assistant":
        yield "invalid_tool_call", f"messages[{i}] has tool_calls but only assistant messages may call tools."
    if not isinstance(calls, list) or not calls:
        yield "invalid_tool_call", f"messages[{i}].tool_calls must be a non-empty list."
        return
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            yield (
                "invalid_tool_call",
                f"messages[{i}].tool_calls[{j}] must be {{'id': ..., 'type': 'function', "
                "'function': {'name': ..., 'arguments': '{...}'}}.",
            )
            continue
        name, arguments = function["name"], function.get("arguments")
        if not isinstance(call.get("id"), str):
            yield (
                "invalid_tool_call",
                f"messages[{i}].tool_calls[{j}] needs a string `id` (a tool message answers it).",
            )
        if not isinstance(arguments, str):
            yield (
                "tool_call_arguments_not_json",
                f"messages[{i}].tool_calls[{j}] ({name}): `arguments` must be a JSON *string*, "
                "e.g. json.dumps({...}).",
            )
        else:
            try:
                parsed = jsontext.loads(arguments)
            except jsontext.JSONTextError as e:
                parsed = e
            if not isinstance(parsed, dict):
                yield (
                    "tool_call_arguments_not_json",
                    f"messages[{i}].tool_calls[{j}] ({name}): arguments {arguments[:60]!r} are not a JSON object.",
                )
        if declared is None:
            yield (
                "undeclared_tool",
                f"messages[{i}] calls {name!r} but the example has no `tools`: declare it there.",
            )
        elif name not in declared:
            known = ", ".join(sorted(declared)) or "none"
            yield "undeclared_tool", f"messages[{i}] calls {name!r}, which is not in `tools` ({known})."


def _check_weight(message: Mapping, i: int) -> Iterator[tuple[str, str]]:
    weight = message["weight"]
    if isinstance(weight, bool) or weight not in (0, 1):
        yield (
            "invalid_weight",
            f"messages[{i}].weight is {weight!r}: it must be 0 (don't train) or 1 (train).",
        )


_PLAIN_KEYS, _PLAIN_ROLES = {"role", "content", "name"}, {"system", "user", "assistant"}


def _plain_message_ok(message: dict) -> bool:
    """The common case, checked fast: a text message with only role, content and maybe name."""
    content = message.get("content")
    return (
        message.keys() <= _PLAIN_KEYS
        and type(message.get("role")) is str
        and message["role"] in _PLAIN_ROLES
        and type(content) is str
        and bool(content)
        and not content.isspace()
    )


def _check_message(
    message: Any, i: int, declared: set[str] | None, call_ids: set[str]
) -> Iterator[tuple[str, str]]:
    if type(message) is dict and _plain_message_ok(message):
        return
    if not isinstance(message, dict):
        yield (
            "data_type",
            f"messages[{i}] must be an object {{'role': ..., 'content': ...}}, not {type(message).__name__}.",
        )
        return
    role = message.get("role")
    calls = "tool_calls" in message or "function_call" in message
    if "role" not in message or ("content" not in message and not calls):
        missing = "role" if "role" not in message else "content"
        yield (
            "message_missing_key",
            f"messages[{i}] has no `{missing}`: every message needs role and content.",
        )
    unknown = sorted(set(message) - MESSAGE_KEYS)
    if unknown:
        yield (
            "message_unrecognized_key",
            f"messages[{i}] has unrecognized key(s) {', '.join(unknown)}: allowed are {', '.join(sorted(MESSAGE_KEYS))}.",
        )
    if "role" in message and (not isinstance(role, str) or role not in ROLES):
        yield "unrecognized_role", f"messages[{i}].role is {role!r}: use one of {', '.join(sorted(ROLES))}."
    if "content" in message:
        content = message["content"]
        parts = (
            isinstance(content, list)
            and content
            and all(isinstance(p, dict) and "type" in p for p in content)
        )
        text = isinstance(content, str) and content.strip()
        if not (text or parts or (calls and content in (None, ""))):
            yield (
                "missing_content",
                f"messages[{i}] ({role}) has empty or non-text content: give it the text.",
            )
    if "weight" in message:
        yield from _check_weight(message, i)
        if role != "assistant":
            yield (
                "weight_on_non_assistant",
                f"messages[{i}] is {role!r}: weight only applies to assistant messages.",
            )
    if "tool_calls" in message:
        yield from _check_tool_calls(message, i, declared)
        for call in message["tool_calls"] if isinstance(message["tool_calls"], list) else ():
            if isinstance(call, dict) and isinstance(call.get("id"), str):
                call_ids.add(call["id"])
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str):
            yield (
                "tool_message_missing_id",
                f"messages[{i}] (tool) needs `tool_call_id`, the id of the call it answers.",
            )
        elif call_id not in call_ids:
            yield (
                "unknown_tool_call_id",
                f"messages[{i}] answers tool call {call_id!r}, which no earlier assistant made.",
            )


# Problem classes that are warnings: the file is accepted but probably not what you meant.
WARNING_CODES = {
    "duplicate_example",
    "too_long",
    "weight_on_non_assistant",
    "unrecognized_example_key",
    "last_message_not_assistant",
    "nothing_to_train",
    "unknown_model",
}


def check_example(example: Any) -> list[tuple[str, str]]:
    """Every format problem of one example as (code, fix-it sentence) pairs; [] for a good example.

    >>> check_example({"messages": [{"role": "user", "content": "hi"}]})[0][0]
    'example_missing_assistant_message'
    """
    if not isinstance(example, dict):
        return [("data_type", f"An example must be a JSON object, not {type(example).__name__}.")]
    messages = example.get("messages")
    if "preferred_output" in example or "non_preferred_output" in example:
        return [
            (
                "dpo_format",
                "This is a DPO (preference) example; this file must hold supervised chat examples "
                "{'messages': [...]}. Put DPO data in its own file for method={'type': 'dpo'}.",
            )
        ]
    if "prompt" in example and "completion" in example and messages is None:
        return [
            (
                "prompt_completion_format",
                "This is the legacy prompt/completion format; chat models need "
                "{'messages': [{'role': 'user', 'content': prompt}, {'role': 'assistant', 'content': completion}]}.",
            )
        ]
    if not isinstance(messages, list) or not messages:
        found = ", ".join(list(example)[:6]) or "none"
        return [
            ("missing_messages_list", f"The example needs a non-empty `messages` list (its keys: {found}).")
        ]
    problems = list(_check_tools(example))
    unknown = sorted(set(example) - EXAMPLE_KEYS)
    if unknown:
        problems.append(
            ("unrecognized_example_key", f"Key(s) {', '.join(unknown)} are not part of the format.")
        )
    declared, call_ids = _declared_tools(example), set()
    for i, message in enumerate(messages):
        problems.extend(_check_message(message, i, declared, call_ids))
    assistants = [m for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
    if not assistants:
        problems.append(
            ("example_missing_assistant_message", "Add an assistant message: it is what the model learns.")
        )
    elif all(m.get("weight", 1) == 0 for m in assistants):
        problems.append(
            ("nothing_to_train", "Every assistant message has weight 0, so nothing is learned from it.")
        )
    elif assistants[-1] is not messages[-1]:
        problems.append(
            ("last_message_not_assistant", "Messages after the last assistant message are not learned.")
        )
    return problems


def _example_tokens(example: Mapping, encoding: str) -> tuple[int, int]:
    """(all tokens, trained assistant tokens) of one example; the first is what a prompt of it would cost."""
    total, trained = tokens.REPLY_PRIMING + tokens.tools_tokens(example.get("tools"), encoding), 0
    for m in example.get("messages") or ():
        if isinstance(m, dict):
            in_prompt, said = tokens.message_token_counts(m, encoding)
            total += in_prompt
            if m.get("role") == "assistant" and m.get("weight", 1) != 0:
                trained += said
    return total, trained


def _fingerprint(example: Mapping) -> bytes:
    """A 16-byte digest of the example's content (key order ignored); raises TypeError if not JSON."""
    return hashlib.blake2b(json.dumps(example, sort_keys=True).encode(), digest_size=16).digest()


def _cached_tokens(
    example: dict, fingerprint: bytes, encoding: str, known: dict[bytes, tuple[int, int]] | None
) -> tuple[int, int]:
    if known is None:
        return _example_tokens(example, encoding)
    if fingerprint not in known:
        known[fingerprint] = _example_tokens(example, encoding)
    return known[fingerprint]


class _Validator:
    """Checks examples one at a time (so a file can be validated without holding it) and collects problems."""

    def __init__(self, model: str | None, min_examples: int):
        self.model = model or tokens.DEFAULT_MODEL
        self.known: dict[bytes, tuple[int, int]] | None = None  # token counts by example fingerprint, if kept
        self.problems: list[Problem] = []
        self.min_examples = min_examples
        self.n_examples = 0
        self.seen: dict[bytes, int] = {}
        try:
            self.encoding = tokens.encoding_name_for(self.model)
        except tokens.UnknownModelError:
            self.encoding = tokens.encoding_name_for(tokens.DEFAULT_MODEL)
            self.problems.append(
                Problem(
                    None,
                    "unknown_model",
                    f"Unknown model {model!r}: tokens counted with "
                    f"{self.encoding} ({tokens.DEFAULT_MODEL}) and a {tokens.MAX_TOKENS_PER_EXAMPLE}-token limit.",
                )
            )
        try:
            self.max_tokens = tokens.price_for(self.model).training_context or tokens.MAX_TOKENS_PER_EXAMPLE
        except tokens.UnknownModelError:
            self.max_tokens = tokens.MAX_TOKENS_PER_EXAMPLE

    def check(self, example: dict, line: int | None, index: int) -> tuple[int, int]:
        self.n_examples += 1
        found = check_example(example)
        self.problems.extend(Problem(line, code, message, index) for code, message in found)
        try:
            fingerprint = _fingerprint(example)
        except (TypeError, ValueError) as e:  # only possible for examples built in Python
            self.problems.append(
                Problem(line, "data_type", f"Not JSON-serializable ({e}): use str/number/list/dict.", index)
            )
            return 0, 0
        if fingerprint in self.seen:
            first = self.seen[fingerprint]  # a file line (>= 1), or ~index for an example not from a file
            where = f"line {first}" if first > 0 else f"example {~first}"
            self.problems.append(
                Problem(
                    line, "duplicate_example", f"Exact duplicate of {where}: remove it (dedupe()).", index
                )
            )
        else:
            self.seen[fingerprint] = line if line is not None else ~index
        counts = _cached_tokens(example, fingerprint, self.encoding, self.known)
        if counts[0] > self.max_tokens:
            self.problems.append(
                Problem(
                    line,
                    "too_long",
                    f"{counts[0]:,} tokens: over the {self.max_tokens:,}-token "
                    f"training context of {self.model}, it will be truncated. Shorten it.",
                    index,
                )
            )
        return counts

    def report(self, load_problems: Iterable[Problem] = ()) -> ValidationReport:
        problems = [*load_problems, *self.problems]
        if self.n_examples < self.min_examples:
            problems.append(
                Problem(
                    None,
                    "too_few_examples",
                    f"{self.n_examples} valid-JSON examples; OpenAI needs "
                    f"at least {self.min_examples} (50-100 good ones usually help more).",
                )
            )
        problems.sort(key=lambda p: (p.line is None, p.line or 0))
        return ValidationReport(
            errors=[p for p in problems if p.code not in WARNING_CODES],
            warnings=[p for p in problems if p.code in WARNING_CODES],
            n_examples=self.n_examples,
            model=self.model,
        )


@dataclass
class ValidationReport:
    """The result of a validation: falsy when there are errors. Warnings do not block a fine-tune."""

    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    n_examples: int = 0
    model: str = tokens.DEFAULT_MODEL

    def __bool__(self) -> bool:
        return not self.errors

    def to_dataframe(self) -> pd.DataFrame:
        """One row per problem: severity, line, example, code, message."""
        import pandas as pd

        rows = [
            {"severity": s, **asdict(p)}
            for s, ps in (("error", self.errors), ("warning", self.warnings))
            for p in ps
        ]
        columns = ["severity", "line", "example", "code", "message"]
        return pd.DataFrame(rows, columns=columns).astype({"line": "Int64", "example": "Int64"})

    def summary(self) -> str:
        verdict = "OK" if self else "FAILED"
        return (
            f"{verdict}: {self.n_examples} examples checked for {self.model}, "
            f"{len(self.errors)} errors, {len(self.warnings)} warnings"
        )

    def format(self, limit: int = 50) -> str:
        """The summary, then up to `limit` errors and `limit` warnings, one per line."""
        lines = [self.summary()]
        for label, problems in (("error  ", self.errors), ("warning", self.warnings)):
            lines += [f"  {label} {p}" for p in problems[:limit]]
            if len(problems) > limit:
                lines.append(f"  ... and {len(problems) - limit} more {label.strip()}s")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    def _repr_html_(self) -> str:
        table = self.to_dataframe().to_html(index=False, na_rep="") if self.errors or self.warnings else ""
        return f"<p><b>{html.escape(self.summary())}</b></p>{table}"


def validate_file(
    path: str | Path, model: str | None = None, min_examples: int = MIN_EXAMPLES
) -> ValidationReport:
    """Validate a JSONL training file line by line without loading it whole (the CLI and the server use this).

    >>> print(validate_file("missing.jsonl"))  # doctest: +SKIP
    """
    validator, load_problems, n = _Validator(model, min_examples), [], 0
    for n, raw in _read_lines(path):
        example, problem = _parse_line(raw, n)
        if problem:
            load_problems.append(problem)
        else:
            validator.check(example, n, validator.n_examples)
    if n == 0:
        load_problems.append(Problem(None, "empty_file", "The file is empty: add one JSON example per line."))
    return validator.report(load_problems)


# ------------------------------------------------------------------------------------------ statistics


def _describe(values: list[int]) -> dict[str, float]:
    import numpy as np

    a = np.asarray(values, dtype=float)
    if not len(a):
        return dict.fromkeys(("min", "max", "mean", "median", "p5", "p95"), float("nan"))
    p5, p95 = np.percentile(a, [5, 95])
    return {
        "min": a.min(),
        "max": a.max(),
        "mean": a.mean(),
        "median": float(np.median(a)),
        "p5": p5,
        "p95": p95,
    }


@dataclass
class TokenStats:
    """Per-example token counts and their distributions; `plot()` draws a histogram."""

    model: str
    per_example: pd.DataFrame  # total_tokens, assistant_tokens, n_messages

    @property
    def summary(self) -> pd.DataFrame:
        """min/max/mean/median/p5/p95 (true 5th and 95th percentiles) of each per-example column."""
        import pandas as pd

        return pd.DataFrame({c: _describe(self.per_example[c].tolist()) for c in self.per_example.columns}).T

    def plot(self, ax=None, column: str = "total_tokens", bins: int = 30):
        """A histogram of `column` on `ax` (a new figure when None); returns the Axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3))
        ax.hist(self.per_example[column], bins=bins, color="#4c72b0")
        ax.set(
            xlabel=column.replace("_", " "), ylabel="examples", title=f"{column} per example ({self.model})"
        )
        return ax

    def _repr_html_(self) -> str:
        return (
            f"<p>{len(self.per_example)} examples, tokens for {self.model}</p>"
            + self.summary.round(1).to_html()
        )


@dataclass(frozen=True)
class CostEstimate:
    """What a fine-tune would cost: billed tokens = tokens per epoch (each example capped) × epochs."""

    model: str
    n_examples: int
    n_epochs: int
    tokens_per_epoch: int
    billed_tokens: int
    usd_per_1m: float
    cost_usd: float
    prices_date: str

    def __str__(self) -> str:
        return (
            f"{self.model}: {self.n_examples} examples × {self.n_epochs} epochs = {self.billed_tokens:,} billed "
            f"tokens × ${self.usd_per_1m:.2f}/1M = ${self.cost_usd:.4f} (prices of {self.prices_date})"
        )

    def _repr_html_(self) -> str:
        return f"<p>{self}</p>"


# -------------------------------------------------------------------------------------------- dataset


def _json_cell(value: Any) -> Any:
    """A DataFrame/CSV cell that may hold JSON text (CSV) or the object itself (DataFrame)."""
    return (
        json.loads(value)
        if isinstance(value, str) and value
        else value
        if not isinstance(value, str)
        else None
    )


def _write(path: str | Path, text: str) -> Path:
    """`atomic_write_text`, first deleting temp files that killed earlier writes to `path` left behind."""
    path = Path(path)
    remove_orphans(path.parent, temp_names(path.name))
    return atomic_write_text(path, text)


class ChatDataset:
    """A list of chat examples ``{"messages": [...], "tools"?: [...]}`` with the file's line of each one.

    >>> ds = ChatDataset()
    >>> ds.add_pair("Hi?", "Hello!", system="Be brief.")
    >>> ds.examples[0]["messages"][0]
    {'role': 'system', 'content': 'Be brief.'}
    """

    def __init__(self, examples: Iterable[Mapping] = (), *, lines: Iterable[int | None] | None = None):
        self.examples: list[dict] = [dict(e) for e in examples]
        self.lines: list[int | None] = list(lines) if lines is not None else [None] * len(self.examples)
        self.load_problems: list[Problem] = []
        # token counts by encoding, then by example content (so edits in place can never give stale counts)
        self._token_cache: dict[str, dict[bytes, tuple[int, int]]] = {}

    # --- building
    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]], system: str | None = None) -> ChatDataset:
        """From (question, answer) pairs, each becoming [system?, user, assistant]."""
        ds = cls()
        for question, answer in pairs:
            ds.add_pair(question, answer, system=system)
        return ds

    @classmethod
    def from_dataframe(
        cls, df: pd.DataFrame, question: str = "question", answer: str = "answer", system: str | None = None
    ) -> ChatDataset:
        """From a DataFrame: a ``messages`` column (as `to_dataframe` writes), or `question`/`answer` columns."""
        if "messages" in df.columns:
            tools_column = df["tools"] if "tools" in df.columns else [None] * len(df)
            examples = []
            for messages, tools_value in zip(df["messages"], tools_column, strict=True):
                example = {"messages": _json_cell(messages)}
                if isinstance(_json_cell(tools_value), list):
                    example["tools"] = _json_cell(tools_value)
                examples.append(example)
            return cls(examples)
        missing = [c for c in (question, answer) if c not in df.columns]
        if missing:
            raise KeyError(f"Column(s) {missing} not in the DataFrame (columns: {list(df.columns)})")
        return cls.from_pairs(
            zip(df[question].astype(str), df[answer].astype(str), strict=True), system=system
        )

    @classmethod
    def from_csv(
        cls, path: str | Path, question: str = "question", answer: str = "answer", system: str | None = None
    ) -> ChatDataset:
        """From a CSV file (see `from_dataframe` for the columns)."""
        import pandas as pd

        return cls.from_dataframe(
            pd.read_csv(path, dtype=str, keep_default_na=False), question, answer, system
        )

    @classmethod
    def from_jsonl(cls, path: str | Path) -> ChatDataset:
        """Load a JSONL file. Bad lines never stop the load: each is in `load_problems`, the rest in `examples`."""
        ds, n, pool = cls(), 0, {}
        for n, raw in _read_lines(path):
            example, problem = _parse_line(raw, n)
            if problem:
                ds.load_problems.append(problem)
            else:
                ds.examples.append(_share_strings(example, pool))
                ds.lines.append(n)
        if n == 0:
            ds.load_problems.append(
                Problem(None, "empty_file", "The file is empty: add one JSON example per line.")
            )
        return ds

    def add_pair(self, question: str, answer: str, system: str | None = None) -> None:
        """Append one [system?, user, assistant] example."""
        messages = [{"role": "system", "content": system}] if system else []
        self.append(
            {
                "messages": [
                    *messages,
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ]
            }
        )

    def append(self, example: Mapping | list) -> None:
        """Append one example: a dict with `messages` (and maybe `tools`), or a bare list of messages."""
        self.examples.append({"messages": list(example)} if isinstance(example, list) else dict(example))
        self.lines.append(None)

    # --- container protocol
    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int | slice) -> dict | ChatDataset:
        if isinstance(index, slice):
            return self._subset(range(len(self))[index])
        return self.examples[index]

    def __iter__(self) -> Iterator[dict]:
        return iter(self.examples)

    def __repr__(self) -> str:
        return f"ChatDataset({len(self)} examples, {len(self.load_problems)} load problems)"

    # --- writing
    def to_jsonl(self, path: str | Path) -> Path:
        """Write one example per line, atomically (a crash mid-write leaves the old file intact)."""
        text = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in self.examples)
        return _write(path, text)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per example: ``messages`` (and ``tools`` when any example has them), plus readable columns."""
        import pandas as pd

        def text(example: Mapping, role: str, last: bool = False) -> str | None:
            found = [
                m.get("content")
                for m in example.get("messages", ())
                if isinstance(m, dict) and m.get("role") == role
            ]
            return (found[-1] if last else found[0]) if found else None

        data: dict[str, list] = {
            "line": self.lines,
            "messages": [e.get("messages") for e in self.examples],
            "user": [text(e, "user") for e in self.examples],
            "assistant": [text(e, "assistant", last=True) for e in self.examples],
        }
        if any("tools" in e for e in self.examples):
            data["tools"] = [e.get("tools") for e in self.examples]
        return pd.DataFrame(data).astype({"line": "Int64"})

    def to_csv(self, path: str | Path) -> Path:
        """Write `to_dataframe()` as CSV with JSON cells, atomically; `from_csv` reads it back."""
        df = self.to_dataframe().drop(columns=["line"])
        for column in ("messages", "tools"):
            if column in df.columns:
                df[column] = [json.dumps(v, ensure_ascii=False) if v is not None else "" for v in df[column]]
        buffer = io.StringIO()
        df.to_csv(buffer, index=False, quoting=csv.QUOTE_NONNUMERIC)
        return _write(path, buffer.getvalue())

    # --- checking and counting
    def validate(self, model: str | None = None, min_examples: int = MIN_EXAMPLES) -> ValidationReport:
        """Every problem of every example (with its file line) plus the load problems; falsy when any is an error."""
        validator = _Validator(model, min_examples)
        validator.known = self._known_counts(validator.encoding)
        for i, (example, line) in enumerate(zip(self.examples, self.lines, strict=True)):
            validator.check(example, line, i)
        return validator.report(self.load_problems)

    def _known_counts(self, encoding: str) -> dict[bytes, tuple[int, int]]:
        known = self._token_cache.setdefault(encoding, {})
        if len(known) > 2 * len(self.examples) + 1000:  # many edits since: forget the old versions
            known.clear()
        return known

    def _counts(self, model: str) -> list[tuple[int, int]]:
        """(total, trained) tokens per example, reusing counts of unchanged examples."""
        encoding = tokens.encoding_name_for(model)
        known, counts = self._known_counts(encoding), []
        for example in self.examples:
            try:
                counts.append(_cached_tokens(example, _fingerprint(example), encoding, known))
            except (TypeError, ValueError):  # not JSON-serializable: count it, don't cache it
                counts.append(_example_tokens(example, encoding))
        return counts

    def stats(self, model: str = tokens.DEFAULT_MODEL) -> TokenStats:
        """Per-example tokens (total, trained assistant tokens), messages per example, and their distributions."""
        import pandas as pd

        counts = self._counts(model)
        per_example = pd.DataFrame(
            {
                "total_tokens": [c[0] for c in counts],
                "assistant_tokens": [c[1] for c in counts],
                "n_messages": [len(e.get("messages") or ()) for e in self.examples],
            }
        )
        return TokenStats(model, per_example)

    def estimate_cost(self, model: str = FINETUNE_MODEL, n_epochs: int | str = "auto") -> CostEstimate:
        """The fine-tuning cost on `model`: OpenAI's default epochs (or `n_epochs`), billed tokens and the price."""
        price = tokens.price_for(model)
        if price.training is None:
            raise tokens.UnknownModelError(
                f"{model!r} cannot be fine-tuned; choose one of: "
                + ", ".join(m for m, p in tokens.PRICES.items() if p.training)
            )
        if not self.examples:
            raise ValueError("The dataset is empty: nothing to price")
        epochs = default_epochs(len(self)) if n_epochs == "auto" else int(n_epochs)
        cap = price.training_context or tokens.MAX_TOKENS_PER_EXAMPLE
        per_epoch = tokens.billed_tokens((c[0] for c in self._counts(model)), 1, cap)
        billed = per_epoch * epochs
        return CostEstimate(
            model,
            len(self),
            epochs,
            per_epoch,
            billed,
            price.training,
            tokens.training_cost(model, billed),
            price.date,
        )

    # --- reshaping
    def split(self, val_fraction: float = 0.2, seed: int = 0) -> tuple[ChatDataset, ChatDataset]:
        """(train, validation): a deterministic shuffle by `seed`; at least one of each when there are 2+ examples."""
        if not 0 <= val_fraction < 1:
            raise ValueError("val_fraction must be in [0, 1)")
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        n_val = round(len(order) * val_fraction)
        if val_fraction > 0 and len(order) >= 2:
            n_val = min(max(n_val, 1), len(order) - 1)
        return self._subset(sorted(order[n_val:])), self._subset(sorted(order[:n_val]))

    def dedupe(self) -> ChatDataset:
        """A new dataset without exact duplicates (the first occurrence of each example is kept)."""
        seen, keep = set(), []
        for i, example in enumerate(self.examples):
            fingerprint = _fingerprint(example)
            if fingerprint not in seen:
                seen.add(fingerprint)
                keep.append(i)
        return self._subset(keep)

    def _subset(self, indices: Iterable[int]) -> ChatDataset:
        indices = list(indices)
        return ChatDataset([self.examples[i] for i in indices], lines=[self.lines[i] for i in indices])
