"""A cold start does only what the first chats need, and soon (issue 16: first answer after set-up under 3 s).

A server process started as `connect()` starts one (`llmlab.local.process.run`), on the ONNX engine, begins
loading the built chat model before any request (beside importing FastAPI and building the app), and answers
plain, JSON-mode, tool-call and streamed chats and lists its models without importing torch or transformers
(training, the torch engine and embeddings load them) or the `openai` SDK (~1 s: files and fine-tuning jobs
render through its types, and tests/test_conformance.py checks the server's own dicts against them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TEST_HOME
from openai import OpenAI

from llmlab.local.engine_onnx import build_onnx_model, onnx_available
from llmlab.local.process import answers, read_record
from llmlab.models import CHAT_MODEL_ID

NOT_NEEDED = ("openai", "torch", "transformers", "sentence_transformers", "peft")

# the server, and a thread that prints, when told, whether ONNX Runtime (the chat model's) gets imported within
# a minute, then, told again, which of the modules named in argv[2] it has imported
SERVER = """
import json, sys, threading, time
from pathlib import Path
from llmlab.local.process import run

def report() -> None:
    sys.stdin.readline()
    deadline = time.monotonic() + 60
    while "onnxruntime" not in sys.modules and time.monotonic() < deadline:
        time.sleep(0.05)
    print(json.dumps("onnxruntime" in sys.modules), flush=True)
    sys.stdin.readline()
    print(json.dumps(sorted(m for m in sys.argv[2].split(",") if m in sys.modules)), flush=True)

threading.Thread(target=report, daemon=True).start()
run(Path(sys.argv[1]))
"""


def _started(home: Path, child: subprocess.Popen, timeout: float = 120) -> OpenAI:
    """An `openai` client for the server `child` runs for `home`, once it answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert child.poll() is None, (home / "server.log").read_text()[-3000:]
        record = read_record(home)
        if record is not None and answers(record):
            return OpenAI(base_url=record.url, api_key=record.key, timeout=300, max_retries=0)
        time.sleep(0.05)
    raise TimeoutError("the server did not answer")


def _told(child: subprocess.Popen) -> object:
    """What the server `child` reports when told (a line on its stdin)."""
    child.stdin.write("\n")
    child.stdin.flush()
    return json.loads(child.stdout.readline())


@pytest.mark.skipif(not onnx_available(), reason="onnxruntime-genai is not installed here")
def test_a_server_loads_the_chat_model_at_once_and_chats_without_the_sdk_torch_or_transformers(tmp_path):
    build_onnx_model(TEST_HOME)  # prepared during set-up, as for a learner
    home = tmp_path
    (home / "weights").symlink_to((TEST_HOME / "weights").resolve(), target_is_directory=True)
    env = {**os.environ, "LLMLAB_ENGINE": "onnx", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", SERVER, str(home), ",".join(NOT_NEEDED)]
    with open(home / "server.log", "w") as log:
        child = subprocess.Popen(
            command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True
        )
    try:
        client = _started(home, child)
        assert _told(child), "no request yet, and the chat model did not begin loading"
        hi = [{"role": "user", "content": "Hi"}]
        tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
        chat = client.chat.completions.create
        assert chat(model="gpt-4o-mini", messages=hi, max_tokens=4).choices[0].message.content
        chat(model="gpt-4o-mini", messages=hi, max_tokens=8, response_format={"type": "json_object"})
        called = chat(model="gpt-4o-mini", messages=hi, max_tokens=16, tools=[tool], tool_choice="required")
        assert called.choices[0].message.tool_calls[0].function.name == "get_time"
        assert [c.choices for c in chat(model="gpt-4o-mini", messages=hi, max_tokens=4, stream=True)]
        assert CHAT_MODEL_ID in [m.id for m in client.models.list()]  # the built app's list
        imported = _told(child)
    finally:
        child.terminate()
        child.wait(30)
    assert imported == []
