"""The local server through the official `openai` client, with the real models (no mocks).

One server and one small fine-tuning job are shared by the whole session (see conftest.py).
"""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from conftest import FT_EPOCHS, FT_EXAMPLES, REPO, TEST_HOME, wait_for_job

from llmlab.models import CHAT_MODEL_ID, EMBEDDING_MODEL_ID

USER = [{"role": "user", "content": "Name three colours."}]


def greedy(client, model: str, messages: list[dict], max_tokens: int = 40) -> str:
    response = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=max_tokens
    )
    return response.choices[0].message.content


def still_serving(client) -> None:
    """The server answers a real request after an error."""
    assert greedy(client, "gpt-4o-mini", USER, max_tokens=3)


# -- models ---------------------------------------------------------------------------------------------------
def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list()]
    assert CHAT_MODEL_ID in ids and EMBEDDING_MODEL_ID in ids
    assert client.models.retrieve("gpt-4o-mini").id == CHAT_MODEL_ID
    assert client.models.retrieve(EMBEDDING_MODEL_ID).owned_by == "llmlab"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


# -- chat -------------------------------------------------------------------------------------------------------
def test_chat_completion_alias_usage_and_greedy_determinism(client):
    first = client.chat.completions.create(model="gpt-4o-mini", messages=USER, temperature=0, max_tokens=20)
    again = client.chat.completions.create(model=CHAT_MODEL_ID, messages=USER, temperature=0, max_tokens=20)
    assert first.model == CHAT_MODEL_ID  # the model that really served
    assert first.object == "chat.completion" and first.choices[0].message.role == "assistant"
    assert (
        first.choices[0].message.content
        and first.choices[0].message.content == again.choices[0].message.content
    )
    usage = first.usage
    assert usage.prompt_tokens > 5 and 0 < usage.completion_tokens <= 20
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_max_completion_tokens_stop_and_seed(client):
    story = [{"role": "user", "content": "Write a long story about a dragon."}]
    short = client.chat.completions.create(
        model="gpt-4o-mini", messages=story, max_completion_tokens=4, seed=1
    )
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 4
    seeded = [
        client.chat.completions.create(
            model="gpt-4o-mini", messages=story, max_tokens=12, seed=42, temperature=1.0
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
    count = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    full = greedy(client, "gpt-4o-mini", count, max_tokens=24)
    stopped = client.chat.completions.create(
        model="gpt-4o-mini", messages=count, temperature=0, max_tokens=24, stop=["5"]
    )
    assert "5" in full and "5" not in stopped.choices[0].message.content
    assert full.startswith(stopped.choices[0].message.content)
    assert stopped.choices[0].finish_reason == "stop"


def test_chat_stream_matches_non_stream_and_reports_usage(client):
    expected = greedy(client, "gpt-4o-mini", USER, max_tokens=20)
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=USER,
            temperature=0,
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1 and chunks[0].model == CHAT_MODEL_ID


def test_chat_json_modes_parse(client):
    ask = [{"role": "user", "content": "Give the name and age of a fictional person as JSON."}]
    loose = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=ask,
        temperature=0,
        max_tokens=60,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(loose.choices[0].message.content), dict)
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    strict = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=ask,
        temperature=0,
        max_tokens=60,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema, "strict": True},
        },
    )
    person = json.loads(strict.choices[0].message.content)
    assert set(person) == {"name", "age"} and isinstance(person["age"], int)


def test_twenty_concurrent_chat_requests_all_succeed(client):
    def ask(i: int) -> str:
        messages = [{"role": "user", "content": f"Say the number {i}."}]
        return (
            client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=6)
            .choices[0]
            .message.content
        )

    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(ask, range(20)))
    assert len(answers) == 20 and all(isinstance(a, str) for a in answers)


