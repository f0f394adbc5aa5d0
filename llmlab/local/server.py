"""The OpenAI-compatible local server: models, embeddings, chat completions, files and fine-tuning jobs.

Responses are built from the `openai.types` models, errors have OpenAI's body
``{"error": {"message", "type", "param", "code"}}``; the models load on first use.

>>> base_url, stop = serve_app_in_thread(create_app(api_key="k"))  # doctest: +SKIP
>>> from openai import OpenAI
>>> client = OpenAI(base_url=base_url, api_key="k")  # doctest: +SKIP
>>> client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])  # doctest: +SKIP
"""

from __future__ import annotations

import atexit
import base64
import json
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

import uvicorn
from fastapi import Body, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from openai.types import CreateEmbeddingResponse, FileDeleted, FileObject, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmlab import openai_facts
from llmlab.local.jobs import JobRequestError, JobRunner
from llmlab.local.loopback import bind, refusal
from llmlab.local.requests import (
    APIError,
    ChatCompletionRequest,
    EmbeddingRequest,
    FilePurpose,
    FineTuningJobRequest,
    JsonObjectFormat,
    JsonSchemaFormat,
    ResponseFormat,
    parse,
    request_error,
)
from llmlab.local.starting import DEFAULT_MAX_TOKENS, model_list
from llmlab.local.store import Store, new_id, paginate, public
from llmlab.models import CHAT_MODEL_ID, EMBEDDING_MODEL_ID, resolve_alias
from llmlab.paths import llmlab_home

EMBEDDING_INPUT_LIMIT = 8191  # OpenAI's limit per embeddings input, in its own tokens (cl100k_base)
JsonBody = Annotated[dict[str, Any], Body()]
Limit = Annotated[int, Query(ge=1, le=10000)]
_log = logging.getLogger(__name__)


class _Models:
    """One ChatRuntime and one EmbeddingRuntime per app, created on first use."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self._lock = threading.Lock()
        self._chat: Any = None
        self._embedding: Any = None

    def chat(self) -> Any:
        with self._lock:
            if self._chat is None:
                from llmlab.local.runtime import ChatRuntime

                self._chat = ChatRuntime(self.home)
            return self._chat

    def embedding(self) -> Any:
        with self._lock:
            if self._embedding is None:
                from llmlab.local.runtime import EmbeddingRuntime

                self._embedding = EmbeddingRuntime(self.home)
            return self._embedding


class LocalBackend:
    """What one app serves: the store, the job runner and the models (reachable as `app.state.backend`)."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.store = Store(self.home)
        self.models = _Models(self.home)
        self.jobs = JobRunner(self.store, self.models.chat)

    # -- models ------------------------------------------------------------------------------------------
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

    def chat_target(self, model: str) -> tuple[str, str | None]:
        """(the id that serves `model`, the adapter name to generate with or None); 404/400 otherwise."""
        if model.startswith("ft:"):
            from llmlab.local.engine_onnx import AdapterError

            found = self.fine_tuned_models().get(model)
            if found is None:
                raise _model_not_found(model)
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
        raise _model_not_found(model)

    def model_list(self) -> list[dict]:
        """What GET /v1/models lists (`starting.model_list`, which answers it while the server starts)."""
        return _rendered(
            model_list(self.store),
            lambda m: Model.model_validate(m).model_dump(mode="json", exclude_unset=True),
        )


def _model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        "model",
        "model_not_found",
    )


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


def _runtime_errors(call: Callable[[], Any]) -> Any:
    """Run `call`, turning the runtime's refusals into OpenAI errors."""
    try:
        return call()
    except Exception as exc:
        raise _as_api_error(exc) from exc


def _as_api_error(exc: Exception) -> Exception:
    from llmlab.local.runtime import ContextLengthExceeded, GrammarError
    from llmlab.local.toolcalls import ToolChoiceError, ToolSchemaError

    if isinstance(exc, ContextLengthExceeded):
        return APIError(400, str(exc), "messages", "context_length_exceeded")
    if isinstance(exc, ToolSchemaError):
        return APIError(400, str(exc), exc.param, "invalid_function_parameters")
    if isinstance(exc, ToolChoiceError):
        return APIError(400, str(exc), "tool_choice")
    if isinstance(exc, GrammarError):
        return APIError(400, f"Invalid schema for response_format: {exc}", "response_format")
    return exc


