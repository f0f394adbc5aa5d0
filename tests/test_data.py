"""Consistency checks of the fictional company in data/ (Fernhollow Instruments).

Every fact must agree across the handbook, the Q&A pairs, the evaluation questions and the table.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

DATA = Path(__file__).resolve().parent.parent / "data"
HANDBOOK = DATA / "handbook"
JSONL_FILES = ["qa_train.jsonl", "eval.jsonl", "tools_train.jsonl", "tools_eval.jsonl"]


def read_jsonl(name: str) -> list[dict]:
    """Parse a JSONL file of data/, failing with the line number on a bad line."""
    rows = []
    for number, line in enumerate((DATA / name).read_text(encoding="utf-8").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            pytest.fail(f"{name}:{number}: {exc}")
    return rows


@pytest.fixture(scope="module")
def employees() -> pd.DataFrame:
    return pd.read_csv(DATA / "employees.csv", keep_default_na=False)


@pytest.fixture(scope="module")
def tools() -> dict[str, dict]:
    return {t["function"]["name"]: t for t in json.loads((DATA / "tools.json").read_text())}


def user_questions(rows: list[dict]) -> set[str]:
    return {m["content"].strip().lower() for r in rows for m in r["messages"] if m["role"] == "user"}


def assistant_answers(rows: list[dict]) -> list[str]:
    return [
        m["content"] for r in rows for m in r["messages"] if m["role"] == "assistant" and m.get("content")
    ]


def named_employee(question: str, employees: pd.DataFrame) -> str:
    names = [n for n in employees["name"] if n.lower() in question.lower()]
    assert len(names) == 1, f"expected exactly one employee named in {question!r}, found {names}"
    return names[0]


def validate_arguments(arguments: dict, schema: dict) -> None:
    """Validate tool arguments with jsonschema when installed, else check keys, types and enums by hand."""
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    if jsonschema is not None:
        jsonschema.validate(arguments, schema)
        return
    props = schema["properties"]
    assert set(schema.get("required", [])) <= set(arguments), arguments
    assert set(arguments) <= set(props), arguments
    types = {"string": str, "integer": int, "number": (int, float), "boolean": bool}
    for key, value in arguments.items():
        assert isinstance(value, types[props[key]["type"]]), (key, value)
        assert value in props[key].get("enum", [value]), (key, value)
        assert props[key].get("minimum", value) <= value <= props[key].get("maximum", value), (key, value)


@pytest.mark.parametrize("name", JSONL_FILES)
def test_every_jsonl_line_parses(name):
    assert read_jsonl(name)


def test_handbook_documents_have_a_title_and_a_sensible_length():
    docs = sorted(HANDBOOK.glob("*.md"))
    assert len(docs) >= 14
    for doc in [*docs, DATA / "new_policy.md"]:
        text = doc.read_text(encoding="utf-8")
        assert re.match(r"# \S", text), doc.name
        words = len(text.split())
        assert (80 if doc.name == "new_policy.md" else 150) <= words <= 350, (doc.name, words)


def test_qa_train_is_chat_format_with_one_system_prompt():
    rows = read_jsonl("qa_train.jsonl")
    assert len(rows) >= 48
    for row in rows:
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        assert len(row["messages"][2]["content"].split()) <= 40
    assert len({row["messages"][0]["content"] for row in rows}) == 1
    assert len(user_questions(rows)) == len(rows), "duplicate training questions"


def test_eval_facts_appear_in_their_source(employees):
    rows = read_jsonl("eval.jsonl")
    assert len(rows) >= 30
    assert len({r["id"] for r in rows}) == len(rows)
    for row in rows:
        assert row["facts"] and row["kind"] in {"paraphrase", "handbook_only", "live"}, row
        if row["source"] == "employees.csv":
            record = employees[employees["name"] == named_employee(row["question"], employees)].iloc[0]
            text = " ".join(str(v) for v in record.values)
        else:
            text = (HANDBOOK / row["source"]).read_text(encoding="utf-8")
        for fact in row["facts"]:
            assert fact.lower() in text.lower(), (row["id"], fact)
            assert fact.lower() not in row["question"].lower(), (
                f"{row['id']}: the question gives away {fact!r}"
            )


def test_eval_kinds_match_the_training_set():
    rows = read_jsonl("eval.jsonl")
    kinds = [r["kind"] for r in rows]
    assert kinds.count("paraphrase") >= 18
    assert kinds.count("handbook_only") >= 5
    assert kinds.count("live") >= 5
    assert all(r["source"] == "employees.csv" for r in rows if r["kind"] == "live")
    answers = [a.lower() for a in assistant_answers(read_jsonl("qa_train.jsonl"))]
    for row in rows:
        facts = [f.lower() for f in row["facts"]]
        taught = any(all(f in a for f in facts) for a in answers)
        if row["kind"] == "paraphrase":
            assert taught, f"{row['id']}: no training answer states {facts}"
        elif row["kind"] == "handbook_only":
            assert not any(f in a for f in facts for a in answers), (
                f"{row['id']}: a training answer states it"
            )


def test_eval_questions_are_not_copies_of_training_questions():
    trained = user_questions(read_jsonl("qa_train.jsonl")) | user_questions(read_jsonl("tools_train.jsonl"))
    for name in ["eval.jsonl", "tools_eval.jsonl"]:
        for row in read_jsonl(name):
            assert row["question"].strip().lower() not in trained, (name, row["id"])


def test_employee_table_is_consistent(employees):
    assert len(employees) >= 20
    assert employees["employee_id"].is_unique and employees["name"].is_unique
    assert (
        employees["leave_days_left"] == employees["leave_days_total"] - employees["leave_days_taken"]
    ).all()
    assert (employees["leave_days_left"] >= 0).all()
    managers = employees["manager"][employees["manager"] != ""]
    assert managers.isin(employees["name"]).all()
    assert (employees["manager"] == "").sum() == 1, "exactly one employee (the CEO) has no manager"
    start = pd.to_datetime(employees["start_date"], format="%Y-%m-%d")
    years = (pd.Timestamp("2026-02-01") - start).dt.days // 365.25
    expected = 27 + (years // 3).clip(upper=3)
    assert (employees["leave_days_total"] == expected).all(), "leave_days_total = 27 + seniority bonus"


def test_handbook_states_the_leave_rules_the_table_uses():
    text = (HANDBOOK / "leave.md").read_text(encoding="utf-8")
    assert "27 days" in text and "every 3 full years" in text and "maximum of 3 extra days" in text


def test_live_eval_questions_name_existing_employees(employees):
    for row in read_jsonl("eval.jsonl"):
        if row["kind"] == "live":
            named_employee(row["question"], employees)


def test_tools_have_an_enum_and_a_number_parameter(tools):
    assert len(tools) == 3
    params = [p for t in tools.values() for p in t["function"]["parameters"]["properties"].values()]
    assert any("enum" in p for p in params)
    assert any(p["type"] in {"integer", "number"} for p in params)
    rooms = tools["book_meeting_room"]["function"]["parameters"]["properties"]["room"]["enum"]
    handbook_rooms = (HANDBOOK / "meeting_rooms.md").read_text(encoding="utf-8")
    assert all(room in handbook_rooms for room in rooms)


def test_tools_eval_expects_valid_calls(tools, employees):
    rows = read_jsonl("tools_eval.jsonl")
    assert len(rows) >= 30
    for row in rows:
        if row["tool"] is None:
            assert row["arguments"] == {}
            continue
        validate_arguments(row["arguments"], tools[row["tool"]]["function"]["parameters"])
        for key in ("employee_name", "name"):
            if key in row["arguments"]:
                assert row["arguments"][key] in set(employees["name"]), row["id"]
    assert sum(r["tool"] is None for r in rows) >= 3
    assert all(sum(r["tool"] == name for r in rows) >= 8 for name in tools)


def test_tools_train_calls_are_valid_and_results_match_the_table(tools, employees):
    rows = read_jsonl("tools_train.jsonl")
    assert len(rows) >= 24
    by_name = employees.set_index("name")
    without_tool = 0
    for row in rows:
        assert [t["function"]["name"] for t in row["tools"]] == list(tools)
        calls = [c for m in row["messages"] if m["role"] == "assistant" for c in m.get("tool_calls", [])]
        without_tool += not calls
        for call in calls:
            arguments = json.loads(call["function"]["arguments"])
            validate_arguments(arguments, tools[call["function"]["name"]]["function"]["parameters"])
        for message in row["messages"]:
            if message["role"] == "tool":
                assert message["tool_call_id"] in {c["id"] for c in calls}
                result = json.loads(message["content"])
                if "leave_days_left" in result:
                    assert (
                        result["leave_days_left"] == by_name.loc[result["employee_name"], "leave_days_left"]
                    )
                if "team" in result:
                    assert result["manager"] == (by_name.loc[result["name"], "manager"] or None)
    assert without_tool >= 3


def test_new_policy_is_not_in_the_handbook():
    new = (DATA / "new_policy.md").read_text(encoding="utf-8")
    assert "Thursdays only" in new
    assert all("dog" not in doc.read_text(encoding="utf-8").lower() for doc in HANDBOOK.glob("*.md"))


def test_changed_fact_changes_exactly_one_fact():
    change = json.loads((DATA / "changed_fact.json").read_text(encoding="utf-8"))
    old_text = (HANDBOOK / change["doc"]).read_text(encoding="utf-8")
    assert change["old_fact"] in old_text and change["new_fact"] not in old_text
    assert change["new_text"] == old_text.replace(change["old_fact"], change["new_fact"])
    answers = assistant_answers(read_jsonl("qa_train.jsonl"))
    assert any(change["old_fact"] in a for a in answers), (
        "the fine-tuned model must have learned the old fact"
    )


def test_every_number_in_a_policy_answer_is_in_the_handbook():
    handbook = " ".join(doc.read_text(encoding="utf-8") for doc in HANDBOOK.glob("*.md"))
    handbook_numbers = set(re.findall(r"\d+(?:[.:,]\d+)*", handbook))
    no_tool = [
        r for r in read_jsonl("tools_train.jsonl") if all("tool_calls" not in m for m in r["messages"])
    ]
    for answer in assistant_answers(read_jsonl("qa_train.jsonl") + no_tool):
        for number in re.findall(r"\d+(?:[.:,]\d+)*", answer):
            assert number in handbook_numbers, (number, answer)


def test_changed_fact_is_asked_in_the_trained_wording_and_in_paraphrases():
    change = json.loads((DATA / "changed_fact.json").read_text(encoding="utf-8"))
    asked = change["questions"]
    assert change["question"] in asked and len(set(asked)) == len(asked) >= 4
    trained = user_questions(read_jsonl("qa_train.jsonl"))
    assert asked[0].lower() in trained, "the first is the training question, word for word"
    assert all(q.lower() not in trained for q in asked[1:]), "the others are paraphrases"