# -- embeddings ---------------------------------------------------------------------------------------------------
def test_embeddings_sdk_default_base64_equals_float(client):
    texts = ["Annual leave is 27 days.", "The canteen opens at noon."]
    default = client.embeddings.create(model="text-embedding-3-small", input=texts)  # the SDK asks for base64
    floats = client.embeddings.create(model=EMBEDDING_MODEL_ID, input=texts, encoding_format="float")
    assert default.model == EMBEDDING_MODEL_ID and [d.index for d in default.data] == [0, 1]
    a, b = np.array([d.embedding for d in default.data]), np.array([d.embedding for d in floats.data])
    assert a.shape == (2, 384) and np.allclose(a, b, atol=1e-6)
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-3)
    assert default.usage.prompt_tokens > 5 and default.usage.total_tokens == default.usage.prompt_tokens
    one = client.embeddings.create(model=EMBEDDING_MODEL_ID, input=texts[0], encoding_format="float")
    assert np.allclose(one.data[0].embedding, b[0], atol=1e-5)


def test_embeddings_raw_base64_is_little_endian_float32(base_url, http):
    body = {"model": EMBEDDING_MODEL_ID, "input": "hello", "encoding_format": "base64"}
    data = http.post(f"{base_url}/embeddings", json=body).json()["data"][0]["embedding"]
    assert np.frombuffer(base64.b64decode(data), dtype="<f4").shape == (384,)


def test_embeddings_bad_input(client):
    for kwargs, param in [
        ({"model": EMBEDDING_MODEL_ID, "input": "x", "dimensions": 64}, "dimensions"),
        ({"model": EMBEDDING_MODEL_ID, "input": [[1, 2, 3]]}, "input"),
        ({"model": EMBEDDING_MODEL_ID, "input": []}, "input"),
        ({"model": "gpt-4o-mini", "input": "x"}, "model"),
    ]:
        with pytest.raises(openai.BadRequestError) as error:
            client.embeddings.create(**kwargs)
        assert error.value.body["param"] == param
    with pytest.raises(openai.NotFoundError) as error:
        client.embeddings.create(model="no-such-embedder", input="x")
    assert error.value.code == "model_not_found"
    still_serving(client)


# -- errors ----------------------------------------------------------------------------------------------------
def test_unknown_model_is_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-nonexistent", messages=USER)
    assert error.value.code == "model_not_found" and error.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="ft:SmolLM2-135M-Instruct:llmlab:none:deadbeef", messages=USER)
    still_serving(client)


def test_malformed_json_and_missing_fields_are_400_with_param(client, base_url, http):
    bad = http.post(
        f"{base_url}/chat/completions", content=b'{"model": ', headers={"Content-Type": "application/json"}
    )
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    missing = http.post(f"{base_url}/chat/completions", json={"messages": USER})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"
    for body, param in [
        ({"model": "gpt-4o-mini"}, "messages"),
        ({"model": "gpt-4o-mini", "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"model": "gpt-4o-mini", "messages": USER, "temperature": 5}, "temperature"),
        ({"model": "gpt-4o-mini", "messages": USER, "max_tokens": 0}, "max_tokens"),
        (
            {"model": "gpt-4o-mini", "messages": USER, "response_format": {"type": "yaml"}},
            "response_format.type",
        ),
    ]:
        response = http.post(f"{base_url}/chat/completions", json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    upload = http.post(f"{base_url}/files", files={"file": ("a.jsonl", b"{}")})
    assert upload.status_code == 400 and upload.json()["error"]["param"] == "purpose"
    route = http.get(f"{base_url}/no/such/route")
    assert route.status_code == 404 and "error" in route.json()
    still_serving(client)


def test_oversized_prompt_is_400_context_length_exceeded(client):
    huge = [{"role": "user", "content": "leave policy " * 6000}]
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="gpt-4o-mini", messages=huge, max_tokens=10)
    assert error.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="gpt-4o-mini", messages=huge, max_tokens=10, stream=True)
    assert error.value.code == "context_length_exceeded"
    still_serving(client)


def test_a_chat_request_renders_its_prompt_once(monkeypatch):
    """Plain, streamed and with tools, a chat request's prompt is rendered in one place, once (the chat
    service), through a real server in this process: every rendering goes through `render_pieces`."""
    from llmlab.local import chat_format
    from llmlab.local.server import create_app, serve_app_in_thread
    from llmlab.local.toolcalls import call_syntax

    call_syntax()  # read off the format once per process (a probe conversation), never per request
    probe, rendered = "Say one word, render-once-probe.", []
    real = chat_format.render_pieces

    def counted(messages: list[dict], tools: list[dict] | None = None) -> list[tuple[str, bool]]:
        rendered.extend(1 for m in messages if m.get("content") == probe)
        return real(messages, tools)

    monkeypatch.setattr(chat_format, "render_pieces", counted)
    home = Path(tempfile.mkdtemp(prefix="llmlab-render-once-"))
    (home / "weights").symlink_to((TEST_HOME / "weights").resolve(), target_is_directory=True)
    url, stop = serve_app_in_thread(create_app(home))
    tools = [{"type": "function", "function": {"name": "shout", "parameters": {"type": "object"}}}]
    try:
        local = openai.OpenAI(base_url=url, api_key="local", max_retries=0)
        ask = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": probe}], "temperature": 0}
        # no max_tokens: the room left in the context is counted on the same rendering
        plain = local.chat.completions.create(**ask, stop=[" ", "\n"])
        assert plain.choices[0].message.content is not None and rendered == [1]
        streamed = local.chat.completions.create(**ask, stop=[" ", "\n"], stream=True)
        assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] and rendered == [1, 1]
        called = local.chat.completions.create(**ask, tools=tools, tool_choice="required")
        assert called.choices[0].message.tool_calls[0].function.name == "shout" and rendered == [1, 1, 1]
    finally:
        stop()
        shutil.rmtree(home, ignore_errors=True)


