"""HTTP routes: thin functions that check readiness and hand the parsed request to its serving class."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from starlette.responses import JSONResponse, Response

from server import errors
from server.metrics import CONTENT_TYPE
from server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from server.serving import ServingContext, cancel_on_disconnect
from server.serving_chat import ChatServing
from server.serving_completions import CompletionServing

router = APIRouter()


def serving(request: Request) -> ServingContext:
    """The serving context, or 503 while the model loads or the server drains."""
    state = request.app.state
    ctx: ServingContext | None = state.serving
    if ctx is None or state.draining or not ctx.engine.ready:
        if state.draining:
            message = "The server is shutting down."
        elif state.load_failed.is_set():
            message = "The model failed to load; see the server log."
        else:
            message = "The model is loading; retry shortly."
        raise errors.unavailable(message, state.settings.retry_after_s)
    return ctx


@router.api_route("/health", methods=["GET", "HEAD"])
async def health(request: Request) -> Response:
    serving(request)
    return JSONResponse({"status": "ok"})


@router.api_route("/metrics", methods=["GET", "HEAD"])
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)


def _card(ctx: ServingContext) -> ModelCard:
    return ModelCard(id=ctx.model_name, max_model_len=ctx.engine.max_model_len)


@router.get("/v1/models")
async def list_models(ctx: ServingContext = Depends(serving)) -> Response:
    return Response(ModelList(data=[_card(ctx)]).model_dump_json(), media_type="application/json")


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, ctx: ServingContext = Depends(serving)) -> Response:
    ctx.check_model(model)
    return Response(_card(ctx).model_dump_json(), media_type="application/json")


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, request: Request, ctx: ServingContext = Depends(serving)
) -> Response:
    return await cancel_on_disconnect(request, ChatServing(ctx).create(body, time.perf_counter()))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, ctx: ServingContext = Depends(serving)) -> Response:
    return await cancel_on_disconnect(request, CompletionServing(ctx).create(body, time.perf_counter()))
