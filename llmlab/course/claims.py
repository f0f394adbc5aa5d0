"""The usual claims about fine-tuning, RAG and function calling, as tables (the seeds' qualitative
comparisons); notebook 07 sets them beside the measured table of `llmlab.course.evaluation`.

>>> finetuning_vs_rag().loc["Knowledge updates", "RAG"]
'Instant: add or replace a document'
>>> list(summary().columns)
['Fine-tuning', 'RAG', 'Function calling']
"""

from __future__ import annotations

import pandas as pd

__all__ = ["finetuning_vs_function_calling", "finetuning_vs_rag", "summary"]

_FT, _RAG, _FC = "Fine-tuning", "RAG", "Function calling"

_FINETUNING_VS_RAG = {
    "What it changes": ("The model's weights", "The prompt: retrieved text is added to it"),
    "Best for": (
        "Style, format, tone, a narrow task done the same way every time",
        "Knowledge: facts from your own documents",
    ),
    "Knowledge updates": ("Re-train on the corrected examples", "Instant: add or replace a document"),
    "Set-up": ("Prepare examples, then a training job", "Chunk, embed and index the documents"),
    "Data needed": ("Hundreds of curated Q&A examples", "The documents as they are"),
    "Answers unseen questions": ("Only as well as it generalises", "When the right passage is retrieved"),
    "Shows its sources": ("No", "Yes: the retrieved passages"),
    "Hallucination risk": ("Higher: facts are memorised, not looked up", "Lower: grounded in the context"),
    "Cost per question": ("Short prompts, but fine-tuned models cost more per token", "Longer prompts"),
}

_FINETUNING_VS_FUNCTION_CALLING = {
    "What it changes": ("The model's weights", "Nothing in the model: your code runs functions it asks for"),
    "Best for": ("How the model answers", "Live data and actions: databases, APIs, bookings"),
    "Freshness": ("Frozen at training time", "Always current: the function reads the live data"),
    "Set-up": ("Examples and a training job", "Write the functions and their JSON schemas"),
    "Failure mode": ("Confidently wrong answers", "A wrong tool or wrong arguments; errors can be fed back"),
    "Latency": ("One model call", "At least two model calls plus the function"),
    "Combines with the other": (
        "Fine-tuning on tool-call examples makes the model call tools more reliably",
        "Needs a model that can choose tools and fill in arguments",
    ),
}

_SUMMARY = {
    "Teaches": ("Behaviour and format", "Knowledge from documents", "Access to live data and actions"),
    "Changes the model": ("Yes", "No", "No"),
    "Up-to-date facts": ("No (until re-trained)", "Yes (re-index)", "Yes (live)"),
    "Set-up effort": ("High", "Medium", "Medium"),
    "Latency per answer": ("Low", "Medium (retrieval + longer prompt)", "Higher (several calls)"),
    "Shows where an answer came from": ("No", "Sources", "Tool-call trace"),
    "Typical use": ("A consistent support tone; a strict output format", "Handbook Q&A", "My leave balance"),
}


def finetuning_vs_rag() -> pd.DataFrame:
    """The usual qualitative comparison of fine-tuning and RAG, one row per aspect.

    >>> list(finetuning_vs_rag().columns)
    ['Fine-tuning', 'RAG']
    """
    return pd.DataFrame.from_dict(_FINETUNING_VS_RAG, orient="index", columns=[_FT, _RAG])


def finetuning_vs_function_calling() -> pd.DataFrame:
    """The usual qualitative comparison of fine-tuning and function calling, one row per aspect."""
    return pd.DataFrame.from_dict(_FINETUNING_VS_FUNCTION_CALLING, orient="index", columns=[_FT, _FC])


def summary() -> pd.DataFrame:
    """The three techniques side by side: what each teaches, costs and is good for."""
    return pd.DataFrame.from_dict(_SUMMARY, orient="index", columns=[_FT, _RAG, _FC])
