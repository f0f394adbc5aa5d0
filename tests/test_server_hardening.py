"""The local server under hostile or unlucky input: every malformed request is a 4xx in OpenAI's shape and
stores nothing, an unexpected error is a 500 that keeps the connection, torn records on disk are skipped,
only loopback hosts and origins are served, and a big training file neither fills memory nor blocks a cancel.

Most tests run their own app on a fresh home (no model is loaded: validation comes before any model work);
the big-file test uses the session's server and its chat model.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
import typing
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import openai
import pytest
from conftest import REPO, wait_for_job

from llmlab.local import requests
from llmlab.local.requests import ChatCompletionRequest, EmbeddingRequest, FineTuningJobRequest
from llmlab.local.server import create_app, serve_app_in_thread

USER = [{"role": "user", "content": "Hi"}]
GOOD_LINES = (REPO / "data" / "qa_train.jsonl").read_text(encoding="utf-8").splitlines()[:12]


class Fresh:
    """A server on its own empty home: `url` (…/v1), `app`, `home`, an `httpx.Client` and an `openai` client."""

    def __init__(self, home: Path | None = None, **options: Any) -> None:
        self.home = home or Path(tempfile.mkdtemp(prefix="llmlab-hardening-"))
        self.app = create_app(self.home, **options)
        self.url, self.stop = serve_app_in_thread(self.app)
        self.http = httpx.Client(base_url=self.url, timeout=60)
        self.client = openai.OpenAI(base_url=self.url, api_key="local", max_retries=0)

    def models_untouched(self) -> bool:
        models = self.app.state.backend.models
        return models._chat is None and models._embedding is None


@pytest.fixture
def fresh():
    server = Fresh()
    yield server
    server.http.close()
    server.stop()


def upload(server: Fresh, lines: list[str], name: str = "train.jsonl") -> str:
    data = "\n".join(lines).encode("utf-8")
    return server.client.files.create(file=(name, data), purpose="fine-tune").id


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


# -- malformed requests -----------------------------------------------------------------------------------------
def test_bad_job_metadata_is_a_400_and_stores_no_job(fresh):
    train = upload(fresh, GOOD_LINES)
    for metadata, param in [
        ({"a": 1}, "metadata.a"),
        ("x", "metadata"),
        ({f"k{i}": "v" for i in range(17)}, "metadata"),
        ({"k" * 65: "v"}, None),
        ({"k": "v" * 513}, "metadata.k"),
    ]:
        body = {"model": "gpt-4o-mini", "training_file": train, "metadata": metadata}
        error = assert_openai_error(fresh.http.post("/fine_tuning/jobs", json=body), 400)
        assert error["param"].startswith("metadata") and (param is None or error["param"] == param)
    listed = fresh.http.get("/fine_tuning/jobs")
    assert listed.status_code == 200 and listed.json()["data"] == []
    assert not list((fresh.home / "jobs").iterdir())
    # good metadata is kept and returned (the file fails validation, so nothing trains)
    broken = upload(fresh, ["{not json", *GOOD_LINES])
    job = fresh.client.fine_tuning.jobs.create(
        model="gpt-4o-mini", training_file=broken, metadata={"team": "docs", "run": "1"}
    )
    assert job.metadata == {"team": "docs", "run": "1"}
    assert wait_for_job(fresh.client, job.id, timeout=60).status == "failed"
    assert fresh.client.fine_tuning.jobs.list().data[0].metadata == {"team": "docs", "run": "1"}
    assert fresh.models_untouched()


def test_wrongly_typed_job_fields_are_400_with_param(fresh):
    train = upload(fresh, GOOD_LINES)
    for extra, param in [
        ({"method": {"type": "supervised", "supervised": "x"}}, "method.supervised"),
        (
            {"method": {"type": "supervised", "supervised": {"hyperparameters": [1]}}},
            "method.supervised.hyperparameters",
        ),
        ({"method": "supervised"}, "method"),
        ({"hyperparameters": "x"}, "hyperparameters"),
        ({"hyperparameters": {"n_epochs": "3"}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"n_epochs": True}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"epochs": 3}}, "hyperparameters.epochs"),
        ({"seed": "7"}, "seed"),
        ({"validation_file": 5}, "validation_file"),
        ({"suffix": ["a"]}, "suffix"),
        ({"integrations": "wandb"}, "integrations"),
        ({"training_file": None}, "training_file"),
    ]:
        body = {"model": "gpt-4o-mini", "training_file": train, **extra}
        assert_openai_error(fresh.http.post("/fine_tuning/jobs", json=body), 400, param)
    assert fresh.http.get("/fine_tuning/jobs").json()["data"] == []


def test_malformed_chat_fields_are_400_before_any_model_work(fresh):
    deep: dict = {"type": "object"}
    for _ in range(200):
        deep = {"type": "object", "properties": {"a": deep}}

    def tool(parameters: Any) -> list[dict]:
        return [{"type": "function", "function": {"name": "f", "parameters": parameters}}]

    for extra, param in [
        ({"stream_options": "x"}, "stream_options"),
        ({"stream_options": [1]}, "stream_options"),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"tools": "x"}, "tools"),
        ({"tools": ["x"]}, "tools[0]"),
        ({"tools": tool({"type": "bogus"})}, "tools[0].function.parameters"),
        ({"tools": tool({"type": "object", "properties": 5})}, "tools[0].function.parameters"),
        ({"tools": tool(deep)}, "tools[0].function.parameters"),
        ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools[0].function.name"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "bogus"}},
                }
            },
            "response_format.json_schema.schema",
        ),
        ({"response_format": "json"}, "response_format"),
        ({"tool_choice": 5}, "tool_choice"),
        ({"functions": "x"}, "functions"),
        ({"function_call": 5}, "function_call"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"top_logprobs": 99}, "top_logprobs"),
        ({"n": 2, "stream": True}, "n"),
        ({"metadata": {"a": 1}}, "metadata.a"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0]",
        ),
        ({"messages": "hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({"no_such_argument": 1}, "no_such_argument"),
    ]:
        body = {"model": "gpt-4o-mini", "messages": USER, **extra}
        assert_openai_error(fresh.http.post("/chat/completions", json=body), 400, param)
    assert fresh.models_untouched()


def test_every_openai_argument_is_declared():
    """A field the SDK sends is typed in the request models (so it can never skip its check)."""
    from openai.types import embedding_create_params
    from openai.types.chat import completion_create_params
    from openai.types.fine_tuning import job_create_params

    for params, model in [
        (completion_create_params.CompletionCreateParamsStreaming, ChatCompletionRequest),
        (embedding_create_params.EmbeddingCreateParams, EmbeddingRequest),
        (job_create_params.JobCreateParams, FineTuningJobRequest),
    ]:
        missing = set(params.__annotations__) - set(model.model_fields)
        assert not missing, f"{model.__name__} does not declare {sorted(missing)}"


def test_reasoning_effort_takes_the_sdks_values():
    """`requests.ReasoningEffort` is written out (the server starts without the SDK): it is the SDK's."""
    from openai.types.shared import ReasoningEffort

    assert typing.get_args(requests.ReasoningEffort) == typing.get_args(ReasoningEffort)  # Literal: any order


