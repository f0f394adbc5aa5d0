"""The chat service: one chat-completions request, from its JSON body to a completion or a stream of chunks.

A request flows route → validated request (`requests.ChatCompletionRequest`) → this service → runtime. The
service finds the model that serves the request (a fine-tuned one loads its adapter), renders the prompt
once (`chat_format.render`), routes tools (`toolcalls`: tool_choice auto / none / required / a named
function) and asks the runtime to generate. It answers OpenAI's `ChatCompletion` as a dict, or, for
`stream=True`, an iterator of `ChatCompletionChunk` dicts that the route sends as server-sent events. The dicts
are built here without the `openai` package (importing it costs a cold start ~1 s): tests/test_conformance.py
checks every shape the service answers against the SDK's own types.

>>> service = ChatService(home, store, Models(home))  # doctest: +SKIP
>>> service.complete({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]})  # doctest: +SKIP
{'id': 'chatcmpl-…', 'object': 'chat.completion', 'choices': [...], 'usage': {...}, ...}
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

from llmlab import openai_facts
from llmlab.local.chat_format import render
from llmlab.local.errors import APIError, as_api_error, model_not_found, runtime_errors
from llmlab.local.legacy import LegacyError, legacy_finish_reason, modernize, to_legacy
from llmlab.local.requests import (
    ChatCompletionRequest,
    JsonObjectFormat,
    JsonSchemaFormat,
    ResponseFormat,
    parse,
)
from llmlab.local.runtimes import Models
from llmlab.local.starting import DEFAULT_MAX_TOKENS
from llmlab.local.store import Store, new_id
from llmlab.models import CHAT_MODEL_ID, EMBEDDING_MODEL_ID, resolve_alias

Chunks = Generator[dict, None, None]


class ChatService:
    """Chat completions over the `models` of one llmlab `home`, fine-tuned models found in its `store`."""

    def __init__(self, home: Path, store: Store, models: Models) -> None:
        self.home, self.store, self.models = Path(home), store, models

    # -- models and adapters ---------------------------------------------------------------------------------
    def fine_tuned_models(self) -> dict[str, tuple[dict, Path]]:
        """Every usable fine-tuned model name and checkpoint name -> (its job, its adapter folder).

        A succeeded job's model, and the checkpoints of any job (one that failed or was cancelled too)
        whose adapter is on disk: what `checkpoints` lists is what answers.
        """
        found = {}
        for job in self.store.list_jobs():
            if job["status"] == "succeeded" and job.get("fine_tuned_model"):
                found[job["fine_tuned_model"]] = (job, self.home / job["_adapter_dir"])
            for checkpoint in self.checkpoints(job["id"]):
                found[checkpoint["fine_tuned_model_checkpoint"]] = (
                    job,
                    self.home / checkpoint["_adapter_dir"],
                )
        return found

    def checkpoints(self, job_id: str) -> list[dict]:
        """The job's checkpoints whose adapter is complete on disk, newest first."""
        return [
            c
            for c in self.store.list_checkpoints(job_id)
            if (self.home / c.get("_adapter_dir", "") / "adapter_config.json").is_file()
        ]

    def target(self, model: str) -> tuple[str, str | None]:
        """(the id that serves `model`, the adapter to generate with or None), the adapter loaded;
        404/400 otherwise."""
        if model.startswith("ft:"):
            from llmlab.local.engine_onnx import AdapterError

            found = self.fine_tuned_models().get(model)
            if found is None:
                raise model_not_found(model)
            runtime = self.models.chat()
            if not runtime.has_adapter(model):
                try:
                    runtime.load_adapter(model, found[1])
                except AdapterError as exc:
                    raise APIError(
                        400, f"The model {model} cannot be served: {exc}", "model", "model_unavailable"
                    ) from exc
            return model, model
        local = resolve_alias(model)
        if local == CHAT_MODEL_ID:
            return CHAT_MODEL_ID, None
        if local == EMBEDDING_MODEL_ID:
            raise APIError(400, f"{model} is an embedding model: use it with /v1/embeddings.", "model")
        raise model_not_found(model)

    # -- one request -------------------------------------------------------------------------------------------
    def complete(self, body: dict) -> dict | Chunks:
        """The answer to the chat-completions request `body`: a `ChatCompletion` dict, or the chunks of a
        stream (the first is ready: a refusal is raised here as an `APIError`, before anything is sent)."""
        request = parse(ChatCompletionRequest, body)  # the body as sent, legacy `functions` included
        try:
            body, legacy = modernize(body)
        except LegacyError as exc:
            raise APIError(400, str(exc), exc.param) from exc
        if legacy:  # checked again in today's terms: `functions` became `tools`
            request = parse(ChatCompletionRequest, body)
        messages = _messages(body)
        served, adapter = self.target(request.model)
        n = request.n or 1
        stream = bool(request.stream)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        runtime = self.models.chat()
        options = _generation_options(request, runtime)
        tools = body.get("tools") or None
        prompt = render(messages, tools=tools)  # the one rendering of this request's prompt
        if options["max_tokens"] is None:
            room = runtime.context_length - runtime.count_tokens(prompt)
            options["max_tokens"] = max(1, min(DEFAULT_MAX_TOKENS, room))
        options["adapter"] = adapter
        if tools:
            return _with_tools(runtime, body, prompt, options, served, stream, include_usage, legacy)
        if stream:
            return _stream(runtime, prompt, options, _Chunks(served), include_usage)
        choices, completion_tokens, prompt_tokens = [], 0, 0
        for index in range(n):
            seed = options["seed"] + index if options["seed"] is not None else None
            gen = runtime_errors(lambda seed=seed: runtime.generate(prompt, **{**options, "seed": seed}))
            message = {"role": "assistant", "content": gen.text}
            logprobs = _choice_logprobs(options, gen.logprobs)
            choices.append(
                {"index": index, "message": message, "finish_reason": gen.finish_reason, "logprobs": logprobs}
            )
            completion_tokens += gen.completion_tokens
            prompt_tokens = gen.prompt_tokens
        return _completion(served, choices, prompt_tokens, completion_tokens)


