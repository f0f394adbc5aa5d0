"""Function calling: schemas from Python functions, the `run` loop, and tool calls on the local server."""

from __future__ import annotations

import enum
import json
from typing import Annotated, Literal

import httpx
import openai
import pytest
from pydantic import AfterValidator, BaseModel
from typing_extensions import TypedDict

from llmlab.tools import Tool, parse_docstring, run, strict_mode_problems, tool

# ---------------------------------------------------------------- schema generation (pure, fast)


def params(fn) -> dict:
    return tool(fn).schema["function"]["parameters"]


class Unit(enum.Enum):
    celsius = "celsius"
    fahrenheit = "fahrenheit"


class Period(BaseModel):
    start: str
    days: int


class Point(TypedDict):
    x: float
    y: float


class Node(BaseModel):
    name: str
    children: list[Node] = []


def test_scalar_types_and_required():
    def f(s: str, i: int, x: float, b: bool, opt: str = "a"):
        pass

    p = params(f)
    assert {k: v["type"] for k, v in p["properties"].items()} == {
        "s": "string",
        "i": "integer",
        "x": "number",
        "b": "boolean",
        "opt": "string",
    }
    assert p["required"] == ["s", "i", "x", "b"]
    assert p["properties"]["opt"]["default"] == "a"
    assert p["type"] == "object" and p["additionalProperties"] is False


def test_literal_enum_optional_list():
    def f(mode: Literal["fast", "slow"], unit: Unit, limit: int | None = None, tags: list[str] | None = None):
        pass

    p = params(f)["properties"]
    assert p["mode"] == {"enum": ["fast", "slow"], "type": "string"}
    assert p["unit"] == {"enum": ["celsius", "fahrenheit"], "type": "string"}
    assert p["limit"]["anyOf"] == [{"type": "integer"}, {"type": "null"}]
    assert p["tags"]["anyOf"][0] == {"type": "array", "items": {"type": "string"}}


def test_pydantic_model_and_typeddict_are_inlined():
    def f(period: Period, point: Point):
        pass

    p = params(f)
    assert "$defs" not in p and "$ref" not in json.dumps(p)
    assert p["properties"]["period"]["properties"] == {
        "start": {"type": "string"},
        "days": {"type": "integer"},
    }
    assert p["properties"]["period"]["required"] == ["start", "days"]
    assert p["properties"]["point"]["properties"]["x"] == {"type": "number"}


def test_recursive_model_keeps_defs():
    def f(tree: Node):
        pass

    p = params(f)
    assert p["properties"]["tree"] == {"$ref": "#/$defs/Node"}
    assert p["$defs"]["Node"]["properties"]["children"]["items"] == {"$ref": "#/$defs/Node"}


def test_google_docstring_descriptions():
    @tool
    def leave_balance(employee: str, year: int = 2026) -> int:
        """Days of leave an employee has left.

        Longer explanation that is not part of the summary.

        Args:
            employee: Full name, e.g. "Ada Park".
            year (int): Calendar year,
                defaults to this year.

        Returns:
            The number of days.
        """
        return 12

    fn = leave_balance.schema["function"]
    assert leave_balance.schema["type"] == "function"
    assert fn["name"] == "leave_balance" and fn["description"] == "Days of leave an employee has left."
    assert fn["parameters"]["properties"]["employee"]["description"] == 'Full name, e.g. "Ada Park".'
    assert fn["parameters"]["properties"]["year"]["description"] == "Calendar year, defaults to this year."
    assert leave_balance("Ada") == 12  # still callable like the function


def test_numpy_docstring_descriptions():
    summary, described = parse_docstring(
        """Convert a temperature.

        Parameters
        ----------
        value : float
            The temperature.
        unit : str
            Target unit.
        """
    )
    assert summary == "Convert a temperature."
    assert described == {"value": "The temperature.", "unit": "Target unit."}


def test_decorator_with_options_and_var_args_rejected():
    @tool(name="lookup", description="Find it.")
    def f(q: str):
        return q

    assert (f.name, f.schema["function"]["description"]) == ("lookup", "Find it.")
    with pytest.raises(TypeError, match=r"\*args"):
        tool(lambda *xs: None)


def test_validate_converts_and_reports():
    def f(period: Period, unit: Unit = Unit.celsius) -> str:
        return f"{period.days} {unit.value}"

    t = Tool(f)
    assert t.invoke('{"period": {"start": "2026-01-05", "days": 3}, "unit": "fahrenheit"}') == "3 fahrenheit"
    with pytest.raises(ValueError, match="period.days"):
        t.validate({"period": {"start": "x", "days": "many"}})
    with pytest.raises(ValueError, match="not valid JSON"):
        t.validate("{oops")
    with pytest.raises(ValueError, match="Extra inputs"):
        t.validate({"period": {"start": "x", "days": 1}, "colour": "red"})


