"""Fernhollow's live-data tools (`llmlab.course.company`): schemas = data/tools.json, values = the employee table."""

from __future__ import annotations

import csv
import json

import httpx
import openai
import pytest

from llmlab.course import company, evaluation, questions
from llmlab.course.data import DATA_DIR
from llmlab.tools import Tool, run

TABLE = list(csv.DictReader((DATA_DIR / "employees.csv").open(encoding="utf-8")))


@pytest.fixture(autouse=True)
def free_rooms():
    company.reset_bookings()
    yield
    company.reset_bookings()


# ---------------------------------------------------------------- schemas


def test_company_tools_are_the_tools_of_data_tools_json():
    tools, definitions = company.company_tools(), company.tool_definitions()
    assert all(isinstance(t, Tool) for t in tools)
    assert [t.name for t in tools] == [d["function"]["name"] for d in definitions]
    for t, definition in zip(tools, definitions, strict=True):
        ours, theirs = t.schema["function"], definition["function"]
        assert json.dumps(ours["parameters"], sort_keys=True) == json.dumps(
            theirs["parameters"], sort_keys=True
        ), t.name
        assert ours["description"] == theirs["description"], t.name
        assert t.schema == definition


def test_tool_definitions_reads_data_tools_json():
    raw = json.loads((DATA_DIR / "tools.json").read_text(encoding="utf-8"))
    assert company.tool_definitions() == (raw["tools"] if isinstance(raw, dict) else raw)


# ---------------------------------------------------------------- the table


def test_employees_is_the_csv_and_a_copy():
    frame = company.employees()
    assert frame["name"].tolist() == [r["name"] for r in TABLE]
    frame.loc[0, "leave_days_left"] = -1
    assert company.employees().loc[0, "leave_days_left"] == int(TABLE[0]["leave_days_left"])


@pytest.mark.parametrize("row", TABLE, ids=[r["name"] for r in TABLE])
def test_get_leave_balance_returns_the_tables_values(row):
    assert company.get_leave_balance(row["name"]) == {
        "employee_name": row["name"],
        "leave_days_total": int(row["leave_days_total"]),
        "leave_days_taken": int(row["leave_days_taken"]),
        "leave_days_left": int(row["leave_days_left"]),
    }


@pytest.mark.parametrize("row", TABLE, ids=[r["name"] for r in TABLE])
def test_find_employee_returns_the_tables_values(row):
    found = company.find_employee(row["name"])
    expected = {k: row[k] or None for k in ("employee_id", "name", "team", "manager", "location", "laptop")}
    assert found == {**expected, "start_date": row["start_date"]}
    json.dumps(found)  # plain Python values, ready to go back to the model


def test_results_are_json_with_plain_types():
    leave = company.get_leave_balance("Kwame Mensah")
    assert all(type(leave[k]) is int for k in ("leave_days_total", "leave_days_taken", "leave_days_left"))
    assert company.find_employee("Joana Ribeiro")["manager"] is None  # the CEO has no manager


def test_names_ignore_case_and_spacing():
    assert company.get_leave_balance("  kwame   MENSAH ")["employee_name"] == "Kwame Mensah"
    assert company.find_employee("sanne de groot")["name"] == "Sanne de Groot"


def test_unknown_employee_raises_a_clear_error_with_suggestions():
    with pytest.raises(ValueError, match=r"no employee named 'Kwame Mensa'.*Did you mean 'Kwame Mensah'\?"):
        company.get_leave_balance("Kwame Mensa")
    with pytest.raises(ValueError, match=r"^no employee named 'Bob Stone' at Fernhollow\. Use the"):
        company.find_employee("Bob Stone")
    with pytest.raises(ValueError, match="no employee named"):
        company.get_leave_balance.invoke('{"employee_name": "Nobody"}')


def test_invalid_arguments_are_rejected_by_the_schema():
    with pytest.raises(ValueError, match="employee_name: Field required"):
        company.get_leave_balance.validate("{}")
    with pytest.raises(ValueError, match="team: Extra inputs are not permitted"):
        company.find_employee.validate({"name": "Kwame Mensah", "team": "Firmware"})
    with pytest.raises(ValueError, match=r"room: Input should be 'Touriga'"):
        company.book_meeting_room.validate({"room": "Kitchen", "date": "2026-12-03", "hours": 1})
    with pytest.raises(ValueError, match="hours: Input should be less than or equal to 4"):
        company.book_meeting_room.validate({"room": "Baga", "date": "2026-12-03", "hours": 5})
    with pytest.raises(ValueError, match="hours: Input should be greater than or equal to 1"):
        company.book_meeting_room.validate({"room": "Baga", "date": "2026-12-03", "hours": 0})


# ---------------------------------------------------------------- bookings (state in memory)


