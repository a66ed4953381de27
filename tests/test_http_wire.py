"""cnnpack.http_wire: the HTTP/1.1 protocol of the load client, one request at a time on a keep-alive connection.

Against a real Triton (tests/test_infer.py: a thousand requests at 16, a rejected request, a killed and a stuck
server) and here, driven byte by byte or against a socket that resets, for what Triton sends rarely or in one piece.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import pytest

from cnnpack.blocking_wire import Answer
from cnnpack.http_wire import HttpConnection


class Transport:
    """What the protocol writes, and whether it closed the connection."""

    def __init__(self) -> None:
        self.written, self.closed = [], False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True


class Loop:
    """Answers as blocking_wire.Answer and timers the test fires itself."""

    def __init__(self) -> None:
        self.timers = []

    @staticmethod
    def create_future() -> Answer:
        return Answer()

    def call_later(self, delay, callback):
        timer = Timer(callback)
        self.timers.append(timer)
        return timer


class Timer:
    def __init__(self, callback) -> None:
        self.callback, self.cancelled = callback, False

    def cancel(self) -> None:
        self.cancelled = True


def _connection() -> tuple[HttpConnection, Transport, Loop]:
    conn, transport, loop = HttpConnection(), Transport(), Loop()
    conn.loop = loop
    conn.connection_made(transport)
    return conn, transport, loop


def test_an_answer_read_a_byte_at_a_time_settles_once_it_is_whole_and_the_next_one_reads_clean():
    conn, transport, loop = _connection()
    ok = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\ncontent-length: 5\r\n\r\nhello"
    answer = conn.send(b"REQUEST", 5.0)
    assert transport.written == [b"REQUEST"]
    for i in range(len(ok) - 1):
        conn.data_received(ok[i:i + 1])
        assert not answer.done()
    conn.data_received(ok[-1:])
    assert answer.done() and answer.error is None and loop.timers[0].cancelled
    second = conn.send(b"REQUEST", 5.0)  # keep-alive: nothing of the first answer is left to misread
    conn.data_received(b'HTTP/1.1 503 Service Unavailable\r\nContent-Length: 16\r\n\r\n{"error":"busy"}')
    assert second.error.status() == "503" and second.error.message() == "busy" and not conn.closed


def test_a_refused_request_raises_the_server_s_message_and_status_as_tritonclient_does():
    from tritonclient.utils import InferenceServerException

    conn, _, _ = _connection()
    body = b'{"error":"unexpected shape for input \'input\'"}'
    answer = conn.send(b"REQUEST", 5.0)
    conn.data_received(b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert isinstance(answer.error, InferenceServerException)
    assert answer.error.status() == "400" and "unexpected shape for input 'input'" in answer.error.message()
    garbled = conn.send(b"REQUEST", 5.0)  # not JSON: its first bytes are the message
    conn.data_received(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 9\r\n\r\nupstream!")
    assert garbled.error.status() == "502" and garbled.error.message() == "upstream!"


def test_an_answer_without_content_length_fails_its_request_and_closes_the_connection():
    conn, transport, _ = _connection()
    answer = conn.send(b"REQUEST", 5.0)
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert isinstance(answer.error, ConnectionError) and "without Content-Length" in str(answer.error)
    assert conn.closed and transport.closed  # the rest of that answer must not be read as the next one's


def test_a_request_past_its_timeout_fails_and_its_late_answer_is_not_read_as_the_next_one():
    conn, transport, loop = _connection()
    answer = conn.send(b"REQUEST", 0.5)
    loop.timers[-1].callback()  # the timeout fires
    assert isinstance(answer.error, TimeoutError) and conn.closed and transport.closed
    late = conn.send(b"REQUEST", 5.0)  # on the closed connection: fails now, never takes the late answer
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(late.error, ConnectionResetError) and isinstance(answer.error, TimeoutError)


def test_a_connection_lost_mid_answer_fails_the_request_as_a_reset():
    conn, _, _ = _connection()
    answer = conn.send(b"REQUEST", 5.0)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    conn.connection_lost(None)
    assert isinstance(answer.error, ConnectionResetError) and conn.closed


def test_a_request_on_a_connection_the_server_already_reset_fails_at_once():
    """The reset can come between the connect and the first write (the server accepts and resets at once): the write
    would be dropped by the closed transport, so the request fails now as a reset, not after the client timeout."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    async def main():
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(HttpConnection, *srv.getsockname())
        peer, _ = srv.accept()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()  # RST
        for _ in range(100):  # until the event loop has read the reset
            if conn.closed:
                break
            await asyncio.sleep(0.01)
        assert conn.closed
        t0 = time.perf_counter()
        with pytest.raises(ConnectionResetError):
            await conn.send(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", timeout_s=30)
        return time.perf_counter() - t0

    try:
        assert asyncio.run(main()) < 1
    finally:
        srv.close()