# -- request pieces (the request models checked the types; these turn them into what the runtime takes) ------
def _text_content(content: Any, param: str) -> str:
    """A message's content as text (a string, or a list of text parts); other parts are refused."""
    if content is None or isinstance(content, str):
        return content or ""
    for i, part in enumerate(content):
        if part["type"] != "text":
            raise APIError(
                400, f"Only text content parts are supported locally ('{param}[{i}]').", f"{param}[{i}]"
            )
    return "".join(openai_facts.text_parts(content))


def _messages(body: dict) -> list[dict]:
    """The (validated) messages of `body`, content as text, `developer` as `system`."""
    return [
        {
            **message,
            "role": "system" if message["role"] == "developer" else message["role"],
            "content": _text_content(message.get("content"), f"messages[{i}].content"),
        }
        for i, message in enumerate(body["messages"])
    ]


def _generation_options(request: ChatCompletionRequest, runtime: Any) -> dict:
    param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    max_tokens = getattr(request, param)
    if max_tokens is not None and max_tokens > runtime.context_length:
        raise APIError(
            400,
            f"'{param}' must be at most {runtime.context_length} (the model's context), got {max_tokens}.",
            param,
        )
    options = {
        "max_tokens": max_tokens,
        "temperature": 1.0 if request.temperature is None else request.temperature,
        "top_p": 1.0 if request.top_p is None else request.top_p,
        "seed": request.seed,
        "stop": [request.stop] if isinstance(request.stop, str) else request.stop or None,
        "logprobs": _logprobs(request),
        "frequency_penalty": request.frequency_penalty or 0.0,
        "presence_penalty": request.presence_penalty or 0.0,
    }
    schema = _json_schema(request.response_format)
    if schema is not None:
        options["json_schema"] = schema
    return options


def _logprobs(request: ChatCompletionRequest) -> int | None:
    """How many top alternatives to report per token (`top_logprobs`, default 0), None without `logprobs`."""
    if not request.logprobs:
        if request.top_logprobs is not None:
            raise APIError(400, "'top_logprobs' is only allowed when 'logprobs' is true.", "top_logprobs")
        return None
    return request.top_logprobs or 0


def _choice_logprobs(options: dict, entries: list[dict] | None) -> dict | None:
    """A choice's `logprobs` (OpenAI's `ChoiceLogprobs`) when the request asked for them, else None."""
    return None if options["logprobs"] is None else {"content": entries, "refusal": None}


def _json_schema(response_format: ResponseFormat | None) -> dict | None:
    """The JSON schema that `response_format` asks for, or None for plain text."""
    if isinstance(response_format, JsonObjectFormat):
        return {"type": "object"}
    if isinstance(response_format, JsonSchemaFormat):
        return response_format.json_schema.schema_ or {"type": "object"}
    return None


