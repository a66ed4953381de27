"""One request at a time without an event loop: a connection's protocol (`grpc_wire.H2Connection`,
`http_wire.HttpConnection`) driven on a blocking socket by the caller's thread, as perf_analyzer's synchronous
client does. `cnnpack.loadclient` uses it for a load of concurrency 1.
"""

from __future__ import annotations

import time


class Answer:
    """A request's answer where no event loop runs: the part of asyncio.Future the protocols use."""

    __slots__ = ("finished", "error")

    def __init__(self) -> None:
        self.finished, self.error = False, None

    def done(self) -> bool:
        return self.finished

    def set_result(self, _value) -> None:
        self.finished = True

    def set_exception(self, error: BaseException) -> None:
        self.finished, self.error = True, error


class _NoTimer:
    @staticmethod
    def cancel() -> None:
        pass


class _NoLoop:
    """What the protocols ask of an event loop, for `Blocking`: answers without callbacks; the timeout is kept by
    the socket."""

    @staticmethod
    def create_future() -> Answer:
        return Answer()

    @staticmethod
    def call_later(_delay: float, _callback) -> _NoTimer:
        return _NoTimer()


class Blocking:
    """A connection's protocol (`grpc_wire.H2Connection`, `http_wire.HttpConnection`: asyncio.Protocol's methods) on a
    blocking socket, driven by the caller's thread one request at a time.

    At concurrency 1 every request's latency includes the client's own time, and an event loop's wake-ups
    between the answer and the next request are most of it: gRPC through the event loop read 0.86-0.95x
    perf_analyzer's requests/s at concurrency 1, a blocking socket 0.95-1.30x, interleaved (the host is noisy).
    This object is the protocol's transport: `write` sends at once, `close` closes the socket.
    """

    def __init__(self, protocol, host: str, port: int, timeout_s: float) -> None:
        import socket

        self.protocol = protocol
        protocol.loop = _NoLoop
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.inbox = memoryview(bytearray(1 << 16))
        protocol.connection_made(self)

    def write(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            self.protocol.connection_lost(e)

    def close(self) -> None:
        self.sock.close()

    def wait(self, answer: Answer, timeout_s: float) -> None:
        """Reads the server's bytes into the protocol until `answer` is settled; raises its error."""
        deadline = time.monotonic() + timeout_s
        while not answer.done():
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                self.sock.settimeout(left)
                n = self.sock.recv_into(self.inbox)
            except TimeoutError:
                self.protocol.timed_out()
                break
            except OSError as e:
                self.protocol.connection_lost(e)
                break
            if not n:
                self.protocol.connection_lost(None)
                break
            self.protocol.data_received(self.inbox[:n])
        if answer.error is not None:
            raise answer.error
