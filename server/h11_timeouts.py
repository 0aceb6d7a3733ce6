"""uvicorn's h11 protocol with a deadline for a request's headers.

uvicorn closes a kept-alive connection that stays idle, but it waits for ever on one that is
sending a request's headers, and on one that connects and sends nothing: twenty such slow clients
("slowloris") held their connections open indefinitely. Here a connection must finish a request's
headers within `header_timeout_s` of connecting, or, on a kept-alive connection, of the first byte
of its next request; otherwise it is closed. (A body sent too slowly is answered 408 by the app:
server/app.py, RequestBodyMiddleware.)
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("athena.server")


class HeaderTimeoutH11Protocol(H11Protocol):
    def __init__(self, *args: Any, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._header_deadline is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first bytes of a kept-alive connection's next request
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are in (or the connection failed)
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            log.debug(
                "closing a connection from %s: no complete request headers within %.1f s",
                f"{self.client[0]}:{self.client[1]}" if self.client else "?",
                self.header_timeout_s,
            )
            self.transport.close()
