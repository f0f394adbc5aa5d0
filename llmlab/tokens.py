"""Exact OpenAI token counts, offline, and the dated price table behind cost estimates.

Token counts use the `bpe-openai` package, which ships OpenAI's ``o200k_base`` (gpt-4o, gpt-4.1, o-series)
and ``cl100k_base`` (gpt-4, gpt-3.5-turbo, embeddings) vocabularies, so nothing is downloaded (tiktoken
fetches its files over the network on first use). Its token ids are tiktoken's.

>>> count_tokens("tiktoken is great!")
6
>>> count_chat_tokens([{"role": "user", "content": "hello world"}])
9
>>> default_epochs(10)
10
>>> round(chat_cost("gpt-4o-mini", input_tokens=1_000_000, output_tokens=0), 2)
0.15
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from llmlab.openai_facts import CHAT_MODEL, FINE_TUNABLE_SNAPSHOTS, base_model, text_parts, undated

if TYPE_CHECKING:  # bpe_openai loads a large native library: import it only when counting
    from bpe_openai import Encoding

DEFAULT_MODEL = CHAT_MODEL  # the model whose tokens are counted when none is named

# Model-name prefixes -> encoding, longest prefix wins ("gpt-4o" before "gpt-4").
_ENCODING_PREFIXES: dict[str, str] = {
    "gpt-4o": "o200k_base",
    "chatgpt-4o": "o200k_base",
    "gpt-4.1": "o200k_base",
    "gpt-4.5": "o200k_base",
    "gpt-5": "o200k_base",
    "o1": "o200k_base",
    "o3": "o200k_base",
    "o4": "o200k_base",
    "gpt-4": "cl100k_base",
    "gpt-3.5": "cl100k_base",
    "gpt-35": "cl100k_base",
    "text-embedding-3": "cl100k_base",
    "text-embedding-ada-002": "cl100k_base",
    "davinci-002": "cl100k_base",
    "babbage-002": "cl100k_base",
}
ENCODINGS = ("o200k_base", "cl100k_base")


class UnknownModelError(ValueError):
    """A model name that the token counter or the price table does not know."""


def encoding_name_for(model: str) -> str:
    """The encoding OpenAI uses for `model` (an encoding name is accepted too).

    >>> encoding_name_for("gpt-3.5-turbo-0125"), encoding_name_for("ft:gpt-4o-mini:acme::x1")
    ('cl100k_base', 'o200k_base')
    """
    name = base_model(model).lower()
    if name in ENCODINGS:
        return name
    for prefix in sorted(_ENCODING_PREFIXES, key=len, reverse=True):
        if name.startswith(prefix):
            return _ENCODING_PREFIXES[prefix]
    known = ", ".join(sorted(_ENCODING_PREFIXES))
    raise UnknownModelError(f"No OpenAI tokenizer known for model {model!r}; known model families: {known}")


@cache
def _encoding(name: str) -> Encoding:
    import bpe_openai

    return bpe_openai.get_encoding(name)


@cache
def _counter(name: str):
    """The native tokenizer's `count(text) -> int`: the same number as ``len(encode_ordinary(text))``.

    The one use of a private module of `bpe-openai` (0.1.4), kept here alone, because its public API is not
    a substitute: it counts only by building the token list (`Encoding.encode_ordinary`: 1.4-1.6x slower on
    long texts, measured here), and it refuses texts of 1,000,000 characters or more ("Input too long to
    encode safely") and of more than 200,000 tokens, which a token count of a whole file must not do.
    tests/test_tokens.py compares the counts with the public `encode_ordinary`, and fails by name if a
    release drops `_bindings`; this is then the line to change.
    """
    from bpe_openai import _bindings  # private: the Rust tokenizer without the list-building wrapper

    return _bindings.tokenizer_for_encoding(name).count


def encoding_for(model: str = DEFAULT_MODEL) -> Encoding:
    """A tiktoken-compatible `Encoding` (encode/decode) for `model`, loaded offline.

    >>> enc = encoding_for("gpt-4o-mini")
    >>> enc.name, enc.decode(enc.encode("hello world"))
    ('o200k_base', 'hello world')
    """
    return _encoding(encoding_name_for(model))


def _count(text: str, encoding: str) -> int:
    try:
        return _counter(encoding)(text)
    except UnicodeEncodeError:  # a lone surrogate ("\\ud800" in JSON) is not UTF-8: count it as "?"
        return _counter(encoding)(text.encode("utf-8", "replace").decode("utf-8"))


def count_tokens(text: str, model: str = DEFAULT_MODEL) -> int:
    """Exact number of tokens in `text` for `model`; special-token strings count as plain text, as in the API.

    >>> count_tokens("hello world"), count_tokens("hello world", "gpt-4")
    (2, 2)
    """
    return _count(text, encoding_name_for(model))


TOKENS_PER_MESSAGE = 3  # <|start|>{role/name}<|message|>{content}<|end|>
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3  # every reply is primed with <|start|>assistant<|message|>
TOKENS_PER_TOOL_CALL = 3  # approximation: OpenAI has not published how tool calls are rendered


def _tool_call_tokens(tool_calls: Any, encoding: str) -> int:
    total = 0
    for call in tool_calls if isinstance(tool_calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            total += TOKENS_PER_TOOL_CALL
            for key in ("name", "arguments"):
                if isinstance(function.get(key), str):
                    total += _count(function[key], encoding)
    return total


def message_token_counts(message: Mapping[str, Any], encoding: str) -> tuple[int, int]:
    """(tokens the message adds to a prompt, tokens of what it says) for one chat message.

    The first follows the Cookbook (3 per message, every string value, 1 per name); the second counts only
    its text content and tool calls (what training learns from an assistant message).
    """
    said, other = 0, TOKENS_PER_MESSAGE
    for key, value in message.items():
        if key == "content":
            if isinstance(value, str):
                said += _count(value, encoding)
            elif isinstance(value, list):  # content parts: only the text parts are counted
                said += sum(_count(text, encoding) for text in text_parts(value))
        elif key == "tool_calls":
            said += _tool_call_tokens(value, encoding)
        elif isinstance(value, str) and key != "weight":
            other += _count(value, encoding) + (TOKENS_PER_NAME if key == "name" else 0)
    return said + other, said


def message_tokens(message: Mapping[str, Any], encoding: str) -> int:
    """Tokens one chat message adds to a prompt, with the Cookbook's 3-per-message and 1-per-name rule."""
    return message_token_counts(message, encoding)[0]


# The Cookbook's tool-definition rule, fitted to the API's prompt_tokens (gpt-4o family / gpt-4, gpt-3.5).
_FUNC_INIT = {"o200k_base": 7, "cl100k_base": 10}
_PROP_INIT, _PROP_KEY, _ENUM_INIT, _ENUM_ITEM, _FUNC_END = 3, 3, -3, 3, 12


def tools_tokens(tools: Iterable[Mapping[str, Any]] | None, encoding: str) -> int:
    """Tokens that a `tools` list adds to a prompt (OpenAI Cookbook approximation; exact for flat schemas).

    Nested object properties are counted by their name, type and description only.
    """
    tools = [t for t in tools or () if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    if not tools:
        return 0
    total = _FUNC_END
    for tool in tools:
        function = tool["function"]
        description = str(function.get("description") or "").removesuffix(".")
        total += _FUNC_INIT[encoding] + _count(f"{function.get('name', '')}:{description}", encoding)
        parameters = function.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, dict) else None
        if not isinstance(properties, dict) or not properties:
            continue
        total += _PROP_INIT
        for key, prop in properties.items():
            prop = prop if isinstance(prop, dict) else {}
            total += _PROP_KEY
            enum = prop.get("enum")
            if isinstance(enum, list):
                total += _ENUM_INIT + sum(_ENUM_ITEM + _count(str(item), encoding) for item in enum)
            p_desc = str(prop.get("description") or "").removesuffix(".")
            total += _count(f"{key}:{prop.get('type', '')}:{p_desc}", encoding)
    return total


def count_chat_tokens(
    messages: Iterable[Mapping[str, Any]],
    model: str = DEFAULT_MODEL,
    tools: Iterable[Mapping[str, Any]] | None = None,
) -> int:
    """Prompt tokens of a chat request, as OpenAI's Cookbook counts them (3 per message, 1 per name, 3 priming).

    Matches the API's `usage.prompt_tokens` for plain messages; tool definitions use the Cookbook's fitted
    rule, and assistant `tool_calls` count their name and arguments plus 3 each (an approximation).

    >>> count_chat_tokens([{"role": "user", "content": "hello world"}], model="gpt-4")
    9
    """
    encoding = encoding_name_for(model)
    total = REPLY_PRIMING + tools_tokens(tools, encoding)
    return total + sum(message_tokens(m, encoding) for m in messages if isinstance(m, dict))


# ---------------------------------------------------------------------------------------------- prices

PRICES_DATE = "2025-06-01"
PRICES_SOURCE = "https://openai.com/api/pricing (standard tier, USD per 1M tokens)"


@dataclass(frozen=True)
class ModelPrice:
    """USD per 1M tokens. `training` is None when the model cannot be fine-tuned; `output` None for embeddings.

    `ft_input`/`ft_output` price a model fine-tuned from this one; `training_context` is the most tokens
    per training example (longer ones are truncated).
    """

    model: str
    input: float
    output: float | None = None
    training: float | None = None
    ft_input: float | None = None
    ft_output: float | None = None
    training_context: int | None = None
    date: str = PRICES_DATE


PRICES: dict[str, ModelPrice] = {
    p.model: p
    for p in (
        ModelPrice(
            "gpt-4o-mini", 0.15, 0.60, training=3.00, ft_input=0.30, ft_output=1.20, training_context=65_536
        ),
        ModelPrice(
            "gpt-4o", 2.50, 10.00, training=25.00, ft_input=3.75, ft_output=15.00, training_context=65_536
        ),
        ModelPrice(
            "gpt-4.1", 2.00, 8.00, training=25.00, ft_input=3.00, ft_output=12.00, training_context=65_536
        ),
        ModelPrice(
            "gpt-4.1-mini", 0.40, 1.60, training=5.00, ft_input=0.80, ft_output=3.20, training_context=65_536
        ),
        ModelPrice(
            "gpt-4.1-nano", 0.10, 0.40, training=1.50, ft_input=0.20, ft_output=0.80, training_context=65_536
        ),
        ModelPrice(
            "gpt-3.5-turbo", 0.50, 1.50, training=8.00, ft_input=3.00, ft_output=6.00, training_context=16_385
        ),
        ModelPrice("text-embedding-3-small", 0.02),
        ModelPrice("text-embedding-3-large", 0.13),
        ModelPrice("text-embedding-ada-002", 0.10),
    )
}


def price_for(model: str) -> ModelPrice:
    """The price of `model` from the dated table; a fine-tuned model (``ft:…``) gets its base's fine-tuned prices.

    >>> price_for("gpt-4o-mini-2024-07-18").training
    3.0
    >>> price_for("ft:gpt-4o-mini-2024-07-18:acme::abc").input
    0.3
    """
    name = base_model(model)
    key = FINE_TUNABLE_SNAPSHOTS.get(name) or (name if name in PRICES else undated(name))
    if key not in PRICES:
        known = ", ".join([*PRICES, *FINE_TUNABLE_SNAPSHOTS])
        raise UnknownModelError(
            f"No price for model {model!r} (table of {PRICES_DATE}); known models: {known}"
        )
    price = PRICES[key]
    if name == model:
        return price
    if price.training is None:
        raise UnknownModelError(f"{base_model(model)!r} cannot be fine-tuned, so {model!r} has no price")
    return ModelPrice(
        model,
        price.ft_input,
        price.ft_output,
        training=price.training,
        training_context=price.training_context,
    )


def chat_cost(model: str, input_tokens: int, output_tokens: int = 0) -> float:
    """USD for a chat call of `model` (fine-tuned ``ft:…`` names are priced as fine-tuned models).

    >>> chat_cost("gpt-4o-mini", 2_000, 500)
    0.0006
    """
    price = price_for(model)
    if price.output is None:
        raise UnknownModelError(f"{model!r} is an embedding model; use embedding_cost()")
    return round((input_tokens * price.input + output_tokens * price.output) / 1e6, 10)


def embedding_cost(model: str, tokens: int) -> float:
    """USD for embedding `tokens` tokens with `model`.

    >>> embedding_cost("text-embedding-3-small", 1_000_000)
    0.02
    """
    return round(tokens * price_for(model).input / 1e6, 10)


def training_cost(model: str, billed_tokens: int) -> float:
    """USD to train `billed_tokens` (tokens per epoch × epochs) on `model`.

    >>> training_cost("gpt-4o-mini-2024-07-18", 1_000_000)
    3.0
    """
    price = price_for(model)
    if price.training is None:
        raise UnknownModelError(
            f"{model!r} cannot be fine-tuned; fine-tunable: {', '.join(FINE_TUNABLE_SNAPSHOTS)}"
        )
    return round(billed_tokens * price.training / 1e6, 10)


# ------------------------------------------------------------------------------- epochs (OpenAI Cookbook)

TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
MIN_DEFAULT_EPOCHS = 1
MAX_DEFAULT_EPOCHS = 25
MAX_TOKENS_PER_EXAMPLE = 16_385  # the Cookbook's per-example cap when the model's context is unknown


def default_epochs(n_examples: int) -> int:
    """The epochs OpenAI picks for ``n_epochs="auto"``: 3, raised toward 100 example-passes, lowered past 25,000.

    >>> [default_epochs(n) for n in (1, 10, 34, 100, 10_000, 100_000)]
    [25, 10, 3, 3, 2, 1]
    """
    if n_examples <= 0:
        raise ValueError("default_epochs needs at least one example")
    if n_examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_DEFAULT_EPOCHS, math.ceil(MIN_TARGET_EXAMPLES / n_examples))
    if n_examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(MIN_DEFAULT_EPOCHS, MAX_TARGET_EXAMPLES // n_examples)
    return TARGET_EPOCHS


def billed_tokens(
    example_tokens: Iterable[int], n_epochs: int, max_tokens: int = MAX_TOKENS_PER_EXAMPLE
) -> int:
    """Tokens charged for training: each example capped at `max_tokens`, times the epochs.

    >>> billed_tokens([100, 20_000], n_epochs=2)
    32970
    """
    return sum(min(max_tokens, t) for t in example_tokens) * n_epochs
