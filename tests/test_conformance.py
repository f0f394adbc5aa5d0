"""Drop-in conformance: OpenAI client code as published notebooks write it, against the local server.

Every test goes through the real `openai` client to the session's real local server (issue 20).
"""

from __future__ import annotations

import base64
import enum
import json
import random
import struct

import openai
import pydantic
import pytest
from conftest import FT_EPOCHS, FT_EXAMPLES
from openai.types.chat.chat_completion import ChoiceLogprobs

from llmlab import finetune
from llmlab.tools import tool

MODEL = "gpt-4o-mini"
EXPENSE = [{"role": "user", "content": "Log my expense: a lunch for 12 EUR."}]


class Category(enum.Enum):
    FOOD = "food"
    TRAVEL = "travel"
    OFFICE = "office"


class Amount(pydantic.BaseModel):
    value: float
    currency: str


class Expense(pydantic.BaseModel):
    """Log one expense."""

    category: Category
    amount: Amount


class Weather(pydantic.BaseModel):
    """The weather in a city."""

    city: str


class Task(pydantic.BaseModel):
    title: str
    subtasks: list[Task] = []


@tool
def log_expense(category: Category, amount: Amount) -> str:
    """Log one expense.

    Args:
        category: What kind of expense it is.
        amount: How much was paid.
    """
    return f"logged {amount.value} {amount.currency} for {category.value}"


@tool
def plan_task(task: Task) -> str:
    """Plan a task and its subtasks."""
    return task.title


def _named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


# -- 1. tool schemas with $defs / $ref ---------------------------------------------------------------------------
@pytest.mark.parametrize("tool_choice", ["required", "named", "auto"])
def test_pydantic_function_tool_with_defs(client, tool_choice):
    expense = openai.pydantic_function_tool(Expense, name="log_expense")
    weather = openai.pydantic_function_tool(Weather, name="get_weather")
    assert "$defs" in expense["function"]["parameters"]  # the SDK's own helper writes references
    kwargs = dict(
        model=MODEL,
        messages=EXPENSE,
        tools=[expense, weather],
        tool_choice=_named("log_expense") if tool_choice == "named" else tool_choice,
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=80,
    )
    if tool_choice == "auto":  # the model may answer in text, which parse() refuses when cut off
        choice = client.chat.completions.create(**kwargs).choices[0]
        models = {"log_expense": Expense, "get_weather": Weather}
        for call in choice.message.tool_calls or []:
            models[call.function.name].model_validate_json(call.function.arguments)
        assert choice.finish_reason in ("tool_calls", "stop", "length")
        return
    choice = client.chat.completions.parse(**kwargs).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        model = Expense if call.function.name == "log_expense" else Weather
        assert isinstance(call.function.parsed_arguments, model)
    if tool_choice == "named":
        assert choice.message.tool_calls[0].function.parsed_arguments.amount.currency


@pytest.mark.parametrize("tool_choice", ["required", "named", "auto"])
def test_tool_decorator_with_enum_nested_and_recursive_models(client, tool_choice):
    assert "$defs" in plan_task.parameters  # a recursive model keeps its references
    done = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Plan my move: pack boxes, then rent a van."}],
        tools=[log_expense.schema, plan_task.schema],
        tool_choice=_named("plan_task") if tool_choice == "named" else tool_choice,
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=60,
    )
    choice = done.choices[0]
    if tool_choice != "auto":
        assert choice.message.tool_calls
    if tool_choice == "named":
        assert choice.message.tool_calls[0].function.name == "plan_task"
    tools = {"log_expense": log_expense, "plan_task": plan_task}
    for call in choice.message.tool_calls or []:
        if choice.finish_reason == "tool_calls":
            tools[call.function.name].validate(call.function.arguments)  # raises when invalid


def test_response_format_with_defs(client):
    done = client.chat.completions.parse(
        model=MODEL, messages=EXPENSE, response_format=Expense, temperature=0, max_tokens=60
    )
    assert isinstance(done.choices[0].message.parsed, Expense)