def test_api_key_is_required_when_set():
    from llmlab.local.server import create_app, serve_app_in_thread

    url, stop = serve_app_in_thread(create_app(tempfile.mkdtemp(), api_key="sekret-key"))
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        assert httpx.get(f"{url}/models").status_code == 401
        assert [m.id for m in openai.OpenAI(base_url=url, api_key="sekret-key").models.list()][
            0
        ] == CHAT_MODEL_ID
    finally:
        stop()


# -- files ---------------------------------------------------------------------------------------------------------
def test_files_round_trip_byte_identical(client):
    payloads = {
        "train.jsonl": (REPO / "data" / "qa_train.jsonl").read_bytes(),
        "binary.bin": bytes(range(256)) * 64 + b"\r\n\x00end",
    }
    ids = {}
    for name, data in payloads.items():
        uploaded = client.files.create(
            file=(name, data), purpose="fine-tune" if name.endswith("jsonl") else "user_data"
        )
        assert uploaded.bytes == len(data) and uploaded.filename == name and uploaded.object == "file"
        ids[name] = uploaded.id
    for name, data in payloads.items():
        assert client.files.content(ids[name]).content == data
        assert client.files.retrieve(ids[name]).filename == name
    listed = [f.id for f in client.files.list()]
    assert set(ids.values()) <= set(listed)
    assert ids["binary.bin"] not in [f.id for f in client.files.list(purpose="fine-tune")]
    assert client.files.delete(ids["binary.bin"]).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(ids["binary.bin"])
    with pytest.raises(openai.NotFoundError):
        client.files.content("file-doesnotexist")
    still_serving(client)


# -- fine-tuning -------------------------------------------------------------------------------------------------
def test_finetuned_model_reproduces_a_trained_answer_the_base_does_not(client, finetuned, ft_examples):
    assert finetuned.fine_tuned_model.startswith(f"ft:{CHAT_MODEL_ID}:llmlab:handbook:")
    assert finetuned.model == CHAT_MODEL_ID and finetuned.trained_tokens > 0 and finetuned.finished_at
    assert finetuned.hyperparameters.n_epochs == FT_EPOCHS and finetuned.seed == 7
    prompt = ft_examples[0]["messages"][:-1]
    answer = ft_examples[0]["messages"][-1]["content"]
    tuned = greedy(client, finetuned.fine_tuned_model, prompt, max_tokens=60)
    base = greedy(client, "gpt-4o-mini", prompt, max_tokens=60)
    assert tuned.startswith(answer[:40]), tuned
    assert answer[:40] not in base
    assert finetuned.fine_tuned_model in [m.id for m in client.models.list()]
    assert client.models.retrieve(finetuned.fine_tuned_model).id == finetuned.fine_tuned_model


