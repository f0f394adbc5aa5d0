"""The opt-in ONNX Runtime GenAI engine (`LLMLAB_ENGINE=onnx`): the int8 model computes the same model as
torch fp32 (teacher-forced), and through the real server it keeps the runtime's behaviour: stop strings,
`max_tokens`, usage counts, streaming equal to non-streaming, seeds, log-probs, the context-length 400, and
the torch fallback for JSON modes.

int8 is fluent but not token-identical to fp32, so greedy texts are not compared word for word. The int8
model is built once per machine in the weight cache (~25 s the first time).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import openai
import pytest
import torch
from conftest import TEST_HOME

from llmlab.local.chat_format import render
from llmlab.local.runtime import ChatRuntime, build_folder_atomically
from llmlab.local.server import create_app, serve_app_in_thread

QUESTIONS = [
    "How many days of annual leave do employees get?",
    "What is the capital of France?",
    "Write a haiku about the sea.",
]
MODEL = "gpt-4o-mini"


def linked_home() -> Path:
    """A fresh home whose `weights/` (float and int8 ONNX models) links to the session's, as in conftest."""
    home = Path(tempfile.mkdtemp(prefix="llmlab-engine-test-"))
    (home / "weights").symlink_to((TEST_HOME / "weights").resolve(), target_is_directory=True)
    return home


@pytest.fixture(scope="module")
def onnx_server():
    """A server on its own home with `LLMLAB_ENGINE=onnx`; its chat runtime is loaded before the env is restored."""
    home = linked_home()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMLAB_ENGINE", "onnx")
        app = create_app(home)
        runtime = app.state.backend.models.chat()
        runtime.tokenizer  # noqa: B018 - loads the torch fallback and the ONNX engine now
    url, stop = serve_app_in_thread(app)
    client = openai.OpenAI(base_url=url, api_key="local", max_retries=0, timeout=600)
    yield client, runtime
    stop()


@pytest.fixture(scope="module")
def torch_runtime() -> ChatRuntime:
    runtime = ChatRuntime(linked_home())
    assert runtime.engine == "torch"  # the default
    return runtime


def ask(client: openai.OpenAI, question: str, **options) -> openai.types.chat.ChatCompletion:
    messages = [{"role": "user", "content": question}]
    return client.chat.completions.create(model=MODEL, messages=messages, **options)


def test_an_unknown_engine_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LLMLAB_ENGINE", "tpu")
    with pytest.raises(ValueError, match="LLMLAB_ENGINE must be one of torch, onnx, not 'tpu'"):
        ChatRuntime(linked_home())


def test_a_folder_appears_complete_or_not_at_all(tmp_path):
    target = tmp_path / "model"

    def broken(tmp: Path) -> None:
        (tmp / "half.onnx").write_bytes(b"12")
        raise RuntimeError("builder died")

    with pytest.raises(RuntimeError, match="builder died"):
        build_folder_atomically(target, broken)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp folder is left
    build_folder_atomically(target, lambda tmp: (tmp / "a.onnx").write_text("first"))
    build_folder_atomically(target, lambda tmp: (tmp / "a.onnx").write_text("second"))  # lost a race
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (target / "a.onnx").read_text() == "first"


def test_the_int8_model_is_built_once_under_the_home(onnx_server):
    from llmlab.local.engine_onnx import build_onnx_model

    _, runtime = onnx_server
    folder = runtime.home / "weights" / f"{runtime.model_id}-onnx-int8"
    config = folder / "genai_config.json"
    assert json.loads(config.read_text())["model"]["type"] == "llama"
    built = config.stat().st_mtime_ns
    assert build_onnx_model(runtime.home) == folder and config.stat().st_mtime_ns == built
    assert not list(folder.parent.glob(f".{folder.name}.*"))  # no temp folder left


def test_engine_logits_follow_torch_fp32(onnx_server, torch_runtime):
    """Teacher-forced on torch's greedy answers: the int8 engine's next-token distributions stay close."""
    _, runtime = onnx_server
    klds, agree, total = [], 0, 0
    for question in QUESTIONS:
        prompt = render([{"role": "user", "content": question}])
        ids = torch_runtime.encode(prompt)
        answer = torch_runtime.encode(torch_runtime.generate(prompt, temperature=0, max_tokens=16).text)
        mine, advance = runtime._onnx.start(ids, max_length=len(ids) + len(answer) + 1)
        theirs, step = torch_runtime._decoder(ids, None, len(answer), constrained=False)
        for token in answer:
            kld = torch.sum(theirs.softmax(-1) * (theirs.log_softmax(-1) - mine.log_softmax(-1)))
            klds.append(float(kld))
            agree += int(mine.argmax()) == int(theirs.argmax())
            total += 1
            mine, theirs = advance(token), step(token)
    assert sum(klds) / len(klds) < 0.05, klds  # measured ~0.007; a wrong position or KV state gives > 1
    assert agree / total >= 0.8, (agree, total)