DEEP_JSON = '{"q": ' + "[" * 5000 + "]" * 5000 + "}"  # RecursionError in json.loads
LONG_NUMBER_JSON = '{"q": ' + "7" * 5000 + "}"  # ValueError: more digits than int() reads


@pytest.mark.parametrize(
    ("arguments", "match"),
    [(DEEP_JSON, "nested too deeply"), (LONG_NUMBER_JSON, "too many digits"), ('{"q": [1,,2]}', "column 10")],
)
def test_unreadable_json_arguments_are_a_clear_error(arguments, match):
    def echo(q: object = None) -> str:
        return "ran"

    with pytest.raises(ValueError, match=rf"not valid JSON \(.*{match}"):
        tool(echo).invoke(arguments)
    assert tool(echo).invoke('{"q": [[1]]}') == "ran"


def test_positional_only_parameters_are_supported():
    def scale(value: float, /, factor: float = 2.0) -> float:
        """Scale a value."""
        return value * factor

    t = tool(scale)
    assert t.parameters["required"] == ["value"] and set(t.parameters["properties"]) == {"value", "factor"}
    assert t.invoke('{"value": 3}') == 6.0
    assert t.invoke({"factor": 10, "value": 0.5}) == 5.0
    assert t(4, factor=0.5) == 2.0  # still callable as the plain function


def test_unresolvable_annotation_is_a_clear_error_naming_the_function():
    def book_room(room: NoSuchRoom, when: str) -> str:  # noqa: F821 (the defect under test)
        return "booked"

    with pytest.raises(TypeError, match=r"book_room.*cannot be resolved.*NoSuchRoom"):
        tool(book_room)

    def only_the_return_type_is_unknown(when: str) -> NoSuchReceipt:  # noqa: F821
        return when

    assert tool(only_the_return_type_is_unknown).invoke('{"when": "now"}') == "now"


# ---------------------------------------------------------------- the OpenAI-specific path, mocked
# OpenAI's servers cannot be reached from here (no internet), so this test plays them with an httpx
# MockTransport that answers with the exact JSON shape OpenAI returns for parallel tool calls.


def _completion(message: dict, finish_reason: str) -> dict:
    return {
        "id": "chatcmpl-123",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
        "usage": {"prompt_tokens": 80, "completion_tokens": 20, "total_tokens": 100},
    }


def test_run_parallel_tool_calls_against_openai_shape():
    requests: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        requests.append(body)
        if len(requests) == 1:
            calls = [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
                },
                {
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": 3}'},
                },
                {"id": "call_c", "type": "function", "function": {"name": "boom", "arguments": "{}"}},
            ]
            message = {"role": "assistant", "content": None, "tool_calls": calls, "refusal": None}
            return httpx.Response(200, json=_completion(message, "tool_calls"))
        message = {"role": "assistant", "content": "Oslo is 4 °C.", "refusal": None}
        return httpx.Response(200, json=_completion(message, "stop"))

    def weather(city: str) -> dict:
        """Current weather.

        Args:
            city: City name.
        """
        return {"city": city, "celsius": 4}

    def boom() -> str:
        raise RuntimeError("service down")

    client = openai.OpenAI(
        api_key="sk-test", http_client=httpx.Client(transport=httpx.MockTransport(handler))
    )
    lab = type("FakeLab", (), {"client": client, "chat_model": "gpt-4o-mini"})()
    result = run(
        lab, [{"role": "user", "content": "Weather in Oslo?"}], [weather, boom], tool_choice="required"
    )

    assert result.status == "completed" and result.content == "Oslo is 4 °C."
    first, second = requests
    assert first["tool_choice"] == "required" and second["tool_choice"] == "auto"
    assert first["tools"][0]["function"]["parameters"]["properties"]["city"]["description"] == "City name."
    tool_messages = [m for m in second["messages"] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_messages] == ["call_a", "call_b", "call_c"]
    assert json.loads(tool_messages[0]["content"]) == {"city": "Oslo", "celsius": 4}
    assert tool_messages[1]["content"].startswith("Error: invalid arguments for weather: city:")
    assert "RuntimeError: service down" in tool_messages[2]["content"]
    assert second["messages"][1]["tool_calls"][1]["id"] == "call_b"

    frame = result.trace.to_dataframe()
    assert list(frame["kind"]) == ["model", "tool", "tool", "tool", "model"]
    assert list(frame["round"]) == [1, 1, 1, 1, 2]
    assert frame["tokens"].sum() == 200
    assert frame["error"].notna().sum() == 2


