"""The widgets of llmlab.ui, driven from Python (set values, click) against the real local backend.

Outside a kernel ipywidgets runs callbacks synchronously and swallows their exceptions, so every test
asserts on widget state and on what the library objects received.
"""

from __future__ import annotations

import csv
import html
import json
import os
import re

import numpy as np
import openai
import pandas as pd
import pytest

from llmlab.course.data import DATA_DIR
from llmlab.datasets import ChatDataset
from llmlab.ui import ChatPanel, ComparisonView, DatasetEditor, JobMonitor, SearchBox, ask_api_key
from llmlab.ui.svg import bar_chart, line_chart

HANDBOOK = ["leave.md", "remote_work.md", "expenses.md", "sick_leave.md"]
LEAVE_QUESTION = "How many days of annual leave do I get?"


@pytest.fixture(scope="module")
def kb(lab):
    """A knowledge base on a few handbook documents."""
    from llmlab.rag import KnowledgeBase

    kb = KnowledgeBase(lab)
    kb.add_documents([DATA_DIR / "handbook" / name for name in HANDBOOK])
    return kb


def _upload_job(client, examples, n_epochs):
    data = "".join(json.dumps(e) + "\n" for e in examples).encode()
    upload = client.files.create(file=("ui_small.jsonl", data), purpose="fine-tune")
    hyper = {"n_epochs": n_epochs, "batch_size": 5}
    return client.fine_tuning.jobs.create(
        model="gpt-4o-mini-2024-07-18",
        training_file=upload.id,
        suffix="ui",
        seed=3,
        method={"type": "supervised", "supervised": {"hyperparameters": hyper}},
    )


# ------------------------------------------------------------------------------------------ charts


def test_line_chart_draws_one_polyline_per_series_and_skips_bad_points():
    svg = line_chart({"train": [(1, 2.0), (2, float("nan")), (3, 0.5)], "validation": [(3, 1.0)]})
    assert re.findall(r'data-series="(\w+)"', svg) == ["train", "validation"]
    train = re.search(r'data-series="train" points="([^"]+)"', svg).group(1).split()
    assert len(train) == 2  # the NaN point is dropped
    assert "no data yet" in line_chart({"train": []})


def test_bar_chart_scales_bars_and_marks_missing_values():
    svg = bar_chart(["a", "b", "c"], [1.0, 2.0, None])
    widths = dict(re.findall(r'data-label="(\w)" x="\d+" y="\d+" width="([\d.]+)"', svg))
    assert float(widths["b"]) == pytest.approx(2 * float(widths["a"]))
    assert float(widths["c"]) == 0 and "n/a" in svg


# ----------------------------------------------------------------------------------- dataset editor


def test_dataset_editor_edits_adds_deletes_and_exports_what_it_shows(tmp_path):
    ds = ChatDataset.from_jsonl(DATA_DIR / "qa_train.jsonl")
    n = len(ds)
    editor = DatasetEditor(ds, page_size=5)
    assert editor.last_error is None
    assert len(editor.rows) == 5 and editor.page_label.value == f"examples 1–5 of {n}"
    first = ds[0]["messages"]
    assert editor.rows[0].values == {m["role"]: m["content"] for m in first}
    assert f"<b>{n}</b> examples" in editor.token_summary.value and "$" in editor.cost.value
    assert editor.report and "OK" in editor.validation.value

    # edit: the dataset changes and the token count follows
    before = int(editor.rows[0].tokens.value.split()[0].replace(",", ""))
    editor.rows[0].fields["assistant"].value = "Twenty-seven days, plus one day per three years. " * 4
    assert ds[0]["messages"][-1]["content"].startswith("Twenty-seven days")
    assert int(editor.rows[0].tokens.value.split()[0].replace(",", "")) > before
    editor.rows[0].fields["system"].value = ""
    assert [m["role"] for m in ds[0]["messages"]] == ["user", "assistant"]

    # delete the second example
    second = ds[1]
    editor.rows[1].delete_button.click()
    assert len(ds) == n - 1 and second not in ds.examples
    assert editor.page_label.value == f"examples 1–5 of {n - 1}"

    # add: through the form (an incomplete one is refused with a message)
    editor.new_fields["user"].value = "Can I bring my dog to the office?"
    editor.add_button.click()
    assert "needs both" in editor.error.value and len(ds) == n - 1
    editor.new_fields["assistant"].value = "Only on Thursdays."
    editor.add_button.click()
    assert editor.error.value == "" and len(ds) == n
    assert ds[-1]["messages"] == [
        {"role": "user", "content": "Can I bring my dog to the office?"},
        {"role": "assistant", "content": "Only on Thursdays."},
    ]
    assert editor.rows[-1].values["assistant"] == "Only on Thursdays."  # the last page is shown
    assert editor.new_fields["user"].value == ""

    # export: the file is the dataset
    editor.path.value = str(tmp_path / "edited.jsonl")
    editor.export_button.click()
    assert editor.last_error is None and "Wrote" in editor.status.value
    assert ChatDataset.from_jsonl(tmp_path / "edited.jsonl").examples == ds.examples


