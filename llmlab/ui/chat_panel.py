"""`ChatPanel`: chat with a model (base or fine-tuned), optionally grounded in a knowledge base and with tools.

Each answer shows the sources it was given (with a `KnowledgeBase`) and each tool call with its result
(with `tools`, through `llmlab.tools.run`). Without tools the answer streams in token by token; the history
keeps its newest turn in view.

>>> panel = ChatPanel(lab, knowledge_base=kb, tools=[leave_balance])   # doctest: +SKIP
>>> panel.send("How many days of leave do I get?")                     # doctest: +SKIP
>>> panel.turns[-1].sources.ids                                         # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import ipywidgets as w

from llmlab.tools import run
from llmlab.ui._base import Panel, esc, styled


@dataclass
class Turn:
    """One question and its answer, with the model, sources and tool steps that produced it."""

    question: str
    answer: str
    model: str
    sources: list = field(default_factory=list)  # index hits (id, score, text, metadata)
    tool_steps: list = field(default_factory=list)  # llmlab.tools.TraceStep with kind == "tool"
    seconds: float = 0.0


def fine_tuned_models(lab: Any) -> list[str]:
    """The fine-tuned models the client can use (ids starting with "ft:"), newest first."""
    models = [m for m in lab.client.models.list() if m.id.startswith("ft:")]
    return [m.id for m in sorted(models, key=lambda m: m.created or 0, reverse=True)]


class ChatPanel(Panel):
    """A chat history, an input box, a model picker (base + fine-tuned), sources and tool calls per answer.

    State readable from Python: `.turns` (a list of `Turn`), `.history.value` (HTML), `.model.options`.
    Earlier turns (up to `history_turns`) are sent with each question, as plain question/answer pairs;
    `tool_choice` applies to the first model call of each answer (see `llmlab.tools.run`).
    """

    def __init__(
        self,
        lab: Any,
        knowledge_base: Any = None,
        tools: list | None = None,
        model: str | None = None,
        *,
        k: int = 3,
        system: str | None = None,
        history_turns: int = 3,
        max_tokens: int = 200,
        temperature: float = 0.0,
        tool_choice: str | dict = "auto",
    ):
        self.lab, self.knowledge_base, self.tools = lab, knowledge_base, list(tools or [])
        self.k, self.system, self.history_turns = k, system, history_turns
        self.max_tokens, self.temperature, self.tool_choice = max_tokens, temperature, tool_choice
        self.turns: list[Turn] = []

        self.model = styled(
            w.Dropdown(options=[lab.chat_model], value=lab.chat_model, description="model"), "chat-model"
        )
        self.reload_button = styled(
            w.Button(icon="refresh", tooltip="List fine-tuned models again", layout=w.Layout(width="36px")),
            "chat-reload",
        )
        self.history = styled(w.HTML(""), "chat-history")
        self.input = styled(
            w.Text(
                placeholder="Type a message and press Enter",
                continuous_update=False,
                layout=w.Layout(width="520px"),
            ),
            "chat-input",
        )
        self.send_button = styled(w.Button(description="Send", icon="paper-plane"), "chat-send")
        self.clear_button = styled(w.Button(description="Clear"), "chat-clear")
        submit = self.guard(lambda *_: self.send())
        self.input.observe(submit, "value")
        self.send_button.on_click(submit)
        self.clear_button.on_click(self.guard(lambda _: self.clear()))
        self.reload_button.on_click(self.guard(lambda _: self.load_models()))
        super().__init__(
            "chat-panel",
            [
                w.HBox([self.model, self.reload_button]),
                self.history,
                w.HBox([self.input, self.send_button, self.clear_button]),
            ],
        )
        self.guard(self.load_models)(model)

    def load_models(self, select: str | None = None) -> list[str]:
        """Fill the model picker: the base chat model and every fine-tuned model; select `select` if given."""
        current = select or self.model.value
        options = [self.lab.chat_model, *fine_tuned_models(self.lab)]
        if current and current not in options:
            options.append(current)
        self.model.options = options
        self.model.value = current or self.lab.chat_model
        return options

    def clear(self) -> None:
        """Forget the conversation."""
        self.turns.clear()
        self._show()

    def _show(self, writing: Turn | None = None) -> None:
        """Draw the history, plus the answer being written; the newest turn stays in view.

        The scroll box is a reversed flex column: browsers keep such a box scrolled to its end as it grows.
        """
        turns = [*self.turns, writing] if writing else self.turns
        self.history.value = (
            '<div class="llmlab-chat-scroll" style="max-height:480px;overflow-y:auto;display:flex;'
            f'flex-direction:column-reverse"><div>{"".join(self._turn_html(t) for t in turns)}</div></div>'
            if turns
            else ""
        )

    def _messages(self, question: str) -> tuple[list[dict], list]:
        """The messages to send (system, recent turns, the question with retrieved context) and the hits."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for turn in self.turns[-self.history_turns :] if self.history_turns else []:
            messages += [
                {"role": "user", "content": turn.question},
                {"role": "assistant", "content": turn.answer},
            ]
        if self.knowledge_base is None:
            return [*messages, {"role": "user", "content": question}], []
        hits = self.knowledge_base.search(question, k=self.k)
        return [*messages, *self.knowledge_base.build_prompt(question, hits)], list(hits)

    def send(self, text: str | None = None) -> Turn | None:
        """Ask `text` (default: the input box's text, which is then cleared); returns the new `Turn`."""
        question = (self.input.value if text is None else text).strip()
        if not question:
            return None
        self.send_button.disabled = True
        try:
            with self.working(f"{self.model.value} is thinking…"):
                turn = self._ask(question)
            self.turns.append(turn)
        finally:
            self.send_button.disabled = False
            self._show()  # on an error: the finished turns only, no half answer
        if text is None:
            self.input.value = ""  # the observer sees an empty value and does nothing
        return turn

    def _ask(self, question: str) -> Turn:
        """One answer: through `llmlab.tools.run` with tools, else streamed into the history as it comes."""
        start = time.perf_counter()
        messages, hits = self._messages(question)
        turn = Turn(question, "", self.model.value, hits)
        options = {"temperature": self.temperature, "max_completion_tokens": self.max_tokens}
        if self.tools:
            result = run(
                self.lab, messages, self.tools, model=turn.model, tool_choice=self.tool_choice, **options
            )
            turn.answer, turn.tool_steps = result.content or "", result.trace.tool_steps
            if result.status != "completed":
                turn.answer += f"\n[stopped: {result.status}]"
        else:
            chunks = self.lab.client.chat.completions.create(
                model=turn.model, messages=messages, stream=True, **options
            )
            for chunk in chunks:
                delta = chunk.choices[0].delta.content if chunk.choices else None
                if delta:
                    turn.answer += delta
                    turn.seconds = time.perf_counter() - start
                    self._show(writing=turn)
        turn.seconds = time.perf_counter() - start
        return turn

    @staticmethod
    def _turn_html(turn: Turn) -> str:
        sources = "".join(
            f"<li><code>{esc(h.id)}</code> {esc(h.metadata.get('title', ''))} (score {h.score:.3f})</li>"
            for h in turn.sources
        )
        calls = "".join(
            f"<li><code>{esc(s.tool)}({esc(s.arguments)})</code> → "
            + (
                f"<span style='color:#b00020'>{esc(s.error)}</span>"
                if s.error
                else f"<code>{esc(s.result)}</code>"
            )
            + "</li>"
            for s in turn.tool_steps
        )
        return (
            '<div class="llmlab-turn" style="margin:6px 0;padding:6px;border-left:3px solid #1565c0">'
            f"<div><b>You:</b> {esc(turn.question)}</div>"
            f'<div class="llmlab-answer" style="white-space:pre-wrap"><b>Model:</b> {esc(turn.answer.strip())}</div>'
            + (f'<div class="llmlab-tool-calls">Tool calls:<ol>{calls}</ol></div>' if calls else "")
            + (f'<div class="llmlab-sources">Sources:<ol>{sources}</ol></div>' if sources else "")
            + f"<small>{esc(turn.model)} · {turn.seconds:.1f} s</small></div>"
        )
