"""The course's harness: systems built over `lab.client`, asked the same questions, scored and priced.

A *system* is a function `question -> Reply`; `plain`, `with_retrieval`, `with_tools`, `hybrid` and
`first_call` build them, so they run on the local backend and on OpenAI alike. `evaluate` asks every system
every question of `llmlab.course.questions` and scores the answers; `summarize` turns that into one row per
technique, `by_kind` into k/n with a 95% interval (`wilson`) per technique and kind, `tool_decisions` into how
often a system called a tool when it should and when it should not. `evaluate_tool_calls` scores the first
tool call of `first_call` on the tool-calling cases. Its length (~470 lines) is one job, the harness notebook 07
reads: the systems and their scoring belong together.

>>> systems = {"base": plain(lab), "RAG": with_retrieval(kb)}           # doctest: +SKIP
>>> rows = evaluate(systems, load_questions(per_kind=5))              # doctest: +SKIP
>>> summarize(rows, setup_seconds={"RAG": 4.2})                       # doctest: +SKIP
>>> wilson(9, 10)
(0.596, 0.982)
>>> openai_cost([{"model": "gpt-4o-mini", "messages": [], "output": ""}]) >= 0
True
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from llmlab import tokens
from llmlab.course import company
from llmlab.course.questions import KINDS, contains_facts, load_tool_eval
from llmlab.openai_facts import CHAT_MODEL
from llmlab.progress import tqdm
from llmlab.rag import build_prompt
from llmlab.tools import run, tool

__all__ = [
    "Reply",
    "System",
    "by_kind",
    "evaluate",
    "evaluate_tool_calls",
    "first_call",
    "hybrid",
    "openai_cost",
    "plain",
    "summarize",
    "tool_decisions",
    "wilson",
    "with_retrieval",
    "with_tools",
]


# ------------------------------------------------------------------------------------------ systems
@dataclass
class Reply:
    """One answer of a system, with what it cost: the requests it sent (for pricing) and the time.

    `tool_calls` are the calls made, as `name(arguments)`; `message` is the model's last message (an
    `openai` `ChatCompletionMessage`) where a system keeps it (`first_call`); `context` is the retrieved text
    a system put in its prompt (RAG, hybrid).
    """

    text: str
    seconds: float
    requests: list[dict] = field(default_factory=list)  # {"model", "messages", "tools", "output"}
    sources: list[str] = field(default_factory=list)
    tool_calls: list[str] = field(default_factory=list)
    message: Any = None
    context: str = ""


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


def with_retrieval(kb: Any, model: str | None = None, k: int = 3, max_tokens: int = 60) -> System:
    """Retrieval-augmented generation with `kb` (a `KnowledgeBase`): the top `k` chunks as context."""

    def ask(question: str) -> Reply:
        start = time.perf_counter()
        answer = kb.answer(question, k=k, model=model, max_tokens=max_tokens)
        request = {"model": answer.model, "messages": answer.messages, "tools": None, "output": answer.text}
        context = "\n".join(hit.text for hit in answer.sources)
        return Reply(
            answer.text, time.perf_counter() - start, [request], sources=answer.sources.ids, context=context
        )

    return ask


def _definitions(tools: list) -> list[dict]:
    """OpenAI's tool definitions of `tools`: `Tool`s, typed functions, or definitions (dicts) already."""
    return [t if isinstance(t, dict) else tool(t).schema for t in tools]


def _call_text(name: str, arguments: str) -> str:
    return f"{name}({arguments})"


def _run_tools(
    lab: Any, messages: list[dict], tools: list, model: str | None, tool_choice: str, max_tokens: int
) -> tuple[str, list[dict], list[str]]:
    """Run the tool loop; (the final text, every request it sent, the calls made as `name(arguments)`)."""
    schemas = _definitions(tools)
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
    calls = [_call_text(step.tool, step.arguments) for step in result.trace.tool_steps]
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
    """All three at once: a (fine-tuned) model, the top `k` chunks of `kb` as context, and `tools` it may call.

    The context stays in the system message, as in RAG's prompt. (In the user message, the system message and
    tools would be the same for every question and read once by the server, but in one run of 07 the hybrid
    then called a tool on 3 of 15 live questions instead of 10: its tool-call examples ask short questions.)
    """

    def ask(question: str) -> Reply:
        start = time.perf_counter()
        hits = kb.search(question, k=k)
        messages = build_prompt(question, hits)
        if system_prompt:
            messages[0] = {"role": "system", "content": f"{system_prompt}\n\n{messages[0]['content']}"}
        text, requests, calls = _run_tools(kb.lab, messages, tools, model, tool_choice, max_tokens)
        context = "\n".join(hit.text for hit in hits)
        return Reply(
            text, time.perf_counter() - start, requests, sources=hits.ids, tool_calls=calls, context=context
        )

    return ask


