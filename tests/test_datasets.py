"""ChatDataset: building, validating every error class with exact line numbers, statistics, cost, atomic writes."""

import json
import os
import subprocess
import sys

import matplotlib
import pandas as pd
import pytest
from crashes import killed_at_replace

from llmlab import tokens
from llmlab.course.data import DATA_DIR
from llmlab.datasets import MIN_EXAMPLES, ChatDataset, Problem, ValidationReport, validate_file

matplotlib.use("Agg")

GOOD = {
    "messages": [{"role": "user", "content": "How many leave days?"}, {"role": "assistant", "content": "25."}]
}
OTHER = {
    "messages": [{"role": "user", "content": "Who approves leave?"}, {"role": "assistant", "content": "HR."}]
}
WEATHER = {
    "type": "function",
    "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}},
}


def call(name="weather", arguments='{"city": "Oslo"}', id_="c1"):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_example(*calls, tools=(WEATHER,), answer_id="c1"):
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": list(calls)},
        {"role": "tool", "tool_call_id": answer_id, "content": "12 C"},
        {"role": "assistant", "content": "12 C in Oslo."},
    ]
    return {"messages": messages, "tools": list(tools)} if tools is not None else {"messages": messages}


def line(obj) -> bytes:
    return obj if isinstance(obj, bytes) else json.dumps(obj).encode()


def write(path, lines) -> str:
    path.write_bytes(b"".join(line(x) + b"\n" for x in lines))
    return str(path)


def found(report: ValidationReport, severity="errors"):
    return [(p.line, p.code) for p in getattr(report, severity) if p.code != "too_few_examples"]


def both_paths(path, **kw) -> ValidationReport:
    """validate_file (streaming) and ChatDataset.validate must agree exactly."""
    streamed = validate_file(path, **kw)
    loaded = ChatDataset.from_jsonl(path).validate(**kw)
    assert (streamed.errors, streamed.warnings) == (loaded.errors, loaded.warnings)
    return streamed


def msg(role, content, **extra):
    return {"role": role, "content": content, **extra}


# Each case: a bad line placed at line 2, after a good line 1, and the error it must produce on line 2.
ERROR_CASES = {
    "blank_line": b"   ",
    "invalid_utf8": b'{"messages": [{"role": "user", "content": "caf\xe9"}]}',
    "invalid_json": b'{"messages": [{"role": "user" "content": "hi"}]}',
    "data_type": [GOOD],
    "missing_messages_list": {"conversation": []},
    "dpo_format": {
        "input": {"messages": [msg("user", "hi")]},
        "preferred_output": [],
        "non_preferred_output": [],
    },
    "prompt_completion_format": {"prompt": "hi", "completion": "hello"},
    "message_missing_key": {"messages": [{"content": "hi"}, msg("assistant", "hello")]},
    "message_unrecognized_key": {"messages": [msg("user", "hi", mood="happy"), msg("assistant", "hello")]},
    "unrecognized_role": {"messages": [msg("customer", "hi"), msg("assistant", "hello")]},
    "missing_content": {"messages": [msg("user", "   "), msg("assistant", "hello")]},
    "invalid_weight": {"messages": [msg("user", "hi"), msg("assistant", "hello", weight=0.5)]},
    "invalid_tools": {
        **tool_example(call()),
        "tools": [{"type": "function", "function": {"description": "x"}}],
    },
    "invalid_parallel_tool_calls": {**tool_example(call()), "parallel_tool_calls": "yes"},
    "invalid_tool_call": tool_example({"id": "c1", "type": "function"}),
    "tool_call_arguments_not_json": tool_example(call(arguments="{city: Oslo}")),
    "undeclared_tool": tool_example(call(name="stock_price")),
    "tool_message_missing_id": {
        "messages": [msg("user", "hi"), msg("assistant", None, tool_calls=[call()]), msg("tool", "12 C")],
        "tools": [WEATHER],
    },
    "unknown_tool_call_id": tool_example(call(), answer_id="c9"),
    "example_missing_assistant_message": {"messages": [msg("system", "Be brief."), msg("user", "hi")]},
}


