"""The course's questions and what counts as a right answer to them.

Four kinds of questions, each with the key facts a right answer contains (`load_questions`): *trained*
(asked word for word as in qa_train.jsonl), *paraphrase* (held out), *handbook_only* (in the handbook, not in
the training set) and *live* (only a tool knows). The tool-calling cases (`load_tool_eval`) name the tool
and arguments a question needs. `training_set` is the small fine-tuning set behind the trained questions;
`hybrid_training_set` adds tool-call examples to it (the model that decides by itself when to call a tool).

>>> contains_facts("You get 27 days of leave.", ["27"]), contains_facts("In 2027.", ["27"])
(True, False)
>>> load_questions(per_kind=1)["kind"].tolist()
['trained', 'paraphrase', 'handbook_only', 'live']
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import pandas as pd

from llmlab.course.data import DATA_DIR, read_jsonl
from llmlab.datasets import ChatDataset

__all__ = [
    "HYBRID_OPTIONS",
    "HYBRID_TOOL_EXAMPLES",
    "KINDS",
    "contains_facts",
    "hybrid_training_set",
    "load_questions",
    "load_tool_eval",
    "trained_questions",
    "training_set",
]

KINDS = ("trained", "paraphrase", "handbook_only", "live")
# The fine-tune that teaches the facts and when to call a tool: notebook 06 trains it, 07 reuses the job
# (`finetune.fine_tune(..., reuse=True)` finds it by its file and these settings).
HYBRID_TOOL_EXAMPLES = 6  # of data/tools_train.jsonl's examples, with the Q&A pairs (`hybrid_training_set`)
HYBRID_OPTIONS = {"n_epochs": 4, "batch_size": 2, "seed": 42}


# ------------------------------------------------------------------------------------------ scoring
def _normalise(text: str) -> str:
    return " ".join(text.lower().replace("\u2019", "'").split())


def contains_facts(answer: str, facts: Iterable[str]) -> bool:
    """The scoring rule: an answer is right when it contains every key fact, as a whole word or number.

    Case and spacing do not matter; "27" is not found in "270", "2027" or "1.27", "9:30" is found in "by 9:30.".

    >>> contains_facts("Carried-over days expire on 30 June.", ["30 June"])
    True
    >>> contains_facts("You get 2 days.", ["27"])
    False
    """
    text = _normalise(answer or "")
    return all(re.search(rf"(?<![\w.,]){re.escape(_normalise(f))}(?!\w|[.,]\d)", text) for f in facts)


# ------------------------------------------------------------------------------------------ questions
def trained_questions() -> list[dict]:
    """Training questions (verbatim from qa_train.jsonl) with the key facts of their answers.

    The facts come from the held-out paraphrases: each paraphrase's facts are stated by one training
    answer, and that answer's question is asked word for word.
    """
    examples = read_jsonl("qa_train.jsonl")
    rows, seen = [], set()
    for row in read_jsonl("eval.jsonl"):
        if row["kind"] != "paraphrase":
            continue
        for example in examples:
            messages = example["messages"]
            answer = next(m["content"] for m in messages if m["role"] == "assistant")
            question = next(m["content"] for m in messages if m["role"] == "user")
            if contains_facts(answer, row["facts"]) and question not in seen:
                seen.add(question)
                rows.append(
                    {
                        "id": f"train-{row['id']}",
                        "question": question,
                        "facts": row["facts"],
                        "source": row["source"],
                        "kind": "trained",
                    }
                )
                break
    return rows


def training_set(n: int = 10) -> ChatDataset:
    """The examples of qa_train.jsonl behind the first `n` trained questions, in file order: a small
    fine-tuning set whose every example is tested (notebooks 02 and 07 train on it).

    >>> len(training_set(10))
    10
    """
    dataset = ChatDataset.from_jsonl(DATA_DIR / "qa_train.jsonl")
    wanted = {row["question"] for row in trained_questions()[:n]}
    keep = [
        i
        for i, e in enumerate(dataset)
        if any(m["content"] in wanted for m in e["messages"] if m["role"] == "user")
    ]
    return ChatDataset([dataset[i] for i in keep], lines=[dataset.lines[i] for i in keep])


def hybrid_training_set(n: int | None = None, tool_examples: int | None = None) -> ChatDataset:
    """The Q&A pairs behind the trained questions (all, or the first `n`) followed by tool-call examples of
    data/tools_train.jsonl (all, or a shortened set of `tool_examples` that keeps the mix of tools, of calls
    and of direct answers): one set that teaches the facts and when to call a tool (notebook 07's hybrid).

    >>> len(hybrid_training_set(10, tool_examples=9))
    19
    """
    qa = training_set(len(trained_questions()) if n is None else n)
    tools = ChatDataset.from_jsonl(DATA_DIR / "tools_train.jsonl")
    keep = list(range(len(tools)))
    if tool_examples is not None:
        groups: dict[str, list[int]] = {}  # first tool called (or "none") -> example indices, in file order
        for i, example in enumerate(tools):
            calls = [c for m in example["messages"] for c in m.get("tool_calls") or []]
            groups.setdefault(calls[0]["function"]["name"] if calls else "none", []).append(i)
        rounds = [
            [g[r] for g in groups.values() if r < len(g)] for r in range(max(map(len, groups.values())))
        ]
        keep = sorted([i for r in rounds for i in r][:tool_examples])
    return ChatDataset([*qa, *(tools[i] for i in keep)], lines=[*qa.lines, *(tools.lines[i] for i in keep)])


def load_questions(per_kind: int | None = None) -> pd.DataFrame:
    """The evaluation questions: trained (verbatim), paraphrase (held out), handbook_only, live.

    `per_kind` keeps the first N of each kind (a fixed, repeatable subset).

    >>> load_questions(per_kind=2)["kind"].tolist()
    ['trained', 'trained', 'paraphrase', 'paraphrase', 'handbook_only', 'handbook_only', 'live', 'live']
    """
    rows = trained_questions() + read_jsonl("eval.jsonl")
    frame = pd.DataFrame(rows, columns=["id", "question", "facts", "source", "kind"])
    frame["kind"] = pd.Categorical(frame["kind"], categories=KINDS, ordered=True)
    frame = frame.sort_values("kind", kind="stable")
    if per_kind is not None:
        frame = frame.groupby("kind", observed=True, sort=True).head(per_kind)
    frame["kind"] = frame["kind"].astype(str)
    return frame.reset_index(drop=True)


def load_tool_eval() -> list[dict]:
    """The tool-calling test set, data/tools_eval.jsonl: `{"id", "question", "tool", "arguments"}` each.

    `tool` is None for the questions that need no tool (the handbook answers them).

    >>> load_tool_eval()[0]["tool"]
    'get_leave_balance'
    """
    return read_jsonl("tools_eval.jsonl")
