"""The ONNX Runtime GenAI engine (the default where `onnxruntime-genai` imports): the int8 model computes the same model as
torch fp32 (teacher-forced), and through the real server it keeps the runtime's behaviour: stop strings,
`max_tokens`, usage counts, streaming equal to non-streaming, seeds, log-probs, the context-length 400, JSON
modes and tool calls by constrained decoding, the log-probability that decides `tool_choice="auto"`, the
prompt cache, and fine-tuned models (LoRA adapters per request). The server's torch model is forbidden to
run a forward pass: everything here is answered by the ONNX engine, not by a silent fallback.

int8 is fluent but not token-identical to fp32, so greedy texts are not compared word for word. The int8
model is built once per machine in the weight cache (~25 s the first time).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import openai
import pytest
from conftest import TEST_HOME

from llmlab.local.chat_format import render
from llmlab.local.engine_onnx import KEPT_BUDGET
from llmlab.local.memory_limit import memory_limit_bytes
from llmlab.local.runtime import ChatRuntime, _log_softmax
from llmlab.local.server import create_app, serve_app_in_thread
from llmlab.local.store import Store
from llmlab.local.toolcalls import plan
from llmlab.local.weights import build_folder_atomically
from llmlab.tools import tool

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
    runtime._forward = torch_forward_forbidden
    url, stop = serve_app_in_thread(app)
    client = openai.OpenAI(base_url=url, api_key="local", max_retries=0, timeout=600)
    yield client, runtime
    stop()


def torch_forward_forbidden(*args, **kwargs):
    raise AssertionError("the torch model ran a forward pass with LLMLAB_ENGINE=onnx")


@pytest.fixture(scope="module")
def torch_runtime() -> ChatRuntime:
    """The fp32 torch engine, pinned (`LLMLAB_ENGINE=torch`): the reference the int8 engine is compared with."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMLAB_ENGINE", "torch")
        runtime = ChatRuntime(linked_home())
    assert runtime.engine == "torch"
    return runtime


def ask(client: openai.OpenAI, question: str, **options) -> openai.types.chat.ChatCompletion:
    messages = [{"role": "user", "content": question}]
    return client.chat.completions.create(model=MODEL, messages=messages, **options)


def test_an_unknown_engine_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LLMLAB_ENGINE", "tpu")
    with pytest.raises(ValueError, match="LLMLAB_ENGINE must be one of torch, onnx, not 'tpu'"):
        ChatRuntime(linked_home())


def test_onnx_is_the_default_where_it_imports_and_torch_the_fallback(monkeypatch):
    monkeypatch.delenv("LLMLAB_ENGINE", raising=False)
    assert ChatRuntime(linked_home()).engine == "onnx"  # installed here
    monkeypatch.setenv("LLMLAB_ENGINE", "torch")
    assert ChatRuntime(linked_home()).engine == "torch"  # forced
    monkeypatch.delenv("LLMLAB_ENGINE")
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # as where it has no wheel
    assert ChatRuntime(linked_home()).engine == "torch"


def test_tight_memory_serves_on_onnx_where_a_job_lets_its_pages_go(monkeypatch):
    """Under Binder's `MEM_LIMIT` of 2 GB all processes with a LoRA job peaked at 1,325 MB with ONNX serving (the
    job's fp32 matrices mapped and their pages let go after each use) vs 1,475 MB with torch, and 1,738 MB before
    (bench/bench_backend.py --memory-only): ONNX serves there on Linux; torch where a job would copy its weights
    (bf16 training asked for, or not Linux), or when told."""
    monkeypatch.delenv("LLMLAB_ENGINE", raising=False)
    monkeypatch.delenv("LLMLAB_TRAINING_BF16", raising=False)
    monkeypatch.setenv("MEM_LIMIT", str(2 * 2**30))
    assert ChatRuntime(linked_home()).engine == ("onnx" if sys.platform.startswith("linux") else "torch")
    monkeypatch.setenv("LLMLAB_TRAINING_BF16", "1")
    assert ChatRuntime(linked_home()).engine == "torch"
    monkeypatch.setenv("LLMLAB_ENGINE", "onnx")
    assert ChatRuntime(linked_home()).engine == "onnx"
    monkeypatch.setenv("LLMLAB_ENGINE", "torch")
    monkeypatch.delenv("LLMLAB_TRAINING_BF16")
    assert ChatRuntime(linked_home()).engine == "torch"
    monkeypatch.setenv("MEM_LIMIT", str(16 * 2**30))
    monkeypatch.delenv("LLMLAB_ENGINE")
    roomy = memory_limit_bytes() >= 4 * 2**30 or sys.platform.startswith("linux")
    assert ChatRuntime(linked_home()).engine == ("onnx" if roomy else "torch")


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
    folder = runtime.home / "weights" / f"{runtime.model_id}-onnx-uint8-lora-r0"
    config = folder / "genai_config.json"
    assert json.loads(config.read_text())["model"]["type"] == "llama"
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    assert sum(i.name.startswith("lora.") for i in graph.input) == 30 * 5 * 2  # A and B per projection
    defaults = [list(i.dims) for i in graph.initializer if i.name.startswith("lora.")]
    assert len(defaults) == 300 and all(0 in dims for dims in defaults)  # rank 0: base requests pay nothing
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
        mine, advance = runtime._onnx.start(ids)
        theirs, step = torch_runtime._decoder(ids, None)
        mine, theirs = mine[-1], theirs[-1]
        for token in answer:
            fp32, int8 = _log_softmax(theirs.astype(np.float64)), _log_softmax(mine.astype(np.float64))
            kld = np.sum(np.exp(fp32) * (fp32 - int8))
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


