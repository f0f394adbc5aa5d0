"""Function calling: a typed Python function becomes a tool; `run` executes the model's tool calls.

>>> @tool
... def leave_balance(employee: str, year: int = 2026) -> int:
...     '''Days of leave an employee has left.
...
...     Args:
...         employee: Full name, e.g. "Ada Park".
...         year: Calendar year.
...     '''
...     return 12
>>> leave_balance.schema["function"]["parameters"]["required"]
['employee']
>>> leave_balance("Ada Park")
12
>>> result = run(lab, [{"role": "user", "content": "Leave left for Ada Park?"}], [leave_balance])  # doctest: +SKIP
>>> result.trace.to_dataframe()  # doctest: +SKIP

The helpers only talk to the model through `lab.client` (the official `openai` client), so the same
code runs against OpenAI and the local backend.
"""

from __future__ import annotations

import inspect
import json
import re
import time
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pydantic
from pydantic_core import to_jsonable_python

from llmlab import jsontext

__all__ = ["RunResult", "Tool", "Trace", "TraceStep", "run", "strict_mode_problems", "tool"]

_SECTION = re.compile(
    r"^\s*(Args|Arguments|Parameters|Params|Returns?|Raises|Yields?|Examples?|Notes?)\s*:?\s*$"
)


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """Split a Google or NumPy style docstring into (summary, {parameter: description}).

    >>> parse_docstring("Add.\\n\\nArgs:\\n    a (int): first.\\n    b: second,\\n        continued.")
    ('Add.', {'a': 'first.', 'b': 'second, continued.'})
    >>> parse_docstring("Add.\\n\\nParameters\\n----------\\na : int\\n    first.")
    ('Add.', {'a': 'first.'})
    """
    lines = inspect.cleandoc(doc or "").splitlines()
    summary: list[str] = []
    params: dict[str, str] = {}
    section = current = indent = None
    numpy = False
    for i, line in enumerate(lines):
        underlined = i + 1 < len(lines) and set(lines[i + 1].strip()) == {"-"}
        header = _SECTION.match(line)
        if header and (line.rstrip().endswith(":") or underlined):
            section, current, indent, numpy = header.group(1).lower(), None, None, underlined
            continue
        if section is None:
            summary.append(line)
            continue
        if section not in ("args", "arguments", "parameters", "params") or not line.strip():
            continue
        if set(line.strip()) == {"-"}:
            continue
        depth = len(line) - len(line.lstrip())
        pattern = r"^\s*\*{0,2}(\w+)\s*(:.*)?$" if numpy else r"^\s*\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$"
        entry = re.match(pattern, line)
        if entry and (indent is None or depth <= indent):
            indent, current = depth, entry.group(1)
            params[current] = "" if numpy else entry.group(2).strip()
        elif current is not None:
            params[current] = f"{params[current]} {line.strip()}".strip()
    text = "\n".join(summary).strip()
    return (text.split("\n\n")[0].replace("\n", " ") if text else ""), params


