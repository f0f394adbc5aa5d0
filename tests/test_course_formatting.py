"""The format task of notebook 02b: the answer checker, its data, and the schema through the real local server."""

from __future__ import annotations

import json

import pytest

from llmlab.course import company, formatting
from llmlab.course.data import read_jsonl

VALID = '{"category": "sick", "employee": "Marta", "dates": "today"}'


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (VALID, None),
        ('  {"dates": "today", "employee": "Marta", "category": "late"}\n', None),  # key order, outer spaces
        ('```json\n{"category": "sick", "employee": "Marta", "dates": "today"}\n```', "not JSON"),
        ('Here it is: {"category": "sick", "employee": "Marta", "dates": "today"}', "not JSON"),
        ('{"category": "sick", "employee": "Marta", "dates": "2022-01-01T00', "not JSON"),  # cut off
        ("", "not JSON"),
        ('["sick", "Marta", "today"]', "not a JSON object"),
        (
            '{"category": "sick", "employee": "Marta"}',
            "keys are category, employee; want category, employee, dates",
        ),
        ('{"category": "sick", "employee": "Marta", "dates": "today", "note": "x"}', "keys are"),
        (
            '{"category": "holiday", "employee": "Marta", "dates": "today"}',
            'category "holiday" is not one of',
        ),
        ('{"category": "sick", "employee": 7, "dates": "today"}', "employee not a non-empty string"),
        ('{"category": "sick", "employee": "Marta", "dates": " "}', "dates not a non-empty string"),
    ],
)
def test_problem_names_what_makes_an_answer_invalid(answer, reason):
    found = formatting.problem(answer)
    if reason is None:
        assert found is None and formatting.parse(answer) == json.loads(answer)
    else:
        assert found is not None and found.startswith(reason) and formatting.parse(answer) is None


def test_fields_right_compares_each_field_and_gives_nothing_to_an_invalid_answer():
    expected = {"category": "sick", "employee": "marta", "dates": "Today "}
    assert formatting.fields_right(VALID, expected) == {"category": True, "employee": True, "dates": True}
    wrong = '{"category": "late", "employee": "Marta", "dates": "tomorrow"}'
    assert formatting.fields_right(wrong, expected) == {"category": False, "employee": True, "dates": False}
    assert not any(formatting.fields_right(VALID[:-1], expected).values())


def test_training_examples_are_valid_answers_under_the_instruction():
    examples = formatting.training_examples()
    assert examples.validate()
    categories = []
    for example in examples:
        system, user, assistant = example["messages"]
        assert system == {"role": "system", "content": formatting.INSTRUCTION}
        assert formatting.problem(assistant["content"]) is None, assistant["content"]
        answer = json.loads(assistant["content"])
        assert answer["dates"].casefold() in user["content"].casefold(), user["content"]
        categories.append(answer["category"])
    assert {c: categories.count(c) for c in formatting.CATEGORIES} == dict.fromkeys(formatting.CATEGORIES, 8)


def test_held_out_messages_are_new_valid_and_from_fernhollow_staff():
    held_out = formatting.load_format_eval()
    trained = {e["messages"][1]["content"] for e in read_jsonl("format_train.jsonl")}
    first_names = {name.split()[0] for name in company.employees()["name"]}
    assert len(held_out) >= 15 and held_out["id"].is_unique
    assert not set(held_out["message"]) & trained
    assert set(held_out["category"]) == set(formatting.CATEGORIES)
    for row in held_out.itertuples():
        expected = {k: getattr(row, k) for k in formatting.KEYS}
        assert formatting.problem(json.dumps(expected)) is None
        assert row.employee in first_names and row.employee in row.message
        assert row.dates.casefold() in row.message.casefold()


def test_schema_constrained_answers_of_the_real_server_are_valid(lab):
    """What notebook 02b shows: with `response_format` the local backend's answers are valid within 64 tokens."""
    for message in formatting.load_format_eval()["message"].head(3):
        response = lab.client.chat.completions.create(
            model=lab.chat_model,
            messages=[
                {"role": "system", "content": formatting.INSTRUCTION},
                {"role": "user", "content": message},
            ],
            response_format=formatting.response_format(),
            temperature=0,
            max_completion_tokens=64,
        )
        answer = response.choices[0].message.content
        assert formatting.problem(answer) is None, answer
        assert response.choices[0].finish_reason == "stop"