# -- files ---------------------------------------------------------------------------------------------------------
def test_download_names_are_encoded_per_rfc_6266(fresh):
    for name in ["r\u00e9sum\u00e9 \u2603.jsonl", 'a"b.jsonl', "plain.txt"]:
        uploaded = fresh.client.files.create(file=(name, b"data"), purpose="user_data")
        stored = fresh.client.files.retrieve(uploaded.id).filename
        response = fresh.http.get(f"/files/{uploaded.id}/content")
        assert response.status_code == 200 and response.content == b"data"
        header = response.headers["content-disposition"]
        fallback = header.split('filename="', 1)[1].split('"', 1)[0]
        assert '"' not in fallback and fallback.isascii()
        assert unquote(header.split("filename*=UTF-8''", 1)[1]) == stored
        assert fresh.client.files.content(uploaded.id).content == b"data"


# -- unexpected errors ---------------------------------------------------------------------------------------------
def test_an_unexpected_error_is_a_500_and_the_connection_stays_usable(fresh, monkeypatch):
    backend = fresh.app.state.backend
    real = backend.model_list
    calls = []

    def broken() -> list[dict]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("disk on fire")
        return real()

    monkeypatch.setattr(backend, "model_list", broken)
    first = fresh.http.get("/models")
    error = assert_openai_error(first, 500)
    assert error["type"] == "server_error" and "disk on fire" in error["message"]
    second = fresh.http.get("/models")
    assert second.status_code == 200

    def local_port(response: httpx.Response) -> int:
        return response.extensions["network_stream"].get_extra_info("socket").getsockname()[1]

    assert local_port(first) == local_port(second)  # the same keep-alive connection served both
    calls.clear()
    with pytest.raises(openai.InternalServerError):
        fresh.client.models.list()
    assert fresh.client.models.list().data