@pytest.mark.parametrize("mode", ["json_schema", "json_object"])
def test_json_modes_are_decoded_on_the_engine(onnx_server, mode):
    client, _ = onnx_server
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}
    formats = {
        "json_schema": {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
        "json_object": {"type": "json_object"},
    }
    reply = ask(
        client,
        "The capital of France, as JSON with a key city.",
        temperature=0,
        max_tokens=30,
        response_format=formats[mode],
    )
    answer = json.loads(reply.choices[0].message.content)
    assert isinstance(answer, dict)
    if mode == "json_schema":
        assert answer == {"city": "Paris"}


def weather(city: str) -> str:
    """Current weather in a city.

    Args:
        city: City name.
    """
    return f"Sunny in {city}, 21 degrees."


@pytest.mark.parametrize("choice", ["required", "named", "none"])
def test_tool_calls_are_decoded_on_the_engine(onnx_server, choice):
    client, _ = onnx_server
    named = {"type": "function", "function": {"name": "weather"}}
    reply = ask(
        client,
        "What is the weather in Paris? Use the weather tool.",
        temperature=0,
        max_tokens=60,
        tools=[tool(weather).schema],
        tool_choice=named if choice == "named" else choice,
    ).choices[0]
    if choice == "none":
        assert not reply.message.tool_calls and reply.message.content
        return
    assert reply.finish_reason == "tool_calls", reply.message
    (call,) = reply.message.tool_calls
    assert call.function.name == "weather" and tool(weather).validate(call.function.arguments) == {
        "city": "Paris"
    }


@pytest.mark.parametrize(
    "question", ["What is the weather in Paris? Use the weather tool.", "Weather in Rome?"]
)
def test_auto_decides_on_the_engine_as_fp32_does(onnx_server, torch_runtime, question):
    """tool_choice "auto" calls when log P(call opener) > log 0.5: that log-probability comes from the int8
    engine (close to fp32's, not equal), and the server's reply follows its decision."""
    client, runtime = onnx_server
    messages, tools = [{"role": "user", "content": question}], [tool(weather).schema]
    mine, fp32 = (
        plan(r, prompt=render(messages, tools=tools), tools=tools, tool_choice="auto")
        for r in (runtime, torch_runtime)
    )
    assert 0 < abs(mine.call_logprob - fp32.call_logprob) < 0.5, (mine.call_logprob, fp32.call_logprob)
    if abs(fp32.call_logprob - math.log(0.5)) > 0.5:  # a clear decision stays the same
        assert (mine.grammar is None) == (fp32.grammar is None)
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, tools=tools, tool_choice="auto", temperature=0, max_tokens=40
    ).choices[0]
    assert (reply.finish_reason == "tool_calls") == (mine.grammar is not None), reply.message
    if reply.message.tool_calls:
        tool(weather).validate(reply.message.tool_calls[0].function.arguments)


