"""The text a tool call is written in, and the grammars that make the model write it right.

`call_syntax` reads the tool-call syntax (opener, separator, closer) off `chat_format.render` itself, so
inference and training never diverge. `call_grammar` is the llguidance grammar of the calls after the opener:
each `{"name": <tool>, "arguments": <valid for that tool's JSON schema>}` (`call_schema`: objects closed,
root-relative `$ref`s re-rooted), up to `MAX_PARALLEL_CALLS` of them. `ANSWER_GRAMMAR` is a text answer that
does not start a tag. `llmlab.local.toolcalls` decides which of them to generate under.

>>> print(call_grammar([{"name": "f", "parameters": {"type": "object"}}], parallel=False).split(chr(10))[0])
start: call "\\n</tool_call>"
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from llmlab.local import chat_format

MAX_PARALLEL_CALLS = 4
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}


@dataclass(frozen=True)
class CallSyntax:
    """How `chat_format.render` writes an assistant's tool calls: the text before, between and after calls."""

    opener: str
    separator: str
    closer: str


@lru_cache(maxsize=1)
def call_syntax() -> CallSyntax:
    """Read the tool-call syntax off `chat_format.render` itself, so inference and training never diverge."""
    calls = [
        {"id": f"call_{n}", "type": "function", "function": {"name": n, "arguments": "{}"}}
        for n in ("AAA", "BBB")
    ]
    head = chat_format.render([{"role": "user", "content": "x"}], add_generation_prompt=True)
    full = chat_format.render(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": calls}],
        add_generation_prompt=False,
    )
    if not full.startswith(head):
        raise RuntimeError("chat_format.render: the generation prompt is not a prefix of the assistant turn")
    turn = full[len(head) :]
    first = json.dumps({"name": "AAA", "arguments": {}})
    second = json.dumps({"name": "BBB", "arguments": {}})
    a, b = turn.index(first), turn.index(second)
    end = turn.rindex(chat_format.END)
    return CallSyntax(turn[:a], turn[a + len(first) : b], turn[b + len(second) : end])


def _closed(node: Any) -> Any:
    """The schema with `additionalProperties: false` on every object that does not say otherwise.

    A small model given the freedom invents extra keys; OpenAI's strict mode closes objects the same way.
    """
    if isinstance(node, list):
        return [_closed(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: _closed(v) if k != "properties" else {n: _closed(p) for n, p in v.items()} for k, v in node.items()
    }
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _local_refs(node: Any) -> bool:
    """True when the schema holds a `$ref` relative to its own root ("#…")."""
    if isinstance(node, list):
        return any(_local_refs(x) for x in node)
    if not isinstance(node, dict):
        return False
    ref = node.get("$ref")
    return (isinstance(ref, str) and ref.startswith("#")) or any(_local_refs(v) for v in node.values())


def _rerooted(node: Any, base: str) -> Any:
    """The schema with every root-relative `$ref` moved under the JSON pointer `base`.

    >>> _rerooted({"items": {"$ref": "#/$defs/Item"}}, "/$defs/tool0")
    {'items': {'$ref': '#/$defs/tool0/$defs/Item'}}
    """
    if isinstance(node, list):
        return [_rerooted(x, base) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _rerooted(v, base) for k, v in node.items()}
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        out["$ref"] = f"#{base}{ref[1:]}"
    return out


def call_schema(functions: list[dict]) -> dict:
    """JSON schema of one call: `{"name": <tool>, "arguments": <that tool's parameters>}` for any tool.

    A tool's parameters sit under the call's "arguments", where their root-relative references
    (`"$ref": "#/$defs/Category"`, as pydantic writes them) would no longer resolve: such a schema moves
    whole to the root's `$defs` (as `tool<i>`) and its references are re-rooted there.
    """
    variants, defs = [], {}
    for i, fn in enumerate(functions):
        parameters = _closed(fn.get("parameters") or {"type": "object", "properties": {}})
        if _local_refs(parameters):
            defs[f"tool{i}"] = _rerooted(parameters, f"/$defs/tool{i}")
            parameters = {"$ref": f"#/$defs/tool{i}"}
        variants.append(
            {
                "type": "object",
                "properties": {"name": {"const": fn["name"]}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    return {"x-guidance": _JSON_STYLE, **({"$defs": defs} if defs else {}), **schema}


def call_grammar(functions: list[dict], parallel: bool) -> str:
    """llguidance Lark grammar of the text after the opener: one call (or up to `MAX_PARALLEL_CALLS` joined
    by the render's separator), then the closer — exactly what a fine-tuned model learned to write."""
    syntax = call_syntax()
    repeat = f" ({json.dumps(syntax.separator)} call){{0,{MAX_PARALLEL_CALLS - 1}}}" if parallel else ""
    return (
        f"start: call{repeat} {json.dumps(syntax.closer)}\ncall: %json {json.dumps(call_schema(functions))}\n"
    )


# A text answer: anything that does not start (after blank space) with "<". Ruling out only the tag
# "<tool_call>" is not enough: after a tool result the base model then writes "<tool_call_2>…" instead.
ANSWER_GRAMMAR = "start: /\\s*([^<\\s][\\s\\S]*)?/\n"
