"""Widgets to see and touch each technique; each is a thin view over the library objects.

>>> from llmlab.ui import DatasetEditor, JobMonitor, SearchBox, ChatPanel, ComparisonView, ask_api_key
>>> SearchBox(kb)  # doctest: +SKIP

Every widget is an `ipywidgets.VBox` with the CSS class `llmlab-<name>`; its state is readable from Python
(e.g. `SearchBox.hits`, `ChatPanel.turns`, `JobMonitor.job`), and errors appear in it as a message.
"""

from llmlab.ui.api_key import ApiKeyPrompt, ask_api_key
from llmlab.ui.chat_panel import ChatPanel, Turn
from llmlab.ui.comparison import ComparisonView
from llmlab.ui.dataset_editor import DatasetEditor
from llmlab.ui.job_monitor import JobMonitor
from llmlab.ui.search_box import SearchBox

__all__ = [
    "ApiKeyPrompt",
    "ChatPanel",
    "ComparisonView",
    "DatasetEditor",
    "JobMonitor",
    "SearchBox",
    "Turn",
    "ask_api_key",
]
