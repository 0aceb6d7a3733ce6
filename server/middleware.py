"""The app's ASGI middleware, outermost first: trailing slashes, the API key, the request body."""

from __future__ import annotations

import asyncio
import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import errors
from server.protocol import lone_surrogate_param


class TrailingSlashMiddleware:
    """ "/v1/models/" is served as "/v1/models" (any trailing slashes dropped), so no route needs a
    redirect: a redirect's Location would be built from the client's Host header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and len(scope["path"]) > 1 and scope["path"].endswith("/"):
            path = scope["path"].rstrip("/") or "/"
            raw = scope.get("raw_path")
            scope = {**scope, "path": path, "raw_path": (raw.rstrip(b"/") or b"/") if raw else raw}
        await self.app(scope, receive, send)


async def _send_error(scope: Scope, receive: Receive, send: Send, err: errors.APIError) -> None:
    await err.response()(scope, receive, send)


class ApiKeyMiddleware:
    """`Authorization: Bearer KEY` on /v1 routes; checked before the body is read."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if not header:
                await _send_error(
                    scope,
                    receive,
                    send,
                    errors.APIError(
                        401,
                        "You didn't provide an API key. You need to provide your API key in an Authorization header "
                        "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                        headers={"WWW-Authenticate": "Bearer"},
                    ),
                )
                return
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                await _send_error(
                    scope,
                    receive,
                    send,
                    errors.APIError(
                        401,
                        "Incorrect API key provided.",
                        code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"},
                    ),
                )
                return
        await self.app(scope, receive, send)


class RequestBodyMiddleware:
    """Reads a request's body once and replays it to the app; later `receive()` calls pass through,
    so disconnects still reach the routes. On the way:
    - 413 for bodies over `max_bytes`: by Content-Length up front, and by counting what arrives
      (a chunked or lying client);
    - 408 (and the connection closed) when the body has not arrived within `timeout_s`;
    - 400 naming the field for a JSON body whose text is not Unicode (a lone surrogate escape)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    def _too_large(self) -> errors.APIError:
        return errors.APIError(
            413, f"Request body too large: the limit is {self.max_bytes} bytes.", code="request_too_large"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await _send_error(scope, receive, send, errors.invalid_request("Invalid Content-Length header."))
                return
            if int(length) > self.max_bytes:
                await _send_error(scope, receive, send, self._too_large())
                return
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # the client left before sending its body
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_bytes:
                        await _send_error(scope, receive, send, self._too_large())
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await _send_error(
                scope,
                receive,
                send,
                errors.APIError(
                    408,
                    f"The request body did not arrive within {self.timeout_s:g} s.",
                    code="request_timeout",
                    headers={"Connection": "close"},
                ),
            )
            return
        body = b"".join(chunks)
        param = lone_surrogate_param(body)
        if param is not None:
            await _send_error(
                scope,
                receive,
                send,
                errors.invalid_request(
                    f"Invalid value for '{param}': the text holds a lone UTF-16 surrogate (an escape such as \\ud800 "
                    "without its pair), which is not valid Unicode.",
                    param=param,
                ),
            )
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