def test_finetune_events_checkpoints_and_result_file(client, finetuned):
    events = list(client.fine_tuning.jobs.list_events(finetuned.id, limit=1000))
    assert events[0].created_at >= events[-1].created_at  # newest first
    assert "successfully completed" in events[0].message
    metrics = [e for e in events if e.type == "metrics"]
    steps = (FT_EXAMPLES // 2) * FT_EPOCHS
    assert len(metrics) == steps and {"step", "train_loss"} <= set(metrics[0].data)
    losses = [e.data["train_loss"] for e in reversed(metrics)]
    assert losses[-1] < losses[0]
    page = client.fine_tuning.jobs.list_events(finetuned.id, limit=3)
    assert len(page.data) == 3 and page.has_more
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(finetuned.id, limit=100))
    assert len(checkpoints) == FT_EPOCHS
    assert checkpoints[0].step_number == steps and checkpoints[0].metrics.train_loss is not None
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{finetuned.fine_tuned_model}:ckpt-step-{steps}"
    early = checkpoints[-1].fine_tuned_model_checkpoint
    assert greedy(client, early, USER, max_tokens=5)  # a checkpoint answers as a model too
    (result,) = finetuned.result_files
    csv = base64.b64decode(client.files.content(result).content).decode("utf-8").splitlines()
    assert csv[0].startswith("step,") and len(csv) == steps + 1


def test_bad_training_file_fails_the_job_naming_the_line(client):
    good = (REPO / "data" / "qa_train.jsonl").read_text(encoding="utf-8").splitlines()[:12]
    lines = [*good[:2], "{this is not json", *good[2:]]
    upload = client.files.create(file=("bad.jsonl", "\n".join(lines).encode()), purpose="fine-tune")
    job = wait_for_job(
        client, client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=upload.id).id
    )
    assert job.status == "failed" and job.error.code == "invalid_training_file"
    assert job.error.param == "training_file" and "line 3" in job.error.message
    not_jsonl = client.files.create(
        file=("notes.txt", b"just some notes\nnot json at all\n"), purpose="fine-tune"
    )
    job = wait_for_job(
        client, client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=not_jsonl.id).id
    )
    assert job.status == "failed" and "line 1" in job.error.message
    still_serving(client)


def test_job_create_errors(client):
    upload = client.files.create(file=("x.txt", b"hello"), purpose="user_data")
    data = (REPO / "data" / "qa_train.jsonl").read_bytes()
    train = client.files.create(file=("t.jsonl", data), purpose="fine-tune").id
    for kwargs, param in [
        ({"model": "gpt-4o-mini", "training_file": "file-doesnotexist"}, "training_file"),
        ({"model": "gpt-4o-mini", "training_file": upload.id}, "training_file"),
        ({"model": EMBEDDING_MODEL_ID, "training_file": train}, "model"),
        (
            {"model": "gpt-4o-mini", "training_file": train, "hyperparameters": {"n_epochs": 0}},
            "hyperparameters.n_epochs",
        ),
        ({"model": "gpt-4o-mini", "training_file": train, "suffix": "a:b"}, "suffix"),
        ({"model": "gpt-4o-mini", "training_file": train, "method": {"type": "dpo"}}, "method.type"),
    ]:
        with pytest.raises(openai.BadRequestError) as error:
            client.fine_tuning.jobs.create(**kwargs)
        assert error.value.body["param"] == param
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model="no-such-base", training_file=upload.id)
    for call in (
        client.fine_tuning.jobs.retrieve,
        client.fine_tuning.jobs.cancel,
        client.fine_tuning.jobs.list_events,
    ):
        with pytest.raises(openai.NotFoundError):
            call("ftjob-doesnotexist")
    still_serving(client)


@pytest.fixture(scope="module")
def cancelled_job(client, finetuned):
    """A job on the whole training file with "auto" hyperparameters, cancelled while it trains."""
    upload = client.files.create(
        file=("qa_train.jsonl", (REPO / "data" / "qa_train.jsonl").read_bytes()), purpose="fine-tune"
    )
    auto = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    job = client.fine_tuning.jobs.create(
        model=CHAT_MODEL_ID,
        training_file=upload.id,
        method={"type": "supervised", "supervised": {"hyperparameters": auto}},
    )
    running = wait_for_job(client, job.id, until=("running", "failed", "succeeded"), timeout=120)
    assert running.status == "running", running.error
    assert greedy(client, "gpt-4o-mini", USER, max_tokens=3)  # training does not freeze the server
    assert client.fine_tuning.jobs.retrieve(job.id).status == "running"
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    return running, cancelled, wait_for_job(client, job.id, timeout=120)


