"""uvicorn as Athena runs it: one config builder (timeouts and limits against slow or too many
clients) and a Server that drains the app before it stops.

Shutdown: on the first SIGINT/SIGTERM (or `begin_shutdown()`), the app drains (`server.app.drain`:
new requests get 503 with Retry-After while the port stays open, running requests finish for up to
--drain-timeout-s, the rest end cleanly) and only then does uvicorn stop: it closes the port, gives
open connections FLUSH_TIMEOUT_S to take their last bytes and exits. A second signal stops at once.
(uvicorn's own shutdown closes the port first and cuts what is still streaming after its grace.)
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from server.app import drain
from server.h11_timeouts import HeaderTimeoutH11Protocol
from server.settings import ServerSettings

log = logging.getLogger("athena.server")

FLUSH_TIMEOUT_S = 5.0  # after the drain: how long open connections may take to receive their last events


def uvicorn_config(app: FastAPI, settings: ServerSettings, **overrides: Any) -> uvicorn.Config:
    """The server's uvicorn settings: h11 with a header deadline (server/h11_timeouts.py), the
    keep-alive timeout, the connection limit and the shutdown flush time."""
    options: dict[str, Any] = dict(
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        lifespan="on",
        http=functools.partial(HeaderTimeoutH11Protocol, header_timeout_s=settings.header_timeout_s),
        timeout_keep_alive=settings.keep_alive_timeout_s,
        limit_concurrency=settings.max_connections,
        timeout_graceful_shutdown=FLUSH_TIMEOUT_S,
    )
    options.update(overrides)
    return uvicorn.Config(app, **options)


class AppServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown: asyncio.Task[None] | None = None
        self._signalled = False

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The signal handler uvicorn installs: the first signal starts the drain, a second stops now."""
        if self._signalled or self._loop is None:
            log.warning("second signal: stopping without waiting for running requests")
            super().handle_exit(sig, frame)
            return
        self._signalled = True
        log.info("signal %d: draining (new requests get 503; running ones may finish)", sig)
        self._loop.call_soon_threadsafe(self.begin_shutdown)

    def begin_shutdown(self) -> None:
        """Drain the app, then stop (call on the server's event loop; later calls do nothing)."""
        if self._shutdown is None:
            self._shutdown = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await drain(self.app)
        except Exception:
            log.exception("draining failed; stopping anyway")
        finally:
            self.should_exit = True