def test_booking_fills_the_day_from_opening_time():
    first = company.book_meeting_room("Baga", "2026-12-03", 2)
    assert first == {
        "booked": True,
        "booking_id": "BK-4101",
        "room": "Baga",
        "date": "2026-12-03",
        "hours": 2,
        "start": "07:30",
        "end": "09:30",
    }
    second = company.book_meeting_room.invoke({"room": "Baga", "date": "2026-12-03", "hours": 4})
    assert (second["booking_id"], second["start"], second["end"]) == ("BK-4102", "09:30", "13:30")
    other_room = company.book_meeting_room("Lek", "2026-12-03", 1)  # Utrecht opens at 8:00
    assert (other_room["start"], other_room["end"]) == ("08:00", "09:00")
    frame = company.bookings()
    assert frame["booking_id"].tolist() == ["BK-4101", "BK-4102", "BK-4103"]
    assert frame.columns.tolist() == ["booking_id", "room", "date", "hours", "start", "end"]


def test_a_full_room_raises_and_books_nothing():
    for _ in range(2):  # Utrecht is open 8:00-19:00: 11 hours
        company.book_meeting_room("Amstel", "2027-01-19", 4)
    with pytest.raises(ValueError, match="Amstel cannot be booked for 4 hours on 2027-01-19: only 3 hours"):
        company.book_meeting_room("Amstel", "2027-01-19", 4)
    assert company.book_meeting_room("Amstel", "2027-01-19", 3)["end"] == "19:00"
    assert company.book_meeting_room("Amstel", "2027-01-20", 4)["start"] == "08:00"  # another day is free
    assert len(company.bookings()) == 4


def test_booking_errors():
    with pytest.raises(ValueError, match="ISO format YYYY-MM-DD"):
        company.book_meeting_room("Lek", "10 December 2026", 1)
    with pytest.raises(ValueError, match="ISO format"):
        company.book_meeting_room("Lek", "2026-02-30", 1)
    with pytest.raises(ValueError, match="2026-12-05 is a Saturday: the offices are open on working days"):
        company.book_meeting_room("Lek", "2026-12-05", 1)
    with pytest.raises(ValueError, match="there is no room 'Kitchen'"):
        company.book_meeting_room("Kitchen", "2026-12-03", 1)
    with pytest.raises(ValueError, match="hours must be a whole number from 1 to 4"):
        company.book_meeting_room("Lek", "2026-12-03", 6)  # a direct Python call skips the schema
    assert company.bookings().empty


def test_reset_bookings():
    company.book_meeting_room("Vecht", "2026-12-01", 1)
    company.reset_bookings()
    assert company.bookings().empty
    assert company.book_meeting_room("Vecht", "2026-12-01", 1)["booking_id"] == "BK-4101"


# ---------------------------------------------------------------- data files


