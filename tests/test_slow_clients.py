"""Slow and idle connections are bounded (issue #15): 100 header-incomplete and 50
body-incomplete connections used to be held for 60 s+ (file descriptors 7 -> 157)."""

import socket
import time

from helpers import ServerProcess


def open_socket(port: int, payload: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(payload)
    return sock


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """(the server closed the connection, what it sent first)."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
        return True, received
    except (TimeoutError, socket.timeout):
        return False, received
    except ConnectionResetError:
        return True, received


def test_header_and_body_incomplete_connections_are_closed(tiny_model_dir, tmp_path):
    """Verified: connections with half a request head are closed after
    REQUEST_HEAD_TIMEOUT_SECONDS; a body that stops arriving gets 408 and is closed after
    REQUEST_BODY_TIMEOUT_SECONDS; a normal request still works meanwhile."""
    server = ServerProcess(tiny_model_dir, tmp_path / "server.log", REQUEST_HEAD_TIMEOUT_SECONDS="1",
                           REQUEST_BODY_TIMEOUT_SECONDS="1").start()
    try:
        heads = [open_socket(server.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n") for _ in range(20)]
        bodies = [open_socket(server.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"mess")
                  for _ in range(10)]
        started = time.monotonic()
        for sock in heads:
            closed, _ = closed_within(sock, 10)
            assert closed
        for sock in bodies:
            closed, answer = closed_within(sock, 10)
            assert closed and answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
        assert time.monotonic() - started < 8
        fine = open_socket(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert closed_within(fine, 10)[1].startswith(b"HTTP/1.1 200")
    finally:
        server.stop()
