"""`DatasetEditor`: edit a `ChatDataset` as a table, with live validation, token counts, cost and export.

Edits go straight into the dataset (its `examples`), so what you see is what `to_jsonl` writes.

>>> from llmlab.datasets import ChatDataset
>>> editor = DatasetEditor(ChatDataset.from_jsonl("data/qa_train.jsonl"))   # doctest: +SKIP
>>> editor.export("my_qa.jsonl")                                              # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ipywidgets as w

from llmlab import tokens
from llmlab.openai_facts import FINETUNE_MODEL
from llmlab.ui._base import TABLE_CSS, Panel, esc, styled

ROLES = ("system", "user", "assistant")


def _position(messages: list[dict], role: str) -> int | None:
    """Index of the message the editor shows for `role`: the first system/user, the last assistant."""
    found = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == role]
    if not found:
        return None
    return found[-1] if role == "assistant" else found[0]


class ExampleRow:
    """One rendered example: Textareas for system / user / assistant, its token count and a delete button."""

    def __init__(self, editor: DatasetEditor, index: int):
        self.index = index
        example = editor.dataset.examples[index]
        messages = example.get("messages") if isinstance(example.get("messages"), list) else []
        line = editor.dataset.lines[index]
        extra = len(messages) - sum(_position(messages, r) is not None for r in ROLES)
        note = f" (+{extra} more messages)" if extra > 0 else ""
        note += " (tools)" if "tools" in example else ""
        self.header = styled(
            w.HTML(f"<b>#{index + 1}</b>" + (f" line {line}" if line else " new") + esc(note)), "row-header"
        )
        self.fields: dict[str, w.Textarea] = {}
        for role in ROLES:
            pos = _position(messages, role)
            content = messages[pos].get("content") if pos is not None else ""
            area = w.Textarea(
                value=content if isinstance(content, str) else "",
                placeholder=role,
                continuous_update=False,
                layout=w.Layout(width="30%", height="4.5em"),
            )
            area.observe(
                editor.guard(lambda change, r=role: editor.edit(self.index, r, change["new"])), "value"
            )
            self.fields[role] = styled(area, f"row-{role}")
        self.tokens = styled(w.Label(""), "row-tokens")
        self.delete_button = styled(
            w.Button(
                description="", icon="trash", tooltip="Delete this example", layout=w.Layout(width="36px")
            ),
            "row-delete",
        )
        self.delete_button.on_click(editor.guard(lambda _: editor.delete(self.index)))
        self.widget = styled(
            w.VBox(
                [
                    w.HBox([self.header, self.tokens, self.delete_button]),
                    w.HBox([self.fields[r] for r in ROLES]),
                ]
            ),
            "row",
        )

    @property
    def values(self) -> dict[str, str]:
        """The texts shown, by role."""
        return {role: area.value for role, area in self.fields.items()}


class DatasetEditor(Panel):
    """A table of a dataset's examples (paged) with add / edit / delete, validation, tokens, cost and export.

    State readable from Python: `.rows` (the `ExampleRow`s of the page shown), `.report` (the last
    `ValidationReport`), `.validation.value`, `.token_summary.value`, `.cost.value`, `.status.value`.
    """

    def __init__(
        self, dataset: Any, model: str = FINETUNE_MODEL, page_size: int = 10, min_examples: int = 10
    ):
        self.dataset, self.model, self.page_size, self.min_examples = dataset, model, page_size, min_examples
        self.page = 0
        self.rows: list[ExampleRow] = []
        self.report: Any = None

        self.table = styled(w.VBox([]), "dataset-table")
        self.prev_button = styled(w.Button(description="◀", layout=w.Layout(width="40px")), "page-prev")
        self.next_button = styled(w.Button(description="▶", layout=w.Layout(width="40px")), "page-next")
        self.page_label = styled(w.Label(""), "page-label")
        self.prev_button.on_click(self.guard(lambda _: self.show_page(self.page - 1)))
        self.next_button.on_click(self.guard(lambda _: self.show_page(self.page + 1)))

        self.new_fields = {
            role: styled(
                w.Textarea(placeholder=f"new {role}", layout=w.Layout(width="30%", height="4.5em")),
                f"new-{role}",
            )
            for role in ROLES
        }
        self.add_button = styled(w.Button(description="Add example", icon="plus"), "add")
        self.add_button.on_click(self.guard(lambda _: self.add_from_form()))

        self.validation = styled(w.HTML(""), "validation")
        self.token_summary = styled(w.HTML(""), "tokens")
        self.cost = styled(w.HTML(""), "cost")
        self.path = styled(w.Text(value="training.jsonl", description="Export to"), "export-path")
        self.export_button = styled(w.Button(description="Export JSONL", icon="download"), "export")
        self.export_button.on_click(self.guard(lambda _: self.export(self.path.value)))
        self.status = styled(w.Label(""), "status")
        super().__init__(
            "dataset-editor",
            [
                w.HBox([self.prev_button, self.page_label, self.next_button]),
                self.table,
                w.HBox([*self.new_fields.values(), self.add_button]),
                self.token_summary,
                self.cost,
                self.validation,
                w.HBox([self.path, self.export_button]),
                self.status,
            ],
        )
        self.guard(self.refresh)()

    # ---- changes to the dataset ---------------------------------------------------------------------
    def edit(self, index: int, role: str, text: str) -> None:
        """Set the `role` message of example `index` to `text` (an empty system text removes the system message)."""
        example = self.dataset.examples[index]
        messages = list(example.get("messages") or [])
        pos = _position(messages, role)
        if pos is not None and messages[pos].get("content") == text:
            return
        if pos is not None and role == "system" and not text:
            del messages[pos]
        elif pos is not None:
            messages[pos] = {**messages[pos], "content": text}
        elif text:
            insert_at = {
                "system": 0,
                "user": _position(messages, "system") is not None,
                "assistant": len(messages),
            }
            messages.insert(int(insert_at[role]), {"role": role, "content": text})
        self.dataset.examples[index] = {**example, "messages": messages}
        self.refresh(rebuild_rows=False)

    def delete(self, index: int) -> None:
        """Remove example `index` from the dataset."""
        del self.dataset.examples[index]
        del self.dataset.lines[index]
        self.refresh()

    def add(self, user: str, assistant: str, system: str = "") -> None:
        """Append one example (through `ChatDataset.add_pair`) and show the last page."""
        self.dataset.add_pair(user, assistant, system=system or None)
        self.page = self._last_page()
        self.refresh()

    def add_from_form(self) -> None:
        """Add the example typed in the "new" fields, then clear them."""
        values = {role: area.value.strip() for role, area in self.new_fields.items()}
        if not values["user"] or not values["assistant"]:
            raise ValueError("A new example needs both a user message and an assistant answer.")
        self.add(values["user"], values["assistant"], values["system"])
        for area in self.new_fields.values():
            area.value = ""

    def export(self, path: str | Path) -> Path:
        """Write the dataset with its own atomic `to_jsonl`; returns the path."""
        with self.working("writing…"):
            written = self.dataset.to_jsonl(path)
        self.status.value = f"Wrote {len(self.dataset)} examples to {written}"
        return written

    # ---- display --------------------------------------------------------------------------------------
    def _last_page(self) -> int:
        return max(0, (len(self.dataset) - 1) // self.page_size)

    def show_page(self, page: int) -> None:
        """Show page `page` (clamped) of the table."""
        self.page = min(max(page, 0), self._last_page())
        self.refresh()

    def refresh(self, rebuild_rows: bool = True) -> None:
        """Re-validate, recount tokens and price, and (unless only a text changed) rebuild the rows."""
        with self.working("checking…"):
            self.page = min(self.page, self._last_page())
            if rebuild_rows:
                start = self.page * self.page_size
                stop = min(start + self.page_size, len(self.dataset))
                self.rows = [ExampleRow(self, i) for i in range(start, stop)]
                self.table.children = [row.widget for row in self.rows]
                self.page_label.value = f"examples {start + 1 if stop else 0}–{stop} of {len(self.dataset)}"
                self.prev_button.disabled = self.page == 0
                self.next_button.disabled = self.page == self._last_page()
            self.report = self.dataset.validate(model=self.model, min_examples=self.min_examples)
            self.validation.value = self._validation_html()
            self._show_tokens()

    def _show_tokens(self) -> None:
        counts = self.dataset.stats(self.model).per_example["total_tokens"].tolist()
        for row in self.rows:
            row.tokens.value = f"{counts[row.index]:,} tokens"
        total = sum(counts)
        self.token_summary.value = (
            f"<b>{len(counts)}</b> examples · <b>{total:,}</b> tokens ({tokens.encoding_name_for(self.model)}) · "
            f"max {max(counts, default=0):,} per example"
        )
        try:
            self.cost.value = f"Estimated fine-tuning cost: {esc(self.dataset.estimate_cost(self.model))}"
        except ValueError as e:  # an empty dataset, or a model that cannot be fine-tuned
            self.cost.value = f"Estimated fine-tuning cost: n/a ({esc(e)})"

    def _validation_html(self) -> str:
        report = self.report
        color = "#2e7d32" if report else "#b00020"
        rows = "".join(
            f"<tr><td>{severity}</td>"
            f"<td>{p.line if p.line is not None else ''}</td>"
            f"<td>{p.example + 1 if p.example is not None else ''}</td>"
            f"<td><code>{esc(p.code)}</code></td><td>{esc(p.message)}</td></tr>"
            for severity, problems in (("error", report.errors), ("warning", report.warnings))
            for p in problems
        )
        table = (
            TABLE_CSS
            + '<table class="llmlab-problems llmlab-table"><tr><th>severity</th><th>line</th><th>example</th>'
            f"<th>code</th><th>message</th></tr>{rows}</table>"
            if rows
            else ""
        )
        return f"<div style='color:{color}'><b>{esc(report.summary())}</b></div>{table}"
