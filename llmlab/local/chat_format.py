"""The one prompt format of the local chat model: SmolLM2's ChatML, plus a tool syntax of our own.

Inference (`render`) and training (`render_pieces`, which marks what the loss may learn) share this code,
so a fine-tuned model sees exactly the text it was trained on.

>>> render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
'<|im_start|>system\\nBe brief.<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'

Like SmolLM2's own template, a conversation that does not open with a system message gets
`DEFAULT_SYSTEM_PROMPT`. Tools (OpenAI's `tools` list) are described in the system message as one JSON
object per line; assistant `tool_calls` become `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
blocks, and `role: "tool"` results become `<|im_start|>tool\\n...<|im_end|>` turns. `developer` messages are
rendered as `system` (SmolLM2 knows no developer role).
"""

from __future__ import annotations

import contextlib
import json

from llmlab.openai_facts import content_text

START, END = "<|im_start|>", "<|im_end|>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
TOOLS_INTRO = (
    "You can call these tools. To call one, reply with only\n"
    f'{TOOL_CALL_OPEN}\n{{"name": <tool name>, "arguments": <arguments as a JSON object>}}\n{TOOL_CALL_CLOSE}\n'
    "Tools:"
)


def tool_call_text(call: dict) -> str:
    """One assistant tool call (OpenAI shape) as `<tool_call>` block; arguments are re-serialised as JSON.

    >>> tool_call_text({"type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}})
    '<tool_call>\\n{"name": "f", "arguments": {"x": 1}}\\n</tool_call>'
    """
    function = call.get("function", call)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        with contextlib.suppress(json.JSONDecodeError):  # else keep the model's raw text: it is what it said
            arguments = json.loads(arguments) if arguments.strip() else {}
    body = json.dumps({"name": function.get("name"), "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def _tools_text(tools: list[dict]) -> str:
    lines = [json.dumps(t.get("function", t), ensure_ascii=False) for t in tools]
    return "\n".join([TOOLS_INTRO, *lines])


def _assistant_text(message: dict) -> str:
    parts = [content_text(message.get("content"))] if message.get("content") else []
    parts += [tool_call_text(call) for call in message.get("tool_calls") or []]
    return "\n".join(parts)


def render_pieces(messages: list[dict], tools: list[dict] | None = None) -> list[tuple[str, bool]]:
    """The conversation as consecutive text pieces, each flagged True when training may learn it.

    Trainable: the content and closing `<|im_end|>` of every assistant message whose `weight` is not 0.
    `"".join(text for text, _ in render_pieces(m))` is `render(m, add_generation_prompt=False)`.

    >>> render_pieces([{"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}])[-2:]
    [('A<|im_end|>', True), ('\\n', False)]
    """
    messages = [{**m, "role": "system" if m.get("role") == "developer" else m.get("role")} for m in messages]
    if not messages or messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": DEFAULT_SYSTEM_PROMPT})
    pieces: list[tuple[str, bool]] = []
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "assistant":
            text = _assistant_text(message)
            pieces += [
                (f"{START}assistant\n", False),
                (text + END, message.get("weight", 1) != 0),
                ("\n", False),
            ]
            continue
        text = content_text(message.get("content"))
        if i == 0 and tools:
            text = f"{text}\n\n{_tools_text(tools)}" if text else _tools_text(tools)
        pieces.append((f"{START}{role}\n{text}{END}\n", False))
    return pieces


def render(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages` (and `tools`), ending with `<|im_start|>assistant\\n` when asked.

    >>> render([{"role": "user", "content": "Hi"}]).startswith(START + "system\\n" + DEFAULT_SYSTEM_PROMPT)
    True
    """
    text = "".join(piece for piece, _ in render_pieces(messages, tools))
    return text + f"{START}assistant\n" if add_generation_prompt else text
