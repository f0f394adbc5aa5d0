"""What llmlab knows about OpenAI's API, written once: model names, dated snapshots, fine-tuned model
names, the statuses that end a fine-tuning job, and the text of content parts.

Helpers and the local backend import these; nothing here talks HTTP (the dataset validator uses it too).

>>> undated("gpt-4o-mini-2024-07-18"), undated("gpt-3.5-turbo-0125"), undated("gpt-4o-mini")
('gpt-4o-mini', 'gpt-3.5-turbo', 'gpt-4o-mini')
>>> base_model("ft:gpt-4o-mini-2024-07-18:acme:faq:9x2")
'gpt-4o-mini-2024-07-18'
>>> content_text([{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}, {"type": "text", "text": "b"}])
'ab'
"""

from __future__ import annotations

import re
from typing import Any

# The defaults a notebook uses: a chat model, an embedding model, and the snapshot it fine-tunes.
CHAT_MODEL = "gpt-4o-mini"
EMBEDDING_MODEL = "text-embedding-3-small"
FINETUNE_MODEL = "gpt-4o-mini-2024-07-18"

# OpenAI's chat and embedding model names (the local backend accepts each as an alias of its own model).
CHAT_MODELS = (
    CHAT_MODEL,
    "gpt-4o",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "gpt-4",
    "gpt-4-turbo",
    "gpt-3.5-turbo",
    "gpt-5",
    "gpt-5-mini",
    "gpt-5-nano",
)
EMBEDDING_MODELS = (EMBEDDING_MODEL, "text-embedding-3-large", "text-embedding-ada-002")

# The fine-tunable snapshots that OpenAI's fine-tuning price list names, each with its undated model.
FINE_TUNABLE_SNAPSHOTS = {
    FINETUNE_MODEL: CHAT_MODEL,
    "gpt-4o-2024-08-06": "gpt-4o",
    "gpt-4.1-2025-04-14": "gpt-4.1",
    "gpt-4.1-mini-2025-04-14": "gpt-4.1-mini",
    "gpt-4.1-nano-2025-04-14": "gpt-4.1-nano",
    "gpt-3.5-turbo-0125": "gpt-3.5-turbo",
}

# A fine-tuning job with one of these statuses will not change again.
FINISHED_JOB_STATUSES = ("succeeded", "failed", "cancelled")

# A snapshot's date: -YYYY-MM-DD (gpt-4o-mini-2024-07-18) or the older -MMDD (gpt-3.5-turbo-0125).
_DATE_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{4})$")


def undated(model: str) -> str:
    """`model` without a snapshot's date; other names unchanged.

    >>> undated("text-embedding-3-small")
    'text-embedding-3-small'
    """
    return _DATE_SUFFIX.sub("", model)


def base_model(model: str) -> str:
    """The base model of a fine-tuned model name (``ft:BASE:org:suffix:id``); other names unchanged.

    >>> base_model("gpt-4o")
    'gpt-4o'
    """
    return model.split(":")[1] if model.startswith("ft:") and model.count(":") >= 2 else model


def text_parts(content: Any) -> list[str]:
    """The texts of a message's content parts (a list of ``{"type": "text", "text": ...}``); others skipped.

    >>> text_parts([{"type": "text", "text": "a"}, {"type": "input_audio"}]), text_parts("not parts")
    (['a'], [])
    """
    if not isinstance(content, list):
        return []
    return [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]


def content_text(content: Any) -> str:
    """A message's `content` as text: a string, None, or a list of content parts (their texts joined).

    >>> content_text(None), content_text("Hi")
    ('', 'Hi')
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(text_parts(content))
    return str(content)
