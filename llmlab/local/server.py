"""The OpenAI-compatible local server's routes and HTTP: models, embeddings, chat completions (streamed as
server-sent events), files and fine-tuning jobs, the API key and loopback guards, serving in a thread.

The routes only parse and answer: a request flows route → validated request (`requests`) → service
(`chat_service`, `embedding_service`, `jobs`) → runtime. Files and fine-tuning jobs are rendered by the
`openai.types` models, imported on the first such request: importing the SDK costs ~1 s, which the first
chat of a cold start does not wait for (models, chats and embeddings are answered as dicts that
tests/test_conformance.py checks against the SDK's types). Errors have OpenAI's body
``{"error": {"message", "type", "param", "code"}}`` (`errors`).

>>> base_url, stop = serve_app_in_thread(create_app(api_key="k"))  # doctest: +SKIP
>>> from openai import OpenAI
>>> client = OpenAI(base_url=base_url, api_key="k")  # doctest: +SKIP
>>> client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

import uvicorn
from fastapi import Body, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import Response, StreamingResponse

from llmlab.local.chat_service import ChatService, Chunks
from llmlab.local.embedding_service import embeddings as create_embeddings
from llmlab.local.errors import APIError, install_handlers, model_not_found
from llmlab.local.jobs import JobRequestError, JobRunner
from llmlab.local.loopback import bind, refusal
from llmlab.local.requests import FilePurpose, FineTuningJobRequest, parse
from llmlab.local.runtimes import Models
from llmlab.local.starting import model_list
from llmlab.local.store import Store, paginate, public
from llmlab.models import resolve_alias
from llmlab.paths import llmlab_home

JsonBody = Annotated[dict[str, Any], Body()]
Limit = Annotated[int, Query(ge=1, le=10000)]
_log = logging.getLogger(__name__)


class LocalBackend:
    """What one app serves: the store, the job runner, the models and the chat service (`app.state.backend`)."""

    def __init__(self, home: Path, models: Models | None = None) -> None:
        self.home = Path(home)
        self.store = Store(self.home)
        self.models = models or Models(self.home)
        self.jobs = JobRunner(self.store, self.models.chat)
        self.chat = ChatService(self.home, self.store, self.models)

    def model_list(self) -> list[dict]:
        """What GET /v1/models lists (`starting.model_list`, which answers it while the server starts)."""
        return model_list(self.store)


# -- chat: the chat service answers, the route sends its chunks as server-sent events ----------------------------
def _sse(chunks: Chunks) -> StreamingResponse:
    """`chunks` as server-sent events, then `[DONE]`. An error once the stream has begun (its status is sent)
    is an event with OpenAI's error body, which ends the stream.

    A pump thread draws the events and hands them to the response. A client that hangs up cancels the response
    (Starlette), which tells the pump: it closes `chunks` after the chunk it is drawing, so the runtime's stream
    ends within a token or two (Starlette's own thread pool would leave the iterator to the garbage collector,
    and the model generating for seconds)."""

    def events() -> Iterator[str]:
        try:
            for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except Exception as exc:
            error = {"message": f"{type(exc).__name__}: {exc}", "type": "server_error"}
            yield f"data: {json.dumps({'error': {**error, 'param': None, 'code': None}})}\n\n"
            return
        finally:
            chunks.close()
        yield "data: [DONE]\n\n"

    async def body() -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        ready: asyncio.Queue[str | None] = asyncio.Queue()
        gone = threading.Event()

        def pump() -> None:
            lines = events()
            try:
                for line in lines:
                    loop.call_soon_threadsafe(ready.put_nowait, line)
                    if gone.is_set():
                        break
            finally:
                lines.close()
                with contextlib.suppress(RuntimeError):  # the event loop has closed: the server stopped
                    loop.call_soon_threadsafe(ready.put_nowait, None)

        threading.Thread(target=pump, name="llmlab-sse", daemon=True).start()
        try:
            while (line := await ready.get()) is not None:
                yield line
        finally:
            gone.set()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# -- fine-tuning -----------------------------------------------------------------------------------------------
def _job(job: dict) -> dict:
    from openai.types.fine_tuning import FineTuningJob

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
    from openai.types.fine_tuning import FineTuningJobEvent

    return FineTuningJobEvent.model_validate(event).model_dump(mode="json")


def _checkpoint(checkpoint: dict) -> dict:
    from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint

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
    from openai.types import FileObject

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
    home: Path | str | None = None,
    api_key: str | None = None,
    allow_remote: bool = False,
    models: Models | None = None,
) -> FastAPI:
    """The FastAPI app serving the llmlab home `home` (default: `llmlab_home()`).

    `api_key` guards every request; unless `allow_remote`, only loopback `Host` names are served. `models`:
    the home's models, when made before the app (default: made here, each loaded on first use).
    """
    backend = LocalBackend(Path(home) if home else llmlab_home(), models)
    app = FastAPI(
        title="llmlab local OpenAI-compatible server", docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.backend = backend
    install_handlers(app)
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
        raise model_not_found(model_id)

    @app.post("/v1/chat/completions", response_model=None)
    def chat(request: JsonBody) -> dict | StreamingResponse:
        answer = backend.chat.complete(request)
        return answer if isinstance(answer, dict) else _sse(answer)

    @app.post("/v1/embeddings")
    def embeddings(request: JsonBody) -> dict:
        return create_embeddings(backend.models, request)

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
        return {"id": file_id, "deleted": True, "object": "file"}

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
        return _page(_rendered(backend.chat.checkpoints(job_id), _checkpoint), after, limit)

    return app


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
