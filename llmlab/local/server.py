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
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from fastapi import Body, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from openai.types import CreateEmbeddingResponse, FileDeleted, FileObject, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmlab.local.jobs import JobRequestError, JobRunner
from llmlab.local.store import Store, new_id, paginate, public
from llmlab.models import CHAT_MODEL_ID, EMBEDDING_MODEL_ID, resolve_alias
from llmlab.paths import llmlab_home

DEFAULT_MAX_TOKENS = 512  # when a request sets no limit: enough for an answer, bounded on a slow CPU
FILE_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
_ROLES = ("system", "developer", "user", "assistant", "tool")
_CREATED = 1730000000  # a fixed "created" time for the bundled models
JsonBody = Annotated[dict[str, Any], Body()]


class APIError(Exception):
    """An error answered with OpenAI's error body and `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {401: "authentication_error", 404: "invalid_request_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


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
        """Every usable fine-tuned model name (and checkpoint name) -> (its job, its adapter folder)."""
        found = {}
        for job in self.store.list_jobs():
            if job["status"] == "succeeded" and job.get("fine_tuned_model"):
                found[job["fine_tuned_model"]] = (job, self.home / job["_adapter_dir"])
                for checkpoint in self.store.list_checkpoints(job["id"]):
                    found[checkpoint["fine_tuned_model_checkpoint"]] = (
                        job,
                        self.home / checkpoint["_adapter_dir"],
                    )
        return found

    def chat_target(self, model: str) -> tuple[str, str | None]:
        """(the id that serves `model`, the adapter name to generate with or None); 404/400 otherwise."""
        if model.startswith("ft:"):
            found = self.fine_tuned_models().get(model)
            if found is None:
                raise _model_not_found(model)
            runtime = self.models.chat()
            if not runtime.has_adapter(model):
                runtime.load_adapter(model, found[1])
            return model, model
        local = resolve_alias(model)
        if local == CHAT_MODEL_ID:
            return CHAT_MODEL_ID, None
        if local == EMBEDDING_MODEL_ID:
            raise APIError(400, f"{model} is an embedding model: use it with /v1/embeddings.", "model")
        raise _model_not_found(model)

    def model_list(self) -> list[dict]:
        models = [
            Model(id=CHAT_MODEL_ID, created=_CREATED, object="model", owned_by="llmlab"),
            Model(id=EMBEDDING_MODEL_ID, created=_CREATED, object="model", owned_by="llmlab"),
        ]
        for job in self.store.list_jobs():
            if job["status"] == "succeeded" and job.get("fine_tuned_model"):
                models.append(
                    Model(
                        id=job["fine_tuned_model"],
                        created=job["finished_at"],
                        object="model",
                        owned_by="llmlab",
                    )
                )
        return [m.model_dump(mode="json", exclude_none=True) for m in models]


def _model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        "model",
        "model_not_found",
    )


# -- request checking ----------------------------------------------------------------------------------------
def _check(condition: bool, message: str, param: str) -> None:
    if not condition:
        raise APIError(400, message, param)


def _number(body: dict, name: str, low: float, high: float, default: Any, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    _check(
        ok_type and not isinstance(value, bool),
        f"'{name}' must be a {'integer' if integer else 'number'}.",
        name,
    )
    _check(low <= value <= high, f"'{name}' must be between {low} and {high}, got {value}.", name)
    return value


def _text_content(content: Any, param: str) -> str:
    """A message's content as text (a string, or a list of text parts); other parts are refused."""
    if content is None or isinstance(content, str):
        return content or ""
    _check(isinstance(content, list), f"'{param}' must be a string or a list of content parts.", param)
    texts = []
    for i, part in enumerate(content):
        ok = isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        _check(ok, f"Only text content parts are supported locally ('{param}.{i}').", f"{param}.{i}")
        texts.append(part["text"])
    return "".join(texts)


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    _check(messages is not None, "Missing required parameter: 'messages'.", "messages")
    _check(
        isinstance(messages, list) and len(messages) > 0, "'messages' must be a non-empty list.", "messages"
    )
    checked = []
    for i, message in enumerate(messages):
        _check(isinstance(message, dict), f"'messages.{i}' must be an object.", f"messages.{i}")
        role = message.get("role")
        _check(
            role in _ROLES,
            f"Invalid 'messages.{i}.role': {role!r}; use one of {', '.join(_ROLES)}.",
            f"messages.{i}.role",
        )
        content = _text_content(message.get("content"), f"messages.{i}.content")
        checked.append({**message, "role": "system" if role == "developer" else role, "content": content})
    return checked


