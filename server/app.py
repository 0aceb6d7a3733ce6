"""The FastAPI app: engine lifecycle (lifespan), middleware (API key, body size, request counts),
error handlers and routes. All state lives on `app.state`:

    settings      ServerSettings
    engine        the AsyncEngine (None until built)
    serving       ServingContext once the engine is ready (routes answer 503 before)
    draining      True from shutdown on (routes answer 503)
    metrics       ServerMetrics (per-app Prometheus registry)
    load_failed   asyncio.Event set when building the engine failed (serve_cli exits on it)
"""
from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from athena_runtime.generation_defaults import describe
from server import errors
from server.chat_page import install_chat_page
from server.metrics import RequestCountMiddleware, ServerMetrics
from server.routes import router
from server.serving import ServingContext
from server.settings import ServerSettings

if TYPE_CHECKING:
    from athena_runtime.engine import AsyncEngine

log = logging.getLogger("athena.server")


def create_app(settings: ServerSettings, engine: "AsyncEngine | None" = None) -> FastAPI:
    """The app; with `engine=None` the engine is built from `settings` in the background once the
    server starts (/health answers 503 until it is ready). The app starts and shuts down the engine."""
    app = FastAPI(title="Athena", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.engine = engine
    app.state.serving = None
    app.state.draining = False
    app.state.load_failed = asyncio.Event()
    app.state.metrics = ServerMetrics(lambda: app.state.serving.engine.stats() if app.state.serving else None)
    app.include_router(router)
    install_chat_page(app)
    errors.install_error_handlers(app)
    # Outermost last: counts -> API key -> body size -> routes.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key.get_secret_value())
    app.add_middleware(RequestCountMiddleware, metrics=app.state.metrics)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state
    loader = None
    if state.engine is not None:
        await _start(app, state.engine)
    else:
        loader = asyncio.create_task(_build_and_start(app))
    try:
        yield
    finally:
        state.draining = True
        if loader is not None:
            loader.cancel()
        ctx: ServingContext | None = state.serving
        if ctx is not None:
            log.info("draining: waiting up to %.0f s for %d running requests", state.settings.drain_timeout_s,
                     ctx.engine.stats().running)
            await ctx.engine.shutdown(drain_timeout_s=state.settings.drain_timeout_s)
            for task in list(ctx.tasks):
                task.cancel()


async def _start(app: FastAPI, engine: "AsyncEngine") -> None:
    settings: ServerSettings = app.state.settings
    if not engine.ready:
        await engine.start()
    app.state.engine = engine
    name = settings.served_model_name or engine.model_name
    defaults = settings.sampling_defaults(getattr(engine, "generation_defaults", {}))
    app.state.serving = ServingContext(engine=engine, model_name=name, settings=settings, metrics=app.state.metrics,
                                       sampling_defaults=defaults)
    log.info("serving %s (context %d tokens)", name, engine.max_model_len)
    log.info("sampling defaults for fields a request leaves out: %s (--generation-config %s%s); otherwise the "
             "OpenAI API's", describe(defaults), settings.generation_config,
             ", with --override-generation-config" if settings.override_generation_config else "")


async def _build_and_start(app: FastAPI) -> None:
    try:
        engine = await asyncio.to_thread(_build_engine, app.state.settings)
        await _start(app, engine)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("could not load the model")
        app.state.load_failed.set()


def _build_engine(settings: ServerSettings) -> "AsyncEngine":
    from athena_runtime.engine import AsyncEngine

    path, name = settings.model, settings.served_model_name
    if path is None:
        from quantize.embedded import EMBEDDED_NAME, default_model_path

        log.info("no model given: using the embedded default (quantized on first use)")
        path, name = str(default_model_path()), name or EMBEDDED_NAME
    log.info("loading %s", path)
    return AsyncEngine.from_path(path, settings.engine_settings(), model_name=name)


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
                await _send_error(scope, receive, send, errors.APIError(
                    401, "You didn't provide an API key. You need to provide your API key in an Authorization header "
                         "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                    headers={"WWW-Authenticate": "Bearer"}))
                return
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                await _send_error(scope, receive, send, errors.APIError(
                    401, "Incorrect API key provided.", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`: by Content-Length up front, and by counting what arrives
    (a chunked or lying client). The body is read here once and replayed to the app; later
    `receive()` calls pass through, so disconnects still reach the routes."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> errors.APIError:
        return errors.APIError(413, f"Request body too large: the limit is {self.max_bytes} bytes.",
                               code="request_too_large")

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
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