def first_call(
    lab: Any,
    tools: list,
    model: str | None = None,
    system_prompt: str | None = None,
    tool_choice: str | dict = "auto",
    max_tokens: int = 64,
) -> System:
    """One request with `tools` (greedy, one call at most) and no tool run: the model's first tool call, or
    its answer. The reply's `message` holds the call (`message.tool_calls`); `evaluate_tool_calls` scores it.
    """
    model = model or lab.chat_model
    definitions = _definitions(tools)

    def ask(question: str) -> Reply:
        messages = _system_messages(system_prompt, question)
        start = time.perf_counter()
        response = lab.client.chat.completions.create(
            model=model,
            messages=messages,
            tools=definitions,
            tool_choice=tool_choice,
            parallel_tool_calls=False,  # only the first call is scored
            temperature=0,
            max_tokens=max_tokens,
        )
        message = response.choices[0].message
        calls = [_call_text(c.function.name, c.function.arguments) for c in message.tool_calls or []]
        output = message.content or json.dumps([c.model_dump() for c in message.tool_calls or []])
        request = {"model": model, "messages": messages, "tools": definitions, "output": output}
        return Reply(
            message.content or "", time.perf_counter() - start, [request], tool_calls=calls, message=message
        )

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


def evaluate(
    systems: dict[str, System], questions: pd.DataFrame, progress: bool = True, workers: int = 1
) -> pd.DataFrame:
    """Ask every system every question; one row per (technique, question) with the answer and its score.

    Columns: technique, id, kind, question, answer, correct, seconds, cost_usd, sources, tool_calls, and
    `retrieved`: for a system that retrieves, whether its context holds the question's key facts (so a
    wrong answer is a reading failure when True, a retrieval failure when False); None for the others.

    With `workers` > 1, that many questions are in flight at once (threads; the rows keep the order of systems
    and questions), for a server that decodes concurrent requests together; `seconds` then includes the time
    an answer waited behind the others, so compare latencies only from runs with `workers=1` (the default; see
    `summarize`'s `latency`).
    """
    pairs = [(name, q) for name in systems for q in questions.itertuples(index=False)]

    def answer(pair: tuple[str, Any]) -> dict:
        name, q = pair
        reply = systems[name](q.question)
        return {
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
            "retrieved": contains_facts(reply.context, q.facts) if reply.sources else None,
        }

    return pd.DataFrame(_in_flight(answer, pairs, workers, "answering", progress))


def _in_flight(
    ask: Callable[[Any], dict], items: list, workers: int, desc: str, progress: bool
) -> list[dict]:
    """`ask` of every item, `workers` at a time (threads), in the items' order, with a progress bar."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(tqdm(pool.map(ask, items), total=len(items), desc=desc, disable=not progress))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% for z=1.96) of a share of k successes in n trials, rounded to 3 places.

    Unlike k/n ± 1.96·sqrt(p(1-p)/n), it stays within [0, 1] and is not empty at 0/n or n/n.

    >>> wilson(0, 15)
    (0.0, 0.204)
    >>> wilson(15, 15)
    (0.796, 1.0)
    """
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (round(max(0.0, centre - half), 3), round(min(1.0, centre + half), 3))


def _counted(flags: pd.Series) -> dict:
    """k, n, the share and its Wilson interval of a column of booleans."""
    k, n = int(flags.sum()), int(flags.count())
    low, high = wilson(k, n)
    return {"k": k, "n": n, "share": k / n if n else float("nan"), "low": low, "high": high}


