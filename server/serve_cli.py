"""`athena serve [MODEL]`: one flag per ServerSettings field (flags override ATHENA_* env vars),
then uvicorn (server/http_server.py), which drains the app before it stops."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import types
import typing
from typing import Any, Literal

from athena_runtime.engine_settings import EngineSettings
from server.settings import ENGINE_FIELDS, ServerSettings

log = logging.getLogger("athena.server")


def _flag_options(annotation: Any) -> dict[str, Any]:
    """argparse options for a field's type: bool -> --x/--no-x, Literal -> choices, else type=."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    is_optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    base = args[0] if is_optional and len(args) == 1 else annotation
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(base) is Literal:
        return {"choices": list(typing.get_args(base))}
    if base in (int, float):
        return {"type": base}
    return {"type": str}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a compressed model over the OpenAI API",
        description="Serve a compressed checkpoint over the OpenAI API (/v1/chat/completions, /v1/completions, "
        "/v1/models, /health, /metrics). Every flag can also be set as an ATHENA_<NAME> "
        "environment variable; flags win.",
    )
    engine_defaults = {f.name: f.default for f in dataclasses.fields(EngineSettings)}
    for name, field in ServerSettings.model_fields.items():
        shown = engine_defaults.get(name) if field.default is None and name in ENGINE_FIELDS else field.default
        default = "" if shown is None else f" (default: {shown})"
        help_text = f"{field.description}{default}".replace("%", "%%")
        if name == "model":
            p.add_argument("model", nargs="?", default=argparse.SUPPRESS, metavar="MODEL", help=help_text)
            continue
        p.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            default=argparse.SUPPRESS,
            help=help_text,
            **_flag_options(field.annotation),
        )
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    given = {k: v for k, v in vars(args).items() if k in ServerSettings.model_fields}
    return ServerSettings(**given)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    logging.getLogger("athena").setLevel(settings.log_level.upper())
    return asyncio.run(serve(settings))


async def serve(settings: ServerSettings) -> int:
    """Serves until SIGINT/SIGTERM (exit 0) or until the model fails to load (exit 1).

    On the first signal the app drains while the port stays open (new requests get 503, running
    ones finish for up to `drain_timeout_s`, the rest end cleanly), then uvicorn stops
    (server/http_server.py); a second signal stops at once."""
    from server.app import create_app
    from server.http_server import AppServer, uvicorn_config

    app = create_app(settings)
    server = AppServer(uvicorn_config(app, settings), app)
    if settings.api_key is None and settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without --api-key: anyone who can reach it can use it", settings.host)
    serving = asyncio.create_task(server.serve())
    load_failed = asyncio.create_task(app.state.load_failed.wait())
    await asyncio.wait({serving, load_failed}, return_when=asyncio.FIRST_COMPLETED)
    if load_failed.done():
        server.should_exit = True
        await serving
        return 1
    load_failed.cancel()
    serving.result()
    return 0 if server.started else 1