def test_a_schema_the_grammar_cannot_take_is_a_400_naming_the_tool(client):
    remote = {"type": "object", "properties": {"x": {"$ref": "https://example.com/schema.json"}}}
    tools = [
        openai.pydantic_function_tool(Weather, name="get_weather"),
        {"type": "function", "function": {"name": "fetch_remote", "parameters": remote}},
    ]
    for tool_choice in ("auto", "required", "none"):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model=MODEL, messages=EXPENSE, tools=tools, tool_choice=tool_choice, max_tokens=5
            )
        assert "fetch_remote" in caught.value.message
        assert caught.value.body["param"] == "tools[1].function.parameters"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL,
            messages=EXPENSE,
            max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "remote", "schema": remote}},
        )
    assert caught.value.body["param"] == "response_format.json_schema.schema"
    ok = client.chat.completions.create(model=MODEL, messages=EXPENSE, max_tokens=2)  # still serving
    assert ok.choices[0].message.content


# -- 2. the fine-tuning job's result file --------------------------------------------------------------------
def test_result_file_is_base64_as_openai_serves_it(client, lab, finetuned):
    (result,) = finetuned.result_files
    assert client.files.retrieve(result).filename == "step_metrics.csv"
    csv = base64.b64decode(client.files.content(result).content, validate=True).decode("utf-8")
    lines = csv.splitlines()
    steps = (FT_EXAMPLES // 2) * FT_EPOCHS
    assert lines[0].startswith("step,") and len(lines) == steps + 1
    table = finetune.results(lab, finetuned.id)
    assert table["step"].tolist() == list(range(1, steps + 1))
    assert table["train_loss"].iloc[-1] < table["train_loss"].iloc[0]


# -- 3. max_tokens: cut-off tool calls, usage never above the limit ------------------------------------------
class Clock(pydantic.BaseModel):
    """The local time in a city."""

    city: str
    hours_24: bool


WEATHER_TOOLS = [  # no $defs here: these tests are about max_tokens alone
    openai.pydantic_function_tool(Weather, name="get_weather"),
    openai.pydantic_function_tool(Clock, name="get_time"),
]


def _streamed(chunks: list) -> tuple[dict, str | None, object]:
    """(tool calls by index as {name, arguments}, finish_reason, usage) of a streamed completion."""
    calls: dict[int, dict] = {}
    finish, usage = None, None
    for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                call["name"] += (delta.function.name or "") if delta.function else ""
                call["arguments"] += (delta.function.arguments or "") if delta.function else ""
    return calls, finish, usage


def test_a_tool_call_cut_off_by_max_tokens_comes_back_partial(client):
    names = {t["function"]["name"] for t in WEATHER_TOOLS}
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    for max_tokens in (1, 4, 16):
        kwargs = dict(model=MODEL, messages=messages, tools=WEATHER_TOOLS, tool_choice="required")
        done = client.chat.completions.create(**kwargs, temperature=0, max_tokens=max_tokens)
        choice = done.choices[0]
        assert choice.finish_reason == "length"
        (call,) = choice.message.tool_calls
        assert call.function.name in names and call.id.startswith("call_")
        assert done.usage.completion_tokens <= max_tokens
        chunks = list(
            client.chat.completions.create(
                **kwargs,
                temperature=0,
                max_tokens=max_tokens,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        calls, finish, usage = _streamed(chunks)
        assert finish == "length" and calls[0]["name"] == call.function.name
        assert calls[0]["arguments"] == call.function.arguments
        assert usage.completion_tokens <= max_tokens


def test_completion_tokens_never_exceed_the_limit(client):
    """A property over many requests: varied small limits, with and without tools, streamed or not."""
    rng = random.Random(20)
    questions = ["What is the weather in Oslo?", "Log a 5 EUR coffee.", "Tell me a joke.", "Hi!"]
    for _ in range(20):
        limit = rng.randint(1, 9)
        kwargs = {
            "model": MODEL,
            "messages": [{"role": "user", "content": rng.choice(questions)}],
            rng.choice(["max_tokens", "max_completion_tokens"]): limit,
            "temperature": rng.choice([0, 1.0]),
            "seed": rng.randint(0, 1000),
        }
        choice = rng.choice([None, "auto", "none", "required", _named("get_weather")])
        if choice is not None:
            kwargs |= {"tools": WEATHER_TOOLS, "tool_choice": choice}
        n = 1 if choice is not None else rng.choice([1, 2])
        if n == 1 and rng.random() < 0.5:
            chunks = list(
                client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
            )
            calls, finish, usage = _streamed(chunks)
        else:
            done = client.chat.completions.create(**kwargs, n=n)
            usage, finish = done.usage, done.choices[0].finish_reason
            calls = done.choices[0].message.tool_calls
        assert usage.completion_tokens <= n * limit, (kwargs, usage)
        if choice in ("required",) or isinstance(choice, dict):
            assert calls, kwargs  # a forced call is never lost, however short the limit
            assert finish in ("tool_calls", "length")


# -- 4. the default cap is documented ---------------------------------------------------------------------
def test_default_max_tokens_is_shown_in_the_models_list(client):
    chat = client.models.retrieve(MODEL)
    assert chat.model_extra["default_max_tokens"] == 512
    listed = {m.id: m for m in client.models.list()}
    assert listed[chat.id].model_extra["default_max_tokens"] == 512


# -- 5. logprobs, legacy functions, embeddings limits ---------------------------------------------------------
def test_logprobs_and_top_logprobs_streamed_and_not(client):
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Name three colours."}],
        temperature=0,
        max_tokens=8,
        logprobs=True,
        top_logprobs=3,
    )
    done = client.chat.completions.create(**kwargs)
    choice = done.choices[0]
    assert isinstance(choice.logprobs, ChoiceLogprobs)
    tokens = choice.logprobs.content
    assert "".join(t.token for t in tokens) == choice.message.content
    assert len(tokens) == done.usage.completion_tokens
    for t in tokens:
        assert bytes(t.bytes).decode("utf-8") == t.token and t.logprob <= 0
        top = [alt.logprob for alt in t.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True)
        assert t.top_logprobs[0].token == t.token  # greedy picks the likeliest token
    streamed = [
        t
        for chunk in client.chat.completions.create(**kwargs, stream=True)
        for c in chunk.choices
        if c.logprobs and c.logprobs.content
        for t in c.logprobs.content
    ]
    assert [t.token for t in streamed] == [t.token for t in tokens]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in tokens], abs=1e-4)
    plain = client.chat.completions.create(**{**kwargs, "logprobs": None, "top_logprobs": None})
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**{**kwargs, "logprobs": False})
    assert caught.value.body["param"] == "top_logprobs"