def by_kind(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per technique and question kind (and "all"): right answers k of n, the share, and its 95%
    Wilson interval `low`–`high`; for systems that retrieve, `retrieved` k/n: questions whose context held
    the key facts.

    >>> rows = pd.DataFrame({"technique": ["RAG"] * 2, "kind": ["live"] * 2, "correct": [True, False],
    ...                      "retrieved": [True, True]})
    >>> by_kind(rows)[["kind", "k", "n", "retrieved"]].values.tolist()
    [['live', 1, 2, '2/2'], ['all', 1, 2, '2/2']]
    """
    out = []
    kinds = [k for k in KINDS if k in set(rows["kind"])] + ["all"]
    for technique, group in rows.groupby("technique", sort=False):
        for kind in kinds:
            part = group if kind == "all" else group[group["kind"] == kind]
            found = (
                part["retrieved"].dropna().astype(bool) if "retrieved" in part else pd.Series([], dtype=bool)
            )
            retrieved = f"{int(found.sum())}/{len(found)}" if len(found) else ""
            out.append(
                {"technique": technique, "kind": kind, **_counted(part["correct"]), "retrieved": retrieved}
            )
    return pd.DataFrame(out)


def tool_decisions(rows: pd.DataFrame, needs_tool: str = "live") -> pd.DataFrame:
    """How often each system called a tool when it should (questions of kind `needs_tool`) and when it should
    not (every other kind): k/n with the share and its 95% Wilson interval, one row per technique and case.
    """
    out = []
    for technique, group in rows.groupby("technique", sort=False):
        called = group["tool_calls"].map(bool)
        for case, mask in (
            ("should call", group["kind"] == needs_tool),
            ("should not", group["kind"] != needs_tool),
        ):
            out.append({"technique": technique, "case": case, **_counted(called[mask])})
    return pd.DataFrame(out)


def summarize(
    rows: pd.DataFrame,
    setup_seconds: dict[str, float] | None = None,
    setup_cost_usd: dict[str, float] | None = None,
    latency: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per technique: accuracy per question kind, overall accuracy, latency, set-up and costs.

    `setup_seconds` / `setup_cost_usd` give each technique's one-off work (training, indexing) and what it
    would cost on OpenAI; the cost of answering is per 1,000 questions. `latency`: rows of `evaluate` whose
    `seconds` give `latency_s` (a run with `workers=1`, when `rows` came from several workers); default `rows`.
    """
    order = list(dict.fromkeys(rows["technique"]))
    accuracy = rows.pivot_table(
        index="technique", columns="kind", values="correct", aggfunc="mean", observed=True
    )
    accuracy = accuracy[[k for k in KINDS if k in accuracy.columns]].add_prefix("accuracy_")
    by = rows.groupby("technique")
    table = accuracy.assign(
        accuracy_all=by["correct"].mean(),
        latency_s=(rows if latency is None else latency).groupby("technique")["seconds"].mean(),
        setup_s=pd.Series(setup_seconds or {}, dtype=float),
        setup_cost_usd=pd.Series(setup_cost_usd or {}, dtype=float),
        cost_per_1k_questions_usd=by["cost_usd"].mean() * 1000,
    )
    return table.reindex(order).rename_axis("technique").reset_index()


def _same(expected: Any, got: Any) -> bool:
    """Equal up to case and surrounding spaces in strings, and int/float in numbers."""
    if isinstance(expected, str) and isinstance(got, str):
        return expected.strip().casefold() == got.strip().casefold()
    if isinstance(expected, (int, float)) and isinstance(got, (int, float)) and not isinstance(got, bool):
        return abs(expected - got) < 1e-9
    if isinstance(expected, dict) and isinstance(got, dict):
        return all(k in got and _same(v, got[k]) for k, v in expected.items())
    return expected == got


def evaluate_tool_calls(
    lab: Any,
    cases: list[dict] | None = None,
    *,
    model: str | None = None,
    tool_choice: str | dict = "auto",
    tools: list | None = None,
    max_tokens: int = 64,
    progress: bool = True,
    workers: int = 1,
) -> pd.DataFrame:
    """Ask each question once (the company's system prompt + question, greedy: `first_call`) and score the
    model's first tool call. `workers`: questions in flight at once, as in `evaluate`.

    `right_tool`: it called the expected tool, or no tool when none is expected. `right_arguments`: that,
    and every expected argument has the expected value (strings compared ignoring case). One row per case,
    with the call (`tool`, `arguments`), the text `answer` when the model answered instead, and `seconds`.
    `cases` defaults to `load_tool_eval()`; `tools` (`Tool`s or OpenAI tool definitions) replaces the
    company's tools, e.g. to try other descriptions.

    >>> scores = evaluate_tool_calls(lab, load_tool_eval()[:5])  # doctest: +SKIP
    >>> scores[["right_tool", "right_arguments"]].mean()  # doctest: +SKIP
    """
    cases = load_tool_eval() if cases is None else cases
    model = model or lab.chat_model
    tools = company.company_tools() if tools is None else tools
    ask = first_call(lab, tools, model, company.system_prompt(), tool_choice, max_tokens)

    def score(case: dict) -> dict:
        reply = ask(case["question"])
        calls = reply.message.tool_calls or []
        name = calls[0].function.name if calls else None
        try:
            arguments = json.loads(calls[0].function.arguments) if calls else None
        except json.JSONDecodeError:  # possible on OpenAI; the local backend's arguments always parse
            arguments = calls[0].function.arguments
        right_tool = name == case["tool"]
        return {
            "id": case.get("id"),
            "question": case["question"],
            "expected_tool": case["tool"],
            "expected_arguments": case["arguments"],
            "tool": name,
            "arguments": arguments,
            "right_tool": right_tool,
            "right_arguments": right_tool and (name is None or _same(case["arguments"], arguments)),
            "answer": reply.message.content,
            "seconds": reply.seconds,
        }

    rows = _in_flight(score, cases, workers, f"{model} · tool_choice={tool_choice}", progress)
    frame = pd.DataFrame(rows, columns=_TOOL_EVAL_COLUMNS)
    for column in ("expected_tool", "tool", "answer"):  # keep None ("no tool") rather than pandas' NaN
        frame[column] = pd.Series([r[column] for r in rows], dtype=object)
    return frame


_TOOL_EVAL_COLUMNS = [
    "id",
    "question",
    "expected_tool",
    "expected_arguments",
    "tool",
    "arguments",
    "right_tool",
    "right_arguments",
    "answer",
    "seconds",
]
