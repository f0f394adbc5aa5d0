"""Fine-tuning, RAG and function calling compared: the usual claims as tables, then measured on the same questions.

>>> claims_finetuning_vs_rag().loc["Knowledge updates", "RAG"]
'Instant: add or replace a document'
>>> contains_facts("You get 27 days of leave.", ["27"]), contains_facts("In 2027.", ["27"])
(True, False)

A *system* is a function `question -> Reply`; `plain`, `rag`, `with_tools` and `hybrid` build them over
`lab.client`, so they run on the local backend and on OpenAI alike. `evaluate` asks every system every
question and scores the answers; `summarize` turns that into one row per technique.

>>> systems = {"base": plain(lab), "RAG": rag(kb)}                    # doctest: +SKIP
>>> rows = evaluate(systems, load_questions(per_kind=5))              # doctest: +SKIP
>>> summarize(rows, setup_seconds={"RAG": 4.2})                       # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from llmlab import tokens
from llmlab.datasets import ChatDataset
from llmlab.openai_facts import CHAT_MODEL
from llmlab.paths import DATA_DIR, read_data_jsonl
from llmlab.progress import tqdm
from llmlab.rag import build_prompt

# ------------------------------------------------------------------------------------------ the claims
_FT, _RAG, _FC = "Fine-tuning", "RAG", "Function calling"

_FINETUNING_VS_RAG = {
    "What it changes": ("The model's weights", "The prompt: retrieved text is added to it"),
    "Best for": (
        "Style, format, tone, a narrow task done the same way every time",
        "Knowledge: facts from your own documents",
    ),
    "Knowledge updates": ("Re-train on the corrected examples", "Instant: add or replace a document"),
    "Set-up": ("Prepare examples, then a training job", "Chunk, embed and index the documents"),
    "Data needed": ("Hundreds of curated Q&A examples", "The documents as they are"),
    "Answers unseen questions": ("Only as well as it generalises", "When the right passage is retrieved"),
    "Shows its sources": ("No", "Yes: the retrieved passages"),
    "Hallucination risk": ("Higher: facts are memorised, not looked up", "Lower: grounded in the context"),
    "Cost per question": ("Short prompts, but fine-tuned models cost more per token", "Longer prompts"),
}

_FINETUNING_VS_FUNCTION_CALLING = {
    "What it changes": ("The model's weights", "Nothing in the model: your code runs functions it asks for"),
    "Best for": ("How the model answers", "Live data and actions: databases, APIs, bookings"),
    "Freshness": ("Frozen at training time", "Always current: the function reads the live data"),
    "Set-up": ("Examples and a training job", "Write the functions and their JSON schemas"),
    "Failure mode": ("Confidently wrong answers", "A wrong tool or wrong arguments; errors can be fed back"),
    "Latency": ("One model call", "At least two model calls plus the function"),
    "Combines with the other": (
        "Fine-tuning on tool-call examples makes the model call tools more reliably",
        "Needs a model that can choose tools and fill in arguments",
    ),
}

_SUMMARY = {
    "Teaches": ("Behaviour and format", "Knowledge from documents", "Access to live data and actions"),
    "Changes the model": ("Yes", "No", "No"),
    "Up-to-date facts": ("No (until re-trained)", "Yes (re-index)", "Yes (live)"),
    "Set-up effort": ("High", "Medium", "Medium"),
    "Latency per answer": ("Low", "Medium (retrieval + longer prompt)", "Higher (several calls)"),
    "Shows where an answer came from": ("No", "Sources", "Tool-call trace"),
    "Typical use": ("A consistent support tone; a strict output format", "Handbook Q&A", "My leave balance"),
}


def claims_finetuning_vs_rag() -> pd.DataFrame:
    """The usual qualitative comparison of fine-tuning and RAG, one row per aspect.

    >>> list(claims_finetuning_vs_rag().columns)
    ['Fine-tuning', 'RAG']
    """
    return pd.DataFrame.from_dict(_FINETUNING_VS_RAG, orient="index", columns=[_FT, _RAG])


def claims_finetuning_vs_function_calling() -> pd.DataFrame:
    """The usual qualitative comparison of fine-tuning and function calling, one row per aspect."""
    return pd.DataFrame.from_dict(_FINETUNING_VS_FUNCTION_CALLING, orient="index", columns=[_FT, _FC])


def claims_summary() -> pd.DataFrame:
    """The three techniques side by side: what each teaches, costs and is good for."""
    return pd.DataFrame.from_dict(_SUMMARY, orient="index", columns=[_FT, _RAG, _FC])


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
    examples = read_data_jsonl("qa_train.jsonl")
    rows, seen = [], set()
    for row in read_data_jsonl("eval.jsonl"):
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


KINDS = ("trained", "paraphrase", "handbook_only", "live")


def load_questions(per_kind: int | None = None) -> pd.DataFrame:
    """The evaluation questions: trained (verbatim), paraphrase (held out), handbook_only, live.

    `per_kind` keeps the first N of each kind (a fixed, repeatable subset).

    >>> load_questions(per_kind=2)["kind"].tolist()
    ['trained', 'trained', 'paraphrase', 'paraphrase', 'handbook_only', 'handbook_only', 'live', 'live']
    """
    rows = trained_questions() + read_data_jsonl("eval.jsonl")
    frame = pd.DataFrame(rows, columns=["id", "question", "facts", "source", "kind"])
    frame["kind"] = pd.Categorical(frame["kind"], categories=KINDS, ordered=True)
    frame = frame.sort_values("kind", kind="stable")
    if per_kind is not None:
        frame = frame.groupby("kind", observed=True, sort=True).head(per_kind)
    frame["kind"] = frame["kind"].astype(str)
    return frame.reset_index(drop=True)


# ------------------------------------------------------------------------------------------ systems
@dataclass
class Reply:
    """One answer of a system, with what it cost: the requests it sent (for pricing) and the time."""

    text: str
    seconds: float
    requests: list[dict] = field(default_factory=list)  # {"model", "messages", "tools", "output"}
    sources: list[str] = field(default_factory=list)
    tool_calls: list[str] = field(default_factory=list)


System = Callable[[str], Reply]


def _system_messages(system_prompt: str | None, question: str) -> list[dict]:
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": question}
    ]


def plain(
    lab: Any, model: str | None = None, system_prompt: str | None = None, max_tokens: int = 60
) -> System:
    """The model alone (base or fine-tuned): one chat completion, greedy.

    >>> base = plain(lab, system_prompt="Answer in one sentence.")   # doctest: +SKIP
    >>> base("How many days of leave do I get?").text                # doctest: +SKIP
    """
    model = model or lab.chat_model

    def ask(question: str) -> Reply:
        messages = _system_messages(system_prompt, question)
        start = time.perf_counter()
        response = lab.client.chat.completions.create(
            model=model, messages=messages, temperature=0, seed=0, max_completion_tokens=max_tokens
        )
        text = response.choices[0].message.content or ""
        request = {"model": model, "messages": messages, "tools": None, "output": text}
        return Reply(text, time.perf_counter() - start, [request])

    return ask


def rag(kb: Any, model: str | None = None, k: int = 3, max_tokens: int = 60) -> System:
    """Retrieval-augmented generation with `kb` (a `KnowledgeBase`): the top `k` chunks as context."""

    def ask(question: str) -> Reply:
        start = time.perf_counter()
        answer = kb.answer(question, k=k, model=model, max_tokens=max_tokens)
        request = {"model": answer.model, "messages": answer.messages, "tools": None, "output": answer.text}
        return Reply(answer.text, time.perf_counter() - start, [request], sources=answer.sources.ids)

    return ask


def _run_tools(
    lab: Any, messages: list[dict], tools: list, model: str | None, tool_choice: str, max_tokens: int
) -> tuple[str, list[dict], list[str]]:
    """Run the tool loop; (the final text, every request it sent, the calls made as `name(arguments)`)."""
    from llmlab.tools import run, tool

    schemas = [tool(t).schema for t in tools]
    result = run(
        lab,
        messages,
        tools,
        model=model,
        max_rounds=3,
        tool_choice=tool_choice,
        parallel_tool_calls=False,  # one call a round: a small model's second call in a row is noise
        temperature=0,
        max_completion_tokens=max_tokens,
    )
    requests = [
        {
            "model": model or lab.chat_model,
            "messages": result.messages[:i],
            "tools": schemas,
            "output": message.get("content") or json.dumps(message.get("tool_calls") or []),
        }
        for i, message in enumerate(result.messages)
        if i >= len(messages) and message.get("role") == "assistant"
    ]
    calls = [f"{step.tool}({step.arguments})" for step in result.trace.tool_steps]
    return result.content or "", requests, calls


def with_tools(
    lab: Any,
    tools: list,
    model: str | None = None,
    system_prompt: str | None = None,
    tool_choice: str = "auto",
    max_tokens: int = 60,
) -> System:
    """Function calling: the model may call `tools` (the `llmlab.tools.run` loop), then answers.

    `tool_choice` applies to the first round ("required": it must call one of the tools first).
    """

    def ask(question: str) -> Reply:
        start = time.perf_counter()
        messages = _system_messages(system_prompt, question)
        text, requests, calls = _run_tools(lab, messages, tools, model, tool_choice, max_tokens)
        return Reply(text, time.perf_counter() - start, requests, tool_calls=calls)

    return ask


def hybrid(
    kb: Any,
    tools: list,
    model: str | None = None,
    system_prompt: str | None = None,
    tool_choice: str = "auto",
    k: int = 3,
    max_tokens: int = 60,
) -> System:
    """All three at once: a (fine-tuned) model, the top `k` chunks of `kb` as context, and `tools` it may call."""

    def ask(question: str) -> Reply:
        start = time.perf_counter()
        hits = kb.search(question, k=k)
        messages = build_prompt(question, hits)
        if system_prompt:
            messages[0] = {"role": "system", "content": f"{system_prompt}\n\n{messages[0]['content']}"}
        text, requests, calls = _run_tools(kb.lab, messages, tools, model, tool_choice, max_tokens)
        return Reply(text, time.perf_counter() - start, requests, sources=hits.ids, tool_calls=calls)

    return ask


# ------------------------------------------------------------------------------------------ measuring
def openai_cost(requests: Iterable[dict], model: str = CHAT_MODEL) -> float:
    """USD that the same requests would cost on OpenAI's `model` (a local ``ft:`` model is priced as a
    fine-tuned `model`), with tokens counted offline by `llmlab.tokens`."""
    total = 0.0
    for request in requests:
        priced = f"ft:{model}:llmlab::local" if str(request["model"]).startswith("ft:") else model
        prompt = tokens.count_chat_tokens(request["messages"], model, tools=request.get("tools"))
        total += tokens.chat_cost(priced, prompt, tokens.count_tokens(request["output"] or "", model))
    return total


def evaluate(systems: dict[str, System], questions: pd.DataFrame, progress: bool = True) -> pd.DataFrame:
    """Ask every system every question; one row per (technique, question) with the answer and its score.

    Columns: technique, id, kind, question, answer, correct, seconds, cost_usd, sources, tool_calls.
    """
    rows = []
    pairs = [(name, q) for name in systems for q in questions.itertuples(index=False)]
    for name, q in tqdm(pairs, desc="answering", disable=not progress):
        reply = systems[name](q.question)
        rows.append(
            {
                "technique": name,
                "id": q.id,
                "kind": q.kind,
                "question": q.question,
                "answer": reply.text.strip(),
                "correct": contains_facts(reply.text, q.facts),
                "seconds": reply.seconds,
                "cost_usd": openai_cost(reply.requests),
                "sources": reply.sources,
                "tool_calls": reply.tool_calls,
            }
        )
    return pd.DataFrame(rows)


def summarize(
    rows: pd.DataFrame,
    setup_seconds: dict[str, float] | None = None,
    setup_cost_usd: dict[str, float] | None = None,
) -> pd.DataFrame:
    """One row per technique: accuracy per question kind, overall accuracy, latency, set-up and costs.

    `setup_seconds` / `setup_cost_usd` give each technique's one-off work (training, indexing) and what it
    would cost on OpenAI; the cost of answering is per 1,000 questions.
    """
    order = list(dict.fromkeys(rows["technique"]))
    accuracy = rows.pivot_table(
        index="technique", columns="kind", values="correct", aggfunc="mean", observed=True
    )
    accuracy = accuracy[[k for k in KINDS if k in accuracy.columns]].add_prefix("accuracy_")
    by = rows.groupby("technique")
    table = accuracy.assign(
        accuracy_all=by["correct"].mean(),
        latency_s=by["seconds"].mean(),
        setup_s=pd.Series(setup_seconds or {}, dtype=float),
        setup_cost_usd=pd.Series(setup_cost_usd or {}, dtype=float),
        cost_per_1k_questions_usd=by["cost_usd"].mean() * 1000,
    )
    return table.reindex(order).rename_axis("technique").reset_index()


__all__ = [
    "KINDS",
    "Reply",
    "System",
    "claims_finetuning_vs_function_calling",
    "claims_finetuning_vs_rag",
    "claims_summary",
    "contains_facts",
    "evaluate",
    "hybrid",
    "load_questions",
    "openai_cost",
    "plain",
    "rag",
    "summarize",
    "trained_questions",
    "training_set",
    "with_tools",
]
