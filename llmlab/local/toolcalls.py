"""Tool calls on the local backend: the model decides, constrained decoding writes the arguments.

The chat service hands a chat-completions request with `tools` to `complete_with_tools`, with the prompt
it rendered once:

>>> messages = [{"role": "user", "content": "Weather in Paris?"}]
>>> done = complete_with_tools(runtime, prompt=render(messages, tools=[weather_tool]),
...                            tools=[weather_tool], tool_choice="required")  # doctest: +SKIP
>>> done.finish_reason, done.tool_calls[0].name, done.tool_calls[0].arguments  # doctest: +SKIP
('tool_calls', 'get_weather', '{"city": "Paris"}')

How it works:
- the prompt is `chat_format.render(messages, tools)` (rendered by the caller): the same text the model is
  fine-tuned on;
- "none" → a text answer, under a grammar that only rules out starting with "<" (after a tool result a small
  model likes to write another `<tool_call>`, and the answer would be empty); it is also stopped at a
  tool-call opener later on;
  "required" or a named function → the model writes `{"name": ..., "arguments": ...}` under an llguidance
  grammar that only admits the tools' names and, for each name, arguments valid for that tool's JSON
  schema (`anyOf` over the tools), so they always parse and validate; with `parallel_tool_calls` it may
  write up to `MAX_PARALLEL_CALLS` calls, and generation stops at the first call that repeats an earlier
  one of the same turn (a small model's loop; running it twice would, e.g., book a room twice);
- "auto" → the model's own likelihood decides: P(the answer starts with the tool-call opener) against
  P(it starts with anything else), i.e. call when log P(opener) > log 0.5; an answer is then written as
  for "none". No keyword rules.
- a tool's parameters with root-relative references (`$defs`/`$ref`, as pydantic and
  `openai.pydantic_function_tool` write them) are re-rooted under the call's grammar; a schema the grammar
  still cannot take is a `ToolSchemaError` naming the tool;
- the syntax and the grammars are `llmlab.local.tool_grammar`'s;
- `max_tokens` bounds the whole turn, opener included; a call it cuts off is returned as far as it was
  written, with finish_reason "length", as OpenAI does.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import string
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from llmlab.local.tool_grammar import ANSWER_GRAMMAR, CallSyntax, call_grammar, call_syntax


class ToolChoiceError(ValueError):
    """A `tool_choice` that names no given tool, or an unknown mode (the server answers 400)."""


class ToolSchemaError(ValueError):
    """A tool whose parameters schema the grammar cannot take (the server answers 400 naming it)."""

    def __init__(self, name: str, index: int | None, reason: str) -> None:
        super().__init__(f"Invalid schema for function '{name}': {reason}")
        self.name = name
        self.param = "tools" if index is None else f"tools[{index}].function.parameters"


@dataclass
class ToolCall:
    """One call: `id` ("call_…"), function `name`, `arguments` as JSON text (OpenAI's shape)."""

    id: str
    name: str
    arguments: str

    def to_dict(self) -> dict:
        """OpenAI's `ChatCompletionMessageToolCall` as a dict."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class ToolCompletion:
    """The assistant's turn: text `content` or `tool_calls`, OpenAI's `finish_reason`, token usage."""

    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"  # "stop" | "length" | "tool_calls"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[dict] | None = None  # per-token entries of a text answer, when asked for

    def message(self) -> dict:
        """OpenAI's assistant message: `{"role", "content", "tool_calls"?}`."""
        out: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [c.to_dict() for c in self.tool_calls]
        return out

    def deltas(self) -> Iterator[dict]:
        """The streamed form (OpenAI's `ChoiceDelta` dicts); the server adds `finish_reason` to the last chunk.

        Each call is one delta with its `index`, `id`, `type` and function name (arguments ""), then one
        with its arguments — the order OpenAI streams them in.
        """
        yield {"role": "assistant", "content": "" if self.tool_calls else self.content}
        for index, call in enumerate(self.tool_calls):
            yield {
                "tool_calls": [
                    {
                        "index": index,
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": ""},
                    }
                ]
            }
            yield {"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]}


def _tool_functions(tools: list[dict]) -> list[dict]:
    out = []
    for t in tools:
        fn = t.get("function", t) if isinstance(t, dict) else t
        if not isinstance(fn, dict) or not fn.get("name"):
            raise ToolChoiceError("every tool needs a function with a name")
        out.append(fn)
    return out


def _chosen(tools: list[dict], tool_choice: str | dict | None) -> tuple[str, list[dict]]:
    """Normalise `tool_choice` to (mode, the functions allowed) with mode "auto" | "none" | "call"."""
    functions = _tool_functions(tools)
    if tool_choice in (None, "auto"):
        return "auto", functions
    if tool_choice == "none":
        return "none", functions
    if tool_choice == "required":
        return "call", functions
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if name is None:
        raise ToolChoiceError(
            f"tool_choice must be 'auto', 'none', 'required' or a function, not {tool_choice!r}"
        )
    allowed = [f for f in functions if f["name"] == name]
    if not allowed:
        raise ToolChoiceError(f"tool_choice names {name!r}, which is not among the tools given")
    return "call", allowed


def new_call_id() -> str:
    """An OpenAI-style tool call id: "call_" and 24 random letters and digits."""
    alphabet = string.ascii_letters + string.digits
    return "call_" + "".join(secrets.choice(alphabet) for _ in range(24))


@dataclass
class ToolPlan:
    """What to generate: the rendered `prompt`, and either a tool call (`grammar` set) or an answer."""

    prompt: str
    grammar: str | None
    call_logprob: float | None = None  # log P(opener) when "auto" decided


def _check_schemas(runtime: Any, tools: list[dict], grammar: str) -> None:
    """Compile `grammar` (the runtime caches it); a schema it cannot take is a `ToolSchemaError` naming
    the tool (found by compiling each tool alone, only when the whole grammar failed)."""
    try:
        runtime.check_grammar(grammar)
    except ValueError as whole:
        functions = _tool_functions(tools)
        for index, fn in enumerate(functions):
            try:
                runtime.check_grammar(call_grammar([fn], parallel=False))
            except ValueError as exc:
                raise ToolSchemaError(fn["name"], index, str(exc)) from exc
        names = ", ".join(fn["name"] for fn in functions)
        raise ToolSchemaError(names, None, str(whole)) from whole


def plan(
    runtime: Any,
    *,
    prompt: str,
    tools: list[dict],
    tool_choice: str | dict | None = "auto",
    adapter: str | None = None,
    parallel_tool_calls: bool = True,
) -> ToolPlan:
    """Decide between calling a tool and answering after `prompt` (`chat_format.render(messages, tools)`,
    generation prompt included; see the module docstring).

    Raises `ToolChoiceError` for a bad `tool_choice` and `ToolSchemaError` for a schema the grammar
    cannot take, whatever the decision.
    """
    mode, functions = _chosen(tools, tool_choice)
    grammar = call_grammar(functions, parallel_tool_calls)
    _check_schemas(runtime, tools, grammar)
    if mode == "none":
        return ToolPlan(prompt, None)
    if mode == "call":
        return ToolPlan(prompt, grammar)
    lp = runtime.logprob(prompt, call_syntax().opener, adapter=adapter)
    return ToolPlan(prompt, grammar if lp > math.log(0.5) else None, lp)


def _decoded(piece: str, syntax: CallSyntax) -> dict | None:
    """The call object written in `piece` when it is complete (a partly written separator or closer may
    follow it), else None.

    >>> _decoded('{"name": "f", "arguments": {}}\\n</tool', call_syntax())
    {'name': 'f', 'arguments': {}}
    """
    try:
        obj, end = json.JSONDecoder().raw_decode(piece)
    except json.JSONDecodeError:
        return None
    tail = piece[end:]
    complete = isinstance(obj, dict) and (syntax.separator.startswith(tail) or syntax.closer.startswith(tail))
    return obj if complete else None


def _call_key(piece: str, syntax: CallSyntax) -> str | None:
    """A complete call's identity (name and arguments, key order ignored), or None while it is incomplete."""
    obj = _decoded(piece, syntax)
    return None if obj is None else json.dumps(obj, sort_keys=True)


def _parse_calls(text: str, syntax: CallSyntax) -> list[ToolCall]:
    """The complete calls in the generated text, each distinct call once (a repeat of an earlier call of the
    same turn is dropped); a call cut off by max_tokens is `_cut_call`'s."""
    calls, seen = [], set()
    for piece in text.removesuffix(syntax.closer).split(syntax.separator):
        key = _call_key(piece, syntax)
        if key is None:
            break
        if key in seen:
            continue
        seen.add(key)
        obj = json.loads(key)
        calls.append(ToolCall(new_call_id(), obj["name"], json.dumps(obj["arguments"], ensure_ascii=False)))
    return calls


# The start of a call as the grammar writes it (name first, fixed separators), cut off anywhere.
_CUT = re.compile(r'(?:\{"name": "(?P<name>[^"]*)(?P<closed>")?(?:, "arguments": (?P<arguments>.*))?)?', re.S)


@dataclass(frozen=True)
class CutCall:
    """A call that max_tokens cut off: the text before its name, its name and arguments as far as written."""

    head: str
    name: str
    name_complete: bool
    arguments: str


def _cut_call(text: str, syntax: CallSyntax) -> CutCall | None:
    """The call that max_tokens cut off at the end of `text`, or None when the last call is complete.

    >>> _cut_call('{"name": "get_weather", "arguments": {"city": "Par', call_syntax())
    CutCall(head='', name='get_weather', name_complete=True, arguments='{"city": "Par')
    """
    last = text.removesuffix(syntax.closer).split(syntax.separator)[-1]
    if _decoded(last, syntax) is not None:
        return None
    found = _CUT.match(last)
    return CutCall(
        text[: len(text) - len(last)],
        found["name"] or "",
        found["closed"] is not None,
        found["arguments"] or "",
    )


def _repeats(text: str, syntax: CallSyntax) -> bool:
    """True when the last call in `text` is complete and repeats an earlier call."""
    *earlier, last = text.removesuffix(syntax.closer).split(syntax.separator)
    key = _call_key(last, syntax) if earlier else None
    return key is not None and key in {_call_key(p, syntax) for p in earlier}


def _generate_calls(runtime: Any, prompt: str, grammar: str, **sampling: Any) -> tuple[str, int]:
    """Stream the calls under `grammar`; stop at the first repeated call. Returns (text, generated tokens)."""
    syntax, text = call_syntax(), ""
    deltas = runtime.stream(prompt, lark_grammar=grammar, **sampling)
    try:
        while True:
            text += next(deltas)
            if _repeats(text, syntax):
                return text, runtime.count_tokens(text)
    except StopIteration as done:
        return text, done.value.completion_tokens
    finally:
        deltas.close()


def _finish_name(runtime: Any, prompt: str, cut: CutCall, functions: list[dict], adapter: str | None) -> str:
    """The tool a cut-off call was naming: the one name that fits what was written, else the likeliest."""
    if cut.name_complete:
        return cut.name
    names = [f["name"] for f in functions if f["name"].startswith(cut.name)] or [f["name"] for f in functions]
    if len(names) == 1:
        return names[0]
    head = f'{prompt}{cut.head}{{"name": "{cut.name}'
    return max(names, key=lambda n: runtime.logprob(head, n[len(cut.name) :] + '"', adapter=adapter))


def complete_with_tools(
    runtime: Any,
    *,
    prompt: str,
    tools: list[dict],
    tool_choice: str | dict | None = "auto",
    adapter: str | None = None,
    max_tokens: int | None = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: list[str] | None = None,
    parallel_tool_calls: bool = True,
    logprobs: int | None = None,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
) -> ToolCompletion:
    """Answer a chat-completions request that has `tools`: text, or tool calls with valid arguments.

    `prompt` is the request's `chat_format.render(messages, tools)`, generation prompt included.

    `max_tokens` bounds the whole turn, tool-call opener included (None: the room left in the context).
    A call cut off by it comes back as far as it was written, with finish_reason "length" (as OpenAI
    does). `logprobs` (the number of top alternatives) adds per-token log-probabilities to a text answer.
    Raises `ToolChoiceError` for a `tool_choice` that names no given tool, `ToolSchemaError` for a
    tool schema the grammar cannot take.
    """
    chosen = plan(
        runtime,
        prompt=prompt,
        tools=tools,
        tool_choice=tool_choice,
        adapter=adapter,
        parallel_tool_calls=parallel_tool_calls,
    )
    sampling = {
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "adapter": adapter,
        "frequency_penalty": frequency_penalty,
        "presence_penalty": presence_penalty,
    }
    syntax = call_syntax()
    if chosen.grammar is None:
        gen = runtime.generate(
            chosen.prompt,
            stop=[*(stop or []), syntax.opener.strip()],
            lark_grammar=ANSWER_GRAMMAR,
            max_tokens=max_tokens,
            logprobs=logprobs,
            **sampling,
        )
        return ToolCompletion(
            gen.text, [], gen.finish_reason, gen.prompt_tokens, gen.completion_tokens, gen.logprobs
        )
    opener = runtime.count_tokens(syntax.opener)
    budget = None if max_tokens is None else max(0, max_tokens - opener)
    prompt = chosen.prompt + syntax.opener
    text, generated = _generate_calls(runtime, prompt, chosen.grammar, max_tokens=budget, **sampling)
    completion_tokens = opener + generated if max_tokens is None else min(max_tokens, opener + generated)
    calls = _parse_calls(text, syntax)
    cut = _cut_call(text, syntax)
    finish = "tool_calls"
    if cut is not None and (cut.head != text or not calls):  # a call was started, or none was finished
        _, functions = _chosen(tools, tool_choice)
        name = _finish_name(runtime, prompt, cut, functions, adapter)
        calls.append(ToolCall(new_call_id(), name, cut.arguments))
        finish = "length"
    return ToolCompletion(None, calls, finish, runtime.count_tokens(chosen.prompt), completion_tokens)