def test_the_auto_decision_log_probability_comes_from_the_engine(onnx_server, torch_runtime):
    """`logprob` (what decides tool_choice "auto") on the int8 engine: close to fp32, not equal, and the
    same whether the prompt is read in full or after a cached prefix."""
    _, runtime = onnx_server
    prompt = render([{"role": "user", "content": QUESTIONS[0]}])
    mine, fp32 = runtime.logprob(prompt, "You get 25 days"), torch_runtime.logprob(prompt, "You get 25 days")
    assert 0 < abs(mine - fp32) < 0.5, (mine, fp32)
    again = runtime.logprob(prompt, "You get 25 days")  # its prompt is cached now
    assert again == pytest.approx(mine, abs=1e-4)


def test_a_shared_prompt_prefix_is_read_once(onnx_server):
    """Requests sharing a long system prompt: the second reads only what follows the kept prompt's KV states,
    and answers exactly as a cold engine does."""
    client, runtime = onnx_server
    system = "You are the assistant of Fernhollow. " + " ".join(
        f"Rule {i}: be kind and brief." for i in range(40)
    )
    messages = [{"role": "system", "content": system}, {"role": "user", "content": QUESTIONS[1]}]
    first = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12)
    engine, reads = runtime._onnx, []
    original = engine._read

    def spy(ids, *args):
        logits, kv, done = original(ids, *args)
        reads.append((len(ids), done))
        return logits, kv, done

    engine._read = spy
    try:
        messages[-1]["content"] = QUESTIONS[0]
        warm = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12)
        engine.budget, kept = 0, engine._kept
        engine._kept = []
        cold = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12)
    finally:
        del engine._read
        engine.budget, engine._kept = KEPT_BUDGET, kept
    (prompt, cached), (_, none) = reads
    assert first.usage.prompt_tokens > 300 and prompt - cached < 40 and none == 0, reads  # the question only
    assert warm.choices[0].message.content == cold.choices[0].message.content


def test_eight_auto_tool_requests_at_once_read_each_prompt_once(onnx_server):
    """Eight tool_choice "auto" requests at once, each with a long prompt of its own (a RAG context, say): the
    decision reads a prompt, then its answer starts from the kept states. With two prompts kept, the other
    requests' reads pushed them out first and most prompts were read twice (07's hybrid: 1.8x slower eight at a
    time than one by one)."""
    client, runtime = onnx_server
    engine, reads = runtime._onnx, []
    original = engine._read

    def spy(ids, *args):
        logits, kv, done = original(ids, *args)
        reads.append(len(ids) - done)
        return logits, kv, done

    def asked(i: int):
        context = " ".join(
            f"Fact {i}.{j}: office {j} of region {i} opens at {7 + j % 3} o'clock." for j in range(30)
        )
        messages = [{"role": "system", "content": context}, {"role": "user", "content": QUESTIONS[i % 2]}]
        options = {"tools": [tool(weather).schema], "max_tokens": 8, "temperature": 0}
        return lambda: client.chat.completions.create(model=MODEL, messages=messages, **options)

    engine._read = spy
    try:
        replies = together(*[asked(i) for i in range(8)])
    finally:
        del engine._read
    prompts = sum(reply.usage.prompt_tokens for reply in replies)
    assert all(reply.usage.prompt_tokens > 300 for reply in replies)
    assert sum(reads) < 1.2 * prompts, (sum(reads), prompts, reads)  # read twice: ~2x


@pytest.fixture(scope="module")
def onnx_finetuned(onnx_server, finetuned):
    """The session's fine-tuned model, its job and adapters copied into the ONNX server's home."""
    client, runtime = onnx_server
    job = Store(TEST_HOME).get_job(finetuned.id)
    shutil.copytree(Store(TEST_HOME).job_dir(job["id"]), Store(runtime.home).job_dir(job["id"]))
    shutil.copytree(TEST_HOME / "adapters" / job["id"], runtime.home / "adapters" / job["id"])
    return client, runtime, job


