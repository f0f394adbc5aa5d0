"""The course's harness: the scoring rule, the question sets, the claims, pricing, and real systems through the
local server."""

from __future__ import annotations

import pandas as pd
import pytest

from llmlab import tokens
from llmlab.course import claims, evaluation, questions
from llmlab.course.data import DATA_DIR, read_jsonl


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
    alone = rows.assign(seconds=[0.5, 1.5, 0.25, 0.25])  # the same answers asked one at a time
    timed = evaluation.summarize(rows, latency=alone).set_index("technique")
    assert timed.loc["RAG", "latency_s"] == 1.0 and timed.loc["base", "latency_s"] == 0.25
    assert timed.loc["RAG", "accuracy_all"] == 0.5  # accuracy still from `rows`


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
    assert rows.loc[rows["technique"] == "base", "retrieved"].isna().all()
    assert rag_rows["retrieved"].map(type).eq(bool).all()


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [(0, 10, 0.0, 0.278), (5, 10, 0.237, 0.763), (10, 10, 0.722, 1.0), (1, 1, 0.207, 1.0)],
)
def test_wilson_interval_matches_the_formula_and_stays_within_0_and_1(k, n, low, high):
    assert evaluation.wilson(k, n) == (low, high)


def test_by_kind_and_tool_decisions_count_answers_retrieval_and_calls():
    """Two systems that answer by rule (no model): the counts, intervals and the retrieved column follow."""
    asked = questions.load_questions(per_kind=2)
    facts = asked.set_index("question")["facts"]

    def reader(question: str) -> evaluation.Reply:  # retrieves every fact, answers only the live questions
        live = question in set(asked.loc[asked["kind"] == "live", "question"])
        answer = " ".join(facts[question]) if live else "I do not know."
        return evaluation.Reply(answer, 0.1, sources=["x.md#0"], context=" ".join(facts[question]))

    def caller(question: str) -> evaluation.Reply:  # calls a tool for every question, answers none
        return evaluation.Reply("No idea.", 0.1, tool_calls=["find_employee({})"])

    rows = evaluation.evaluate({"reader": reader, "caller": caller}, asked, progress=False)
    table = evaluation.by_kind(rows).set_index(["technique", "kind"])
    assert table.loc[("reader", "live"), ["k", "n"]].tolist() == [2, 2]
    assert table.loc[("reader", "all"), ["k", "n"]].tolist() == [2, 8]
    assert (
        table.loc[("reader", "all"), "retrieved"] == "8/8" and table.loc[("caller", "all"), "retrieved"] == ""
    )
    assert (table.loc[("reader", "all"), "low"], table.loc[("reader", "all"), "high"]) == evaluation.wilson(
        2, 8
    )
    calls = evaluation.tool_decisions(rows).set_index(["technique", "case"])
    assert calls.loc[("caller", "should call"), ["k", "n"]].tolist() == [2, 2]
    assert calls.loc[("caller", "should not"), ["k", "n"]].tolist() == [6, 6]
    assert calls.loc[("reader", "should not"), "k"] == 0


def test_hybrid_training_set_adds_a_mix_of_tool_call_examples_to_the_qa_pairs():
    full = questions.hybrid_training_set()
    assert len(full) == len(questions.trained_questions()) + len(read_jsonl("tools_train.jsonl"))
    short = questions.hybrid_training_set(tool_examples=6)
    tool_part = [e for e in short if "tools" in e]
    assert len(short) == len(questions.trained_questions()) + 6 and len(tool_part) == 6
    first_calls = {
        next((c["function"]["name"] for m in e["messages"] for c in m.get("tool_calls") or []), None)
        for e in tool_part
    }
    assert first_calls == {"get_leave_balance", "find_employee", "book_meeting_room", None}
    assert short.validate(min_examples=10)


def test_training_set_holds_the_examples_of_the_first_trained_questions():
    trained = [r["question"] for r in questions.trained_questions()[:10]]
    subset = questions.training_set(10)
    users = [next(m["content"] for m in e["messages"] if m["role"] == "user") for e in subset]
    assert sorted(users) == sorted(trained) and subset.lines == sorted(subset.lines)
    assert subset.validate(min_examples=10)


def test_evaluate_asks_questions_concurrently_and_keeps_their_order():
    """Two answers must be in flight at once (each system waits at a barrier for another), and the rows
    keep the order of systems and questions whatever order the answers finish in."""
    import threading

    asked = questions.load_questions(per_kind=1)
    barrier = threading.Barrier(2, timeout=30)

    def waiting(question: str) -> evaluation.Reply:
        barrier.wait()  # breaks (BrokenBarrierError) when questions are asked one at a time
        return evaluation.Reply(question.upper(), 0.1)

    rows = evaluation.evaluate({"a": waiting, "b": waiting}, asked, progress=False, workers=4)
    assert rows["technique"].tolist() == ["a"] * len(asked) + ["b"] * len(asked)
    assert rows["answer"].tolist() == [q.upper() for q in asked["question"]] * 2