# -- chat ----------------------------------------------------------------------------------------------------------
def _chat(backend: LocalBackend, body: dict) -> dict | StreamingResponse:
    from llmlab.local.legacy import LegacyError, modernize

    request = parse(ChatCompletionRequest, body)  # the body as sent, legacy `functions` included
    try:
        body, legacy = modernize(body)
    except LegacyError as exc:
        raise APIError(400, str(exc), exc.param) from exc
    if legacy:  # checked again in today's terms: `functions` became `tools`
        request = parse(ChatCompletionRequest, body)
    messages = _messages(body)
    served, adapter = backend.chat_target(request.model)
    n = request.n or 1
    stream = bool(request.stream)
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    runtime = backend.models.chat()
    options = _generation_options(request, runtime)
    if options["max_tokens"] is None:
        room = runtime.context_length - runtime.prompt_tokens(messages, tools=body.get("tools") or None)
        options["max_tokens"] = max(1, min(DEFAULT_MAX_TOKENS, room))
    options["adapter"] = adapter
    if request.tools:
        return _chat_with_tools(runtime, body, messages, options, served, stream, include_usage, legacy)
    from llmlab.local.chat_format import render

    prompt = render(messages)
    if stream:
        return _stream(runtime, prompt, options, _Chunks(served), include_usage)
    choices, completion_tokens, prompt_tokens = [], 0, 0
    for index in range(n):
        seed = options["seed"] + index if options["seed"] is not None else None
        gen = _runtime_errors(lambda seed=seed: runtime.generate(prompt, **{**options, "seed": seed}))
        message = {"role": "assistant", "content": gen.text}
        logprobs = _choice_logprobs(options, gen.logprobs)
        choices.append(
            {"index": index, "message": message, "finish_reason": gen.finish_reason, "logprobs": logprobs}
        )
        completion_tokens += gen.completion_tokens
        prompt_tokens = gen.prompt_tokens
    return _completion(served, choices, prompt_tokens, completion_tokens)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _completion(model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    completion = ChatCompletion(
        id=new_id("chatcmpl-"),
        object="chat.completion",
        created=int(time.time()),
        model=model,
        choices=choices,
        usage=_usage(prompt_tokens, completion_tokens),
        system_fingerprint="llmlab",
    )
    return completion.model_dump(mode="json", exclude_unset=True)


def _chat_with_tools(
    runtime: Any,
    body: dict,
    messages: list[dict],
    options: dict,
    served: str,
    stream: bool,
    include_usage: bool,
    legacy: bool,
) -> dict | StreamingResponse:
    """Tool calls: `llmlab.local.toolcalls.complete_with_tools` answers, the server shapes the response
    (in the legacy `function_call` shape for a request with `functions`)."""
    from llmlab.local.legacy import legacy_finish_reason, to_legacy
    from llmlab.local.toolcalls import complete_with_tools

    tools = body["tools"]
    parallel = body.get("parallel_tool_calls")
    done = _runtime_errors(
        lambda: complete_with_tools(
            runtime,
            messages=messages,
            tools=tools,
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

    def body_() -> Iterator[str]:
        for i, delta in enumerate(done.deltas()):
            first = {"logprobs": logprobs} if i == 0 and logprobs else {}
            yield chunks.sse([{"index": 0, "delta": shape(delta), "finish_reason": None, **first}])
        yield chunks.sse([{"index": 0, "delta": {}, "finish_reason": finish}])
        if include_usage:
            yield chunks.sse([], _usage(done.prompt_tokens, done.completion_tokens))
        yield "data: [DONE]\n\n"

    return StreamingResponse(body_(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _Chunks:
    """Server-sent events of one streamed completion (same id and time on every chunk)."""

    def __init__(self, model: str) -> None:
        self.model, self.id, self.created = model, new_id("chatcmpl-"), int(time.time())

    def sse(self, choices: list[dict], usage: dict | None = None) -> str:
        chunk = ChatCompletionChunk(
            id=self.id,
            object="chat.completion.chunk",
            created=self.created,
            model=self.model,
            choices=choices,
            system_fingerprint="llmlab",
            **({"usage": usage} if usage else {}),
        )
        return f"data: {json.dumps(chunk.model_dump(mode='json', exclude_unset=True))}\n\n"


def _stream(
    runtime: Any, prompt: str, options: dict, chunks: _Chunks, include_usage: bool
) -> StreamingResponse:
    """Server-sent events: a role chunk, content chunks, a finish chunk, a usage chunk if asked, [DONE].

    The runtime's stream runs in a thread of its own (it keeps its lock there); a client that hangs up stops it.
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
        raise _as_api_error(first[1])

    def body() -> Iterator[str]:
        item = first
        try:
            yield chunks.sse(
                [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
            )
            while item[0] == "delta":
                delta = item[1]
                if delta or delta.logprobs:
                    logprobs = _choice_logprobs(options, delta.logprobs)
                    choice = {"index": 0, "delta": {"content": str(delta)}, "finish_reason": None}
                    yield chunks.sse([{**choice, **({"logprobs": logprobs} if logprobs else {})}])
                item = events.get()
            if item[0] == "error":
                error = {"message": f"{type(item[1]).__name__}: {item[1]}", "type": "server_error"}
                yield f"data: {json.dumps({'error': {**error, 'param': None, 'code': None}})}\n\n"
                return
            gen = item[1]
            yield chunks.sse([{"index": 0, "delta": {}, "finish_reason": gen.finish_reason}])
            if include_usage:
                yield chunks.sse([], _usage(gen.prompt_tokens, gen.completion_tokens))
            yield "data: [DONE]\n\n"
        finally:
            hung_up.set()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# -- embeddings ---------------------------------------------------------------------------------------------------
def _embeddings(backend: LocalBackend, body: dict) -> dict:
    request = parse(EmbeddingRequest, body)
    model = request.model
    local = resolve_alias(model)
    if local == CHAT_MODEL_ID or model.startswith("ft:"):
        raise APIError(
            400, f"{model} is a chat model: use an embedding model such as {EMBEDDING_MODEL_ID}.", "model"
        )
    if local != EMBEDDING_MODEL_ID:
        raise _model_not_found(model)
    texts = [request.input] if isinstance(request.input, str) else request.input
    if not all(isinstance(t, str) for t in texts):
        raise APIError(
            400, "'input' must be text: token-id arrays are not supported by the local server.", "input"
        )
    if request.dimensions is not None:
        raise APIError(
            400,
            f"{EMBEDDING_MODEL_ID} has a fixed size of 384 dimensions: 'dimensions' is not supported.",
            "dimensions",
        )
    encoding = request.encoding_format or "float"
    _check_input_lengths(texts)
    runtime = backend.models.embedding()
    vectors = runtime.embed(texts)
    tokens = runtime.count_tokens(texts)
    response = CreateEmbeddingResponse(
        data=[{"embedding": [], "index": i, "object": "embedding"} for i in range(len(texts))],
        model=EMBEDDING_MODEL_ID,
        object="list",
        usage={"prompt_tokens": tokens, "total_tokens": tokens},
    ).model_dump(mode="json")
    for item, vector in zip(response["data"], vectors, strict=True):
        as_float32 = vector.astype("<f4")
        item["embedding"] = (
            base64.b64encode(as_float32.tobytes()).decode("ascii")
            if encoding == "base64"
            else as_float32.tolist()
        )
    return response


def _check_input_lengths(texts: list[str]) -> None:
    """Refuse an input longer than OpenAI's limit, counted in OpenAI's tokens (a text of at most that many
    UTF-8 bytes cannot exceed it, so only longer ones are counted)."""
    from llmlab.tokens import count_tokens

    for i, text in enumerate(texts):
        if len(text.encode("utf-8")) > EMBEDDING_INPUT_LIMIT:
            tokens = count_tokens(text, openai_facts.EMBEDDING_MODEL)
            param = f"input[{i}]" if len(texts) > 1 else "input"
            if tokens > EMBEDDING_INPUT_LIMIT:
                raise APIError(
                    400,
                    f"'{param}' is {tokens} tokens long; the maximum input length is {EMBEDDING_INPUT_LIMIT} "
                    "tokens. Please reduce the length of the input.",
                    param,
                )


# -- fine-tuning -----------------------------------------------------------------------------------------------
def _job(job: dict) -> dict:
    return FineTuningJob.model_validate(public(job)).model_dump(mode="json")


def _rendered(records: list[dict], render: Callable[[dict], dict]) -> list[dict]:
    """`render` of each stored record; one that no longer renders is skipped with a warning naming it."""
    out = []
    for record in records:
        try:
            out.append(render(record))
        except ValueError as exc:
            _log.warning(
                "llmlab: skipping the stored record %s: it does not render: %s", record.get("id"), exc
            )
    return out


def _event(event: dict) -> dict:
    return FineTuningJobEvent.model_validate(event).model_dump(mode="json")


def _checkpoint(checkpoint: dict) -> dict:
    return FineTuningJobCheckpoint.model_validate(public(checkpoint)).model_dump(
        mode="json", exclude_none=True
    )


def _page(items: list[dict], after: str | None, limit: int) -> dict:
    page, has_more = paginate(items, after, limit)
    return {"object": "list", "data": page, "has_more": has_more}


def _get_job(backend: LocalBackend, job_id: str) -> dict:
    """The FineTuningJob `job_id` as served; a 404 when there is none or its stored record does not render
    (listing skips such a record too)."""
    job = backend.store.get_job(job_id)
    reason = ""
    if job is not None:
        try:
            return _job(job)
        except ValueError as exc:
            _log.warning("llmlab: the stored record of job %s does not render: %s", job_id, exc)
            reason = " (its stored record is damaged; see the server's log)"
    raise APIError(
        404, f"No fine-tuning job found with id '{job_id}'{reason}.", "fine_tuning_job_id", "not_found"
    )


def _get_file(backend: LocalBackend, file_id: str) -> dict:
    record = backend.store.get_file(file_id)
    if record is None:
        raise APIError(404, f"No such File object: {file_id}", "file_id", "not_found")
    return record


def _file(record: dict) -> dict:
    return FileObject.model_validate(public(record)).model_dump(mode="json", exclude_none=True)


def content_disposition(filename: str) -> str:
    """An attachment header for any file name (RFC 6266): an ASCII fallback and the UTF-8 name.

    >>> print(content_disposition('a"b\u00e9.txt'))
    attachment; filename="a_b_.txt"; filename*=UTF-8''a%22b%C3%A9.txt
    """
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


# -- the app ---------------------------------------------------------------------------------------------------
def create_app(
    home: Path | str | None = None, api_key: str | None = None, allow_remote: bool = False
) -> FastAPI:
    """The FastAPI app serving the llmlab home `home` (default: `llmlab_home()`).

    `api_key` guards every request; unless `allow_remote`, only loopback `Host` names are served.
    """
    backend = LocalBackend(Path(home) if home else llmlab_home())
    app = FastAPI(
        title="llmlab local OpenAI-compatible server", docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.backend = backend
    _install_error_handlers(app)
    if api_key:
        _require_key(app, api_key)
    app.state.activity = Activity()
    app.add_middleware(_TrackActivity, activity=app.state.activity)
    app.add_middleware(_Guard, allow_remote=allow_remote)  # added last: the outermost

    @app.get("/v1/models")
    def list_models() -> dict:
        return {"object": "list", "data": backend.model_list()}

    @app.get("/v1/models/{model_id:path}")
    def get_model(model_id: str) -> dict:
        local = resolve_alias(model_id) or model_id
        for model in backend.model_list():
            if model["id"] == local:
                return model
        raise _model_not_found(model_id)

    @app.post("/v1/chat/completions", response_model=None)
    def chat(request: JsonBody) -> dict | StreamingResponse:
        return _chat(backend, request)

    @app.post("/v1/embeddings")
    def embeddings(request: JsonBody) -> dict:
        return _embeddings(backend, request)

    @app.post("/v1/files")
    def upload_file(file: Annotated[UploadFile, File()], purpose: Annotated[FilePurpose, Form()]) -> dict:
        return _file(backend.store.add_file(file.file, file.filename or "upload", purpose))

    @app.get("/v1/files")
    def list_files(
        purpose: str | None = None,
        after: str | None = None,
        limit: Limit = 10000,
        order: Literal["asc", "desc"] = "desc",
    ) -> dict:
        files = _rendered(backend.store.list_files(purpose), _file)
        return _page(files if order == "desc" else files[::-1], after, limit)

    @app.get("/v1/files/{file_id}")
    def get_file(file_id: str) -> dict:
        return _file(_get_file(backend, file_id))

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str) -> Response:
        record = _get_file(backend, file_id)
        return Response(
            backend.store.file_content(file_id),
            media_type="application/octet-stream",
            headers={"Content-Disposition": content_disposition(record["filename"])},
        )

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str) -> dict:
        _get_file(backend, file_id)
        backend.store.delete_file(file_id)
        return FileDeleted(id=file_id, object="file", deleted=True).model_dump(mode="json")

    @app.post("/v1/fine_tuning/jobs")
    def create_job(request: JsonBody) -> dict:
        checked = parse(FineTuningJobRequest, request)
        try:
            return _job(backend.jobs.create(checked))
        except JobRequestError as exc:
            raise APIError(exc.status, str(exc), exc.param, exc.code) from exc

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs(after: str | None = None, limit: Limit = 20) -> dict:
        return _page(_rendered(backend.store.list_jobs(), _job), after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    def get_job(job_id: str) -> dict:
        return _get_job(backend, job_id)

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(job_id: str) -> dict:
        _get_job(backend, job_id)
        try:
            return _job(backend.jobs.cancel(job_id))
        except JobRequestError as exc:
            raise APIError(exc.status, str(exc), exc.param, exc.code) from exc

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    def job_events(job_id: str, after: str | None = None, limit: Limit = 20) -> dict:
        _get_job(backend, job_id)
        return _page(_rendered(backend.store.list_events(job_id), _event), after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def job_checkpoints(job_id: str, after: str | None = None, limit: Limit = 10) -> dict:
        _get_job(backend, job_id)
        return _page(_rendered(backend.checkpoints(job_id), _checkpoint), after, limit)

    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{**e, "loc": tuple(e.get("loc", ()))[1:]} for e in exc.errors()]
        if errors and errors[0].get("type") == "json_invalid":
            message = "We could not parse the JSON body of your request: it is not valid JSON."
            return APIError(400, message).response()
        where = {str(e["loc"][0]): None for e in errors if e["loc"]}  # query and form fields: one level
        return request_error(errors, where).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = (
            f"Invalid URL ({request.method} {request.url.path})"
            if exc.status_code in (404, 405)
            else exc.detail
        )
        return APIError(exc.status_code, str(message)).response()


def _require_key(app: FastAPI, api_key: str) -> None:
    @app.middleware("http")
    async def check_key(request: Request, call_next: Callable) -> Response:
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            message = (
                "Incorrect API key provided."
                if given
                else "You didn't provide an API key (Authorization: Bearer KEY)."
            )
            return APIError(401, message, None, "invalid_api_key").response()
        return await call_next(request)


_REFUSALS = {
    "host_not_allowed": "Requests must be addressed to a loopback host.",
    "origin_not_allowed": "Cross-origin requests are refused.",
}


class _Guard:
    """The outermost middleware: who may call, and a 500 that keeps the connection open.

    A request is refused (403) when its `Host` is not a loopback name (unless `allow_remote`: DNS
    rebinding) or when a browser sends it from a page whose `Origin` is not loopback (a web page the
    learner visits). An unexpected error is answered as OpenAI's 500 here rather than in Starlette's error
    middleware, which re-raises and so closes a keep-alive connection.
    """

    def __init__(self, app: Any, allow_remote: bool) -> None:
        self.app, self.allow_remote = app, allow_remote

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if (code := refusal(headers, self.allow_remote)) is not None:
            return await APIError(403, _REFUSALS[code], None, code).response()(scope, receive, send)
        started = False

        async def tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            _log.exception("unexpected error answering %s %s", scope["method"], scope["path"])
            if started:
                raise
            message = f"The server had an error processing your request: {type(exc).__name__}: {exc}"
            await APIError(500, message).response()(scope, receive, send)


# -- running it ---------------------------------------------------------------------------------------------------
class Activity:
    """Requests in flight and when the last one ended: what a server's idle shutdown watches."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.last = time.monotonic()

    def idle_seconds(self) -> float:
        return 0.0 if self.in_flight else time.monotonic() - self.last


class _TrackActivity:
    """ASGI middleware counting requests until their last byte is sent (a long stream counts as activity)."""

    def __init__(self, app: Any, activity: Activity) -> None:
        self.app, self.activity = app, activity

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.activity.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.activity.in_flight -= 1
            self.activity.last = time.monotonic()


def idle_seconds(app: FastAPI) -> float:
    """Seconds since `app` last answered a request; 0 while a request or a fine-tuning job is active."""
    from llmlab.local.jobs import ACTIVE

    if any(job["status"] in ACTIVE for job in app.state.backend.store.list_jobs()):
        return 0.0
    return app.state.activity.idle_seconds()


def stop_when_idle(app: FastAPI, server: uvicorn.Server, idle_timeout: float) -> None:
    while not server.should_exit:
        time.sleep(min(5.0, idle_timeout / 4))
        if idle_seconds(app) >= idle_timeout:
            server.should_exit = True


def serve_app_in_thread(app: FastAPI, port: int = 0) -> tuple[str, Callable[[], None]]:
    """Serve `app` on 127.0.0.1:`port` (0 = a free port) in a daemon thread; (base_url, stop)."""
    sock = bind("127.0.0.1", port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="llmlab-server", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not server.started:
        raise RuntimeError("the llmlab server did not start")

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)

    atexit.register(stop)
    return f"http://127.0.0.1:{sock.getsockname()[1]}/v1", stop
