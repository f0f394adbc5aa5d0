"""Shared test fixtures: ONE local server (real models) and ONE small fine-tuning job for the whole session.

The session runs in a temporary `LLMLAB_HOME`, whose `weights/` links to the user's weight cache so the
GGUF is dequantized once per machine, not once per test run. The home's server is a process of its own,
shared by the tests and by the notebooks' kernels (they inherit `LLMLAB_HOME`); it is stopped at exit.

>>> def test_something(lab):             # doctest: +SKIP
...     lab.client.chat.completions.create(model=lab.chat_model, messages=[...])
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite tests the local backend (OpenAI-only paths use a mocked transport, said in those tests): a key in
# the developer's environment must not send the notebooks, which nbval runs in kernels that inherit it, to OpenAI.
os.environ.pop("OPENAI_API_KEY", None)
os.environ.pop("OPENAI_BASE_URL", None)  # nor may a base URL send them to another server
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
TEST_HOME = Path(tempfile.mkdtemp(prefix="llmlab-test-home-"))
os.environ["LLMLAB_HOME"] = str(TEST_HOME)
_WEIGHTS = Path(os.environ.get("LLMLAB_WEIGHTS_CACHE") or Path.home() / ".cache" / "llmlab" / "weights")
_WEIGHTS.mkdir(parents=True, exist_ok=True)
(TEST_HOME / "weights").symlink_to(_WEIGHTS, target_is_directory=True)
atexit.register(shutil.rmtree, TEST_HOME, ignore_errors=True)


def _stop_session_server() -> None:
    from llmlab.local.process import stop_server

    stop_server(TEST_HOME)


atexit.register(_stop_session_server)  # atexit runs last-in first-out: the server stops before its home goes

REPO = Path(__file__).resolve().parent.parent
# tests/browser/widgets.ipynb is opened by tests/test_browser.py in a real browser: nbval must not run it too
collect_ignore_glob = ["browser/*.ipynb"]
FT_EXAMPLES = 10  # OpenAI's minimum; enough for LoRA to learn the answers verbatim
FT_EPOCHS = 8


@pytest.fixture(scope="session")
def lab():
    """`llmlab.connect("local")`: the session's local server and an `openai.OpenAI` client for it."""
    import llmlab

    return llmlab.connect("local", quiet=True)


@pytest.fixture(scope="session")
def client(lab):
    """The session's `openai.OpenAI` client for the local server."""
    return lab.client


@pytest.fixture(scope="session")
def base_url(lab) -> str:
    """The local server's base URL, like http://127.0.0.1:PORT/v1."""
    return lab.base_url.rstrip("/")


@pytest.fixture(scope="session")
def http(lab):
    """An `httpx.Client` that sends the session server's key (for raw HTTP requests to `base_url`)."""
    import httpx

    with httpx.Client(headers={"Authorization": f"Bearer {lab.client.api_key}"}, timeout=600) as client:
        yield client


def wait_for_job(client, job_id: str, until=("succeeded", "failed", "cancelled"), timeout: float = 3600.0):
    """Poll a fine-tuning job until its status is in `until`; return the job."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in until or time.monotonic() > deadline:
            return job
        time.sleep(0.5)


@pytest.fixture(scope="session")
def ft_examples() -> list[dict]:
    """The training examples of the session's fine-tuning job (the first lines of data/qa_train.jsonl)."""
    lines = (REPO / "data" / "qa_train.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:FT_EXAMPLES]]


@pytest.fixture(scope="session")
def finetuned(client, ft_examples):
    """The session's one small fine-tuning job, finished (status succeeded): a `FineTuningJob`."""
    data = "".join(json.dumps(e) + "\n" for e in ft_examples).encode("utf-8")
    upload = client.files.create(file=("qa_small.jsonl", data), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="gpt-4o-mini-2024-07-18",
        training_file=upload.id,
        suffix="handbook",
        seed=7,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": FT_EPOCHS, "batch_size": 2}},
        },
    )
    job = wait_for_job(client, job.id)
    assert job.status == "succeeded", job.error
    return job