# -- persistence ------------------------------------------------------------------------------------------------
def test_torn_records_are_skipped_with_a_warning_and_left_alone(caplog):
    home = Path(tempfile.mkdtemp(prefix="llmlab-torn-"))
    (home / "jobs" / "ftjob-torn").mkdir(parents=True)
    torn_job = home / "jobs" / "ftjob-torn" / "job.json"
    torn_job.write_bytes(b'{"id": "ftjob-torn", "status": "runn')
    (home / "files").mkdir()
    torn_file = home / "files" / "file-torn.json"
    torn_file.write_bytes(b'{"id": "file-torn", "obj')
    (home / "files" / "file-torn").write_bytes(b"lost")
    caplog.set_level(logging.WARNING)
    server = Fresh(home)  # the old server exited here (JSONDecodeError)
    try:
        good = server.client.files.create(file=("ok.txt", b"ok"), purpose="user_data")
        assert [f.id for f in server.client.files.list()] == [good.id]
        assert server.http.get("/files/file-torn").status_code == 404
        assert server.http.get("/fine_tuning/jobs").json()["data"] == []
        assert server.http.get("/fine_tuning/jobs/ftjob-torn").status_code == 404
        warned = " ".join(r.getMessage() for r in caplog.records)
        assert str(torn_job) in warned and str(torn_file) in warned
        assert torn_job.read_bytes() == b'{"id": "ftjob-torn", "status": "runn'  # never overwritten
        assert torn_file.read_bytes() == b'{"id": "file-torn", "obj'
    finally:
        server.http.close()
        server.stop()


def test_a_stored_job_that_does_not_render_is_skipped_in_the_list_and_a_404_alone(fresh, caplog):
    from llmlab.local.store import Store

    store = Store(fresh.home)
    bad = {"id": "ftjob-oldmetadata", "status": "failed", "_created_ns": time.time_ns(), "metadata": {"a": 1}}
    store.job_dir(bad["id"]).mkdir()
    store.save_job(bad)  # what the old server stored for metadata={"a": 1}
    caplog.set_level(logging.WARNING)
    listed = fresh.http.get("/fine_tuning/jobs")
    assert listed.status_code == 200 and listed.json()["data"] == []
    assert "ftjob-oldmetadata" in " ".join(r.getMessage() for r in caplog.records)
    for path in ("", "/events", "/checkpoints"):  # one record, one answer: gone, as the list says
        error = assert_openai_error(fresh.http.get(f"/fine_tuning/jobs/ftjob-oldmetadata{path}"), 404)
        assert "damaged" in error["message"] and error["param"] == "fine_tuning_job_id"
    assert fresh.http.get("/models").status_code == 200


# -- web safety -----------------------------------------------------------------------------------------------------
def test_only_loopback_hosts_and_origins_are_served(fresh):
    port = httpx.URL(fresh.url).port
    for headers in [
        {"Host": f"localhost:{port}"},
        {"Host": f"127.0.0.1:{port}"},
        {"Host": f"[::1]:{port}"},
        {"Origin": "http://localhost:8888"},
        {"Origin": "http://127.0.0.1:8888"},
    ]:
        assert fresh.http.get("/models", headers=headers).status_code == 200, headers
    for headers, code in [
        ({"Host": "evil.example"}, "host_not_allowed"),
        ({"Host": f"evil.example:{port}"}, "host_not_allowed"),
        ({"Origin": "http://evil.example"}, "origin_not_allowed"),
        ({"Origin": "null"}, "origin_not_allowed"),
    ]:
        assert assert_openai_error(fresh.http.get("/models", headers=headers), 403)["code"] == code
    # a page elsewhere cannot upload (a form post needs no preflight)
    refused = fresh.http.post(
        "/files",
        files={"file": ("x.jsonl", b"{}")},
        data={"purpose": "fine-tune"},
        headers={"Origin": "https://evil.example"},
    )
    assert_openai_error(refused, 403)
    assert fresh.client.files.list().data == []
    remote = Fresh(allow_remote=True)
    try:
        assert remote.http.get("/models", headers={"Host": "lab.example:8000"}).status_code == 200
    finally:
        remote.stop()


