"""OpenAI's legacy function calling (`functions`, `function_call`) served through tools.

A request that uses the legacy parameters is rewritten as a tools request (one call at most, as the
legacy API makes), and its answer is shaped back: the call as the message's `function_call`,
finish_reason "function_call".

>>> body, legacy = modernize({"messages": [], "functions": [{"name": "f"}], "function_call": {"name": "f"}})
>>> legacy, body["tools"], body["tool_choice"]
(True, [{'type': 'function', 'function': {'name': 'f'}}], {'type': 'function', 'function': {'name': 'f'}})
>>> to_legacy({"role": "assistant", "content": None, "tool_calls": [
...     {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]})
{'role': 'assistant', 'content': None, 'function_call': {'name': 'f', 'arguments': '{}'}}
"""

from __future__ import annotations

from typing import Any


class LegacyError(ValueError):
    """A legacy request that cannot be served (the server answers 400 with `param`)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _tool_choice(function_call: Any) -> str | dict:
    if function_call in (None, "auto", "none"):
        return function_call or "auto"
    if isinstance(function_call, dict) and isinstance(function_call.get("name"), str):
        return {"type": "function", "function": {"name": function_call["name"]}}
    raise LegacyError(
        "'function_call' must be 'none', 'auto' or {\"name\": <a function's name>}.", "function_call"
    )


def _message(message: Any, calls: list[str], index: int) -> Any:
    """A legacy message in today's shape: an assistant `function_call` becomes a tool call, a "function"
    message its tool result (answering the latest call, whose id is in `calls`)."""
    if not isinstance(message, dict):
        return message
    if message.get("role") == "assistant" and message.get("function_call") is not None:
        calls.append(f"call_legacy{index}")
        rest = {k: v for k, v in message.items() if k != "function_call"}
        call = {"id": calls[-1], "type": "function", "function": message["function_call"]}
        return {**rest, "tool_calls": [call]}
    if message.get("role") == "function":
        rest = {k: v for k, v in message.items() if k not in ("role", "name")}
        return {**rest, "role": "tool", "tool_call_id": calls[-1] if calls else f"call_legacy{index}"}
    return message


def modernize(body: dict) -> tuple[dict, bool]:
    """The request in today's terms, and whether it used the legacy `functions` / `function_call`.

    `functions` become `tools` (with `parallel_tool_calls` off), `function_call` becomes `tool_choice`, and
    legacy messages in the conversation become tool calls and tool results. Mixing the two styles, or
    `function_call` without `functions`, is a `LegacyError`.
    """
    messages = body.get("messages")
    if isinstance(messages, list):
        calls: list[str] = []
        body = {**body, "messages": [_message(m, calls, i) for i, m in enumerate(messages)]}
    functions, function_call = body.get("functions"), body.get("function_call")
    if functions is None:
        if function_call is not None:
            raise LegacyError("'function_call' is only allowed when 'functions' are given.", "function_call")
        return body, False
    if body.get("tools") is not None or body.get("tool_choice") is not None:
        raise LegacyError(
            "Use either 'functions' and 'function_call' or 'tools' and 'tool_choice', not both.", "functions"
        )
    ok = isinstance(functions, list) and functions and all(isinstance(f, dict) for f in functions)
    if not ok:
        raise LegacyError("'functions' must be a non-empty list of function objects.", "functions")
    rest = {k: v for k, v in body.items() if k not in ("functions", "function_call")}
    tools = [{"type": "function", "function": f} for f in functions]
    return {
        **rest,
        "tools": tools,
        "tool_choice": _tool_choice(function_call),
        "parallel_tool_calls": False,
    }, True


def to_legacy(part: dict) -> dict:
    """An assistant message or streamed delta with its (first) tool call as the legacy `function_call`."""
    calls = part.get("tool_calls")
    if not calls:
        return part
    rest = {k: v for k, v in part.items() if k != "tool_calls"}
    return {**rest, "function_call": calls[0]["function"]}


def legacy_finish_reason(finish_reason: str | None) -> str | None:
    """finish_reason as the legacy API says it: "function_call" for a call."""
    return "function_call" if finish_reason == "tool_calls" else finish_reason
