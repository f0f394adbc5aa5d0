"""The course's harness: the scoring rule, the question sets, the claims, pricing, and real systems through the
local server."""

from __future__ import annotations

import pandas as pd
import pytest

from llmlab import tokens
from llmlab.course import claims, evaluation, questions
from llmlab.course.data import DATA_DIR


@pytest.mark.parametrize(
    ("answer", "facts", "right"),
    [
        ("You get 27 days of paid leave.", ["27"], True),
        ("You get 270 days.", ["27"], False),
        ("Since 2027.", ["27"], False),
        ("It costs EUR 1.50, or EUR 50 for ten.", ["50"], True),
        ("It costs EUR 1.50.", ["50"], False),
        ("About 27.5 days.", ["27"], False),
        ("You get EUR 150.", ["50"], False),
        ("Tell your manager by 9:30.", ["9:30"], True),
        ("They expire on 30 JUNE", ["30 June"], True),
        ("They expire on 30\nJune.", ["30 June"], True),
        ("They expire in June.", ["30 June"], False),
        ("A green tag and a log entry.", ["green tag", "log"], True),
        ("A green tag.", ["green tag", "log"], False),
        ("", ["27"], False),
    ],
)
def test_contains_facts_is_the_whole_word_rule(answer, facts, right):
    assert questions.contains_facts(answer, facts) is right


def test_trained_questions_are_verbatim_training_questions_whose_answer_states_the_facts():
    import json

    examples = [json.loads(line) for line in (DATA_DIR / "qa_train.jsonl").read_text().splitlines()]
    pairs = {
        next(m["content"] for m in e["messages"] if m["role"] == "user"): next(
            m["content"] for m in e["messages"] if m["role"] == "assistant"
        )
        for e in examples
    }
    rows = questions.trained_questions()
    assert len(rows) >= 18 and len({r["question"] for r in rows}) == len(rows)
    for row in rows:
        assert row["question"] in pairs
        assert questions.contains_facts(pairs[row["question"]], row["facts"]), row


def test_load_questions_takes_the_first_of_each_kind_in_a_fixed_order():
    everything = questions.load_questions()
    assert list(dict.fromkeys(everything["kind"])) == list(questions.KINDS)
    subset = questions.load_questions(per_kind=3)
    assert subset["kind"].value_counts().to_dict() == dict.fromkeys(questions.KINDS, 3)
    first = everything.groupby("kind", sort=False).head(3).reset_index(drop=True)
    assert subset["id"].tolist() == first["id"].tolist()
    assert questions.load_questions(per_kind=3).equals(subset)


def test_claims_tables_have_one_column_per_technique():
    assert list(claims.finetuning_vs_rag().columns) == ["Fine-tuning", "RAG"]
    assert list(claims.finetuning_vs_function_calling().columns) == [
        "Fine-tuning",
        "Function calling",
    ]
    summary = claims.summary()
    assert list(summary.columns) == ["Fine-tuning", "RAG", "Function calling"]
    assert summary.notna().all().all() and len(summary) >= 5


def test_openai_cost_counts_every_request_and_prices_fine_tuned_models_higher():
    messages = [{"role": "user", "content": "How many days of annual leave do I get?"}]
    one = {"model": "SmolLM2-135M-Instruct", "messages": messages, "tools": None, "output": "27 days."}
    expected = tokens.chat_cost(
        "gpt-4o-mini", tokens.count_chat_tokens(messages, "gpt-4o-mini"), tokens.count_tokens("27 days.")
    )
    assert evaluation.openai_cost([one]) == pytest.approx(expected)
    assert evaluation.openai_cost([one, one]) == pytest.approx(2 * expected)
    assert evaluation.openai_cost([{**one, "model": "ft:SmolLM2-135M-Instruct:llmlab:x:1"}]) > expected


def test_summarize_gives_one_row_per_technique_in_order():
    rows = pd.DataFrame(
        {
            "technique": ["RAG", "RAG", "base", "base"],
            "kind": ["paraphrase", "live", "paraphrase", "live"],
            "correct": [True, False, False, False],
            "seconds": [2.0, 4.0, 1.0, 1.0],
            "cost_usd": [0.001, 0.003, 0.0, 0.0],
        }
    )
    table = evaluation.summarize(rows, setup_seconds={"RAG": 5.0}, setup_cost_usd={"RAG": 0.01})
    assert table["technique"].tolist() == ["RAG", "base"]
    rag = table.set_index("technique").loc["RAG"]
    assert rag["accuracy_paraphrase"] == 1.0 and rag["accuracy_live"] == 0.0 and rag["accuracy_all"] == 0.5
    assert rag["latency_s"] == 3.0 and rag["setup_s"] == 5.0
    assert rag["cost_per_1k_questions_usd"] == pytest.approx(2.0)
    assert pd.isna(table.set_index("technique").loc["base", "setup_s"])


def test_evaluate_real_systems_on_the_local_backend(lab):
    from llmlab.rag import KnowledgeBase

    kb = KnowledgeBase(lab)
    kb.add_documents([DATA_DIR / "handbook" / "leave.md", DATA_DIR / "handbook" / "security.md"])
    asked = questions.load_questions()
    asked = asked[asked["source"].isin(["leave.md", "security.md"])].head(2)
    systems = {"base": evaluation.plain(lab), "RAG": evaluation.with_retrieval(kb)}
    rows = evaluation.evaluate(systems, asked, progress=False)
    assert len(rows) == 4 and set(rows["technique"]) == {"base", "RAG"}
    assert rows["answer"].str.len().gt(0).all() and (rows["seconds"] > 0).all()
    assert (rows["cost_usd"] > 0).all()
    for row in rows.itertuples():
        facts = asked.set_index("id").loc[row.id, "facts"]
        assert row.correct == questions.contains_facts(row.answer, facts)
    rag_rows = rows[rows["technique"] == "RAG"]
    assert all(len(s) == 3 for s in rag_rows["sources"])
    sources = asked.set_index("id")["source"]
    assert all(any(s.startswith(sources[r.id]) for s in r.sources) for r in rag_rows.itertuples())


def test_training_set_holds_the_examples_of_the_first_trained_questions():
    trained = [r["question"] for r in questions.trained_questions()[:10]]
    subset = questions.training_set(10)
    users = [next(m["content"] for m in e["messages"] if m["role"] == "user") for e in subset]
    assert sorted(users) == sorted(trained) and subset.lines == sorted(subset.lines)
    assert subset.validate(min_examples=10)