def test_cancel_stops_a_running_job_and_frees_the_worker(client, cancelled_job):
    from llmlab.datasets import default_epochs

    running, answered, final = cancelled_job
    assert answered.status == "cancelled"  # cancel waits (a few seconds at most) for training to stop
    n = len((REPO / "data" / "qa_train.jsonl").read_text().splitlines())
    assert running.hyperparameters.n_epochs == default_epochs(n)  # "auto" resolved like OpenAI
    assert running.hyperparameters.batch_size == min(8, max(1, n // 10))
    assert running.hyperparameters.learning_rate_multiplier == 1.0
    assert final.status == "cancelled" and final.fine_tuned_model is None
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(final.id)
    queued = client.fine_tuning.jobs.create(
        model="gpt-4o-mini", training_file=running.training_file, suffix="later"
    )
    assert client.fine_tuning.jobs.cancel(queued.id).status == "cancelled"
    later = wait_for_job(client, queued.id)
    assert later.status == "cancelled"


def test_jobs_list_paginates_newest_first(client, finetuned, cancelled_job):
    everything = list(client.fine_tuning.jobs.list(limit=100))
    created = [j.created_at for j in everything]
    assert created == sorted(created, reverse=True) and finetuned.id in [j.id for j in everything]
    first = client.fine_tuning.jobs.list(limit=1)
    assert first.has_more and first.data[0].id == everything[0].id
    second = client.fine_tuning.jobs.list(limit=1, after=first.data[0].id)
    assert second.data[0].id == everything[1].id
    assert [j.id for j in client.fine_tuning.jobs.list(limit=2)] == [j.id for j in everything]


def test_restart_keeps_files_jobs_and_adapters_and_fails_interrupted_jobs(
    finetuned, cancelled_job, ft_examples, client
):
    """A second app on (a copy of) the session's home: nothing is lost, an interrupted job is marked failed."""
    from llmlab.local.server import create_app, serve_app_in_thread
    from llmlab.local.store import Store

    home = Path(tempfile.mkdtemp(prefix="llmlab-restart-"))
    shutil.copytree(TEST_HOME, home, symlinks=True, dirs_exist_ok=True)
    interrupted = dict(
        Store(home).get_job(finetuned.id), id="ftjob-interruptedwhilerunning", status="running"
    )
    interrupted.update(fine_tuned_model=None, finished_at=None, _created_ns=time.time_ns())
    Store(home).job_dir(interrupted["id"]).mkdir()
    Store(home).save_job(interrupted)
    for checkpoint in reversed(Store(home).list_checkpoints(finetuned.id)[:2]):  # its epochs before the stop
        name = checkpoint["fine_tuned_model_checkpoint"].replace(finetuned.id[-8:], interrupted["id"][-8:])
        Store(home).add_checkpoint(interrupted["id"], {**checkpoint, "fine_tuned_model_checkpoint": name})
    Store(home).add_checkpoint(
        interrupted["id"], {**checkpoint, "id": "ftckpt-x", "_adapter_dir": "adapters/gone"}
    )
    url, stop = serve_app_in_thread(create_app(home))
    try:
        again = openai.OpenAI(base_url=url, api_key="local")
        assert again.fine_tuning.jobs.retrieve(finetuned.id).status == "succeeded"
        failed = again.fine_tuning.jobs.retrieve(interrupted["id"])
        assert failed.status == "failed" and "server stopped" in failed.error.message
        listed = list(again.fine_tuning.jobs.checkpoints.list(interrupted["id"]))
        assert len(listed) == 2  # the one whose adapter is gone is not listed; the others answer
        for checkpoint in listed:
            assert greedy(again, checkpoint.fine_tuned_model_checkpoint, USER, max_tokens=3)
        assert {f.id for f in client.files.list()} == {f.id for f in again.files.list()}
        training = finetuned.training_file
        assert again.files.content(training).content == client.files.content(training).content
        prompt = ft_examples[0]["messages"][:-1]
        assert greedy(again, finetuned.fine_tuned_model, prompt, 60) == greedy(
            client, finetuned.fine_tuned_model, prompt, 60
        )
    finally:
        stop()
        shutil.rmtree(home, ignore_errors=True)