def test_llmlab_serve_takes_the_api_key_from_the_environment(tmp_path):
    from llmlab.local.loopback import is_loopback

    assert is_loopback("localhost") and not is_loopback("0.0.0.0")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "LLMLAB_API_KEY": "env-secret-key", "LLMLAB_HOME": str(tmp_path)}
    code = f"from llmlab.cli import main; main(['serve', '--port', '{port}'])"
    process = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO
    )
    try:
        url = f"http://127.0.0.1:{port}/v1/models"
        deadline = time.monotonic() + 120
        while True:
            try:
                refused = httpx.get(url)
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, "llmlab serve did not start"
                time.sleep(0.2)
        assert refused.status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer env-secret-key"}).status_code == 200
        assert b"env-secret-key" not in Path(f"/proc/{process.pid}/cmdline").read_bytes()
    finally:
        process.terminate()
        process.wait(timeout=30)


# -- fuzz -------------------------------------------------------------------------------------------------------------
_JUNK = [None, 0, -1, 1.5, 10**30, "", "x", True, [], [1], ["x"], {}, {"a": 1}, [{"a": None}]]
_RAW = [
    b"",
    b"{",
    b"[]",
    b"null",
    b'"x"',
    b"1e999",
    b"[" * 5000 + b"]" * 5000,
    b'{"model": ' + b"9" * 5000 + b"}",
    b"\xff\xfe{}",
    b'{"model": NaN}',
    b'{"a": ' * 3000 + b"1" + b"}" * 3000,
]


def _invalid_bodies(model: Any, base: dict, rng: random.Random) -> list[dict]:
    """Bodies that `model` refuses: each field set to junk, each required field dropped, messages broken."""
    bodies = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        for value in _JUNK:
            bodies.append({**base, key: value})
        if field.is_required():
            bodies.append({k: v for k, v in base.items() if k != key})
    if "messages" in base:
        for value in _JUNK:
            for key in ("role", "content", "name", "tool_calls", "tool_call_id"):
                bodies.append({**base, "messages": [{**base["messages"][0], key: value}]})
    invalid = []
    for body in bodies:
        try:
            model.model_validate(body)
        except Exception:
            invalid.append(body)
    rng.shuffle(invalid)
    return invalid


def test_fuzz_malformed_requests_never_give_a_500(fresh):
    rng = random.Random(13)
    train = upload(fresh, GOOD_LINES)
    cases: list[tuple[str, str, Any]] = []
    for path, model, base in [
        ("/chat/completions", ChatCompletionRequest, {"model": "gpt-4o-mini", "messages": USER}),
        ("/embeddings", EmbeddingRequest, {"model": "text-embedding-3-small", "input": "x"}),
        ("/fine_tuning/jobs", FineTuningJobRequest, {"model": "gpt-4o-mini", "training_file": train}),
    ]:
        cases += [("POST", path, body) for body in _invalid_bodies(model, base, rng)[:120]]
        cases += [("RAW", path, raw) for raw in _RAW]
    for query in ["limit=0", "limit=abc", "limit=-5", "after=nope&limit=99999999"]:
        cases += [("GET", f"/files?{query}", None), ("GET", f"/fine_tuning/jobs?{query}", None)]
    cases.append(("GET", "/files?order=sideways", None))
    for odd in ["..", "%2e%2e", "file-" + "a" * 5000, "ftjob-%00", "x/../../etc"]:
        cases += [("GET", f"/files/{odd}", None), ("GET", f"/files/{odd}/content", None)]
        cases += [
            ("GET", f"/fine_tuning/jobs/{odd}", None),
            ("POST", f"/fine_tuning/jobs/{odd}/cancel", None),
        ]
        cases += [("GET", f"/fine_tuning/jobs/{odd}/events", None), ("GET", f"/models/{odd}", None)]
    assert 300 <= len(cases) <= 1000
    for method, path, body in cases:
        if method == "RAW":
            response = fresh.http.post(path, content=body, headers={"Content-Type": "application/json"})
        elif method == "POST":
            response = fresh.http.post(path, json=body)
        else:
            response = fresh.http.get(path)
        assert 400 <= response.status_code < 500, (method, path, str(body)[:200], response.text[:300])
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert fresh.http.get("/models").status_code == 200
    for fields in [{"purpose": "fine-tune"}, {"purpose": "nonsense"}, {}]:
        files = {"file": ("x.jsonl", b"{}")} if fields.get("purpose") == "nonsense" else None
        assert 400 <= fresh.http.post("/files", data=fields, files=files).status_code < 500
    assert fresh.http.get("/fine_tuning/jobs").json()["data"] == []
    assert fresh.models_untouched()