LEGACY_FUNCTIONS = [
    {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
]


def test_legacy_functions_answer_in_the_legacy_shape(client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    kwargs = dict(model=MODEL, functions=LEGACY_FUNCTIONS, temperature=0, max_tokens=40)
    done = client.chat.completions.create(messages=messages, function_call={"name": "get_weather"}, **kwargs)
    choice = done.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.tool_calls is None
    assert choice.message.function_call.name == "get_weather"
    assert "city" in json.loads(choice.message.function_call.arguments)
    chunks = list(
        client.chat.completions.create(
            messages=messages, function_call={"name": "get_weather"}, stream=True, **kwargs
        )
    )
    calls = [
        c.choices[0].delta.function_call for c in chunks if c.choices and c.choices[0].delta.function_call
    ]
    assert calls[0].name == "get_weather"
    assert "".join(c.arguments or "" for c in calls) == choice.message.function_call.arguments
    assert chunks[-1].choices[0].finish_reason == "function_call"
    turn = [
        *messages,
        choice.message.model_dump(exclude_none=True),
        {"role": "function", "name": "get_weather", "content": "Sunny, 21 C"},
    ]
    answer = client.chat.completions.create(messages=turn, function_call="none", **kwargs).choices[0]
    assert answer.finish_reason in ("stop", "length") and answer.message.content
    assert answer.message.function_call is None
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(messages=messages, tools=WEATHER_TOOLS, **kwargs)
    assert caught.value.body["param"] == "functions"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=messages, function_call={"name": "get_weather"}, max_tokens=5
        )
    assert caught.value.body["param"] == "function_call"


def test_embeddings_refuse_inputs_over_openais_limit_and_truncate_at_256_word_pieces(client):
    model = "text-embedding-3-small"
    too_long = "alpha beta gamma delta " * 2100  # 8,400 tokens
    for given, param in ((too_long, "input"), (["fine", too_long], "input[1]")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.embeddings.create(model=model, input=given)
        assert caught.value.body["param"] == param and "8191" in caught.value.message
    words = [f"w{i}" for i in range(400)]
    head = " ".join(words[:300])  # well over 256 word pieces: the rest is never read
    a, b = client.embeddings.create(model=model, input=[f"{head} apples", f"{head} rockets"]).data
    assert a.embedding == b.embedding


# -- 6. the server's own dicts are the SDK's types -------------------------------------------------------------
# The server builds its chat, embedding and model answers as dicts, without the SDK (a cold start's second):
# each shape it answers must parse as the SDK's type, every field in it one the SDK declares, nothing lost.
CHAT_SHAPES = {
    "plain, two choices, log-probs": {
        "n": 2,
        "seed": 1,
        "max_tokens": 4,
        "logprobs": True,
        "top_logprobs": 2,
    },
    "JSON schema": {
        "max_tokens": 16,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "w", "schema": Weather.model_json_schema()},
        },
    },
    "tool calls": {"max_tokens": 30, "tools": WEATHER_TOOLS, "tool_choice": "required", "logprobs": True},
    "legacy function call": {
        "max_tokens": 30,
        "functions": LEGACY_FUNCTIONS,
        "function_call": {"name": "get_weather"},
    },
}


