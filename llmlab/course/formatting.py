"""Fine-tuning for a format: employee messages to the HR inbox turned into one JSON object, and its checker.

The task (notebook 02b): a message such as "Off sick today, back Thursday. Marta" becomes
`{"category": "sick", "employee": "Marta", "dates": "today"}`, with exactly the keys of `KEYS` and a category
of `CATEGORIES`. `INSTRUCTION` states the task. `data/format_train.jsonl` holds the fine-tuning examples (chat
format, `INSTRUCTION` as the system message of each, as the prompt will send it), `data/format_eval.jsonl` the
held-out messages with the expected object. `problem` says what makes an answer invalid (None when it is
valid), `fields_right` which fields are right.

>>> problem('{"category": "sick", "employee": "Marta", "dates": "today"}') is None
True
>>> problem('{"category": "ill", "employee": "Marta", "dates": "today"}')
'category "ill" is not one of sick, leave, late, remote'
>>> fields_right('{"category": "late", "employee": "Bram", "dates": "today"}',
...              {"category": "late", "employee": "Bram", "dates": "this morning"})
{'category': True, 'employee': True, 'dates': False}
"""

from __future__ import annotations

import json

import pandas as pd

from llmlab.course.data import DATA_DIR, read_jsonl
from llmlab.datasets import ChatDataset

__all__ = [
    "CATEGORIES",
    "INSTRUCTION",
    "KEYS",
    "SCHEMA",
    "fields_right",
    "load_format_eval",
    "parse",
    "problem",
    "response_format",
    "training_examples",
]

CATEGORIES = ("sick", "leave", "late", "remote")
KEYS = ("category", "employee", "dates")
INSTRUCTION = (
    "You are the HR inbox of Fernhollow Instruments. Answer with only a JSON object with the keys "
    '"category" ("sick", "leave", "late" or "remote"), "employee" (the sender\'s first name) and "dates" '
    "(when, in the message's words)."
)

# The JSON schema of a valid answer, which `response_format` asks the server to enforce. Its short string limits
# let a constrained answer always finish within 64 tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "category": {"type": "string", "enum": list(CATEGORIES)},
        "employee": {"type": "string", "maxLength": 12},
        "dates": {"type": "string", "maxLength": 28},
    },
    "required": list(KEYS),
    "additionalProperties": False,
}


def response_format(name: str = "hr_message") -> dict:
    """The `response_format` argument of `chat.completions.create` that asks for an answer matching `SCHEMA`.

    >>> response_format()["json_schema"]["strict"]
    True
    """
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMA, "strict": True}}


def parse(answer: str) -> dict | None:
    """The answer as a dict when it is valid (see `problem`), else None.

    >>> parse('{"category": "remote", "employee": "Sofia", "dates": "Friday"}')["employee"]
    'Sofia'
    >>> parse("Sure! Here is the JSON: {...}") is None
    True
    """
    return json.loads(answer) if problem(answer) is None else None


def problem(answer: str) -> str | None:
    """Why `answer` is not a valid answer, or None when it is one: a JSON object (nothing before or after it but
    spaces) with exactly the keys of `KEYS`, a category of `CATEGORIES` and non-empty strings for the others.

    >>> problem('{"category": "sick", "employee": "Ana"}')
    'keys are category, employee; want category, employee, dates'
    >>> problem('```json\\n{"category": "sick"}\\n```')
    'not JSON'
    """
    try:
        value = json.loads(answer)
    except (json.JSONDecodeError, TypeError):
        return "not JSON"
    if not isinstance(value, dict):
        return "not a JSON object"
    if set(value) != set(KEYS):
        return f"keys are {', '.join(value)}; want {', '.join(KEYS)}"
    if value["category"] not in CATEGORIES:
        return f'category "{value["category"]}" is not one of {", ".join(CATEGORIES)}'
    empty = [k for k in KEYS if not isinstance(value[k], str) or not value[k].strip()]
    if empty:
        return f"{', '.join(empty)} not a non-empty string"
    return None


def fields_right(answer: str, expected: dict) -> dict[str, bool]:
    """For each key of `KEYS`: does the answer give the expected value (case and outer spaces aside)?

    An invalid answer has no field right.

    >>> fields_right("not JSON", {"category": "sick", "employee": "Ana", "dates": "today"})["category"]
    False
    """
    value = parse(answer) or {}
    return {k: str(value.get(k, "")).strip().casefold() == expected[k].strip().casefold() for k in KEYS}


def training_examples() -> ChatDataset:
    """data/format_train.jsonl: the fine-tuning examples, one system message (the task), a message, its object.

    >>> len(training_examples()) >= 30
    True
    """
    return ChatDataset.from_jsonl(DATA_DIR / "format_train.jsonl")


def load_format_eval() -> pd.DataFrame:
    """data/format_eval.jsonl, the held-out messages: id, message, and the expected category, employee, dates.

    >>> sorted(set(load_format_eval()["category"])) == sorted(CATEGORIES)
    True
    """
    rows = [
        {"id": r["id"], "message": r["message"], **r["expected"]} for r in read_jsonl("format_eval.jsonl")
    ]
    return pd.DataFrame(rows, columns=["id", "message", *KEYS])