# -- a big training file ------------------------------------------------------------------------------------------
def test_a_big_training_file_keeps_memory_bounded_and_cancels_while_preparing(client):
    """~4 MB of examples: the job's Python memory stays far below the file's size (the old server held every
    example and its tokens), and a cancel while the examples are read and tokenized answers `cancelled`."""
    rng = random.Random(5)
    words = [
        "leave",
        "policy",
        "office",
        "badge",
        "canteen",
        "laptop",
        "parking",
        "travel",
        "expense",
        "holiday",
        "manager",
        "payroll",
    ]
    lines = []
    while sum(len(line) + 1 for line in lines) < 4_000_000:
        answer = " ".join(rng.choice(words) for _ in range(150))
        question = f"Question {len(lines)}: " + " ".join(rng.choice(words) for _ in range(12))
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        lines.append(json.dumps({"messages": messages}))
    data = ("\n".join(lines) + "\n").encode("utf-8")
    upload_id = client.files.create(file=("big.jsonl", data), purpose="fine-tune").id
    # one-time costs are not the file's memory: a small job first loads the model, the training libraries and
    # the token tables, then is cancelled
    small = client.files.create(file=("small.jsonl", "\n".join(GOOD_LINES).encode()), purpose="fine-tune")
    warm = client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=small.id)
    assert (
        wait_for_job(client, warm.id, until=("running", "failed", "succeeded"), timeout=600).status
        == "running"
    )
    client.fine_tuning.jobs.cancel(warm.id)
    tracemalloc.start()
    try:
        job = client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=upload_id, suffix="big")
        running = wait_for_job(
            client, job.id, until=("running", "failed", "succeeded", "cancelled"), timeout=600
        )
        assert running.status == "running", running.error
        answered = client.fine_tuning.jobs.cancel(job.id)
        final = wait_for_job(client, job.id, timeout=120)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert answered.status == "cancelled" and final.status == "cancelled"
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=1000))
    assert not [e for e in events if e.type == "metrics"]  # cancelled before the first training step
    assert peak < len(data) / 2, (
        f"peak {peak / 1e6:.1f} MB of Python memory for a {len(data) / 1e6:.1f} MB file"
    )


def test_an_upload_is_stored_in_chunks_never_held_in_memory_whole(fresh, tmp_path):
    """An 8 MB upload, streamed from disk by the client: the server (in this process, so tracemalloc sees both
    sides) copies it to the store in chunks; the old server read the whole body into one bytes object."""
    path = tmp_path / "big.jsonl"
    line = json.dumps({"messages": [{"role": "user", "content": "x" * 1000}]}) + "\n"
    path.write_text(line * (8_000_000 // len(line)), encoding="utf-8")
    tracemalloc.start()
    try:
        with path.open("rb") as f:
            answered = fresh.http.post(
                "/files", files={"file": ("big.jsonl", f)}, data={"purpose": "fine-tune"}
            )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert answered.status_code == 200, answered.text
    stored = answered.json()
    assert stored["bytes"] == path.stat().st_size
    assert fresh.http.get(f"/files/{stored['id']}/content").content == path.read_bytes()
    assert peak < path.stat().st_size / 2, f"peak {peak / 1e6:.1f} MB of Python memory for an 8 MB upload"