def _undeclared(value: object, path: str = "") -> list[str]:
    """Where in a parsed SDK object a field sits that its type does not declare (the SDK's models keep them)."""
    if isinstance(value, pydantic.BaseModel):
        found = [f"{path}.{key}" for key in value.model_extra or {}]
        for name in type(value).model_fields:
            found += _undeclared(getattr(value, name), f"{path}.{name}")
        return found
    if isinstance(value, list):
        return [p for i, item in enumerate(value) for p in _undeclared(item, f"{path}[{i}]")]
    return []


def assert_sdk_shape(sdk_type: type[pydantic.BaseModel], body: dict, extra: tuple[str, ...] = ()) -> None:
    """`body` parses as `sdk_type`, declares no field the SDK does not (but `extra`), and loses nothing."""
    parsed = sdk_type.model_validate(body)
    assert _undeclared(parsed) == list(extra), body
    assert parsed.model_dump(mode="json", exclude_unset=True) == body


@pytest.mark.parametrize("shape", sorted(CHAT_SHAPES))
@pytest.mark.parametrize("stream", [False, True])
def test_chat_answers_are_the_sdks_types(http, base_url, shape, stream):
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    body = {"model": MODEL, "messages": messages, "temperature": 0, **CHAT_SHAPES[shape]}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}, "n": 1}  # a stream has one choice
    response = http.post(f"{base_url}/chat/completions", json=body)
    assert response.status_code == 200, response.text
    if not stream:
        return assert_sdk_shape(ChatCompletion, response.json())
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 3
    for event in events[:-1]:
        assert_sdk_shape(ChatCompletionChunk, json.loads(event))


ENCODINGS = ("float", "base64")


def test_embeddings_models_and_deletions_are_the_sdks_types(client, http, base_url):
    from openai.types import CreateEmbeddingResponse, FileDeleted, Model

    body = {"model": "text-embedding-3-small", "input": ["Hi", "there"]}
    answers = {
        e: http.post(f"{base_url}/embeddings", json={**body, "encoding_format": e}).json() for e in ENCODINGS
    }
    for item in answers["base64"]["data"]:  # the SDK decodes base64 itself: its type holds the floats
        raw = base64.b64decode(item["embedding"])
        item["embedding"] = list(struct.unpack(f"<{len(raw) // 4}f", raw))
    for answer in answers.values():
        assert_sdk_shape(CreateEmbeddingResponse, answer)
    listed = http.get(f"{base_url}/models").json()
    assert listed["object"] == "list" and len(listed["data"]) >= 2
    for model in [*listed["data"], http.get(f"{base_url}/models/{MODEL}").json()]:
        assert_sdk_shape(Model, model, (".default_max_tokens",) if "default_max_tokens" in model else ())
    uploaded = client.files.create(file=("note.txt", b"data"), purpose="user_data")
    assert_sdk_shape(FileDeleted, http.delete(f"{base_url}/files/{uploaded.id}").json())
