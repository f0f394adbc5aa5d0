"""A masked prompt that sets `OPENAI_API_KEY` for this Python process only, never printing or saving it.

>>> prompt = ask_api_key()  # doctest: +SKIP
>>> lab = llmlab.connect()  # doctest: +SKIP
"""

from __future__ import annotations

import os

import ipywidgets as w

from llmlab.ui._base import Panel, styled

ENV_VAR = "OPENAI_API_KEY"


class ApiKeyPrompt(Panel):
    """A Password input and a button; the key goes to `os.environ` of this process and the input is cleared."""

    def __init__(self) -> None:
        self.password = styled(
            w.Password(placeholder="sk-…", description="API key", layout=w.Layout(width="420px")),
            "api-key-input",
        )
        self.button = styled(w.Button(description="Use key", button_style="primary"), "api-key-button")
        self.status = styled(w.Label(self._state()), "api-key-status")
        self.button.on_click(self.guard(lambda _: self.submit()))
        super().__init__("api-key", [w.HBox([self.password, self.button]), self.status])

    @staticmethod
    def _state() -> str:
        return f"{ENV_VAR} is set for this session." if os.environ.get(ENV_VAR) else f"{ENV_VAR} is not set."

    def submit(self) -> bool:
        """Move the typed key into the environment (this process only) and clear the input; False if empty."""
        key = self.password.value.strip()
        self.password.value = ""
        if not key:
            self.status.value = "Paste a key first (nothing was changed)."
            return False
        os.environ[ENV_VAR] = key
        self.status.value = (
            f"{ENV_VAR} set for this Python process only (not saved anywhere). "
            "Run llmlab.connect() to use OpenAI."
        )
        return True


def ask_api_key() -> ApiKeyPrompt:
    """The API-key prompt widget: display it (last line of a cell), paste the key, click "Use key"."""
    return ApiKeyPrompt()