def test_dataset_editor_shows_problems_with_line_numbers_live(tmp_path):
    good = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    no_answer = {"messages": [{"role": "user", "content": "Where is the office?"}]}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n{not json\n" + json.dumps(no_answer) + "\n")
    ds = ChatDataset.from_jsonl(path)
    editor = DatasetEditor(ds, min_examples=1)
    problems = {(p.line, p.code) for p in editor.report.errors}
    assert problems == {(2, "invalid_json"), (3, "example_missing_assistant_message")}
    assert "FAILED" in editor.validation.value
    assert re.search(
        r"<td>3</td><td>2</td><td><code>example_missing_assistant_message", editor.validation.value
    )

    editor.rows[1].fields["assistant"].value = "In Porto and Utrecht."  # fix line 3 in the table
    assert ds[1]["messages"][-1] == {"role": "assistant", "content": "In Porto and Utrecht."}
    assert {(p.line, p.code) for p in editor.report.errors} == {(2, "invalid_json")}
    assert "example_missing_assistant_message" not in editor.validation.value


def test_dataset_editor_pages_and_prices_an_empty_dataset():
    editor = DatasetEditor(ChatDataset.from_pairs([(f"Q{i}?", f"A{i}.") for i in range(7)]), page_size=3)
    editor.next_button.click()
    assert [r.values["user"] for r in editor.rows] == ["Q3?", "Q4?", "Q5?"]
    editor.next_button.click()
    assert [r.index for r in editor.rows] == [6] and editor.next_button.disabled
    assert "too_few_examples" in editor.validation.value
    for _ in range(7):
        editor.rows[0].delete_button.click()
    assert len(editor.dataset) == 0 and editor.rows == [] and editor.last_error is None
    assert "n/a" in editor.cost.value


# -------------------------------------------------------------------------------- comparison, key


def test_comparison_view_has_a_table_and_one_chart_per_metric():
    df = pd.DataFrame(
        {
            "technique": ["base", "fine-tuned", "RAG"],
            "accuracy": [0.1, 0.5, 0.8],
            "latency_s": [0.9, 1.0, np.nan],
        }
    )
    view = ComparisonView(df)
    assert view.metrics == ["accuracy", "latency_s"] and view.labels == ["base", "fine-tuned", "RAG"]
    assert all(label in view.table.value for label in view.labels)
    assert view.charts["accuracy"].value.count("data-label=") == 3
    assert "n/a" in view.charts["latency_s"].value
    indexed = ComparisonView(df.set_index("technique"))
    assert indexed.labels == view.labels and "RAG" in indexed.table.value


def test_ask_api_key_sets_the_environment_only_and_clears_the_input(monkeypatch, capsys):
    # setenv first, so that monkeypatch's teardown also removes the key that the prompt sets: a key left in
    # os.environ would make every notebook after this test (nbval kernels inherit it) talk to OpenAI
    monkeypatch.setenv("OPENAI_API_KEY", "placeholder")
    monkeypatch.delenv("OPENAI_API_KEY")
    prompt = ask_api_key()
    prompt.button.click()
    assert "OPENAI_API_KEY" not in os.environ and "Paste a key" in prompt.status.value
    secret = "sk-test-0123456789abcdef"
    prompt.password.value = secret
    prompt.button.click()
    assert os.environ["OPENAI_API_KEY"] == secret
    assert prompt.password.value == ""
    assert secret not in prompt.status.value and secret[-6:] not in prompt.status.value
    out = capsys.readouterr()
    assert secret not in out.out + out.err


# ------------------------------------------------------------------------------------- job monitor


def test_job_monitor_follows_a_local_job_to_succeeded(lab, ft_examples):
    job = _upload_job(lab.client, ft_examples, n_epochs=2)
    monitor = JobMonitor(lab, job.id, poll_seconds=0.2)
    assert monitor.polling  # a background thread: the constructor returned at once
    final = monitor.wait(timeout=600)
    assert final.status == "succeeded" and monitor.finished
    monitor._thread.join(timeout=5)
    assert not monitor.polling  # polling stops when the job ends
    assert "succeeded" in monitor.status.value and final.fine_tuned_model in monitor.status.value
    steps = [m["step"] for m in monitor.metrics]
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] == monitor.metrics[-1]["total_steps"]
    assert monitor.progress.value == monitor.progress.max == steps[-1]
    assert "epoch 2/2" in monitor.progress_label.value
    train = re.search(r'data-series="train" points="([^"]+)"', monitor.loss_plot.value).group(1).split()
    assert len(train) == len(steps)
    assert [e.message for e in monitor.events][0].startswith("Created fine-tuning job")
    assert "successfully completed" in monitor.event_log.value
    assert len(monitor.checkpoints) == 2 and monitor.cancel_button.disabled
    assert monitor.last_error is None


