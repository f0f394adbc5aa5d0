"""OpenAI's error body for everything the local server refuses: `APIError`, and the mappings onto it.

A refused request is answered with OpenAI's body ``{"error": {"message", "type", "param", "code"}}`` and
its status: pydantic's errors about a request body (`request_error`), the runtime's refusals
(`runtime_errors`), and FastAPI's own errors (`install_handlers`).

>>> error = APIError(404, "No such File object: file-x", "file_id", "not_found")
>>> error.type, error.response().status_code
('invalid_request_error', 404)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPE_ERRORS = ("_type", "_parsing", "literal_error", "is_instance_of")
_INSTANCE = re.compile(r" or instance of \w+")


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


# -- turning pydantic's errors into OpenAI's -------------------------------------------------------------------
def _param(body: Any, loc: tuple, missing: bool) -> str | None:
    """The path of `loc` inside `body` as OpenAI writes it (`messages[0].role`); union labels are dropped."""
    path, node = [], body
    for i, part in enumerate(loc):
        inside = (isinstance(node, dict) and isinstance(part, str) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        )
        if inside:
            node = node[part]
        elif not (missing and i == len(loc) - 1):
            continue
        path.append(f"[{part}]" if isinstance(part, int) else f".{part}")
    return "".join(path).removeprefix(".") or None


def request_error(errors: list[dict], body: Any) -> APIError:
    """The 400 for pydantic's `errors` about `body` (locations relative to the body): the first param's.

    A union's members each report an error at the same param: a broken limit ("at most 2") beats "wrong
    type", and wrong types are listed together ("a valid string or a valid list").
    """
    found = [
        (error, _param(body, tuple(error["loc"]), error["type"] in ("missing", "union_tag_not_found")))
        for error in errors or [{"type": "", "loc": (), "msg": "invalid request"}]
    ]
    same = [(e, p) for e, p in found if p == found[0][1]]
    typed = [(e, p) for e, p in same if any(t in e["type"] for t in _TYPE_ERRORS)]
    first, param = next(((e, p) for e, p in same if (e, p) not in typed), same[0])
    kind, ctx = first["type"], first.get("ctx") or {}
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        param = ".".join(p for p in (param, ctx.get("discriminator", "").strip("'")) if p)
    where = param or "body"
    if kind in ("missing", "union_tag_not_found"):
        return APIError(400, f"Missing required parameter: '{where}'.", param)
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {where}", param)
    if kind == "union_tag_invalid":
        tag, expected = ctx.get("tag"), ctx.get("expected_tags")
        return APIError(400, f"Invalid value for '{where}': {tag!r}; use one of {expected}.", param)
    if (first, param) in typed:
        wanted = dict.fromkeys(
            _INSTANCE.sub("", str(e["msg"])).removeprefix("Input should be ") for e, _ in typed
        )
        return APIError(400, f"Invalid type for '{where}': expected {' or '.join(wanted)}.", param)
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return APIError(400, f"Invalid value for '{where}'{_tool_named(body, param)}: {message}.", param)


def _tool_named(body: Any, param: str | None) -> str:
    """ " (tool 'name')" when `param` points inside one of the request's tools or functions, else ""."""
    found = re.match(r"(tools|functions)\[(\d+)\]\.", param or "")
    if not found:
        return ""
    try:
        entry = body[found[1]][int(found[2])]
        name = entry["function"]["name"] if found[1] == "tools" else entry["name"]
    except (KeyError, IndexError, TypeError):
        return ""
    return f" (tool {name!r})" if isinstance(name, str) else ""


def model_not_found(model: str) -> APIError:
    """OpenAI's 404 for a model that is not served."""
    return APIError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        "model",
        "model_not_found",
    )


# -- the runtime's refusals ----------------------------------------------------------------------------------------
def runtime_errors(call: Callable[[], Any]) -> Any:
    """Run `call`, turning the runtime's refusals into OpenAI errors."""
    try:
        return call()
    except Exception as exc:
        raise as_api_error(exc) from exc


def as_api_error(exc: Exception) -> Exception:
    """The OpenAI error for one of the runtime's refusals (a 400 naming the param); `exc` itself otherwise."""
    from llmlab.local.matchers import GrammarError
    from llmlab.local.runtime import ContextLengthExceeded
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


# -- FastAPI's own errors ------------------------------------------------------------------------------------------
def install_handlers(app: FastAPI) -> None:
    """Answer `APIError`, FastAPI's validation errors and unknown routes with OpenAI's body."""

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
