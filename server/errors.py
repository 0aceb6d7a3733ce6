"""Errors as OpenAI sends them: `{"error": {"message", "type", "param", "code"}}` with the right status.

Everything that fails a request becomes an `APIError`; the handlers installed by
`install_error_handlers` turn it, FastAPI's validation errors, Starlette's HTTP errors (unknown
route, wrong method) and unexpected exceptions into that body. Only messages written here reach a
client: no paths, tracebacks or exception reprs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("athena.server")

INTERNAL_ERROR_MESSAGE = "The server had an error while processing your request. Sorry about that!"


class APIError(Exception):
    """A failure the client is told about."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def json(self) -> str:
        return json.dumps(self.body())

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def context_length_exceeded(max_model_len: int, prompt_tokens: int, completion_tokens: int, param: str) -> APIError:
    return APIError(
        400,
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{prompt_tokens + completion_tokens} tokens ({prompt_tokens} in the {param}, {completion_tokens} in the "
        f"completion). Please reduce the length of the {param} or completion.",
        param=param,
        code="context_length_exceeded",
    )


def overloaded(retry_after_s: int) -> APIError:
    # OpenAI's rate-limit body: type "requests" (the limit that was hit), code "rate_limit_exceeded".
    return APIError(
        429,
        f"The server is overloaded: too many requests are waiting. Retry after {retry_after_s} s.",
        type="requests",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(retry_after_s)},
    )


def unavailable(message: str, retry_after_s: int) -> APIError:
    return APIError(
        503, message, type="server_error", code="service_unavailable", headers={"Retry-After": str(retry_after_s)}
    )


def internal_error() -> APIError:
    return APIError(500, INTERNAL_ERROR_MESSAGE, type="server_error")


def from_engine_error(
    exc: BaseException, retry_after_s: int, queue_retry_after_s: Callable[[], int]
) -> APIError | None:
    """The client-facing error for an exception the engine raises when a request cannot start,
    or None when it is not one of those. `retry_after_s` goes with a 503, `queue_retry_after_s()`
    with a 429 (queue full)."""
    from athena_runtime.engine import ContextLengthExceeded, EngineClosed, EngineOverloaded, GroupTooLarge

    if isinstance(exc, ContextLengthExceeded):
        return APIError(
            400, str(exc) or "The prompt and max_tokens do not fit the model's context.", code="context_length_exceeded"
        )
    if isinstance(exc, GroupTooLarge):
        return invalid_request(f"Too many choices for this server: {exc}.", param="n")
    if isinstance(exc, EngineOverloaded):
        return overloaded(queue_retry_after_s())
    if isinstance(exc, EngineClosed):
        return unavailable("The server is shutting down.", retry_after_s)
    return None


def param_from_loc(loc: tuple[Any, ...]) -> str | None:
    """('body', 'messages', 0, 'content') -> 'messages.[0].content' (OpenAI's spelling)."""
    parts = [f"[{p}]" if isinstance(p, int) else str(p) for p in loc if p != "body"]
    # Pydantic adds the union member it tried ("str", "list[int]", "function-after[...]") to the loc.
    parts = [p for p in parts if not ("[" in p and not p.startswith("[")) and p not in ("str", "int", "float", "bool")]
    return ".".join(parts) or None


def _validation_message(err: dict[str, Any]) -> str:
    if err.get("type") == "json_invalid":
        return (
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
            "HTTP library correctly. The OpenAI API expects a JSON payload.)"
        )
    msg = str(err.get("msg", "invalid value"))
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if not errors:
        return invalid_request("Invalid request.").response()
    first = errors[0]
    # A model validator names the parameter it rejects on the exception it raised (protocol.py).
    if first.get("type") == "json_invalid":
        return invalid_request(_validation_message(first)).response()
    param = getattr((first.get("ctx") or {}).get("error"), "param", None) or param_from_loc(tuple(first.get("loc", ())))
    message = _validation_message(first)
    if tuple(first.get("loc", ())) == ("body",) and param is None:  # no body, not an object, not JSON-typed
        message = "The request body must be a JSON object, sent with 'Content-Type: application/json'."
    if param:
        message = f"Invalid value for '{param}': {message}"
    return invalid_request(message, param=param).response()


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        err = APIError(404, f"Invalid URL ({request.method} {request.url.path})")
    elif exc.status_code == 405:
        err = APIError(405, f"Method {request.method} is not allowed for {request.url.path}")
    else:
        err = APIError(
            exc.status_code,
            str(exc.detail) if exc.status_code < 500 else INTERNAL_ERROR_MESSAGE,
            type="invalid_request_error" if exc.status_code < 500 else "server_error",
        )
    err.headers.update(exc.headers or {})
    return err.response()


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return internal_error().response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