def _generation_options(body: dict, runtime: Any) -> dict:
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    ok_stop = stop is None or (
        isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)
    )
    _check(ok_stop, "'stop' must be a string or a list of up to 4 non-empty strings.", "stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if max_tokens is not None:
        max_tokens = _number({param: max_tokens}, param, 1, runtime.context_length, None, integer=True)
    options = {
        "max_tokens": max_tokens,
        "temperature": _number(body, "temperature", 0, 2, 1.0),
        "top_p": _number(body, "top_p", 0, 1, 1.0),
        "seed": _number(body, "seed", -(2**63), 2**63 - 1, None, integer=True),
        "stop": stop or None,
    }
    schema = _json_schema(body.get("response_format"))
    if schema is not None:
        options["json_schema"] = schema
    return options


def _json_schema(response_format: Any) -> dict | None:
    """The JSON schema that `response_format` asks for, or None for plain text."""
    if response_format is None:
        return None
    _check(isinstance(response_format, dict), "'response_format' must be an object.", "response_format")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        ok = isinstance(spec, dict) and isinstance(spec.get("schema", {}), dict)
        _check(
            ok,
            "'response_format.json_schema' must be an object with a 'schema'.",
            "response_format.json_schema",
        )
        return spec.get("schema") or {"type": "object"}
    raise APIError(
        400,
        f"Invalid 'response_format.type': {kind!r}; use text, json_object or json_schema.",
        "response_format.type",
    )


def _runtime_errors(call: Callable[[], Any]) -> Any:
    """Run `call`, turning the runtime's refusals into OpenAI errors."""
    try:
        return call()
    except Exception as exc:
        raise _as_api_error(exc) from exc


def _as_api_error(exc: Exception) -> Exception:
    from llmlab.local.runtime import ContextLengthExceeded

    if isinstance(exc, ContextLengthExceeded):
        return APIError(400, str(exc), "messages", "context_length_exceeded")
    return exc


# -- chat ----------------------------------------------------------------------------------------------------------
def _chat(backend: LocalBackend, body: dict) -> dict | StreamingResponse:
    model = body.get("model")
    _check(isinstance(model, str) and bool(model), "Missing required parameter: 'model'.", "model")
    messages = _messages(body)
    served, adapter = backend.chat_target(model)
    n = _number(body, "n", 1, 8, 1, integer=True)
    stream = bool(body.get("stream"))
    _check(n == 1 or not stream, "Streaming supports n=1 only.", "n")
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    runtime = backend.models.chat()
    options = _generation_options(body, runtime)
    if options["max_tokens"] is None:
        room = runtime.context_length - runtime.prompt_tokens(messages, tools=body.get("tools") or None)
        options["max_tokens"] = max(1, min(DEFAULT_MAX_TOKENS, room))
    options["adapter"] = adapter
    if body.get("tools"):
        return _chat_with_tools(runtime, body, messages, options, served, stream, include_usage)
    from llmlab.local.chat_format import render

    prompt = render(messages)
    if stream:
        return _stream(runtime, prompt, options, _Chunks(served), include_usage)
    choices, completion_tokens, prompt_tokens = [], 0, 0
    for index in range(n):
        seed = options["seed"] + index if options["seed"] is not None else None
        gen = _runtime_errors(lambda seed=seed: runtime.generate(prompt, **{**options, "seed": seed}))
        message = {"role": "assistant", "content": gen.text}
        choices.append(
            {"index": index, "message": message, "finish_reason": gen.finish_reason, "logprobs": None}
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
) -> dict | StreamingResponse:
    """Tool calls: `llmlab.local.toolcalls.complete_with_tools` answers, the server shapes the response."""
    from llmlab.local.toolcalls import ToolChoiceError, complete_with_tools

    tools = body["tools"]
    _check(
        isinstance(tools, list) and all(isinstance(t, dict) for t in tools),
        "'tools' must be a list.",
        "tools",
    )
    parallel = body.get("parallel_tool_calls")
    try:
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
    except ToolChoiceError as exc:
        raise APIError(400, str(exc), "tool_choice") from exc
    if not stream:
        choice = {
            "index": 0,
            "message": done.message(),
            "finish_reason": done.finish_reason,
            "logprobs": None,
        }
        return _completion(served, [choice], done.prompt_tokens, done.completion_tokens)
    chunks = _Chunks(served)

    def body_() -> Iterator[str]:
        for delta in done.deltas():
            yield chunks.sse([{"index": 0, "delta": delta, "finish_reason": None}])
        yield chunks.sse([{"index": 0, "delta": {}, "finish_reason": done.finish_reason}])
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
                if item[1]:
                    yield chunks.sse([{"index": 0, "delta": {"content": item[1]}, "finish_reason": None}])
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
    model = body.get("model")
    _check(isinstance(model, str) and bool(model), "Missing required parameter: 'model'.", "model")
    local = resolve_alias(model)
    if local == CHAT_MODEL_ID or model.startswith("ft:"):
        raise APIError(
            400, f"{model} is a chat model: use an embedding model such as {EMBEDDING_MODEL_ID}.", "model"
        )
    if local != EMBEDDING_MODEL_ID:
        raise _model_not_found(model)
    texts = body.get("input")
    _check(texts is not None, "Missing required parameter: 'input'.", "input")
    if isinstance(texts, str):
        texts = [texts]
    _check(
        isinstance(texts, list) and len(texts) > 0,
        "'input' must be a string or a non-empty list of strings.",
        "input",
    )
    if not all(isinstance(t, str) for t in texts):
        raise APIError(
            400, "'input' must be text: token-id arrays are not supported by the local server.", "input"
        )
    _check(len(texts) <= 2048, "'input' may hold at most 2048 texts per request.", "input")
    _check(all(texts), "'input' must not contain empty strings.", "input")
    if body.get("dimensions") is not None:
        raise APIError(
            400,
            f"{EMBEDDING_MODEL_ID} has a fixed size of 384 dimensions: 'dimensions' is not supported.",
            "dimensions",
        )
    encoding = body.get("encoding_format") or "float"
    _check(
        encoding in ("float", "base64"), "'encoding_format' must be 'float' or 'base64'.", "encoding_format"
    )
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


# -- fine-tuning -----------------------------------------------------------------------------------------------
def _job(job: dict) -> dict:
    return FineTuningJob.model_validate(public(job)).model_dump(mode="json")


def _page(items: list[dict], after: str | None, limit: int) -> dict:
    _check(1 <= limit <= 10000, "'limit' must be between 1 and 10000.", "limit")
    page, has_more = paginate(items, after, limit)
    return {"object": "list", "data": page, "has_more": has_more}


def _get_job(backend: LocalBackend, job_id: str) -> dict:
    job = backend.store.get_job(job_id)
    if job is None:
        raise APIError(
            404, f"No fine-tuning job found with id '{job_id}'.", "fine_tuning_job_id", "not_found"
        )
    return job


def _get_file(backend: LocalBackend, file_id: str) -> dict:
    record = backend.store.get_file(file_id)
    if record is None:
        raise APIError(404, f"No such File object: {file_id}", "file_id", "not_found")
    return record


def _file(record: dict) -> dict:
    return FileObject.model_validate(public(record)).model_dump(mode="json", exclude_none=True)


# -- the app ---------------------------------------------------------------------------------------------------
def create_app(home: Path | str | None = None, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving the llmlab home `home` (default: `llmlab_home()`); `api_key` guards every request."""
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
    def upload_file(file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]) -> dict:
        _check(
            purpose in FILE_PURPOSES,
            f"Invalid purpose {purpose!r}; use one of {', '.join(FILE_PURPOSES)}.",
            "purpose",
        )
        return _file(backend.store.add_file(file.file.read(), file.filename or "upload", purpose))

    @app.get("/v1/files")
    def list_files(
        purpose: str | None = None, after: str | None = None, limit: int = 10000, order: str = "desc"
    ) -> dict:
        _check(order in ("asc", "desc"), "'order' must be 'asc' or 'desc'.", "order")
        files = [_file(f) for f in backend.store.list_files(purpose)]
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
            headers={"Content-Disposition": f'attachment; filename="{record["filename"]}"'},
        )

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str) -> dict:
        _get_file(backend, file_id)
        backend.store.delete_file(file_id)
        return FileDeleted(id=file_id, object="file", deleted=True).model_dump(mode="json")

    @app.post("/v1/fine_tuning/jobs")
    def create_job(request: JsonBody) -> dict:
        try:
            return _job(backend.jobs.create(request))
        except JobRequestError as exc:
            raise APIError(exc.status, str(exc), exc.param, exc.code) from exc

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs(after: str | None = None, limit: int = 20) -> dict:
        return _page([_job(j) for j in backend.store.list_jobs()], after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    def get_job(job_id: str) -> dict:
        return _job(_get_job(backend, job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(job_id: str) -> dict:
        _get_job(backend, job_id)
        try:
            return _job(backend.jobs.cancel(job_id))
        except JobRequestError as exc:
            raise APIError(exc.status, str(exc), exc.param, exc.code) from exc

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    def job_events(job_id: str, after: str | None = None, limit: int = 20) -> dict:
        _get_job(backend, job_id)
        events = [
            FineTuningJobEvent.model_validate(e).model_dump(mode="json")
            for e in backend.store.list_events(job_id)
        ]
        return _page(events, after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def job_checkpoints(job_id: str, after: str | None = None, limit: int = 10) -> dict:
        _get_job(backend, job_id)
        checkpoints = [
            FineTuningJobCheckpoint.model_validate(public(c)).model_dump(mode="json", exclude_none=True)
            for c in backend.store.list_checkpoints(job_id)
        ]
        return _page(checkpoints, after, limit)

    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(part) for part in first.get("loc", ())[1:]]
        if first.get("type") == "json_invalid":
            message, param = "We could not parse the JSON body of your request: it is not valid JSON.", None
        elif first.get("type") == "missing":
            message, param = (
                f"Missing required parameter: '{'.'.join(loc) or 'body'}'.",
                ".".join(loc) or None,
            )
        else:
            param = ".".join(loc) or None
            message = f"Invalid value for '{param or 'body'}': {first.get('msg', 'invalid request')}."
        return APIError(400, message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = (
            f"Invalid URL ({request.method} {request.url.path})"
            if exc.status_code in (404, 405)
            else exc.detail
        )
        return APIError(exc.status_code, str(message)).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return APIError(
            500, f"The server had an error processing your request: {type(exc).__name__}: {exc}"
        ).response()


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


def _stop_when_idle(app: FastAPI, server: uvicorn.Server, idle_timeout: float) -> None:
    while not server.should_exit:
        time.sleep(min(5.0, idle_timeout / 4))
        if idle_seconds(app) >= idle_timeout:
            server.should_exit = True


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A socket bound to `host`:`port` (0 = a free port); OSError (EADDRINUSE) when the port is taken."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    *,
    home: Path | str | None = None,
    idle_timeout: float | None = None,
    on_ready: Callable[[int], None] | None = None,
    log_level: str = "info",
) -> None:
    """Run the server in the foreground (the CLI checks the host) until stopped, or idle for `idle_timeout` s.

    `on_ready(port)` runs once the port is bound, before the first request is read.
    """
    sock = bind(host, port)
    app = create_app(home or llmlab_home(), api_key=api_key)
    config = uvicorn.Config(app, log_level=log_level, timeout_keep_alive=30, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    if idle_timeout:
        threading.Thread(target=_stop_when_idle, args=(app, server, idle_timeout), daemon=True).start()
    if on_ready is not None:
        on_ready(sock.getsockname()[1])
    server.run(sockets=[sock])


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
