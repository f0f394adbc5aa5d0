"""llmlab.openai_facts, the one home of what llmlab knows about OpenAI, agrees with the SDK and its users."""

from __future__ import annotations

import typing

import pytest
from openai.types.fine_tuning import FineTuningJob

from llmlab import openai_facts, tokens
from llmlab.local import chat_format, jobs
from llmlab.models import CHAT_MODEL_ID, EMBEDDING_MODEL_ID, resolve_alias


@pytest.mark.parametrize("snapshot", sorted(openai_facts.FINE_TUNABLE_SNAPSHOTS))
def test_every_fine_tunable_snapshot_is_priced_and_served_locally(snapshot):
    # the local backend used to refuse the older -MMDD snapshots (gpt-3.5-turbo-0125) with a 404
    assert openai_facts.undated(snapshot) == openai_facts.FINE_TUNABLE_SNAPSHOTS[snapshot]
    assert resolve_alias(snapshot) == CHAT_MODEL_ID
    assert tokens.price_for(snapshot).training is not None


@pytest.mark.parametrize(
    ("name", "served_by"),
    [
        ("gpt-4-0613", CHAT_MODEL_ID),
        ("gpt-4o-2024-11-20", CHAT_MODEL_ID),
        ("text-embedding-3-small", EMBEDDING_MODEL_ID),
        (CHAT_MODEL_ID, CHAT_MODEL_ID),
        ("gpt-4o-mini-preview", None),
        ("llama-3-2024-01-01", None),
    ],
)
def test_dated_and_undated_names_resolve_alike(name, served_by):
    assert resolve_alias(name) == served_by


def test_job_statuses_are_the_sdks():
    sdk_statuses = set(typing.get_args(FineTuningJob.model_fields["status"].annotation))
    assert set(openai_facts.FINISHED_JOB_STATUSES) | set(jobs.ACTIVE) == sdk_statuses
    assert not set(openai_facts.FINISHED_JOB_STATUSES) & set(jobs.ACTIVE)


def test_content_parts_render_and_count_as_their_text():
    parts = [{"type": "text", "text": "Where is "}, {"type": "text", "text": "the office?"}]
    as_parts = [{"role": "user", "content": parts}]
    as_text = [{"role": "user", "content": "Where is the office?"}]
    assert chat_format.render(as_parts) == chat_format.render(as_text)
    # only the text parts are counted: an image part adds no text tokens
    with_image = [{"role": "user", "content": [*parts, {"type": "image_url", "image_url": {"url": "x"}}]}]
    assert tokens.count_chat_tokens(with_image) == tokens.count_chat_tokens(as_parts)
