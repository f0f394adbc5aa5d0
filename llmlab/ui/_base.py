"""What every llmlab widget shares: a VBox root with a stable CSS class, an error box, a busy label.

Button and observe callbacks run inside ipywidgets, which logs and swallows their exceptions; `Panel.guard`
turns any exception into a readable message in the widget instead.

>>> import ipywidgets as w
>>> panel = Panel("demo", [w.Label("hi")])
>>> panel.guard(lambda: 1 / 0)()
>>> "ZeroDivisionError" in panel.error.value
True
"""

from __future__ import annotations

import functools
import html
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import ipywidgets as w


def styled(widget: w.Widget, *names: str) -> w.Widget:
    """Add the CSS classes `llmlab-<name>` (stable selectors for browser tests) and return the widget."""
    for name in names:
        widget.add_class(f"llmlab-{name}")
    return widget


# Inline (no stylesheet in an HTML widget): compact tables whose cells align at the top.
TABLE_CSS = (
    "<style>.llmlab-table td,.llmlab-table th{padding:2px 8px;vertical-align:top;text-align:left}"
    ".llmlab-table{border-collapse:collapse}.llmlab-table tr{border-bottom:1px solid #ddd}</style>"
)


def esc(value: Any) -> str:
    """HTML-escape `value` as text."""
    return html.escape("" if value is None else str(value))


class Panel(w.VBox):
    """A VBox with class `llmlab-<name>`, an `error` HTML box and a `busy` label; `.widget` is the panel itself."""

    def __init__(self, name: str, children: Sequence[w.Widget], **kwargs: Any):
        self.error = styled(w.HTML(""), "error")
        self.busy = styled(w.Label(""), "busy")
        self.last_error: BaseException | None = None
        super().__init__(children=[*children, self.busy, self.error], **kwargs)
        styled(self, name)

    @property
    def widget(self) -> Panel:
        return self

    def show_error(self, error: BaseException | None) -> None:
        """Show `error` as a readable message (None clears it)."""
        self.last_error = error
        if error is None:
            self.error.value = ""
        else:
            self.error.value = (
                '<div style="color:#b00020;white-space:pre-wrap">'
                f"<b>{esc(type(error).__name__)}</b>: {esc(error)}</div>"
            )

    def guard(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` wrapped so that an exception is shown in the widget (and kept in `last_error`), not lost."""

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                result = fn(*args, **kwargs)
            except Exception as e:  # shown to the learner; ipywidgets would only log it
                self.show_error(e)
                return None
            self.show_error(None)
            return result

        return wrapper

    @contextmanager
    def working(self, message: str = "working…") -> Iterator[None]:
        """Show `message` in the busy label while the block runs."""
        self.busy.value = message
        try:
            yield
        finally:
            self.busy.value = ""