def test_error_message_ends_in_one_full_stop():
    def handler(request: httpx.Request) -> httpx.Response:
        if len(json.loads(request.content)["messages"]) > 1:
            message = {"role": "assistant", "content": "Sorry."}
            return httpx.Response(200, json=_completion(message, "stop"))
        call = {"id": "call_x", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
        message = {"role": "assistant", "content": None, "tool_calls": [call]}
        return httpx.Response(200, json=_completion(message, "tool_calls"))

    def lookup() -> str:
        raise ValueError("nobody by that name. Use the full name.")

    client = openai.OpenAI(
        api_key="sk-test", http_client=httpx.Client(transport=httpx.MockTransport(handler))
    )
    lab = type("FakeLab", (), {"client": client, "chat_model": "gpt-4o-mini"})()
    result = run(lab, [{"role": "user", "content": "go"}], [lookup])
    assert result.messages[2]["content"] == (
        "Error: lookup raised ValueError: nobody by that name. Use the full name. "
        "Fix the arguments or answer without it."
    )


def test_run_reports_unreadable_arguments_and_calls_positional_only_tools():
    def handler(request: httpx.Request) -> httpx.Response:
        if len(json.loads(request.content)["messages"]) > 1:
            return httpx.Response(200, json=_completion({"role": "assistant", "content": "Done."}, "stop"))
        calls = [
            {"id": f"call_{i}", "type": "function", "function": {"name": "area", "arguments": arguments}}
            for i, arguments in enumerate(
                [
                    '{"width": ' + "[" * 5000 + "]" * 5000 + "}",
                    '{"width": ' + "9" * 5000 + "}",
                    '{"width": 3}',
                ]
            )
        ]
        message = {"role": "assistant", "content": None, "tool_calls": calls}
        return httpx.Response(200, json=_completion(message, "tool_calls"))

    def area(width: int, /, height: int = 2) -> int:
        return width * height

    client = openai.OpenAI(
        api_key="sk-test", http_client=httpx.Client(transport=httpx.MockTransport(handler))
    )
    lab = type("FakeLab", (), {"client": client, "chat_model": "gpt-4o-mini"})()
    result = run(lab, [{"role": "user", "content": "go"}], [area])
    assert result.status == "completed" and result.content == "Done."
    deep, digits, good = result.trace.tool_steps
    assert "nested too deeply" in deep.error and "too many digits" in digits.error
    assert good.error is None and good.result == "6"


def test_max_rounds_with_a_model_that_never_stops_calling():
    def handler(request: httpx.Request) -> httpx.Response:
        call = {"id": "call_x", "type": "function", "function": {"name": "ping", "arguments": "{}"}}
        message = {"role": "assistant", "content": None, "tool_calls": [call]}
        return httpx.Response(200, json=_completion(message, "tool_calls"))

    client = openai.OpenAI(
        api_key="sk-test", http_client=httpx.Client(transport=httpx.MockTransport(handler))
    )
    lab = type("FakeLab", (), {"client": client, "chat_model": "gpt-4o-mini"})()
    result = run(lab, [{"role": "user", "content": "go"}], [lambda: "pong"], max_rounds=3)
    assert result.status == "max_rounds"
    assert result.trace.to_dataframe()["kind"].tolist() == ["model", "tool"] * 3


# ---------------------------------------------------------------- the real local server


class Window(BaseModel):
    start: str
    days: int


def book_leave(
    employee: str, kind: Literal["annual", "sick", "parental"], hours: float, window: Window
) -> str:
    """Book leave for an employee.

    Args:
        employee: Full name of the employee.
        kind: The type of leave.
        hours: Hours per day.
        window: When the leave starts and how many days it lasts.
    """
    return f"booked {kind} leave for {employee}"


def weather(city: str) -> str:
    """Current weather in a city.

    Args:
        city: City name.
    """
    return f"Sunny in {city}, 21 degrees."


QUESTIONS = ["Please book 3 days of annual leave for Ada Park from 2026-03-02.", "Hello! How are you?"]


@pytest.fixture(scope="module")
def local_lab(lab):
    if lab.backend != "local":
        pytest.skip("needs the local backend")
    return lab


def _create(lab, content: str, tools, **kw):
    return lab.client.chat.completions.create(
        model=lab.chat_model,
        messages=[{"role": "user", "content": content}],
        tools=[tool(t).schema for t in tools],
        temperature=0,
        max_tokens=150,
        **{"parallel_tool_calls": False, **kw},
    )


def test_forced_named_call_has_valid_arguments(local_lab):
    response = _create(
        local_lab,
        QUESTIONS[0],
        [weather, book_leave],
        tool_choice={"type": "function", "function": {"name": "book_leave"}},
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls[:1]
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "book_leave"
    arguments = tool(book_leave).validate(call.function.arguments)  # raises if invalid
    assert arguments["kind"] in ("annual", "sick", "parental")
    assert isinstance(arguments["hours"], float) and isinstance(arguments["window"], Window)
    assert response.usage.completion_tokens > 0


@pytest.mark.parametrize("question", QUESTIONS)
def test_required_always_calls(local_lab, question):
    response = _create(local_lab, question, [weather, book_leave], tool_choice="required")
    message = response.choices[0].message
    assert response.choices[0].finish_reason == "tool_calls" and message.tool_calls
    for call in message.tool_calls:
        tool({"weather": weather, "book_leave": book_leave}[call.function.name]).validate(
            call.function.arguments
        )


@pytest.mark.parametrize("question", ["What is the weather in Paris? Use the weather tool.", QUESTIONS[0]])
def test_none_never_calls(local_lab, question):
    response = _create(local_lab, question, [weather, book_leave], tool_choice="none")
    assert not response.choices[0].message.tool_calls
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.choices[0].message.content


def test_auto_answers_or_calls_validly(local_lab):
    response = _create(local_lab, "What is the weather in Paris?", [weather], tool_choice="auto")
    choice = response.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        tool(weather).validate(choice.message.tool_calls[0].function.arguments)
    else:
        assert choice.finish_reason in ("stop", "length") and choice.message.content is not None


def test_streaming_tool_call_delta_shape(local_lab):
    stream = _create(local_lab, "Weather in Rome?", [weather], tool_choice="required", stream=True)
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    heads = [d.tool_calls[0] for d in deltas if d.tool_calls and d.tool_calls[0].id]
    assert heads and heads[0].index == 0 and heads[0].function.name == "weather"
    arguments = "".join(d.tool_calls[0].function.arguments or "" for d in deltas if d.tool_calls)
    tool(weather).validate(arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def _known_employee(name: str) -> str:
    if name != "Ada Park":
        raise ValueError("unknown employee; known employees: Ada Park")
    return name


def test_invalid_arguments_round_trip_recovers_or_stops_cleanly(local_lab):
    def leave_left(employee: Annotated[str, AfterValidator(_known_employee)]) -> int:
        """Days of leave left.

        Args:
            employee: Full name.
        """
        return 12

    result = run(
        local_lab,
        [{"role": "user", "content": "How many leave days does Bob have left?"}],
        [leave_left],
        tool_choice="required",
        max_rounds=3,
        temperature=0,
        max_tokens=150,
        parallel_tool_calls=False,
    )
    assert result.status in ("completed", "max_rounds")
    steps = result.trace.tool_steps
    if steps[0].error:  # the model did not guess the one known name: the error went back to it
        assert steps[0].error.startswith(
            "invalid arguments for leave_left: employee: Value error, unknown employee"
        )
        assert result.messages[2]["role"] == "tool" and result.messages[2]["content"].startswith("Error:")
    assert result.trace.to_dataframe()["kind"].iloc[-1] == (
        "model" if result.status == "completed" else "tool"
    )


def test_tool_that_raises_is_in_the_trace(local_lab):
    def flaky(city: str) -> str:
        """Weather that always fails.

        Args:
            city: City name.
        """
        raise ConnectionError("weather service unreachable")

    result = run(
        local_lab,
        [{"role": "user", "content": "Weather in Oslo?"}],
        [flaky],
        tool_choice="required",
        max_rounds=2,
        temperature=0,
        max_tokens=150,
        parallel_tool_calls=False,
    )
    step = result.trace.tool_steps[0]
    assert step.tool == "flaky" and step.result is None
    assert step.error == "flaky raised ConnectionError: weather service unreachable"
    assert "ConnectionError" in result.messages[2]["content"]


def test_max_rounds_is_honoured(local_lab):
    result = run(
        local_lab,
        [{"role": "user", "content": "Weather in Oslo?"}],
        [weather],
        tool_choice="required",
        max_rounds=1,
        temperature=0,
        max_tokens=150,
        parallel_tool_calls=False,
    )
    assert result.status == "max_rounds" and result.message.tool_calls
    frame = result.trace.to_dataframe()
    assert frame["kind"].tolist() == ["model"] + ["tool"] * len(result.message.tool_calls)
    assert frame["error"].isna().all() and frame["result"].iloc[-1].startswith("Sunny in")


# ---------------------------------------------------------------- the local backend's guards


def test_repeated_calls_of_a_turn_are_dropped():
    from llmlab.local import toolcalls

    syntax = toolcalls.call_syntax()
    a = '{"name": "find_employee", "arguments": {"name": "Yusuf Demir"}}'
    a_reordered = '{"arguments": {"name": "Yusuf Demir"}, "name": "find_employee"}'
    b = '{"name": "find_employee", "arguments": {"name": "Joost Smit"}}'
    text = syntax.separator.join([a, b, a_reordered]) + syntax.closer
    calls = toolcalls._parse_calls(text, syntax)
    assert [json.loads(c.arguments)["name"] for c in calls] == ["Yusuf Demir", "Joost Smit"]
    assert not toolcalls._repeats(a, syntax) and not toolcalls._repeats(a + syntax.separator + b, syntax)
    assert not toolcalls._repeats(a + syntax.separator + a[:-3], syntax)  # the repeat is not complete yet
    assert toolcalls._repeats(a + syntax.separator + a_reordered, syntax)


def test_answer_grammar_only_rules_out_a_leading_tag():
    import re

    from llmlab.local.toolcalls import ANSWER_GRAMMAR

    pattern = re.compile(ANSWER_GRAMMAR.removeprefix("start: /").removesuffix("/\n"))
    for text in ["", "Ruben Costa.", "  Yes.\nNo <b>tags</b> inside are fine", "{}"]:
        assert pattern.fullmatch(text), text
    for text in ["<tool_call>", "\n<tool_call>{}", "<tool_call_2>"]:
        assert not pattern.fullmatch(text), text


YUSUF = {"employee_id": "E016", "name": "Yusuf Demir", "team": "Data Platform", "manager": "Ruben Costa"}


def _after_a_tool_result(question: str = "Who is Yusuf Demir's manager?") -> list[dict]:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "find_employee", "arguments": '{"name": "Yusuf Demir"}'},
    }
    return [
        {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps(YUSUF)},
    ]


def find_employee(name: str) -> dict:
    """Look up an employee by name.

    Args:
        name: Full name of the employee.
    """
    return YUSUF


@pytest.mark.parametrize("tool_choice", ["none", "auto"])
def test_answer_after_a_tool_result_is_text(local_lab, tool_choice):
    # Before the answer grammar, the base model wrote another "<tool_call>" here and the answer was empty.
    response = local_lab.client.chat.completions.create(
        model=local_lab.chat_model,
        messages=_after_a_tool_result(),
        tools=[tool(find_employee).schema],
        tool_choice=tool_choice,
        temperature=0,
        max_tokens=40,
    )
    message = response.choices[0].message
    if message.tool_calls:  # "auto" may still decide to call, by the model's likelihood
        assert tool_choice == "auto" and response.choices[0].finish_reason == "tool_calls"
    else:
        assert message.content and message.content.strip() and not message.content.lstrip().startswith("<")


def test_parallel_calls_never_repeat_a_call(local_lab):
    # The base model repeats the same call until MAX_PARALLEL_CALLS; the backend stops at the first repeat.
    response = _create(
        local_lab,
        "Who is Yusuf Demir's manager?",
        [find_employee],
        tool_choice={"type": "function", "function": {"name": "find_employee"}},
        parallel_tool_calls=True,
    )
    calls = response.choices[0].message.tool_calls
    assert calls and response.choices[0].finish_reason == "tool_calls"
    keys = [(c.function.name, json.dumps(json.loads(c.function.arguments), sort_keys=True)) for c in calls]
    assert len(keys) == len(set(keys))
    assert response.usage.completion_tokens < 150  # stopped early, not at max_tokens


class _Room(BaseModel):
    name: str
    floor: int = 1


class _Booking(BaseModel):
    room: _Room
    hours: int | None = None


def test_strict_mode_problems_agree_with_the_sdks_strict_schemas():
    """A definition the SDK made strict (`openai.pydantic_function_tool`) passes; ours of the same shape names
    every object and property that strict mode would refuse, nested ones included."""
    assert strict_mode_problems(openai.pydantic_function_tool(_Booking)) == []

    def book(room: _Room, hours: int | None = None) -> str:
        """Book a room."""
        return "ok"

    assert strict_mode_problems(Tool(book).schema) == [
        "parameters: 'hours' is not in required (it has a default)",
        "parameters.room: additionalProperties is not false",
        "parameters.room: 'floor' is not in required (it has a default)",
    ]
    loose = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "object"}}}}
    assert strict_mode_problems({"parameters": loose}) == [
        "parameters: additionalProperties is not false",
        "parameters: 'tags' is not in required",
        "parameters.tags.items: additionalProperties is not false",
    ]