@pytest.mark.parametrize("code", list(ERROR_CASES))
def test_each_error_class_is_reported_on_its_line(tmp_path, code):
    path = write(tmp_path / "bad.jsonl", [GOOD, ERROR_CASES[code], OTHER])
    report = both_paths(path, min_examples=1)
    assert not report
    assert (2, code) in found(report)
    assert all(where == 2 for where, _ in found(report)), found(report)


def test_message_that_is_not_an_object(tmp_path):
    path = write(tmp_path / "bad.jsonl", [{"messages": ["hi", msg("assistant", "hello")]}])
    assert found(both_paths(path, min_examples=1)) == [(1, "data_type")]


def test_undeclared_tool_without_any_tools(tmp_path):
    path = write(tmp_path / "bad.jsonl", [tool_example(call(), tools=None)])
    assert found(both_paths(path, min_examples=1)) == [(1, "undeclared_tool")]


WEIRD = [
    {"messages": {"role": "user"}},
    {"messages": [{"role": ["user"], "content": "hi"}, {"role": "assistant", "content": {"text": "x"}}]},
    {"messages": [{"role": "assistant", "content": "x", "weight": [1]}], "tools": "all"},
    {"messages": [{"role": "assistant", "content": None, "tool_calls": {"id": 1}}], "tools": [None, 3]},
    {"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"function": {"name": 5}}]}]},
    {"messages": [{"role": "tool", "content": "x", "tool_call_id": 7}, None, 3, "s"]},
]


def test_malformed_examples_never_crash_and_are_errors(tmp_path):
    report = both_paths(write(tmp_path / "weird.jsonl", WEIRD), min_examples=1)
    assert {p.line for p in report.errors} == set(range(1, len(WEIRD) + 1))
    assert ChatDataset.from_jsonl(tmp_path / "weird.jsonl").stats().per_example.shape == (len(WEIRD), 3)


def test_in_memory_problems_name_the_example():
    ds = ChatDataset([GOOD, OTHER, GOOD, {"messages": [msg("user", {1, 2}), msg("assistant", "a")]}])
    report = ds.validate(min_examples=1)
    problems = report.errors + report.warnings
    duplicate = next(p for p in problems if p.code == "duplicate_example")
    assert (duplicate.line, duplicate.example) == (None, 2) and "example 0" in duplicate.message
    assert any(p.code == "data_type" and p.example == 3 for p in problems)


def test_empty_file(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    report = both_paths(tmp_path / "empty.jsonl")
    assert [(p.line, p.code) for p in report.errors] == [(None, "empty_file"), (None, "too_few_examples")]


def test_too_few_examples(tmp_path):
    path = write(
        tmp_path / "few.jsonl",
        [GOOD] + [{"messages": [msg("user", f"q{i}"), msg("assistant", "a")]} for i in range(8)],
    )
    report = both_paths(path)
    assert [(p.line, p.code) for p in report.errors] == [(None, "too_few_examples")]
    assert "9" in report.errors[0].message and str(MIN_EXAMPLES) in report.errors[0].message


WARNING_CASES = {
    "duplicate_example": GOOD,
    "weight_on_non_assistant": {"messages": [msg("user", "hi", weight=0), msg("assistant", "hello")]},
    "unrecognized_example_key": {**GOOD, "metadata": {"source": "faq"}},
    "last_message_not_assistant": {
        "messages": [msg("user", "hi"), msg("assistant", "hello"), msg("user", "thanks")]
    },
    "nothing_to_train": {"messages": [msg("user", "hi"), msg("assistant", "hello", weight=0)]},
}


@pytest.mark.parametrize("code", list(WARNING_CASES))
def test_each_warning_class_is_reported_on_its_line(tmp_path, code):
    path = write(tmp_path / "warn.jsonl", [GOOD, WARNING_CASES[code]])
    report = both_paths(path, min_examples=1)
    assert report, report  # warnings never fail a file
    assert found(report, "warnings") == [(2, code)]


def test_too_long_uses_the_model_training_context(tmp_path):
    long = {"messages": [msg("user", "hello " * 17_000), msg("assistant", "ok")]}
    path = write(tmp_path / "long.jsonl", [GOOD, long])
    assert found(both_paths(path, model="gpt-3.5-turbo", min_examples=1), "warnings") == [(2, "too_long")]
    assert found(both_paths(path, model="gpt-4o-mini-2024-07-18", min_examples=1), "warnings") == []  # 65,536


def test_unknown_model_falls_back_with_a_warning(tmp_path):
    report = both_paths(write(tmp_path / "ok.jsonl", [GOOD]), model="SmolLM2-135M-Instruct", min_examples=1)
    assert report and [p.code for p in report.warnings] == ["unknown_model"]


def test_good_file_with_tools_integer_weights_and_parts_passes(tmp_path):
    examples = [
        tool_example(call(), call(id_="c2", arguments='{"city": "Rome"}')),
        {**tool_example(call()), "parallel_tool_calls": False},
        {
            "messages": [
                msg("user", "hi"),
                msg("assistant", "a", weight=0),
                msg("user", "again"),
                msg("assistant", "b", weight=1),
            ]
        },
        {"messages": [msg("user", [{"type": "text", "text": "describe"}]), msg("assistant", "ok")]},
        {"messages": [msg("system", "s"), msg("user", "q", name="ann"), msg("assistant", "r")]},
    ]
    examples[0]["messages"].insert(3, {"role": "tool", "tool_call_id": "c2", "content": "20 C"})
    report = both_paths(write(tmp_path / "good.jsonl", examples), min_examples=1)
    assert report, str(report)
    assert report.warnings == []


def test_mixed_file_keeps_every_good_line_and_reports_every_bad_one(tmp_path):
    lines, good_lines, bad_lines = [], [], []
    bad_cycle = [b"", b"{oops", b"\xff\xfe", b"[1, 2]", b'"text"']
    for i in range(30):
        if i % 3 == 1:
            lines.append(bad_cycle[(i // 3) % len(bad_cycle)])
            bad_lines.append(i + 1)
        else:
            lines.append({"messages": [msg("user", f"question {i}"), msg("assistant", f"answer {i}")]})
            good_lines.append(i + 1)
    path = write(tmp_path / "mixed.jsonl", lines)
    ds = ChatDataset.from_jsonl(path)
    assert ds.lines == good_lines
    assert [e["messages"][0]["content"] for e in ds] == [f"question {n - 1}" for n in good_lines]
    assert sorted(p.line for p in ds.load_problems) == bad_lines
    report = ds.validate()
    assert sorted(p.line for p in report.errors) == bad_lines  # 20 good examples: no other error
    assert report.n_examples == 20


def test_crlf_and_bom_are_accepted(tmp_path):
    path = tmp_path / "win.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + line(GOOD) + b"\r\n" + line(OTHER) + b"\r\n")
    assert found(both_paths(path, min_examples=1)) == []


def test_invalid_json_message_gives_the_position(tmp_path):
    ds = ChatDataset.from_jsonl(write(tmp_path / "bad.jsonl", [b'{"messages": [1,, 2]}']))
    assert "column 17" in ds.load_problems[0].message


def test_report_dataframe_and_text(tmp_path):
    report = both_paths(write(tmp_path / "bad.jsonl", [GOOD, b"{", GOOD]))
    df = report.to_dataframe()
    assert list(df.columns) == ["severity", "line", "example", "code", "message"]
    assert df.iloc[0][["severity", "line", "code"]].tolist() == ["error", 2, "invalid_json"]
    assert set(df["severity"]) == {"error", "warning"}
    text = str(report)
    assert (
        text.startswith("FAILED")
        and "line 2: [invalid_json]" in text
        and "line 3: [duplicate_example]" in text
    )
    assert "<table" in report._repr_html_()
    assert isinstance(report.errors[0], Problem)


def test_report_text_is_capped_for_huge_files(tmp_path):
    report = validate_file(write(tmp_path / "bad.jsonl", [b"{"] * 120))
    text = str(report)
    assert text.count("[invalid_json]") == 50 and "... and 71 more errors" in text  # + too_few_examples
    assert report.format(limit=200).count("[invalid_json]") == 120


def test_build_from_pairs_append_index_iterate():
    ds = ChatDataset.from_pairs([("q1", "a1"), ("q2", "a2")], system="Be brief.")
    ds.add_pair("q3", "a3")
    ds.append([msg("user", "q4"), msg("assistant", "a4")])
    ds.append(tool_example(call()))
    assert len(ds) == 5
    assert ds[0]["messages"][0] == msg("system", "Be brief.")
    assert ds[2]["messages"] == [msg("user", "q3"), msg("assistant", "a3")]
    assert isinstance(ds[1:3], ChatDataset) and len(ds[1:3]) == 2
    assert [e["messages"][-1]["content"] for e in ds][:4] == ["a1", "a2", "a3", "a4"]


def test_jsonl_round_trip(tmp_path):
    ds = ChatDataset.from_pairs([("Ünïcode ✓?", "yes 日本")])
    ds.append(tool_example(call()))
    path = ds.to_jsonl(tmp_path / "out.jsonl")
    again = ChatDataset.from_jsonl(path)
    assert again.examples == ds.examples and again.lines == [1, 2] and again.load_problems == []
    assert "日本" in path.read_text(encoding="utf-8")


def test_dataframe_round_trip_and_custom_columns():
    df = pd.DataFrame({"q": ["How many days?", "Who approves?"], "a": ["25.", "Your manager."]})
    ds = ChatDataset.from_dataframe(df, question="q", answer="a", system="HR bot")
    assert ds[1]["messages"] == [
        msg("system", "HR bot"),
        msg("user", "Who approves?"),
        msg("assistant", "Your manager."),
    ]
    ds.append(tool_example(call()))
    out = ds.to_dataframe()
    assert list(out["user"]) == ["How many days?", "Who approves?", "Weather in Oslo?"]
    assert ChatDataset.from_dataframe(out).examples == ds.examples
    with pytest.raises(KeyError, match="question"):
        ChatDataset.from_dataframe(df)


def test_csv_round_trip(tmp_path):
    ds = ChatDataset.from_pairs([('He said "hi", then left', "line1\nline2")], system="s")
    ds.append(tool_example(call()))
    again = ChatDataset.from_csv(ds.to_csv(tmp_path / "ds.csv"))
    assert again.examples == ds.examples


def test_csv_of_question_answer_columns(tmp_path):
    (tmp_path / "qa.csv").write_text('question,answer\nHow many days?,25\nPets allowed?,"No, sorry"\n')
    ds = ChatDataset.from_csv(tmp_path / "qa.csv")
    assert ds[1]["messages"] == [msg("user", "Pets allowed?"), msg("assistant", "No, sorry")]


def test_atomic_write_keeps_old_file_when_the_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "train.jsonl"
    ChatDataset([GOOD]).to_jsonl(path)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated crash before the rename)")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        ChatDataset.from_pairs([("new", "data")] * 20).to_jsonl(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["train.jsonl"]  # no temporary file left behind


def test_atomic_write_keeps_old_file_when_serialization_fails(tmp_path):
    path = tmp_path / "train.jsonl"
    ChatDataset([GOOD]).to_jsonl(path)
    with pytest.raises(TypeError):
        ChatDataset([GOOD, {"messages": [msg("user", {1, 2})]}]).to_jsonl(path)
    assert ChatDataset.from_jsonl(path).examples == [GOOD]


def test_a_killed_write_keeps_the_old_file_and_the_next_write_removes_its_temp_file(tmp_path):
    path = tmp_path / "train.jsonl"
    ChatDataset([GOOD]).to_jsonl(path)
    code = f"from llmlab.datasets import ChatDataset; ChatDataset([{OTHER!r}] * 50).to_jsonl({str(path)!r})"
    orphans = []
    for _ in range(2):  # each killed write leaves its temp file and removes the one left before it
        killed_at_replace(code, nth=1)  # the temp file is written, the rename never happens
        assert ChatDataset.from_jsonl(path).examples == [GOOD]
        (orphan,) = {p.name for p in tmp_path.iterdir()} - {"train.jsonl"}
        assert orphan.startswith(".train.jsonl.") and orphan.endswith(".tmp") and orphan not in orphans
        orphans.append(orphan)
    live = tmp_path / f".train.jsonl.{os.getpid()}-live1234.tmp"  # a write still running in this process
    other = tmp_path / ".eval.jsonl.abc12345.tmp"  # another file's
    live.write_text("x")
    other.write_text("x")
    ChatDataset([OTHER]).to_jsonl(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, live.name, other.name])
    assert ChatDataset.from_jsonl(path).examples == [OTHER]


DEEP_LINE = b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"  # RecursionError in json.loads
LONG_NUMBER_LINE = b'{"messages": [], "n": ' + b"7" * 5000 + b"}"  # ValueError: too many digits for int()
DEEP_ARGUMENTS = tool_example(call(arguments='{"city": ' + "[" * 5000 + "]" * 5000 + "}"))


def test_lines_python_cannot_parse_are_reported_and_the_good_lines_kept(tmp_path):
    path = write(tmp_path / "odd.jsonl", [GOOD, DEEP_LINE, LONG_NUMBER_LINE, DEEP_ARGUMENTS, OTHER])
    report = both_paths(path, min_examples=1)
    assert found(report) == [(2, "invalid_json"), (3, "invalid_json"), (4, "tool_call_arguments_not_json")]
    ds = ChatDataset.from_jsonl(path)
    assert ds.lines == [1, 4, 5] and ds.examples[0] == GOOD and ds.examples[2] == OTHER
    deep, digits = ds.load_problems
    assert "nested too deeply" in deep.message and "too many digits" in digits.message
    cli = subprocess.run(
        [sys.executable, "-m", "llmlab.cli", "validate", path], capture_output=True, text=True, timeout=120
    )
    assert cli.returncode == 1 and "Traceback" not in cli.stderr, cli.stderr
    assert "line 2: [invalid_json]" in cli.stdout and "line 3: [invalid_json]" in cli.stdout


def test_stats_counts_and_true_percentiles():
    ds = ChatDataset.from_pairs([(f"q{i}", "word " * i) for i in range(1, 101)])
    stats = ds.stats("gpt-4o-mini")
    per = stats.per_example
    assert list(per.columns) == ["total_tokens", "assistant_tokens", "n_messages"]
    assert per["total_tokens"].tolist() == [
        tokens.count_chat_tokens(e["messages"], "gpt-4o-mini") for e in ds
    ]
    assert per["assistant_tokens"].tolist() == [tokens.count_tokens("word " * i) for i in range(1, 101)]
    summary = stats.summary
    assert list(summary.columns) == ["min", "max", "mean", "median", "p5", "p95"]
    values = per["assistant_tokens"].astype(float)
    assert summary.loc["assistant_tokens", "p5"] == pytest.approx(values.quantile(0.05))
    assert summary.loc["assistant_tokens", "p95"] == pytest.approx(values.quantile(0.95))
    assert summary.loc["n_messages", "max"] == 2
    ax = stats.plot()
    assert sum(p.get_height() for p in ax.patches) == 100
    assert "<table" in stats._repr_html_()


def test_counts_follow_edits_in_place():
    ds = ChatDataset.from_pairs([("q", "short")] * 3)
    ds.validate()
    before = ds.stats().per_example["assistant_tokens"].tolist()
    ds[1]["messages"][1]["content"] = "a much longer answer than before"
    after = ds.stats().per_example["assistant_tokens"].tolist()
    assert after[0] == before[0] and after[1] == tokens.count_tokens("a much longer answer than before")


def test_weight_zero_is_not_trained():
    ds = ChatDataset(
        [
            {
                "messages": [
                    msg("user", "q"),
                    msg("assistant", "draft", weight=0),
                    msg("user", "again"),
                    msg("assistant", "final answer", weight=1),
                ]
            }
        ]
    )
    assert ds.stats().per_example["assistant_tokens"][0] == tokens.count_tokens("final answer")


@pytest.mark.parametrize(("n", "epochs"), [(1, 25), (10, 10), (34, 3), (100, 3)])
def test_estimate_cost_uses_default_epochs(n, epochs):
    ds = ChatDataset.from_pairs([(f"question {i}", "answer") for i in range(n)])
    estimate = ds.estimate_cost("gpt-4o-mini-2024-07-18")
    per_epoch = sum(tokens.count_chat_tokens(e["messages"], "gpt-4o-mini") for e in ds)
    assert (estimate.n_epochs, estimate.tokens_per_epoch, estimate.billed_tokens) == (
        epochs,
        per_epoch,
        per_epoch * epochs,
    )
    assert estimate.cost_usd == pytest.approx(per_epoch * epochs * 3.00 / 1e6)
    assert tokens.PRICES_DATE in str(estimate)
    assert ds.estimate_cost("gpt-4.1-nano-2025-04-14", n_epochs=2).billed_tokens == per_epoch * 2


def test_estimate_cost_unknown_model_lists_known():
    ds = ChatDataset.from_pairs([("q", "a")])
    with pytest.raises(tokens.UnknownModelError, match="gpt-4o-mini-2024-07-18"):
        ds.estimate_cost("gpt-5-ultra")
    with pytest.raises(tokens.UnknownModelError, match="cannot be fine-tuned"):
        ds.estimate_cost("text-embedding-3-small")


def test_split_is_deterministic_and_complete():
    ds = ChatDataset.from_pairs([(f"q{i}", f"a{i}") for i in range(50)])
    train, val = ds.split(0.2, seed=7)
    assert (len(train), len(val)) == (40, 10)
    again_train, again_val = ds.split(0.2, seed=7)
    assert again_val.examples == val.examples and again_train.examples == train.examples
    assert sorted(json.dumps(e) for e in train.examples + val.examples) == sorted(json.dumps(e) for e in ds)
    assert ds.split(0.2, seed=8)[1].examples != val.examples
    assert len(ChatDataset.from_pairs([("a", "b"), ("c", "d")]).split(0.1)[1]) == 1


def test_dedupe_keeps_first_occurrence(tmp_path):
    path = write(
        tmp_path / "dups.jsonl", [GOOD, {"messages": [msg("user", "x"), msg("assistant", "y")]}, GOOD, GOOD]
    )
    unique = ChatDataset.from_jsonl(path).dedupe()
    assert len(unique) == 2 and unique.lines == [1, 2]


@pytest.mark.parametrize("name", ["qa_train.jsonl", "tools_train.jsonl"])
def test_shipped_training_files_are_valid_for_openai(name):
    path = DATA_DIR / name
    if not path.exists():
        pytest.skip(f"{path} not written yet")
    report = validate_file(path, model="gpt-4o-mini-2024-07-18")
    assert report, str(report)
    assert report.n_examples >= 10


def test_import_is_cheap():
    code = "import sys, llmlab.datasets; print(sorted(m for m in ('torch', 'pandas', 'matplotlib', 'bpe_openai', 'transformers', 'fastapi') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_validator_the_server_shares_loads_no_notebook_library():
    """`llmlab.validation` (the server's and the CLI's validator) validates a file without pandas, numpy,
    matplotlib or `llmlab.datasets` in the process (the import rule `validator-lean` checks the imports)."""
    code = (
        "import sys\n"
        "from llmlab.validation import validate_file\n"
        f"report = validate_file({str(DATA_DIR / 'qa_train.jsonl')!r})\n"
        "assert report and report.n_examples > 10, report\n"
        "print(sorted(m for m in ('pandas', 'numpy', 'matplotlib', 'llmlab.datasets') if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_the_notebook_report_is_the_validators_report_with_a_table():
    from llmlab import validation

    plain = validation.validate_file(DATA_DIR / "qa_train.jsonl")
    rich = validate_file(DATA_DIR / "qa_train.jsonl")
    assert isinstance(rich, validation.ValidationReport) and not hasattr(plain, "to_dataframe")
    assert (rich.errors, rich.warnings, rich.n_examples, rich.model) == (
        plain.errors,
        plain.warnings,
        plain.n_examples,
        plain.model,
    )
    assert str(rich) == str(plain) and "<b>OK: " in rich._repr_html_()