def test_system_prompt_is_the_training_examples():
    first = json.loads((DATA_DIR / "tools_train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert company.system_prompt() == first["messages"][0]["content"]


def test_tool_eval_cases_are_consistent_with_the_tools_and_the_table():
    cases = questions.load_tool_eval()
    assert len(cases) == 30 and len({c["id"] for c in cases}) == 30
    by_name = {t.name: t for t in company.company_tools()}
    for case in cases:
        assert set(case) == {"id", "question", "tool", "arguments"}
        if case["tool"] is None:
            assert case["arguments"] == {}
            continue
        tool = by_name[case["tool"]]
        result = tool.invoke(case["arguments"])  # valid for the schema, and the employee exists
        assert result
    company.reset_bookings()


# ---------------------------------------------------------------- evaluate_tool_calls


def _fake_lab(answers: dict[str, dict | None]):
    """A lab whose client answers each question with the given tool call (or text): OpenAI's shape."""
    requests: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        requests.append(body)
        call = answers[body["messages"][-1]["content"]]
        if call is None:
            message, finish = {"role": "assistant", "content": "Sure."}, "stop"
        else:
            function = {"name": call["name"], "arguments": json.dumps(call["arguments"])}
            tool_call = {"id": "call_1", "type": "function", "function": function}
            message, finish = {"role": "assistant", "content": None, "tool_calls": [tool_call]}, "tool_calls"
        choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        completion = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": "gpt-4o-mini",
            "choices": [choice],
        }
        return httpx.Response(200, json=completion)

    client = openai.OpenAI(
        api_key="sk-test", http_client=httpx.Client(transport=httpx.MockTransport(handler))
    )
    return type("FakeLab", (), {"client": client, "chat_model": "gpt-4o-mini"})(), requests


def test_evaluate_tool_calls_scores_choice_and_arguments():
    cases = [
        {"id": "a", "question": "Q1", "tool": "find_employee", "arguments": {"name": "Yusuf Demir"}},
        {"id": "b", "question": "Q2", "tool": "find_employee", "arguments": {"name": "Yusuf Demir"}},
        {"id": "c", "question": "Q3", "tool": "book_meeting_room", "arguments": {"room": "Lek", "hours": 2}},
        {"id": "d", "question": "Q4", "tool": "get_leave_balance", "arguments": {"employee_name": "X"}},
        {"id": "e", "question": "Q5", "tool": None, "arguments": {}},
        {"id": "f", "question": "Q6", "tool": None, "arguments": {}},
    ]
    lab, requests = _fake_lab(
        {
            "Q1": {"name": "find_employee", "arguments": {"name": " yusuf demir"}},  # case and spaces ignored
            "Q2": {"name": "find_employee", "arguments": {"name": "Yusuf"}},  # right tool, wrong argument
            "Q3": {"name": "book_meeting_room", "arguments": {"room": "Lek", "date": "x", "hours": 2.0}},
            "Q4": {"name": "find_employee", "arguments": {"name": "X"}},  # wrong tool
            "Q5": None,  # rightly answers
            "Q6": {"name": "find_employee", "arguments": {"name": "X"}},  # calls when no tool is needed
        }
    )
    scores = evaluation.evaluate_tool_calls(lab, cases, tool_choice="auto", progress=False)
    assert scores["id"].tolist() == list("abcdef")
    assert scores["right_tool"].tolist() == [True, True, True, False, True, False]
    assert scores["right_arguments"].tolist() == [True, False, True, False, True, False]
    assert scores.loc[4, "tool"] is None and scores.loc[0, "arguments"] == {"name": " yusuf demir"}
    assert scores.loc[4, "answer"] == "Sure." and scores.loc[0, "answer"] is None
    first = requests[0]
    assert first["messages"][0] == {"role": "system", "content": company.system_prompt()}
    assert first["tools"] == company.tool_definitions()
    assert first["tool_choice"] == "auto" and first["temperature"] == 0
    assert first["parallel_tool_calls"] is False

    shorter = [
        {**d, "function": {**d["function"], "description": "Leave."}} for d in company.tool_definitions()
    ]
    evaluation.evaluate_tool_calls(lab, cases[:1], tools=[shorter[0], company.find_employee], progress=False)
    assert requests[-1]["tools"] == [shorter[0], company.find_employee.schema]


# ---------------------------------------------------------------- the real local server


@pytest.fixture(scope="module")
def local_lab(lab):
    if lab.backend != "local":
        pytest.skip("needs the local backend")
    return lab


def test_evaluate_tool_calls_on_the_local_server(local_lab):
    cases = [c for c in questions.load_tool_eval() if c["id"] in ("t01", "t19")]
    scores = evaluation.evaluate_tool_calls(local_lab, cases, tool_choice="required", progress=False)
    assert scores["tool"].isin(["get_leave_balance", "find_employee", "book_meeting_room"]).all()
    for _, row in scores.iterrows():  # constrained decoding: the arguments always fit the schema
        {t.name: t for t in company.company_tools()}[row["tool"]].validate(row["arguments"])
    assert (scores["seconds"] > 0).all()


def test_evaluate_tool_calls_with_workers_gives_the_rows_of_one_at_a_time_in_order(local_lab):
    """Greedy answers do not depend on their batch-mates: concurrent questions score as sequential ones."""
    cases = questions.load_tool_eval()[:6]
    alone = evaluation.evaluate_tool_calls(local_lab, cases, tool_choice="required", progress=False)
    together = evaluation.evaluate_tool_calls(
        local_lab, cases, tool_choice="required", progress=False, workers=6
    )
    columns = ["id", "tool", "arguments", "right_tool", "right_arguments"]
    assert together[columns].equals(alone[columns])
    assert together["id"].tolist() == [c["id"] for c in cases]


def test_unknown_employee_error_goes_back_to_the_model(local_lab):
    result = run(
        local_lab,
        [
            {"role": "system", "content": company.system_prompt()},
            {"role": "user", "content": "How many leave days does Bob Stone have left?"},
        ],
        company.company_tools(),
        tool_choice="get_leave_balance",
        max_rounds=2,
        temperature=0,
        max_tokens=60,
        parallel_tool_calls=False,
    )
    step = result.trace.tool_steps[0]
    assert step.tool == "get_leave_balance"
    name = json.loads(step.arguments)["employee_name"]
    if name.casefold() not in {r["name"].casefold() for r in TABLE}:
        assert step.error.startswith(f"get_leave_balance raised ValueError: no employee named {name!r}")
        tool_message = result.messages[3]
        assert tool_message["role"] == "tool" and tool_message["content"].startswith("Error: ")
        assert "full name. Fix the arguments" in tool_message["content"]  # one full stop, not two
    assert result.status in ("completed", "max_rounds")