def test_greedy_answers_count_their_tokens(onnx_server, torch_runtime):
    client, _ = onnx_server
    for question in QUESTIONS:
        reply = ask(client, question, temperature=0, max_tokens=32, logprobs=True)
        choice, usage = reply.choices[0], reply.usage
        assert choice.message.content.strip()
        assert usage.prompt_tokens == torch_runtime.prompt_tokens([{"role": "user", "content": question}])
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert len(choice.logprobs.content) == usage.completion_tokens
        assert b"".join(bytes(t.bytes) for t in choice.logprobs.content).decode() == choice.message.content
        assert choice.finish_reason == ("length" if usage.completion_tokens == 32 else "stop")
        first = choice.logprobs.content[0]
        prompt = render([{"role": "user", "content": question}])
        fp32 = torch_runtime.generate(prompt, temperature=0, max_tokens=1, logprobs=0).logprobs[0]
        if fp32["token"] == first.token:  # the int8 engine served it: close to fp32, not equal
            assert 0 < abs(first.logprob - fp32["logprob"]) < 0.3


def test_max_tokens_is_respected(onnx_server):
    client, _ = onnx_server
    reply = ask(client, QUESTIONS[2], temperature=0, max_tokens=3)
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"


def test_streaming_equals_non_streaming_at_temperature_0(onnx_server):
    client, _ = onnx_server
    whole = ask(client, QUESTIONS[0], temperature=0, max_tokens=40)
    chunks = list(
        ask(
            client,
            QUESTIONS[0],
            temperature=0,
            max_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 3  # really streamed
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]


def test_a_seed_makes_sampling_reproducible(onnx_server):
    client, _ = onnx_server
    texts = [
        ask(client, QUESTIONS[2], temperature=1.0, top_p=0.9, seed=7, max_tokens=16)
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert texts[0] == texts[1] and texts[0]


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_cuts_the_answer(onnx_server, stream):
    client, _ = onnx_server
    full = ask(client, QUESTIONS[2], temperature=0, max_tokens=24).choices[0].message.content
    words = full.split()
    assert len(words) > 4, full
    stop = words[3]
    options = {"temperature": 0, "max_tokens": 24, "stop": [stop]}
    if stream:
        chunks = list(ask(client, QUESTIONS[2], stream=True, **options))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        reply = ask(client, QUESTIONS[2], **options)
        text, finish = reply.choices[0].message.content, [reply.choices[0].finish_reason]
    assert text == full[: full.index(stop)] and finish == ["stop"]


def test_a_prompt_longer_than_the_context_is_a_400(onnx_server):
    client, _ = onnx_server
    with pytest.raises(openai.BadRequestError) as error:
        ask(client, "leave policy " * 6000, max_tokens=10)
    assert error.value.code == "context_length_exceeded"
    assert ask(client, QUESTIONS[1], max_tokens=2).usage.completion_tokens == 2  # still serving


def test_json_mode_falls_back_to_torch(onnx_server):
    client, _ = onnx_server
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}
    reply = ask(
        client,
        "The capital of France, as JSON.",
        temperature=0,
        max_tokens=20,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
    )
    assert json.loads(reply.choices[0].message.content)["city"] in {"Paris", "Rome"}


def test_a_large_max_tokens_grows_the_kv_states_as_needed(onnx_server):
    """max_tokens beyond `SHARED_KV`: the KV states grow instead of being allocated for 8,000 tokens."""
    client, _ = onnx_server
    small = ask(client, QUESTIONS[2], temperature=0, max_tokens=64, stop=["\n"]).choices[0]
    large = ask(client, QUESTIONS[2], temperature=0, max_tokens=8000, stop=["\n"]).choices[0]
    assert large.finish_reason == small.finish_reason == "stop"
    assert large.message.content == small.message.content