def _inline_refs(schema: dict) -> dict:
    """Replace `$ref`s into `$defs` by the definitions themselves (kept when a model refers to itself)."""
    defs = schema.get("$defs", {})

    def resolve(node: Any, seen: tuple[str, ...]) -> Any:
        if isinstance(node, list):
            return [resolve(x, seen) for x in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref", "")
        if ref.startswith("#/$defs/"):
            name = ref.removeprefix("#/$defs/")
            if name in seen:
                raise RecursionError(name)
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return {**resolve(defs[name], (*seen, name)), **resolve(rest, seen)}
        return {k: resolve(v, seen) for k, v in node.items() if k != "$defs"}

    try:
        return resolve(schema, ())
    except RecursionError:
        return schema


def _drop_titles(node: Any) -> Any:
    """Remove pydantic's auto-generated `title`s (noise in a prompt), keeping property names intact."""
    if isinstance(node, list):
        return [_drop_titles(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "title" and isinstance(value, str):
            continue
        if key in ("properties", "$defs") and isinstance(value, dict):
            out[key] = {name: _drop_titles(sub) for name, sub in value.items()}
        else:
            out[key] = _drop_titles(value)
    return out


class Tool:
    """A Python function the model may call: `.name`, `.schema` (OpenAI's tool definition), callable as-is.

    >>> def add(a: int, b: int = 1) -> int:
    ...     '''Add two numbers.'''
    ...     return a + b
    >>> t = Tool(add)
    >>> t.schema["function"]["parameters"]["properties"]["a"]
    {'type': 'integer'}
    >>> t.invoke('{"a": 2}')
    3
    """

    def __init__(self, fn: Callable[..., Any], *, name: str | None = None, description: str | None = None):
        self.fn = fn
        self.name = name or fn.__name__
        summary, param_docs = parse_docstring(fn.__doc__)
        self.description = description if description is not None else summary
        fields: dict[str, Any] = {}
        self._positional: list[str] = []  # positional-only parameters, passed by position
        for pname, param in inspect.signature(fn).parameters.items():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise TypeError(f"tool {self.name!r}: *args/**kwargs cannot be described to a model")
            if param.kind == param.POSITIONAL_ONLY:
                self._positional.append(pname)
            annotation = Any if param.annotation is inspect.Parameter.empty else param.annotation
            default = ... if param.default is inspect.Parameter.empty else param.default
            fields[pname] = (annotation, pydantic.Field(default, description=param_docs.get(pname) or None))
        try:
            hints, unresolved = typing.get_type_hints(fn, include_extras=True), None
        except Exception as e:  # e.g. a forward reference to a name not defined (yet)
            hints, unresolved = {}, e  # the raw annotations still do when only the return type is unknown
        for pname in fields:
            if pname in hints:
                fields[pname] = (hints[pname], fields[pname][1])
        try:
            self.model = pydantic.create_model(
                f"{self.name}_arguments", __config__=pydantic.ConfigDict(extra="forbid"), **fields
            )
            parameters = _drop_titles(_inline_refs(self.model.model_json_schema()))
        except pydantic.PydanticUserError:
            if unresolved is None:
                raise
            raise TypeError(
                f"tool {self.name!r} ({getattr(fn, '__qualname__', self.name)}): its type annotations cannot be "
                f"resolved ({type(unresolved).__name__}: {unresolved}); define or import every type in its "
                "signature before decorating it"
            ) from None
        parameters.setdefault("properties", {})
        parameters.setdefault("required", [])
        self.parameters: dict = parameters
        self.__doc__ = fn.__doc__
        self.__name__ = self.name

    @property
    def schema(self) -> dict:
        """OpenAI's tool definition: `{"type": "function", "function": {name, description, parameters}}`."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Tool({self.name!r})"

    def validate(self, arguments: str | dict) -> dict[str, Any]:
        """Parse (if JSON text) and validate arguments; raises `ValueError` with a readable message.

        Returns the keyword arguments converted to the function's types (e.g. dicts to pydantic models).
        """
        if isinstance(arguments, str):
            try:
                arguments = jsontext.loads(arguments or "{}")
            except jsontext.JSONTextError as e:
                raise ValueError(f"arguments are not valid JSON ({e})") from None
        if not isinstance(arguments, dict):
            raise ValueError(f"arguments must be a JSON object, got {type(arguments).__name__}")
        try:
            parsed = self.model.model_validate(arguments)
        except pydantic.ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(map(str, err['loc'])) or 'arguments'}: {err['msg']}" for err in e.errors()
            )
            raise ValueError(problems) from None
        return {name: getattr(parsed, name) for name in type(parsed).model_fields}

    def invoke(self, arguments: str | dict) -> Any:
        """Validate `arguments` (JSON text or dict) and call the function with them."""
        return self._apply(self.validate(arguments))

    def _apply(self, kwargs: dict[str, Any]) -> Any:
        """Call the function with validated arguments by name (positional-only ones go by position)."""
        kwargs = dict(kwargs)
        return self.fn(*[kwargs.pop(name) for name in self._positional], **kwargs)


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None, description: str | None = None):
    """Decorator (or function) turning a typed function into a `Tool`: `@tool`, `@tool(name=...)`, `tool(fn)`."""
    if fn is None:
        return lambda f: Tool(f, name=name, description=description)
    return fn if isinstance(fn, Tool) else Tool(fn, name=name, description=description)


def strict_mode_problems(schema: dict) -> list[str]:
    """Why OpenAI would refuse the tool definition `schema` with ``"strict": true``; [] when it would accept it.

    Strict mode (Structured Outputs for function calling) makes two demands of every object in the parameters
    that an ordinary schema need not meet, and the SDK's own `to_strict_json_schema` enforces the same two:
    ``"additionalProperties": false``, and every property in ``required`` (an optional parameter becomes a
    required one that may be null).

    >>> def greet(name: str, greeting: str = "Hello") -> str:
    ...     '''Greet someone.'''
    ...     return f"{greeting}, {name}"
    >>> strict_mode_problems(Tool(greet).schema)
    ["parameters: 'greeting' is not in required (it has a default)"]
    """
    problems: list[str] = []

    def visit(node: Any, where: str) -> None:
        if isinstance(node, list):
            for i, item in enumerate(node):
                visit(item, f"{where}[{i}]")
            return
        if not isinstance(node, dict):
            return
        if node.get("type") == "object" or "properties" in node:
            if node.get("additionalProperties") is not False:
                problems.append(f"{where}: additionalProperties is not false")
            required = set(node.get("required", []))
            for name, prop in node.get("properties", {}).items():
                if name not in required:
                    why = " (it has a default)" if isinstance(prop, dict) and "default" in prop else ""
                    problems.append(f"{where}: {name!r} is not in required{why}")
        for key, child in node.items():
            if key in ("properties", "$defs", "definitions") and isinstance(child, dict):
                for name, sub in child.items():
                    visit(sub, f"{where}.{name}")
            elif key in ("items", "anyOf", "allOf", "oneOf", "prefixItems"):
                visit(child, f"{where}.{key}")

    visit(schema.get("function", schema).get("parameters", {}), "parameters")
    return problems


@dataclass
class TraceStep:
    """One step of a run: a model response (`kind="model"`) or one tool execution (`kind="tool"`)."""

    round: int
    kind: str
    tool: str | None = None
    arguments: str | None = None
    result: str | None = None
    error: str | None = None
    tokens: int = 0
    seconds: float = 0.0
    call_id: str | None = None


class Trace(list):
    """The list of `TraceStep`s of a run, with `.to_dataframe()`."""

    def to_dataframe(self):
        """One row per step: round, kind, tool, arguments, result, error, tokens, seconds."""
        import pandas as pd

        columns = ["round", "kind", "tool", "arguments", "result", "error", "tokens", "seconds"]
        return pd.DataFrame([{c: getattr(s, c) for c in columns} for s in self], columns=columns)

    @property
    def tool_steps(self) -> list[TraceStep]:
        """The tool executions only."""
        return [s for s in self if s.kind == "tool"]


@dataclass
class RunResult:
    """What `run` returns: the last assistant `message`, the whole conversation, the trace, and a status.

    `status` is "completed" (the model answered without asking for more tools) or "max_rounds" (it was
    still calling tools when the round budget ran out; `message` is then its last tool-calling message).
    """

    message: Any
    messages: list[dict]
    trace: Trace = field(default_factory=Trace)
    status: str = "completed"

    @property
    def content(self) -> str | None:
        """The final answer's text."""
        return self.message.content


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(to_jsonable_python(value), ensure_ascii=False)


def _execute(call: Any, by_name: dict[str, Tool], round_no: int) -> tuple[dict, TraceStep]:
    """Run one tool call; any problem becomes an error message the model can read and recover from."""
    name, arguments = call.function.name, call.function.arguments
    step = TraceStep(round=round_no, kind="tool", tool=name, arguments=arguments, call_id=call.id)
    start = time.perf_counter()
    chosen = by_name.get(name)
    if chosen is None:
        step.error = f"unknown tool {name!r}; available tools: {', '.join(by_name)}"
    else:
        try:
            kwargs = chosen.validate(arguments)
        except ValueError as e:
            step.error = f"invalid arguments for {name}: {e}"
        else:
            try:
                step.result = _as_text(chosen._apply(kwargs))
            except Exception as e:  # the function's own failure is reported to the model, not raised
                step.error = f"{name} raised {type(e).__name__}: {e}"
    step.seconds = time.perf_counter() - start
    content = (
        step.result
        if step.error is None
        else f"Error: {step.error.rstrip('.')}. Fix the arguments or answer without it."
    )
    return {"role": "tool", "tool_call_id": call.id, "content": content}, step


def _assistant_dict(message: Any) -> dict:
    out: dict[str, Any] = {"role": "assistant", "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.function.name, "arguments": c.function.arguments},
            }
            for c in message.tool_calls
        ]
    return out


def run(
    lab: Any,
    messages: list[dict],
    tools: Iterable[Tool | Callable[..., Any]],
    model: str | None = None,
    max_rounds: int = 5,
    tool_choice: str | dict = "auto",
    **create_kwargs: Any,
) -> RunResult:
    """Ask the model, run every tool call it makes (parallel ones too), feed the results back, repeat.

    `tool_choice` ("auto", "none", "required" or `{"type": "function", "function": {"name": ...}}`) applies
    to the first round; later rounds use "auto" so that a forced call is followed by an answer. A round is
    one model response; after `max_rounds` responses the run stops with `status="max_rounds"`.
    Invalid arguments, unknown tools and exceptions are sent back as tool messages starting with "Error:".

    >>> result = run(lab, [{"role": "user", "content": "How many days of leave has Ada left?"}],
    ...              [leave_balance], tool_choice="required")  # doctest: +SKIP
    >>> result.status, result.content  # doctest: +SKIP
    """
    if isinstance(tool_choice, str) and tool_choice not in ("auto", "none", "required"):
        tool_choice = {"type": "function", "function": {"name": tool_choice}}
    toolset = [tool(t) for t in tools]
    by_name = {t.name: t for t in toolset}
    conversation = [dict(m) for m in messages]
    trace = Trace()
    message = None
    for round_no in range(1, max_rounds + 1):
        start = time.perf_counter()
        response = lab.client.chat.completions.create(
            model=model or lab.chat_model,
            messages=conversation,
            tools=[t.schema for t in toolset],
            tool_choice=tool_choice if round_no == 1 else "auto",
            **create_kwargs,
        )
        message = response.choices[0].message
        usage = response.usage
        trace.append(
            TraceStep(
                round=round_no,
                kind="model",
                result=message.content,
                tokens=usage.total_tokens if usage else 0,
                seconds=time.perf_counter() - start,
            )
        )
        conversation.append(_assistant_dict(message))
        if not message.tool_calls:
            return RunResult(message, conversation, trace, "completed")
        for call in message.tool_calls:
            tool_message, step = _execute(call, by_name, round_no)
            conversation.append(tool_message)
            trace.append(step)
    return RunResult(message, conversation, trace, "max_rounds")
