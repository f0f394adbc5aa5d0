"""The validator of OpenAI's chat fine-tuning format, shared by the notebooks, the CLI and the local server.

Every error class with its file line and a fix: `validate_file` checks a JSONL file line by line without
holding it; `check_example` checks one example. It imports no pandas or matplotlib (the server loads it;
`llmlab.datasets` adds the tables and plots for notebooks) and nothing that talks HTTP (contracts
`validator-lean` and `validator-offline` in pyproject.toml). Its length (~510 lines) is the format's rule
set, one checker per part of an example; the rules read best together.

>>> report = validate_file("/dev/null")
>>> bool(report), [p.code for p in report.errors]
(False, ['empty_file', 'too_few_examples'])
>>> check_example({"messages": [{"role": "user", "content": "Hi"}]})[0][0]
'example_missing_assistant_message'
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmlab import jsontext, tokens

__all__ = [
    "MIN_EXAMPLES",
    "Problem",
    "ValidationReport",
    "Validator",
    "cached_tokens",
    "check_example",
    "example_tokens",
    "fingerprint",
    "read_examples",
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


def read_examples(path: str | Path) -> Iterator[tuple[int | None, dict | None, Problem | None]]:
    """Each line of a JSONL file parsed on its own, so that one bad line loses nothing: `(line, example, None)`
    or `(line, None, problem)`; an empty file gives one `(None, None, empty_file problem)`.

    >>> next(read_examples("/dev/null"))[2].code
    'empty_file'
    """
    n = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            yield n, *_parse_line(raw.rstrip(b"\n"), n)
    if n == 0:
        yield None, None, Problem(None, "empty_file", "The file is empty: add one JSON example per line.")


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


def example_tokens(example: Mapping, encoding: str) -> tuple[int, int]:
    """(all tokens, trained assistant tokens) of one example; the first is what a prompt of it would cost."""
    total, trained = tokens.REPLY_PRIMING + tokens.tools_tokens(example.get("tools"), encoding), 0
    for m in example.get("messages") or ():
        if isinstance(m, dict):
            in_prompt, said = tokens.message_token_counts(m, encoding)
            total += in_prompt
            if m.get("role") == "assistant" and m.get("weight", 1) != 0:
                trained += said
    return total, trained


def fingerprint(example: Mapping) -> bytes:
    """A 16-byte digest of the example's content (key order ignored); raises TypeError if not JSON."""
    return hashlib.blake2b(json.dumps(example, sort_keys=True).encode(), digest_size=16).digest()


def cached_tokens(
    example: dict, digest: bytes, encoding: str, known: dict[bytes, tuple[int, int]] | None
) -> tuple[int, int]:
    """`example_tokens`, kept in `known` by the example's `digest` (its `fingerprint`) when `known` is given."""
    if known is None:
        return example_tokens(example, encoding)
    if digest not in known:
        known[digest] = example_tokens(example, encoding)
    return known[digest]


class Validator:
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
            digest = fingerprint(example)
        except (TypeError, ValueError) as e:  # only possible for examples built in Python
            self.problems.append(
                Problem(line, "data_type", f"Not JSON-serializable ({e}): use str/number/list/dict.", index)
            )
            return 0, 0
        if digest in self.seen:
            first = self.seen[digest]  # a file line (>= 1), or ~index for an example not from a file
            where = f"line {first}" if first > 0 else f"example {~first}"
            self.problems.append(
                Problem(
                    line, "duplicate_example", f"Exact duplicate of {where}: remove it (dedupe()).", index
                )
            )
        else:
            self.seen[digest] = line if line is not None else ~index
        counts = cached_tokens(example, digest, self.encoding, self.known)
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
    """The result of a validation: falsy when there are errors. Warnings do not block a fine-tune.

    (`llmlab.datasets.ValidationReport` adds a table view for notebooks.)
    """

    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    n_examples: int = 0
    model: str = tokens.DEFAULT_MODEL

    def __bool__(self) -> bool:
        return not self.errors

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


def validate_file(
    path: str | Path, model: str | None = None, min_examples: int = MIN_EXAMPLES
) -> ValidationReport:
    """Validate a JSONL training file line by line without loading it whole (the CLI and the server use this).

    >>> print(validate_file("missing.jsonl"))  # doctest: +SKIP
    """
    validator, load_problems = Validator(model, min_examples), []
    for line, example, problem in read_examples(path):
        if problem:
            load_problems.append(problem)
        else:
            validator.check(example, line, validator.n_examples)
    return validator.report(load_problems)