def test_job_monitor_cancel_button_cancels_the_job(lab, ft_examples):
    job = _upload_job(lab.client, ft_examples, n_epochs=20)
    monitor = JobMonitor(lab, job.id, poll_seconds=0.2, start=False)
    monitor.refresh()
    assert not monitor.cancel_button.disabled
    monitor.cancel_button.click()
    assert monitor.last_error is None
    final = monitor.wait(timeout=300)
    assert final.status == "cancelled" == lab.client.fine_tuning.jobs.retrieve(job.id).status
    assert "cancelled" in monitor.status.value and monitor.cancel_button.disabled


def test_job_monitor_shows_an_unknown_job_as_an_error_and_stops(lab):
    monitor = JobMonitor(lab, "ftjob-does-not-exist", poll_seconds=0.1)
    monitor._thread.join(timeout=30)
    assert not monitor.polling and not monitor.finished
    assert isinstance(monitor.last_error, openai.NotFoundError)
    assert "NotFoundError" in monitor.error.value


# -------------------------------------------------------------------------------------- search box


def test_search_box_shows_hits_and_switches_k_and_backend(lab, kb):
    box = SearchBox(kb)
    assert box.backend.value == kb.index.backend == "exact"
    box.query.value = LEAVE_QUESTION  # what pressing Enter does (continuous_update=False)
    assert box.last_error is None and len(box.hits) == 3
    assert box.hits[0].metadata["source"] == "leave.md"
    assert box.results.value.count("<tr>") == 1 + 3 and "leave.md" in box.results.value
    assert box.hits.ids == kb.search(LEAVE_QUESTION, k=3).ids  # the same as the library's own search

    box.k.value = 5
    assert len(box.hits) == 5 and box.results.value.count("<tr>") == 6
    exact = box.hits.ids
    box.backend.value = "hnsw"
    assert box.last_error is None and kb.index.backend == "exact"
    assert box.hits.ids == exact and "hnsw search" in box.info.value  # a small index: recall 1
    hnsw = box.index_for("hnsw")
    assert hnsw.backend == "hnsw" and len(hnsw) == len(kb.index)

    # a new document is searchable at once, on the rebuilt hnsw copy too
    kb.add_documents(
        ["# Dogs\n\nDogs may come to the Porto office on Thursdays."], metadata={"source": "dogs.md"}
    )
    try:
        box.search("Can I bring my dog to the office?")
        assert box.hits[0].id == "dogs.md#0" and box.index_for("hnsw") is not hnsw
    finally:
        kb.index.delete(["dogs.md#0"])


def test_search_box_over_an_index_and_its_errors(lab, kb):
    box = SearchBox(kb.index, embed=lab, k=2)
    box.search(LEAVE_QUESTION)
    assert box.hits.ids == kb.search(LEAVE_QUESTION, k=2).ids
    box.query.value = "   "
    assert box.hits == [] and box.results.value == ""
    with pytest.raises(TypeError, match="embed="):
        SearchBox(kb.index)

    from llmlab.rag import KnowledgeBase

    empty = SearchBox(KnowledgeBase(lab))
    empty.query.value = "anything"
    assert "empty" in empty.error.value and empty.hits == []