# -- the answer ----------------------------------------------------------------------------------------------------
def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _completion(model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI's `ChatCompletion` as a dict."""
    return {
        "id": new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": _usage(prompt_tokens, completion_tokens),
        "system_fingerprint": "llmlab",
    }


def _with_tools(
    runtime: Any,
    body: dict,
    prompt: str,
    options: dict,
    served: str,
    stream: bool,
    include_usage: bool,
    legacy: bool,
) -> dict | Chunks:
    """Tool calls: `llmlab.local.toolcalls.complete_with_tools` answers on the rendered `prompt`, the service
    shapes the response (in the legacy `function_call` shape for a request with `functions`)."""
    from llmlab.local.toolcalls import complete_with_tools

    parallel = body.get("parallel_tool_calls")
    done = runtime_errors(
        lambda: complete_with_tools(
            runtime,
            prompt=prompt,
            tools=body["tools"],
            tool_choice=body.get("tool_choice") or "auto",
            parallel_tool_calls=True if parallel is None else bool(parallel),
            **{k: v for k, v in options.items() if k != "json_schema"},
        )
    )
    shape = to_legacy if legacy else lambda part: part
    finish = legacy_finish_reason(done.finish_reason) if legacy else done.finish_reason
    logprobs = _choice_logprobs(options, done.logprobs)
    if not stream:
        choice = {"index": 0, "message": shape(done.message()), "finish_reason": finish, "logprobs": logprobs}
        return _completion(served, [choice], done.prompt_tokens, done.completion_tokens)
    chunks = _Chunks(served)

    def streamed() -> Chunks:
        for i, delta in enumerate(done.deltas()):
            first = {"logprobs": logprobs} if i == 0 and logprobs else {}
            yield chunks.chunk([{"index": 0, "delta": shape(delta), "finish_reason": None, **first}])
        yield chunks.chunk([{"index": 0, "delta": {}, "finish_reason": finish}])
        if include_usage:
            yield chunks.chunk([], _usage(done.prompt_tokens, done.completion_tokens))

    return streamed()


class _Chunks:
    """The chunks of one streamed completion (same id and time on every chunk)."""

    def __init__(self, model: str) -> None:
        self.model, self.id, self.created = model, new_id("chatcmpl-"), int(time.time())

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        """OpenAI's `ChatCompletionChunk` as a dict."""
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "system_fingerprint": "llmlab",
        }
        return chunk | ({"usage": usage} if usage else {})


def _stream(runtime: Any, prompt: str, options: dict, chunks: _Chunks, include_usage: bool) -> Chunks:
    """A role chunk, content chunks, a finish chunk and a usage chunk if asked.

    The runtime's stream runs in a thread of its own (it keeps its lock there) and is started here, so a
    refusal is raised before the first chunk; closing the chunks (a client that hangs up) stops it. An
    error later on is raised from the chunks.
    """
    events: queue.Queue[tuple[str, Any]] = queue.Queue()
    hung_up = threading.Event()

    def produce() -> None:
        try:
            deltas = runtime.stream(prompt, **options)
            while True:
                try:
                    delta = next(deltas)
                except StopIteration as done:
                    events.put(("done", done.value))
                    return
                events.put(("delta", delta))
                if hung_up.is_set():
                    deltas.close()
                    return
        except Exception as exc:
            events.put(("error", exc))

    threading.Thread(target=produce, name="llmlab-stream", daemon=True).start()
    first = events.get()
    if first[0] == "error":
        raise as_api_error(first[1])

    def relayed() -> Chunks:
        item = first
        try:
            yield chunks.chunk(
                [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
            )
            while item[0] == "delta":
                delta = item[1]
                if delta or delta.logprobs:
                    logprobs = _choice_logprobs(options, delta.logprobs)
                    choice = {"index": 0, "delta": {"content": str(delta)}, "finish_reason": None}
                    yield chunks.chunk([{**choice, **({"logprobs": logprobs} if logprobs else {})}])
                item = events.get()
            if item[0] == "error":
                raise item[1]
            gen = item[1]
            yield chunks.chunk([{"index": 0, "delta": {}, "finish_reason": gen.finish_reason}])
            if include_usage:
                yield chunks.chunk([], _usage(gen.prompt_tokens, gen.completion_tokens))
        finally:
            hung_up.set()

    return relayed()
