"""One local server per LLMLAB_HOME shared by every kernel, and `connect()` to any OpenAI-compatible server.

Real processes on 127.0.0.1: kernels are Python subprocesses calling `llmlab.connect()`, the server is the
process `connect()` spawns, "another server" is a real `llmlab serve`. Each test uses a home of its own
(its `weights/` linked to the session's) and stops every process it started.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import REPO, TEST_HOME

import llmlab
from llmlab.local import process
from llmlab.local.process import ServerRecord, ensure_server, find_server, read_record, stop_server
from llmlab.models import CHAT_MODEL_ID, EMBEDDING_MODEL_ID

USER = [{"role": "user", "content": "Name three colours."}]
TRAIN = (REPO / "data" / "qa_train.jsonl").read_text(encoding="utf-8").splitlines()[:10]


def server_pids(home: Path) -> list[int]:
    """Pids of the llmlab server processes serving `home` (from /proc)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"llmlab.local.process" in args and str(home).encode() in args:
            pids.append(int(cmdline.parent.name))
    return pids


def wait_until(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh LLMLAB_HOME (weights shared with the session) whose servers are all stopped afterwards."""
    folder = tmp_path / "home"
    folder.mkdir()
    (folder / "weights").symlink_to((TEST_HOME / "weights").resolve(), target_is_directory=True)
    monkeypatch.setenv("LLMLAB_HOME", str(folder))
    yield folder
    stop_server(folder)
    for pid in server_pids(folder):  # e.g. one a test orphaned on purpose
        os.kill(pid, signal.SIGKILL)


def kernel(home: Path, code: str, **env: str) -> subprocess.Popen:
    """A Python process standing in for a notebook kernel, running `code` against `home`."""
    full_env = {**os.environ, "LLMLAB_HOME": str(home), **env}
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # connect() must not need nor set them
        full_env.pop(name, None)
    return subprocess.Popen(
        [sys.executable, "-c", code], env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


HEAVY = ("torch", "transformers", "sentence_transformers", "fastapi", "uvicorn")
KERNEL = f"""
import json, os, sys, llmlab
lab = llmlab.connect(quiet=True)
models = [m.id for m in lab.client.models.list()]
{{body}}
print(json.dumps({{{{
    "base_url": lab.base_url, "models": models, "heavy": [m for m in {HEAVY!r} if m in sys.modules],
    "offline_env": [n for n in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if n in os.environ], **result,
}}}}))
"""


def run_kernels(home: Path, n: int, body: str = "result = {}") -> list[dict]:
    """Start `n` kernels at once; each connects, lists the models, runs `body` (which sets `result`)."""
    kernels = [kernel(home, KERNEL.format(body=body)) for _ in range(n)]
    results = []
    for k in kernels:
        out, err = k.communicate(timeout=300)
        assert k.returncode == 0, err
        results.append(json.loads(out.splitlines()[-1]))
    for r in results:
        assert r["heavy"] == []  # the models (and the server) live in the server process only
        assert r["offline_env"] == []  # no global side effects on the learner's process
    return results


# -- one server per home ----------------------------------------------------------------------------------------
def test_two_kernels_connecting_at_once_share_one_server(home):
    results = run_kernels(home, 2)
    record = read_record(home)
    assert server_pids(home) == [record.pid]
    assert {r["base_url"].rstrip("/") for r in results} == {record.url}
    assert all(CHAT_MODEL_ID in r["models"] for r in results)
    assert stat.S_IMODE((home / "server.json").stat().st_mode) == 0o600
    assert record.version == llmlab.__version__ and record.pid != os.getpid()
    # the server outlives the kernels that started it, and a third connect() finds it
    assert find_server(home) == record and ensure_server(home) == (record, False)


def test_kernels_using_chat_and_embeddings_load_no_models(lab):
    body = """
answer = lab.client.chat.completions.create(model=lab.chat_model, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=5)
vectors = lab.client.embeddings.create(model=lab.embedding_model, input=["leave policy"])
result = {"answer": answer.choices[0].message.content, "dims": len(vectors.data[0].embedding)}
"""
    results = run_kernels(TEST_HOME, 2, body)  # the session's server, shared with this process
    assert [(bool(r["answer"]), r["dims"]) for r in results] == [(True, 384)] * 2
    assert {r["base_url"] for r in results} == {lab.base_url}


def test_every_request_needs_the_server_key(lab):
    url = lab.base_url.rstrip("/")
    assert httpx.get(f"{url}/models").status_code == 401
    wrong = httpx.get(f"{url}/models", headers={"Authorization": "Bearer not-the-key"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="not-the-key", max_retries=0).models.list()
    assert CHAT_MODEL_ID in [m.id for m in lab.client.models.list()]


def test_stale_records_are_replaced_and_foreign_processes_left_alone(home):
    """A record naming a dead process, or a live foreign process and a port that something else answers."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    foreign = subprocess.Popen(["sleep", "60"])
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        for pid, port in ((dead.pid, free_port()), (foreign.pid, other.server_address[1])):
            stale = ServerRecord(
                f"http://127.0.0.1:{port}/v1", port, pid, llmlab.__version__, str(home), 0.0, None, "k"
            )
            process._write_record(home, stale)
            assert find_server(home) is None
            record, started = ensure_server(home)
            assert started and record.pid not in (dead.pid, foreign.pid) and record.port != port
            stop_server(home)
        assert foreign.poll() is None  # never signalled
    finally:
        foreign.kill()
        other.shutdown()


def test_a_server_of_another_version_is_stopped_and_replaced(home):
    old, _ = ensure_server(home)
    process._write_record(home, dataclasses.replace(old, version="0.0.0-old"))
    new, started = ensure_server(home)
    assert started and new.pid != old.pid and new.version == llmlab.__version__
    assert wait_until(lambda: old.pid not in server_pids(home), 20)
    assert server_pids(home) == [new.pid]


def test_kill_9_next_connect_starts_a_new_server_and_fails_its_job(home):
    lab = llmlab.connect(quiet=True)
    data = ("\n".join(TRAIN) + "\n").encode()
    upload = lab.client.files.create(file=("train.jsonl", data), purpose="fine-tune")
    job = lab.client.fine_tuning.jobs.create(model=lab.finetune_model, training_file=upload.id)
    old = read_record(home)
    os.kill(old.pid, signal.SIGKILL)
    assert wait_until(lambda: old.pid not in server_pids(home), 10)
    again = llmlab.connect(quiet=True)
    assert read_record(home).pid != old.pid and again.base_url != lab.base_url
    failed = again.client.fine_tuning.jobs.retrieve(job.id)
    assert failed.status == "failed" and "server stopped" in failed.error.message
    assert again.client.files.content(upload.id).content == data  # files intact
    # the first kernel's client follows the new server by itself
    assert lab.client.fine_tuning.jobs.retrieve(job.id).status == "failed"


def test_idle_server_stops_itself_and_the_client_starts_it_again(home, monkeypatch):
    monkeypatch.setenv("LLMLAB_IDLE_TIMEOUT", "2")
    lab = llmlab.connect(quiet=True)
    first = read_record(home)
    assert first.idle_timeout == 2
    assert lab.client.models.list().data
    assert wait_until(lambda: first.pid not in server_pids(home), 60)
    assert read_record(home) is None  # it removed its record on the way out
    assert CHAT_MODEL_ID in [m.id for m in lab.client.models.list()]  # restarted on the next request
    assert read_record(home).pid != first.pid


def test_idle_time_counts_from_the_last_request_and_not_during_a_job(tmp_path):
    from llmlab.local.server import create_app, idle_seconds

    app = create_app(tmp_path)
    assert idle_seconds(app) > 0
    store = app.state.backend.store
    job = {
        "id": "ftjob-active",
        "status": "running",
        "_created_ns": 1,
        "_owner": app.state.backend.jobs.owner.id,
    }
    store.job_dir(job["id"]).mkdir()
    store.save_job(job)
    assert idle_seconds(app) == 0.0
    store.update_job(job["id"], status="succeeded")
    assert idle_seconds(app) > 0


def test_a_kernel_killed_mid_request_leaves_the_server_serving(lab):
    code = f"""
import openai
client = openai.OpenAI(base_url={lab.base_url!r}, api_key={lab.client.api_key!r})
for chunk in client.chat.completions.create(model="gpt-4o-mini", stream=True, max_tokens=300,
                                            messages=[{{"role": "user", "content": "Tell a long story."}}]):
    print("chunk", flush=True)
"""
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().startswith("chunk")  # the request is running
    finally:
        child.kill()
        child.wait()
    answer = lab.client.chat.completions.create(model=lab.chat_model, messages=USER, max_tokens=5)
    assert answer.choices[0].message.content


# -- jobs belong to their server; a finished job never changes ---------------------------------------------------
def test_a_second_server_on_the_home_leaves_the_first_ones_job_alone(client):
    """Opening a second notebook started a second server, whose start failed the first one's running job."""
    from llmlab.local.server import create_app

    upload = client.files.create(file=("t.jsonl", ("\n".join(TRAIN) + "\n").encode()), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=upload.id, suffix="second")
    create_app(TEST_HOME)  # a second server on the session's home "recovers" it
    assert client.fine_tuning.jobs.retrieve(job.id).status in ("validating_files", "queued", "running")
    assert client.fine_tuning.jobs.cancel(job.id).status in ("cancelled", "running")
    assert wait_until(lambda: client.fine_tuning.jobs.retrieve(job.id).status == "cancelled", 60)


def test_a_finished_job_never_changes_status(tmp_path):
    from llmlab.local.store import Store

    store = Store(tmp_path)
    store.job_dir("ftjob-x").mkdir()
    store.save_job(
        {"id": "ftjob-x", "status": "failed", "_created_ns": 1, "error": {"code": "server_stopped"}}
    )
    store.update_job("ftjob-x", status="succeeded", fine_tuned_model="ft:x", error=None)
    assert store.get_job("ftjob-x") == {
        "id": "ftjob-x",
        "status": "failed",
        "_created_ns": 1,
        "error": {"code": "server_stopped"},
    }


# -- llmlab serve / status / stop, and connect() to another OpenAI-compatible server --------------------------
def cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLMLAB_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "llmlab.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def other_server(tmp_path):
    """A real `llmlab serve` on another port with its own home and key: an OpenAI-compatible server."""
    other_home = tmp_path / "other-home"
    other_home.mkdir()
    (other_home / "weights").symlink_to((TEST_HOME / "weights").resolve(), target_is_directory=True)
    port, key = free_port(), "other-server-key"
    env = {**os.environ, "LLMLAB_HOME": str(other_home), "LLMLAB_API_KEY": key}
    serve = subprocess.Popen(
        [sys.executable, "-m", "llmlab.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert wait_until(lambda: read_record(other_home) is not None or serve.poll() is not None, 60)
        yield f"http://127.0.0.1:{port}/v1", key, other_home, serve
    finally:
        serve.terminate()
        serve.wait(30)


def test_llmlab_serve_status_and_stop_share_the_record(other_server):
    url, key, other_home, serve = other_server
    record = read_record(other_home)
    assert record.url == url and record.pid == serve.pid and record.key == key
    status = cli("status", home=other_home)
    assert status.returncode == 0 and url in status.stdout and str(serve.pid) in status.stdout
    assert key not in status.stdout
    twice = cli("serve", "--port", str(free_port()), home=other_home)
    assert twice.returncode == 1 and "already runs" in twice.stderr
    stopped = cli("stop", home=other_home)
    assert stopped.returncode == 0 and url in stopped.stdout
    assert serve.wait(30) == 0 and read_record(other_home) is None
    assert cli("status", home=other_home).returncode == 1


def test_connect_to_another_server_by_base_url_picks_its_models(other_server, home, monkeypatch):
    url, key, _, _ = other_server
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    monkeypatch.setenv("OPENAI_API_KEY", key)
    lab = llmlab.connect(quiet=True)  # "auto" honours OPENAI_BASE_URL
    assert lab.backend == "endpoint" and lab.base_url.rstrip("/") == url
    assert (lab.chat_model, lab.embedding_model) == (CHAT_MODEL_ID, EMBEDDING_MODEL_ID)
    assert lab.client.chat.completions.create(model=lab.chat_model, messages=USER, max_tokens=5).choices
    assert len(lab.client.embeddings.create(model=lab.embedding_model, input="x").data[0].embedding) == 384
    assert lab.supports("fine_tuning") and lab.supports("embeddings")
    assert read_record(home) is None and server_pids(home) == []  # no local server was started
    with pytest.raises(ValueError, match="has no model 'gpt-4o-mini'"):
        llmlab.connect(base_url=url, api_key=key, chat_model="gpt-4o-mini", quiet=True)
    with pytest.raises(PermissionError):
        llmlab.connect(base_url=url, api_key="wrong", quiet=True)


class _OllamaLike(http.server.BaseHTTPRequestHandler):
    """Answers GET /v1/models like Ollama does; every other route is a 404 (no fine-tuning)."""

    def do_GET(self):
        if self.path != "/v1/models":
            self.send_error(404)
            return
        ids = ["nomic-embed-text:latest", "llama3.2:latest"]
        body = json.dumps(
            {
                "object": "list",
                "data": [{"id": i, "object": "model", "created": 0, "owned_by": "library"} for i in ids],
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_server_without_fine_tuning_says_so_and_a_dead_url_fails_fast(home, monkeypatch):
    ollama = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OllamaLike)
    threading.Thread(target=ollama.serve_forever, daemon=True).start()
    try:
        lab = llmlab.connect(base_url=f"http://127.0.0.1:{ollama.server_address[1]}/v1", quiet=True)
        assert (lab.chat_model, lab.embedding_model) == ("llama3.2:latest", "nomic-embed-text:latest")
        assert lab.supports("chat") and not lab.supports("fine_tuning")
        checks = {c.name: c for c in llmlab.doctor(lab).checks}  # the endpoint, its models, what works there
        assert checks["endpoint"].detail == f"endpoint backend at {lab.base_url}"
        assert checks["models"].detail == "nomic-embed-text:latest, llama3.2:latest"
        assert checks["chat"].ok and checks["embeddings"].ok and not checks["fine-tuning"].ok
        assert (
            llmlab.connect(base_url=lab.base_url, chat_model="llama3.2", quiet=True).chat_model == "llama3.2"
        )
    finally:
        ollama.shutdown()
    with pytest.raises(ConnectionError, match="did not answer"):  # nothing listens there
        llmlab.connect(base_url=f"http://127.0.0.1:{free_port()}/v1", quiet=True)
    monkeypatch.setattr(sys.modules["llmlab.connect"], "ENDPOINT_TIMEOUT", 1.0)
    with socket.socket() as silent:  # accepts connections, never answers: an error, not a hang
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with pytest.raises(ConnectionError, match="did not answer"):
            llmlab.connect(base_url=f"http://127.0.0.1:{silent.getsockname()[1]}/v1", quiet=True)
    assert read_record(home) is None


# -- a starting server ------------------------------------------------------------------------------------------
def test_a_client_that_reads_the_record_before_the_server_runs_is_answered(tmp_path):
    """The record is written between binding the port and uvicorn's start (with the chat model loading beside
    it, that can take a while): a client that connects then waits in the port's backlog and gets its answer.
    Bound but not listening, it was refused (a CI run failed so: "Connection refused" right after the record)."""
    import socket

    import uvicorn

    from llmlab.local.loopback import bind
    from llmlab.local.starting import StartingApp

    sock = bind()
    early = socket.create_connection(sock.getsockname(), timeout=5)  # refused when the socket only binds
    early.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer k\r\n\r\n")
    front = StartingApp(tmp_path, api_key="k")
    server = uvicorn.Server(uvicorn.Config(front, lifespan="off", log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    try:
        assert early.recv(64).startswith(b"HTTP/1.1 200")
    finally:
        early.close()
        server.should_exit = True


def test_a_starting_server_lists_its_models_before_its_app_is_built(tmp_path):
    """From the port's first moment the server answers the key's GET /v1/models (what `connect()` waits for) with
    the same list the app gives; every other request, a wrong key or a web page's too, waits for the app."""
    import uvicorn
    from openai.types import Model

    from llmlab.local.loopback import bind
    from llmlab.local.server import create_app
    from llmlab.local.starting import StartingApp
    from llmlab.local.store import Store

    tuned = {"id": "ftjob-a", "status": "succeeded", "_created_ns": 1, "finished_at": 1700000000}
    Store(tmp_path).save_job({**tuned, "fine_tuned_model": "ft:SmolLM2-135M-Instruct:llmlab:x:a"})
    release = threading.Event()
    front = StartingApp(tmp_path, api_key="k")
    front.start(lambda: release.wait(60) and create_app(tmp_path, api_key="k"), on_error=release.clear)
    sock = bind()
    server = uvicorn.Server(uvicorn.Config(front, lifespan="off", log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    try:
        assert wait_until(lambda: server.started, 30)
        url, key = f"http://127.0.0.1:{sock.getsockname()[1]}/v1", {"Authorization": "Bearer k"}
        early = httpx.get(f"{url}/models", headers=key, timeout=10)
        assert early.status_code == 200 and front.app is None
        waiting = {
            "files": lambda: httpx.get(f"{url}/files", headers=key, timeout=60),
            "wrong key": lambda: httpx.get(
                f"{url}/models", headers={"Authorization": "Bearer no"}, timeout=60
            ),
            "web page": lambda: httpx.get(
                f"{url}/models", headers={**key, "Origin": "https://evil.example"}, timeout=60
            ),
        }
        replies: dict[str, httpx.Response] = {}
        threads = [
            threading.Thread(target=lambda n=n, f=f: replies.update({n: f()})) for n, f in waiting.items()
        ]
        for t in threads:
            t.start()
        time.sleep(0.5)
        assert replies == {} and front.app is None  # they wait: the app is not built
        release.set()
        for t in threads:
            t.join(60)
        assert {n: r.status_code for n, r in replies.items()} == {
            "files": 200,
            "wrong key": 401,
            "web page": 403,
        }
        late = httpx.get(f"{url}/models", headers=key, timeout=10)  # now from the app
        assert front.app is not None and late.json() == early.json()
        listed = [Model.model_validate(m) for m in early.json()["data"]]
        assert [m.id for m in listed] == [
            CHAT_MODEL_ID,
            EMBEDDING_MODEL_ID,
            "ft:SmolLM2-135M-Instruct:llmlab:x:a",
        ]
    finally:
        release.set()
        server.should_exit = True