# -------------------------------------------------------------------------------------- chat panel


def test_chat_panel_shows_the_sources_of_each_answer(lab, kb):
    panel = ChatPanel(lab, knowledge_base=kb, max_tokens=40)
    assert panel.model.value == lab.chat_model
    panel.input.value = LEAVE_QUESTION  # Enter
    assert panel.last_error is None and len(panel.turns) == 1
    turn = panel.turns[0]
    assert turn.answer.strip() and turn.model == lab.chat_model
    assert [h.id for h in turn.sources] == kb.search(LEAVE_QUESTION, k=3).ids
    assert turn.sources[0].metadata["source"] == "leave.md"
    assert "llmlab-sources" in panel.history.value and "leave.md#" in panel.history.value
    assert panel.input.value == ""  # cleared for the next message

    panel.send("And how many sick days?")
    assert len(panel.turns) == 2 and panel.history.value.count("llmlab-turn") == 2
    panel.clear_button.click()
    assert panel.turns == [] and panel.history.value == ""


def test_chat_panel_streams_the_answer_and_keeps_the_newest_turn_in_view(lab):
    """The answer appears token by token (the history changes many times during one `send`, each time with a
    longer start of the final answer), and the history is a reversed flex column scrolled to its newest turn."""
    panel = ChatPanel(lab, max_tokens=40)
    seen: list[str] = []
    panel.history.observe(lambda change: seen.append(change["new"]), "value")
    turn = panel.send("Write one sentence about the sea.")
    assert panel.last_error is None and turn.answer.strip()
    answers = [html.unescape(m) for v in seen for m in re.findall(r"<b>Model:</b> (.*?)</div>", v, re.S)]
    assert len(answers) >= 3, answers  # partial answers were shown before the last one
    assert all(turn.answer.strip().startswith(a) for a in answers) and answers[-1] == turn.answer.strip()
    panel.send("And one about the sky.")
    assert "flex-direction:column-reverse" in panel.history.value
    inner = re.search(r'class="llmlab-chat-scroll"[^>]*><div>(.*)</div></div>$', panel.history.value, re.S)
    assert inner and inner.group(1).count("llmlab-turn") == 2
    assert inner.group(1).rfind("the sky") > inner.group(1).rfind("the sea")  # newest last, at the bottom


def test_chat_panel_shows_tool_calls_and_results(lab):
    from llmlab.tools import tool

    with open(DATA_DIR / "employees.csv", encoding="utf-8") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}

    @tool
    def get_leave_balance(employee_name: str) -> dict:
        """Get an employee's annual leave: days in total, taken and left.

        Args:
            employee_name: Full name of the employee, e.g. 'Kwame Mensah'.
        """
        row = rows[employee_name]
        return {k: int(row[f"leave_days_{k}"]) for k in ("total", "taken", "left")}

    panel = ChatPanel(lab, tools=[get_leave_balance], tool_choice="required", max_tokens=64)
    turn = panel.send("How many leave days does Kwame Mensah have left?")
    assert panel.last_error is None and turn is panel.turns[-1]
    assert turn.tool_steps and turn.tool_steps[0].tool == "get_leave_balance"
    step = turn.tool_steps[0]
    assert "llmlab-tool-calls" in panel.history.value and "get_leave_balance(" in panel.history.value
    shown = step.result if step.error is None else step.error
    assert shown and html.escape(shown) in panel.history.value


def test_chat_panel_lists_fine_tuned_models_and_uses_the_chosen_one(lab, finetuned):
    panel = ChatPanel(lab, max_tokens=24)
    assert panel.model.options[0] == lab.chat_model
    assert finetuned.fine_tuned_model in panel.model.options
    panel.model.value = finetuned.fine_tuned_model
    turn = panel.send(LEAVE_QUESTION)
    assert turn.model == finetuned.fine_tuned_model and finetuned.fine_tuned_model in panel.history.value


def test_chat_panel_shows_api_errors_in_the_widget(lab):
    panel = ChatPanel(lab, model="no-such-model")
    assert panel.model.value == "no-such-model"
    panel.input.value = "Hello?"
    assert panel.turns == [] and isinstance(panel.last_error, openai.APIStatusError)
    assert "no-such-model" in panel.error.value
    assert panel.input.value == "Hello?" and not panel.send_button.disabled