def test_a_finetuned_model_answers_its_training_question_on_the_engine(onnx_finetuned, ft_examples):
    client, runtime, job = onnx_finetuned
    prompt = ft_examples[0]["messages"][:-1]
    answer = ft_examples[0]["messages"][-1]["content"]
    tuned = client.chat.completions.create(
        model=job["fine_tuned_model"], messages=prompt, temperature=0, max_tokens=60
    )
    base = client.chat.completions.create(model=MODEL, messages=prompt, temperature=0, max_tokens=60)
    assert tuned.choices[0].message.content.startswith(answer[:40]), tuned.choices[0].message.content
    assert answer[:40] not in base.choices[0].message.content
    assert (runtime.home / job["_adapter_dir"] / "adapter.onnx_adapter").is_file()  # exported for the engine
    assert runtime._peft is None  # torch never loaded it


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_an_unreadable_adapter_fails_that_model_only(onnx_finetuned, ft_examples, damage):
    client, runtime, job = onnx_finetuned
    broken = {**job, "id": f"ftjob-broken{damage}", "fine_tuned_model": f"{job['fine_tuned_model']}-{damage}"}
    broken["_adapter_dir"] = f"adapters/{broken['id']}"
    shutil.copytree(
        runtime.home / job["_adapter_dir"],
        runtime.home / broken["_adapter_dir"],
        ignore=shutil.ignore_patterns("checkpoint-*", "*.onnx_adapter"),
    )
    weights = runtime.home / broken["_adapter_dir"] / "adapter_model.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:1000])
    Store(runtime.home).save_job(broken)
    prompt = ft_examples[0]["messages"][:-1]
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=broken["fine_tuned_model"], messages=prompt, max_tokens=5)
    assert error.value.code == "model_unavailable" and error.value.param == "model"
    assert broken["fine_tuned_model"] in error.value.message and "unreadable" in error.value.message
    for model in (MODEL, job["fine_tuned_model"]):  # the base and the good fine-tuned model still answer
        assert client.chat.completions.create(
            model=model, messages=prompt, max_tokens=3
        ).usage.completion_tokens


def test_a_large_max_tokens_grows_the_kv_states_as_needed(onnx_server):
    """A large max_tokens: the KV states grow as the answer does instead of being allocated for 8,000 tokens."""
    client, _ = onnx_server
    small = ask(client, QUESTIONS[2], temperature=0, max_tokens=64, stop=["\n"]).choices[0]
    large = ask(client, QUESTIONS[2], temperature=0, max_tokens=8000, stop=["\n"]).choices[0]
    assert large.finish_reason == small.finish_reason == "stop"
    assert large.message.content == small.message.content


def repeats(runtime: ChatRuntime, text: str) -> float:
    """The share of `text`'s tokens that occurred before in it."""
    ids = runtime.encode(text)
    return 1 - len(set(ids)) / len(ids)


def test_repetition_penalties_apply_on_both_engines(onnx_server, torch_runtime):
    """frequency_penalty / presence_penalty (OpenAI's; ignored before) in the one decoding loop: the greedy
    answer that repeats itself ("12 months ... 12 months ...") repeats less, on torch and through the server
    on the ONNX engine."""
    client, runtime = onnx_server
    prompt = render([{"role": "user", "content": QUESTIONS[0]}])
    for penalty in ({"frequency_penalty": 1.0}, {"presence_penalty": 1.5}):
        plain = torch_runtime.generate(prompt, temperature=0, max_tokens=60).text
        penalized = torch_runtime.generate(prompt, temperature=0, max_tokens=60, **penalty).text
        assert repeats(runtime, penalized) < repeats(runtime, plain), (plain, penalized)
        plain = ask(client, QUESTIONS[0], temperature=0, max_tokens=60).choices[0].message.content
        penalized = (
            ask(client, QUESTIONS[0], temperature=0, max_tokens=60, **penalty).choices[0].message.content
        )
        assert repeats(runtime, penalized) < repeats(runtime, plain), (plain, penalized)


# -- requests running at the same time are decoded in one batch ---------------------------------------------
LONG = ["Write a short story about a robot.", "Explain how a bicycle works.", "Describe a day at the beach."]


