"""The local model runtime on the real models: weight cache, decoding, constrained JSON, log-probs, embeddings.

The chat runtime here builds its weight cache from the GGUF in a fresh home (~30 s, once per session) and
is shared with tests/test_training.py through `fresh_chat_runtime()`.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from llmlab.local import chat_format
from llmlab.local.chat_format import render
from llmlab.local.embedding_runtime import EmbeddingRuntime
from llmlab.local.prompt_cache import PromptCache
from llmlab.local.runtime import ChatRuntime, ContextLengthExceeded, Generation

CAPITAL = render([{"role": "user", "content": "What is the capital of France?"}])


@functools.cache
def fresh_chat_runtime() -> ChatRuntime:
    """One ChatRuntime over a new, empty home: its first use dequantizes the GGUF into the cache."""
    runtime = ChatRuntime(Path(tempfile.mkdtemp(prefix="llmlab-runtime-test-")))
    runtime.model  # noqa: B018 - load now
    return runtime


@pytest.fixture(scope="session")
def rt() -> ChatRuntime:
    return fresh_chat_runtime()


def test_weight_cache_is_built_once_and_reloaded(rt):
    cache = rt.home / "weights" / rt.model_id
    assert (cache / "model.safetensors").is_file() and (cache / "tokenizer.json").is_file()
    built = [rt.model_id] + ([f"{rt.model_id}-onnx-uint8-lora-r0"] if rt.engine == "onnx" else [])
    assert sorted(p.name for p in cache.parent.iterdir()) == built  # no half-written temp folder left
    stamp = (cache / "model.safetensors").stat().st_mtime_ns
    again = ChatRuntime(rt.home)
    name = "model.layers.3.mlp.down_proj.weight"
    assert torch.equal(again.model.state_dict()[name], rt._base_tensors[name])
    assert (cache / "model.safetensors").stat().st_mtime_ns == stamp
    assert again.tokenizer.eos_token == chat_format.END
    del again


def test_render_matches_the_models_own_chat_template(rt):
    for messages in (
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "How are you?"},
        ],
    ):
        for gen_prompt in (True, False):
            expected = rt.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=gen_prompt
            )
            assert render(messages, add_generation_prompt=gen_prompt) == expected


def test_greedy_generation_is_deterministic_and_sane(rt):
    first = rt.generate(CAPITAL, temperature=0, max_tokens=30)
    second = rt.generate(CAPITAL, temperature=0, max_tokens=30)
    assert first == second
    assert "Paris" in first.text
    assert first.finish_reason == "stop"  # the model ended its turn with <|im_end|>
    assert (
        first.prompt_tokens
        == rt.count_tokens(CAPITAL)
        == rt.prompt_tokens([{"role": "user", "content": "What is the capital of France?"}])
    )
    assert 0 < first.completion_tokens < 30


def test_sampling_with_a_seed_is_reproducible(rt):
    runs = [rt.generate(CAPITAL, temperature=1.2, top_p=0.95, seed=s, max_tokens=12).text for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_max_tokens_ends_with_length(rt):
    gen = rt.generate(
        render([{"role": "user", "content": "Write a long story about a dragon."}]), max_tokens=5
    )
    assert gen.finish_reason == "length" and gen.completion_tokens == 5


def test_stop_string_cuts_the_text(rt):
    full = rt.generate(CAPITAL, temperature=0, max_tokens=30).text
    word = full.split()[3]
    gen = rt.generate(CAPITAL, temperature=0, max_tokens=30, stop=["zzz", word])
    assert gen.finish_reason == "stop"
    assert gen.text == full[: full.index(word)]


def test_stream_yields_the_same_text_and_returns_the_generation(rt):
    deltas, stream = [], rt.stream(CAPITAL, temperature=0, max_tokens=30, stop=["Paris"])
    while True:
        try:
            deltas.append(next(stream))
        except StopIteration as done:
            final = done.value
            break
    assert isinstance(final, Generation) and final.finish_reason == "stop"
    assert (
        "".join(deltas) == final.text == rt.generate(CAPITAL, temperature=0, max_tokens=30, stop="Paris").text
    )
    assert "Paris" not in final.text and len(deltas) > 1  # held back the partial stop string only


def test_closing_a_stream_releases_the_lock(rt):
    stream = rt.stream(CAPITAL, temperature=0, max_tokens=30)
    next(stream)
    stream.close()
    assert rt.generate(CAPITAL, temperature=0, max_tokens=3).completion_tokens == 3


SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "London", "Berlin"]},
        "temperature_c": {"type": "number"},
        "place": {
            "type": "object",
            "properties": {"country": {"type": "string"}},
            "required": ["country"],
            "additionalProperties": False,
        },
    },
    "required": ["city", "temperature_c", "place"],
    "additionalProperties": False,
}


def _valid(obj: dict) -> bool:
    return (
        set(obj) == {"city", "temperature_c", "place"}
        and obj["city"] in ("Paris", "London", "Berlin")
        and isinstance(obj["temperature_c"], int | float)
        and set(obj["place"]) == {"country"}
        and isinstance(obj["place"]["country"], str)
    )


def test_json_schema_output_parses_and_validates(rt):
    prompt = render(
        [{"role": "user", "content": "Weather in Paris as JSON: city, temperature_c, place.country."}]
    )
    greedy = rt.generate(prompt, temperature=0, json_schema=SCHEMA, max_tokens=60)
    sampled = rt.generate(prompt, temperature=1.0, seed=1, json_schema=SCHEMA, max_tokens=60)
    for gen in (greedy, sampled):
        assert gen.finish_reason == "stop", gen
        assert _valid(json.loads(gen.text)), gen.text
    assert (
        rt.generate(prompt, temperature=0, json_schema=SCHEMA, max_tokens=60) == greedy
    )  # compiled once, reused


def test_json_object_mode_and_lark_grammar(rt):
    prompt = render([{"role": "user", "content": "Give a JSON object with the name and age of a cat."}])
    # a small frequency penalty: greedy, the 135M model may repeat one phrase inside the "description" string
    # until max_tokens (int8 does here, fp32 on other prompts: a near-tie decides); with it both engines give
    # the same short object. The penalty itself is tested in tests/test_engine.py.
    gen = rt.generate(
        prompt, temperature=0, json_schema={"type": "object"}, max_tokens=150, frequency_penalty=0.3
    )
    assert gen.finish_reason == "stop" and isinstance(json.loads(gen.text), dict)
    gen = rt.generate(CAPITAL, temperature=0, lark_grammar='start: "yes" | "no"', max_tokens=5)
    assert gen.text in ("yes", "no") and gen.finish_reason == "stop"
    with pytest.raises(ValueError):
        rt.generate(CAPITAL, lark_grammar="start: (", max_tokens=5)


def test_logprob_prefers_the_truth(rt):
    right = rt.logprob(CAPITAL, "The capital of France is Paris.")
    wrong = rt.logprob(CAPITAL, "The capital of France is Berlin.")
    assert wrong < right < 0
    assert rt.logprob(CAPITAL, "") == 0.0


def test_context_length_exceeded(rt):
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 8192"):
        rt.generate(CAPITAL, max_tokens=rt.context_length)
    with pytest.raises(ContextLengthExceeded):
        rt.logprob("word " * rt.context_length, "x")


def test_unknown_adapter_is_refused(rt):
    with pytest.raises(KeyError):
        rt.generate(CAPITAL, adapter="nope", max_tokens=2)


LONG_SYSTEM = "You are the helpdesk assistant of Fernhollow Ltd. Answer in one short sentence. " + " ".join(
    f"Rule {i}: be polite, be brief, and say when you do not know." for i in range(12)
)


def _ask(question: str) -> str:
    return render([{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": question}])


@pytest.fixture(scope="module")
def torch_rt(rt) -> ChatRuntime:
    """The torch engine on the same home, pinned (`LLMLAB_ENGINE=torch`, read when a runtime is made):
    `PromptCache` is its prompt cache (the ONNX engine keeps its own, tested in tests/test_engine.py)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMLAB_ENGINE", "torch")
        return ChatRuntime(rt.home)


