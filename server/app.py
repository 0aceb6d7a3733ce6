"""The FastAPI app: engine lifecycle (lifespan, drain), middleware (server/middleware.py, request
counts), error handlers and routes. All state lives on `app.state`:

    settings      ServerSettings
    engine        the AsyncEngine (None until built)
    serving       ServingContext once the engine is ready (routes answer 503 before)
    draining      True from shutdown on (routes answer 503)
    metrics       ServerMetrics (per-app Prometheus registry)
    load_failed   asyncio.Event set when building the engine failed (serve_cli exits on it)
    loader        the task building the engine (None once done or when one was given)
    drained       the drain task, once shutdown began (`drain`)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI

from athena_runtime.format.generation_defaults import describe
from server import errors
from server.chat_page import install_chat_page
from server.metrics import RequestCountMiddleware, ServerMetrics
from server.middleware import ApiKeyMiddleware, RequestBodyMiddleware, TrailingSlashMiddleware
from server.prompt_encoder import PromptEncoder
from server.retry_after import RetryAfterEstimator
from server.routes import router
from server.serving import ServingContext
from server.settings import ServerSettings

if TYPE_CHECKING:
    from athena_runtime.engine import AsyncEngine

log = logging.getLogger("athena.server")


def create_app(settings: ServerSettings, engine: "AsyncEngine | None" = None) -> FastAPI:
    """The app; with `engine=None` the engine is built from `settings` in the background once the
    server starts (/health answers 503 until it is ready). The app starts and shuts down the engine."""
    # redirect_slashes=False: Starlette would build the redirect's Location from the client's Host header;
    # TrailingSlashMiddleware answers "/v1/models/" as "/v1/models" instead.
    app = FastAPI(
        title="Athena", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.serving = None
    app.state.draining = False
    app.state.load_failed = asyncio.Event()
    app.state.loader = None
    app.state.drained = None
    app.state.metrics = ServerMetrics(lambda: app.state.serving.engine.stats() if app.state.serving else None)
    app.include_router(router)
    install_chat_page(app)
    errors.install_error_handlers(app)
    # Outermost last: trailing slash -> counts -> API key -> body -> routes.
    app.add_middleware(RequestBodyMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key.get_secret_value())
    app.add_middleware(RequestCountMiddleware, metrics=app.state.metrics)
    app.add_middleware(TrailingSlashMiddleware)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state
    if state.engine is not None:
        await _start(app, state.engine)
    else:
        state.loader = asyncio.create_task(_build_and_start(app))
    try:
        yield
    finally:
        await drain(app)  # at once if the server drained before it stopped (http_server.AppServer)


async def drain(app: FastAPI) -> None:
    """Stop admitting (routes answer 503 with Retry-After), let running requests finish for up to
    --drain-timeout-s, then end the rest (a stream gets an error event and `data: [DONE]`, a
    non-streamed request a 503) and stop the engine. Later calls wait for the first one's drain."""
    state = app.state
    if state.drained is None:
        state.drained = asyncio.ensure_future(_drain(app))
    await asyncio.shield(state.drained)


async def _drain(app: FastAPI) -> None:
    state = app.state
    state.draining = True
    if state.loader is not None:
        state.loader.cancel()
    ctx: ServingContext | None = state.serving
    if ctx is None:
        return
    stats = ctx.engine.stats()
    log.info(
        "draining: waiting up to %.1f s for %d running and %d waiting requests",
        state.settings.drain_timeout_s,
        stats.running,
        stats.waiting,
    )
    await ctx.engine.shutdown(drain_timeout_s=state.settings.drain_timeout_s)
    # the engine handed every unfinished request a "cancelled" output: let their streams write their last
    # events (bounded: a task stuck elsewhere is cancelled)
    if ctx.tasks:
        await asyncio.wait(set(ctx.tasks), timeout=1.0)
    for task in list(ctx.tasks):
        task.cancel()
    log.info("drained")


async def _start(app: FastAPI, engine: "AsyncEngine") -> None:
    settings: ServerSettings = app.state.settings
    if not engine.ready:
        await engine.start()
    app.state.engine = engine
    name = settings.served_model_name or engine.model_name
    defaults = settings.sampling_defaults(getattr(engine, "generation_defaults", {}))
    encoder = await asyncio.to_thread(PromptEncoder, engine.tokenizer, engine.max_model_len)
    app.state.serving = ServingContext(
        engine=engine,
        model_name=name,
        settings=settings,
        metrics=app.state.metrics,
        encoder=encoder,
        max_choices=_max_choices(settings, engine),
        retry_after=RetryAfterEstimator(settings.retry_after_s, settings.retry_after_max_s),
        sampling_defaults=defaults,
    )
    log.info("serving %s (context %d tokens)", name, engine.max_model_len)
    log.info(
        "sampling defaults for fields a request leaves out: %s (--generation-config %s%s); otherwise the OpenAI API's",
        describe(defaults),
        settings.generation_config,
        ", with --override-generation-config" if settings.override_generation_config else "",
    )


def _max_choices(settings: ServerSettings, engine: "AsyncEngine") -> int:
    """--max-choices, at most --max-queue: a request's choices are admitted all together, and more
    than the queue holds could never be."""
    if settings.max_choices is None:
        return engine.max_queue
    if settings.max_choices > engine.max_queue:
        log.warning(
            "--max-choices %d is more than --max-queue %d can ever admit: using %d",
            settings.max_choices,
            engine.max_queue,
            engine.max_queue,
        )
        return engine.max_queue
    return settings.max_choices


async def _build_and_start(app: FastAPI) -> None:
    try:
        engine = await asyncio.to_thread(_build_engine, app.state.settings)
        await _start(app, engine)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("could not load the model")
        app.state.load_failed.set()
    finally:
        app.state.loader = None


def _build_engine(settings: ServerSettings) -> "AsyncEngine":
    from athena_runtime.engine import AsyncEngine

    path, name = settings.model, settings.served_model_name
    if path is None:
        from quantize.embedded import EMBEDDED_NAME, default_model_path

        log.info("no model given: using the embedded default (quantized on first use)")
        path, name = str(default_model_path()), name or EMBEDDED_NAME
    log.info("loading %s", path)
    return AsyncEngine.from_path(path, settings.engine_settings(), model_name=name)
