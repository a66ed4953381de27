"""The HTTP/1.1 side of cnnpack's load client (`cnnpack.loadclient`): an asyncio protocol that writes one prebuilt
request at a time on a keep-alive connection and reads its answer by Content-Length, settling it with None (HTTP 200)
or the server's error as tritonclient reports it (`server_error`).

The gRPC side is `cnnpack.grpc_wire`; `cnnpack.blocking_wire` drives either protocol on a blocking socket.
"""

from __future__ import annotations

import asyncio


def server_error(message: str, status: str | None = None):
    """The server's error as tritonclient raises it (status and message)."""
    from tritonclient.utils import InferenceServerException

    return InferenceServerException(msg=message, status=status)


class HttpConnection(asyncio.Protocol):
    """An HTTP/1.1 keep-alive connection with one request at a time; answers are read by Content-Length.
    `loop`: as `grpc_wire.H2Connection`'s."""

    loop = None

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.answer: asyncio.Future | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.head: tuple[int, int, int] | None = None  # status, header length, total length
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._settle(error=exc or ConnectionResetError("the server closed the connection"))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def send(self, request: bytes, timeout_s: float, answer=None) -> asyncio.Future:
        """Writes `request`; the answer (a new future, or `answer`: settled instead) ends with None or its error."""
        loop = self.loop or asyncio.get_running_loop()
        answer = self.answer = loop.create_future() if answer is None else answer
        if self.closed:
            # lost before this request was written (a reset right after the connect): the transport would drop the
            # write silently and the answer wait for the timeout, a dead server read as a stuck one
            self._settle(error=ConnectionResetError("the server closed the connection"))
            return answer
        self.timer = loop.call_later(timeout_s, self.timed_out)
        self.transport.write(request)
        return answer

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.head is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            if "content-length" not in fields:  # Triton always sends one; anything else is not Triton
                self._settle(error=ConnectionError(f"an answer without Content-Length: {lines[0]!r}"))
                self.close()
                return
            self.head = (int(lines[0].split()[1]), end + 4, end + 4 + int(fields["content-length"]))
        status, start, total = self.head
        if len(self.buffer) < total:
            return
        body = bytes(self.buffer[start:total])
        del self.buffer[:total]
        self.head = None
        if status == 200:
            self._settle()
        else:
            import json

            try:
                message = json.loads(body)["error"]
            except (ValueError, KeyError, TypeError):
                message = body[:200].decode("utf-8", "replace")
            self._settle(error=server_error(message, str(status)))

    def timed_out(self) -> None:
        self.timer = None
        self._settle(error=TimeoutError())
        self.close()  # a late answer must not be read as the next request's

    def _settle(self, error: BaseException | None = None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        answer, self.answer = self.answer, None
        if answer is None or answer.done():
            return
        if error is None:
            answer.set_result(None)
        else:
            answer.set_exception(error)