def test_prompt_cache_reuses_a_shared_prefix_without_changing_answers(torch_rt, monkeypatch):
    """Two prompts with the same long system prompt: the second reads only its own question, and greedy
    answers and log-probs equal those of a runtime that caches nothing."""
    rt = torch_rt
    monkeypatch.setenv("LLMLAB_ENGINE", "torch")
    plain = ChatRuntime(rt.home)
    assert rt.engine == plain.engine == "torch"
    plain.prompt_cache = PromptCache(budget=0)  # keeps nothing
    first, second = _ask("What is the capital of France?"), _ask("Name a large animal.")
    rt.prompt_cache = PromptCache()
    rt.generate(first, temperature=0, max_tokens=4)
    assert 200 < rt.prompt_cache.reusable(None, rt.encode(second)) < rt.count_tokens(second)
    for prompt in (second, first):  # a prefix hit, then a whole-prompt hit (all but the last token)
        assert rt.generate(prompt, temperature=0, max_tokens=20) == plain.generate(
            prompt, temperature=0, max_tokens=20
        )
    assert rt.logprob(second, "Paris.") == pytest.approx(plain.logprob(second, "Paris."), abs=1e-3)
    assert len(plain.prompt_cache) == 0


def test_prompt_cache_keeps_adapters_apart_and_stays_within_budget(rt):
    cache = PromptCache(budget=100, min_reuse=4)

    def states(n: int):
        rng = torch.Generator().manual_seed(n)
        kv = [
            (torch.randn(1, 3, n, 64, generator=rng), torch.randn(1, 3, n, 64, generator=rng))
            for _ in range(2)
        ]
        return type("Cache", (), {"layers": [type("Layer", (), {"keys": k, "values": v}) for k, v in kv]})

    a = list(range(60))
    cache.keep(None, a, states(60))
    assert cache.reusable("some-adapter", a) == 0  # another adapter's states are never reused
    assert cache.reusable(None, a[:30] + [999]) == 30 and cache.reusable(None, [999] + a) == 0
    restored, length = cache.start(rt.model.config, None, a + [7, 8], limit=61)
    assert length == 60 and restored.get_seq_length() == 60
    cache.keep("some-adapter", list(range(50)), states(50))  # 110 tokens > budget: the oldest goes
    assert len(cache) == 1 and cache.reusable(None, a) == 0 and cache.reusable("some-adapter", a) == 50
    cache.forget("some-adapter")
    assert len(cache) == 0


def test_embeddings_are_normalized_and_meaningful():
    emb = EmbeddingRuntime()
    vectors = emb.embed(
        ["How many days of leave do I get?", "annual leave allowance", "the cat sat on the mat"]
    )
    assert vectors.shape == (3, emb.dim) == (3, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
    assert emb.embed([]).shape == (0, 384)
    assert emb.count_tokens(["hello world", "hi"]) == 3 and emb.count_tokens("hello world") == 2
    assert emb.max_tokens == 256
