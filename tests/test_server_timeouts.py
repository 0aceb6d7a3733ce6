"""Slow clients cannot hold connections: a connection that does not finish a
request's headers within --header-timeout-s is closed, a body not sent within --body-timeout-s gets
408, and normal clients keep being served meanwhile. Raw sockets against a real uvicorn."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
from fake_engine import FakeEngine
from server_fixtures import serve_engine

MODEL = "fake-model"
HEADER_S, BODY_S = 1.0, 1.5
SLACK_S = 1.5  # scheduling on a loaded machine
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def server():
    s = serve_engine(FakeEngine(model_name=MODEL), header_timeout_s=HEADER_S, body_timeout_s=BODY_S)
    yield s
    s.stop()


def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.settimeout(0.05)
    return sock


class Slowloris(threading.Thread):
    """Sends `head` at once, then one byte of `trickle` every `every_s` until the server closes the
    connection; records when that happened and what the server sent."""

    def __init__(self, server, head: bytes, trickle: bytes = b"X-Padding: " + b"a" * 200, every_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.sock = connect(server)
        self.head, self.trickle, self.every_s = head, trickle, every_s
        self.start_time = time.monotonic()
        self.closed_after: float | None = None
        self.received = b""

    def run(self) -> None:
        try:
            self.sock.sendall(self.head)
            for i in range(int(20 / self.every_s)):  # gives up after 20 s: the server never closed it
                if i < len(self.trickle):
                    self.sock.sendall(self.trickle[i : i + 1])
                deadline = time.monotonic() + self.every_s
                while time.monotonic() < deadline:
                    try:
                        data = self.sock.recv(65536)
                    except TimeoutError:
                        continue
                    if not data:
                        self.closed_after = time.monotonic() - self.start_time
                        return
                    self.received += data
        except (ConnectionResetError, BrokenPipeError):
            self.closed_after = time.monotonic() - self.start_time
        finally:
            self.sock.close()


def test_slow_headers_are_cut_and_normal_clients_keep_working(server):
    lorises = [Slowloris(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n") for _ in range(20)]
    lorises.append(Slowloris(server, b""))  # connects and says nothing
    lorises.append(Slowloris(server, b"GET /health HTTP/1.1\r\nHost: x\r\n"))
    for loris in lorises:
        loris.start()
    time.sleep(0.3)
    with httpx.Client(base_url=server.url, timeout=10) as http:  # served while they hang on
        for _ in range(3):
            assert http.get("/health").status_code == 200
            assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
    for loris in lorises:
        loris.join(30)
        assert loris.closed_after is not None, "the server never closed a slow connection"
        assert loris.closed_after < HEADER_S + SLACK_S, loris.closed_after
        assert b"200 OK" not in loris.received


def test_slow_body_gets_408(server):
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 400\r\n\r\n{"model": '
    )
    loris = Slowloris(server, head, trickle=b'"' + b"m" * 300)
    loris.start()
    loris.join(30)
    assert loris.closed_after is not None and loris.closed_after < BODY_S + SLACK_S, loris.closed_after
    assert loris.received.startswith(b"HTTP/1.1 408 "), loris.received
    assert b'"code":"request_timeout"' in loris.received.replace(b" ", b"")


def test_a_kept_alive_connection_must_send_its_next_headers_in_time(server):
    sock = connect(server)
    sock.settimeout(10)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = b""
    while not reply.endswith(b'{"status":"ok"}'):
        reply += sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200 ")
    start = time.monotonic()
    sock.sendall(b"GET /health HTTP/1.1\r\n")  # the next request begins, then stalls
    sock.settimeout(HEADER_S + SLACK_S + 5)
    try:
        assert sock.recv(65536) == b""
    except ConnectionResetError:
        pass
    assert time.monotonic() - start < HEADER_S + SLACK_S
    sock.close()


def test_a_client_sending_within_the_deadlines_is_served(server):
    sock = connect(server)
    sock.settimeout(10)
    body = b'{"model": "fake-model", "prompt": "hi", "max_tokens": 2}'
    request = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    for i in range(0, len(request), 40):  # slow, but well within both deadlines
        sock.sendall(request[i : i + 40])
        time.sleep(0.02)
    reply = b""
    while b"\r\n\r\n" not in reply:
        reply += sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200 "), reply
    sock.close()


def test_connection_limit_boundary():
    s = serve_engine(FakeEngine(model_name=MODEL), max_connections=4)
    idle: list[socket.socket] = []
    try:

        def status() -> int:  # a request on a connection of its own
            with httpx.Client(base_url=s.url, timeout=10) as http:
                return http.get("/health").status_code

        for _ in range(2):
            idle.append(connect(s))
        time.sleep(0.2)
        assert status() == 200  # 2 idle + this one: 3 connections, under the limit of 4
        idle.append(connect(s))
        time.sleep(0.2)
        assert status() == 503  # 3 idle + this one: at the limit
        idle.pop().close()
        time.sleep(0.2)
        assert status() == 200
    finally:
        for sock in idle:
            sock.close()
        s.stop()