def together(*calls):
    """Run the calls at the same time (one thread each); their results, in order."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [future.result() for future in [pool.submit(call) for call in calls]]


def content(reply: openai.types.chat.ChatCompletion) -> tuple:
    """What a reply says: its text, its tool calls, its finish reason and token counts."""
    message, usage = reply.choices[0].message, reply.usage
    calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
    return (
        message.content,
        calls,
        reply.choices[0].finish_reason,
        usage.prompt_tokens,
        usage.completion_tokens,
    )


def test_concurrent_requests_are_decoded_together_each_as_alone(onnx_server):
    """8 greedy requests at once: read in shared decode steps (the engine's peak batch), each answer exactly the
    one it gets alone (a batched row's int8 logits are those of the row alone)."""
    client, runtime = onnx_server
    questions = [*QUESTIONS, *LONG, "Name three colours.", "What is Python?"]
    calls = [lambda q=q: ask(client, q, temperature=0, max_tokens=40) for q in questions]
    alone = [content(call()) for call in calls]
    runtime._onnx.scheduler.peak = 0
    batched = [content(reply) for reply in together(*calls)]
    assert batched == alone
    assert runtime._onnx.scheduler.peak >= 2, runtime._onnx.scheduler.peak  # typically all 8


def test_a_stream_closed_mid_batch_leaves_its_batch_mates_whole(onnx_server):
    """A client hangs up on its stream while its batch-mates decode: its row is given back before they finish
    (the server closes the runtime's stream within a token or two: it went on for ~100 tokens when the SSE
    iterator was left to the garbage collector), they finish with their full answers, and the server keeps
    serving."""
    client, runtime = onnx_server
    calls = [lambda q=q: ask(client, q, temperature=0, max_tokens=60) for q in LONG]
    alone = [content(call()) for call in calls]

    def hang_up() -> int:
        stream = ask(client, QUESTIONS[0], temperature=0, max_tokens=200, stream=True)
        chunks = [chunk for chunk, _ in zip(stream, range(5), strict=False)]
        stream.close()
        return len(chunks)

    runtime._onnx.scheduler.peak = 0
    *replies, received = together(*calls, hang_up)
    assert runtime._onnx.scheduler.running() == 0
    assert [content(reply) for reply in replies] == alone and received == 5
    lengths = [reply.usage.completion_tokens for reply in replies]
    assert max(lengths) >= 40, lengths  # the last batch-mate decoded well past the hang-up (5 chunks)
    assert runtime._onnx.scheduler.peak >= 2
    assert ask(client, QUESTIONS[1], temperature=0, max_tokens=12).choices[0].message.content


def test_closing_a_stream_gives_its_row_back_at_once(onnx_server):
    """Two streams decoding, one closed mid-answer (what the server does when its client hangs up): its row goes
    at once, the other streams on to the answer it gives alone."""
    _, runtime = onnx_server
    prompts = [render([{"role": "user", "content": question}]) for question in LONG[:2]]
    alone = runtime.generate(prompts[1], temperature=0, max_tokens=30)
    closed, kept = (runtime.stream(prompt, temperature=0, max_tokens=30) for prompt in prompts)
    pieces = [next(kept)]
    for _ in range(3):
        next(closed)
        pieces.append(next(kept))
    assert runtime._onnx.scheduler.running() == 2
    closed.close()
    assert runtime._onnx.scheduler.running() == 1
    with pytest.raises(StopIteration) as done:
        while True:
            pieces.append(next(kept))
    assert "".join(pieces) == alone.text and done.value.value == alone
    assert runtime._onnx.scheduler.running() == 0


def test_constrained_and_plain_requests_share_a_batch(onnx_server):
    """A JSON-schema request, a tool call and plain requests at once: each comes out as it does alone."""
    client, runtime = onnx_server
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}
    schema_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}
    calls = [
        lambda: ask(
            client,
            "The capital of France, as JSON with a key city.",
            temperature=0,
            max_tokens=30,
            response_format=schema_format,
        ),
        lambda: ask(
            client,
            "What is the weather in Paris? Use the weather tool.",
            temperature=0,
            max_tokens=60,
            tools=[tool(weather).schema],
            tool_choice="required",
        ),
        *[lambda q=q: ask(client, q, temperature=0, max_tokens=40) for q in LONG],
    ]
    alone = [content(call()) for call in calls]
    runtime._onnx.scheduler.peak = 0
    assert [content(reply) for reply in together(*calls)] == alone
    assert json.loads(alone[0][0]) == {"city": "Paris"} and alone[1][1][0][0] == "weather"
    assert runtime._onnx.scheduler.peak >= 2


def test_requests_with_different_adapters_run_at_once(onnx_finetuned, ft_examples):
    """A fine-tuned model and the base model decoding at the same time: each with its own LoRA inputs."""
    client, runtime, job = onnx_finetuned
    prompt = ft_examples[0]["messages"][:-1]
    answer = ft_examples[0]["messages"][-1]["content"]
    calls = [
        lambda model=model: client.chat.completions.create(
            model=model, messages=prompt, temperature=0, max_tokens=40
        )
        for model in (job["fine_tuned_model"], MODEL, job["fine_tuned_model"], MODEL)
    ]
    alone = [content(call()) for call in calls]
    assert [content(reply) for reply in together(*calls)] == alone
    assert alone[0][0].startswith(answer[:40]) and not alone[1][0].startswith(answer[:40])
