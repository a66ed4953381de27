"""gRPC unary calls on a bare HTTP/2 connection (cleartext, prior knowledge): the load client's gRPC wire.

grpc.aio costs 190-650 us of CPU per request here (benchmarks/results/served-loadgen-*.md), on the 2 cores the
server needs too, so the load it drives reads 0.78-0.87x of perf_analyzer's. One request of the load is the
same bytes every time, so this connection writes a prebuilt HEADERS block (HPACK literals, no table) and
the gRPC message in DATA frames, and reads back frames: the answer's headers and trailers are decoded (the
server's HPACK table must be followed) for `:status` and `grpc-status`/`grpc-message`, its message is not.

What HTTP/2 asks of a client is done: the preface and SETTINGS (acknowledged both ways), PING answered,
the server's flow-control windows respected (the message waits for WINDOW_UPDATE), this side's windows
opened wide and topped up, GOAWAY and RST_STREAM failing the call with their code, CONTINUATION and
padding read. One stream at a time per connection: the load opens a connection per request in flight.

    conn = await open_connection("127.0.0.1", 8001, "/inference.GRPCInferenceService/ModelInfer")
    await conn.call(serialized_request, timeout_s=30)    # raises GrpcError, ConnectionError, TimeoutError
"""

from __future__ import annotations

import asyncio
import struct
import urllib.parse

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
SETTINGS_ENABLE_PUSH, SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 2, 4, 5
MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW, DEFAULT_FRAME = 65_535, 16_384
# HTTP/2 error codes (RFC 9113 section 7) and gRPC status codes, for messages
H2_ERRORS = ("NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR", "SETTINGS_TIMEOUT", "STREAM_CLOSED",
             "FRAME_SIZE_ERROR", "REFUSED_STREAM", "CANCEL", "COMPRESSION_ERROR", "CONNECT_ERROR", "ENHANCE_YOUR_CALM",
             "INADEQUATE_SECURITY", "HTTP_1_1_REQUIRED")
GRPC_CODES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
              "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
              "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")


class GrpcError(Exception):
    """The server answered the call with a gRPC status other than OK."""

    def __init__(self, code: int, message: str) -> None:
        name = GRPC_CODES[code] if 0 <= code < len(GRPC_CODES) else str(code)
        super().__init__(message or name)
        self.status = f"StatusCode.{name}"  # as grpc's own StatusCode prints
        self.message = message or name


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload


def _hpack_int(n: int, prefix_bits: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if n < limit:
        return bytes((n,))
    out, n = [limit], n - limit
    while n >= 128:
        out.append((n & 127) | 128)
        n >>= 7
    return bytes((*out, n))


def header_block(fields: list[tuple[str, str]]) -> bytes:
    """HPACK: every field a literal without indexing, its name new, no Huffman (touches no table)."""
    out = bytearray()
    for name, value in fields:
        n, v = name.encode("ascii"), value.encode("ascii")
        out += b"\x00" + _hpack_int(len(n), 7) + n + _hpack_int(len(v), 7) + v
    return bytes(out)


async def open_connection(host: str, port: int, path: str, *, timeout_s: float = 30.0) -> H2Connection:
    loop = asyncio.get_running_loop()
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    _, conn = await asyncio.wait_for(loop.create_connection(lambda: H2Connection(authority, path), host, port),
                                     timeout_s)
    return conn


class H2Connection(asyncio.Protocol):
    """One HTTP/2 connection that carries one unary gRPC call at a time to one method."""

    def __init__(self, authority: str, path: str) -> None:
        import hpack

        self.block = header_block([(":method", "POST"), (":scheme", "http"), (":path", path),
                                   (":authority", authority), ("content-type", "application/grpc"), ("te", "trailers")])
        self.decoder = hpack.Decoder()
        self.decoder.max_allowed_table_size = MAX_WINDOW  # the server's SETTINGS_HEADER_TABLE_SIZE is its own business
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.next_stream = 1
        self.send_window = DEFAULT_WINDOW  # the connection's, set by the server's WINDOW_UPDATEs
        self.stream_window_initial = DEFAULT_WINDOW  # the server's SETTINGS_INITIAL_WINDOW_SIZE
        self.max_frame = DEFAULT_FRAME
        self.received = 0  # DATA bytes since this side's connection window was last topped up
        self.closed: BaseException | None = None
        # the call in flight
        self.stream = 0
        self.pending = memoryview(b"")
        self.stream_window = 0
        self.answer: asyncio.Future | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.fragments: list[bytes] = []  # a header block across HEADERS + CONTINUATION
        self.fragments_end = False  # whether that HEADERS frame ended the stream
        self.status: str | None = None  # :status of the answer's headers
        self.known: dict[bytes, dict[str, str]] = {}  # header blocks that only index the table, decoded
        self.framed: tuple[bytes, int, bytearray, list[int]] | None = None  # the message's DATA frames, prebuilt

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        settings = struct.pack(">HIHI", SETTINGS_ENABLE_PUSH, 0, SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW)
        transport.write(PREFACE + frame(SETTINGS, 0, 0, settings)
                        + frame(WINDOW_UPDATE, 0, 0, (MAX_WINDOW - DEFAULT_WINDOW).to_bytes(4, "big")))

    def connection_lost(self, exc) -> None:
        self._fail_all(exc or ConnectionResetError("the server closed the connection"))

    def close(self) -> None:
        self._fail_all(ConnectionResetError("the connection was closed"))
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        buf, at = self.buffer, 0
        try:
            while len(buf) - at >= 9:
                length = int.from_bytes(buf[at:at + 3], "big")
                if len(buf) - at < 9 + length:
                    break
                kind, flags = buf[at + 3], buf[at + 4]
                stream = int.from_bytes(buf[at + 5:at + 9], "big") & MAX_WINDOW
                self._frame(kind, flags, stream, bytes(buf[at + 9:at + 9 + length]))
                at += 9 + length
        except ConnectionError as e:  # the server broke the protocol: nothing more on this connection is trusted
            self._fail_all(e)
            self.transport.close()
        del buf[:at]

    # -- the call ----------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.answer is not None

    def call(self, message: bytes, timeout_s: float) -> asyncio.Future:
        """Sends one gRPC message (the serialized request); the future ends with None or the call's error."""
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        if self.closed is not None:
            answer.set_exception(self.closed)
            return answer
        self.answer, self.status, self.fragments = answer, None, []
        self.stream, self.next_stream = self.next_stream, self.next_stream + 2
        self.stream_window = self.stream_window_initial
        body = b"\x00" + len(message).to_bytes(4, "big") + message
        self.timer = loop.call_later(timeout_s, self._timed_out)
        headers = frame(HEADERS, END_HEADERS, self.stream, self.block)
        if len(body) <= min(self.send_window, self.stream_window):  # the usual case: all of it at once
            self.send_window -= len(body)
            self.stream_window -= len(body)
            self.transport.write(headers + self._frames(message, body))
        else:
            self.pending = memoryview(body)
            self.transport.write(headers)
            self._pump()
        return answer

    def _frames(self, message: bytes, body: bytes) -> bytes:
        """The message in DATA frames for the stream in flight (built once per message and frame size)."""
        if self.framed is None or self.framed[0] is not message or self.framed[1] != self.max_frame:
            out, offsets = bytearray(), []
            for at in range(0, len(body), self.max_frame):
                chunk = body[at:at + self.max_frame]
                offsets.append(len(out) + 5)
                out += frame(DATA, END_STREAM if at + len(chunk) == len(body) else 0, 0, chunk)
            self.framed = (message, self.max_frame, out, offsets)
        _, _, out, offsets = self.framed
        sid = self.stream.to_bytes(4, "big")
        for at in offsets:
            out[at:at + 4] = sid
        return bytes(out)

    def _pump(self) -> None:
        """Writes as much of the message as the server's windows allow; the last frame ends the stream."""
        out = []
        while self.pending and self.answer is not None:
            n = min(len(self.pending), self.max_frame, self.send_window, self.stream_window)
            if n <= 0:
                break
            chunk, self.pending = self.pending[:n], self.pending[n:]
            self.send_window -= n
            self.stream_window -= n
            out.append(frame(DATA, 0 if self.pending else END_STREAM, self.stream, bytes(chunk)))
        if out:
            self.transport.write(b"".join(out))

    # -- frames from the server ---------------------------------------------------------------------
    def _frame(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if kind == DATA:
            self.received += len(payload)
            if self.received > MAX_WINDOW // 2:  # keep this side's connection window open
                self.transport.write(frame(WINDOW_UPDATE, 0, 0, self.received.to_bytes(4, "big")))
                self.received = 0
            if flags & END_STREAM and stream == self.stream:
                self._settle(ConnectionError("the server ended the gRPC call without trailers"))
        elif kind in (HEADERS, CONTINUATION):
            if kind == HEADERS:
                payload = _unpad(payload, flags)
                if flags & PRIORITY_FLAG:
                    payload = payload[5:]
                self.fragments, self.fragments_end = [payload], bool(flags & END_STREAM)
            else:
                self.fragments.append(payload)
            if flags & END_HEADERS:
                self._headers(stream, b"".join(self.fragments), self.fragments_end)
        elif kind == SETTINGS:
            if not flags & ACK:
                self._settings(payload)
                self.transport.write(frame(SETTINGS, ACK, 0))
        elif kind == PING:
            if not flags & ACK:
                self.transport.write(frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE:
            inc = int.from_bytes(payload[:4], "big") & MAX_WINDOW
            if stream == 0:
                self.send_window += inc
            elif stream == self.stream:
                self.stream_window += inc
            self._pump()
        elif kind == RST_STREAM:
            if stream == self.stream:
                code = int.from_bytes(payload[:4], "big")
                self._settle(ConnectionResetError(f"the server reset the gRPC call ({_h2_error(code)})"))
        elif kind == GOAWAY:
            code = int.from_bytes(payload[4:8], "big")
            debug = payload[8:].decode("utf-8", "replace").strip()
            self._fail_all(ConnectionResetError(f"the server closed the connection (GOAWAY {_h2_error(code)}"
                                                + (f": {debug})" if debug else ")")))
        elif kind == PUSH_PROMISE:
            raise ConnectionError("the server sent PUSH_PROMISE after push was disabled")
        # PRIORITY and unknown frame types are ignored, as RFC 9113 asks

    def _settings(self, payload: bytes) -> None:
        for i in range(0, len(payload) - 5, 6):
            key, value = struct.unpack(">HI", payload[i:i + 6])
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                self.stream_window += value - self.stream_window_initial
                self.stream_window_initial = value
            elif key == SETTINGS_MAX_FRAME_SIZE:
                self.max_frame = value
        self._pump()

    def _headers(self, stream: int, block: bytes, ended: bool) -> None:
        got = self.known.get(block)
        if got is None:
            try:
                fields = self.decoder.decode(block, raw=True)  # the table must follow every block, this call's or not
            except Exception as e:  # noqa: BLE001 - hpack's errors: the connection's state is lost
                raise ConnectionError(f"an undecodable header block from the server ({e})") from None
            got = {k.decode("latin-1"): v.decode("latin-1") for k, v in fields}
            if 0xFF not in block and all(b & 0x80 for b in block):  # one-byte indexed fields only: the table is
                self.known[block] = got  # left as it was, so the same bytes mean the same fields until it changes
            else:
                self.known.clear()
        if stream != self.stream or self.answer is None:
            return
        if ":status" in got:
            self.status = got[":status"]
        if not ended:
            if self.status != "200":
                self._settle(ConnectionError(f"HTTP status {self.status} to a gRPC call: is it Triton's gRPC port?"))
            return
        if self.status is not None and self.status != "200":
            self._settle(ConnectionError(f"HTTP status {self.status} to a gRPC call: is it Triton's gRPC port?"))
            return
        code = got.get("grpc-status")
        if code is None:
            self._settle(ConnectionError("the gRPC call ended without grpc-status"))
        elif code == "0":
            self._settle(None)
        else:
            self._settle(GrpcError(int(code), urllib.parse.unquote(got.get("grpc-message", ""))))

    # -- the end of a call ---------------------------------------------------------------------------
    def _timed_out(self) -> None:
        self.timer = None
        self._settle(TimeoutError())
        self.close()  # its answer may still come: never read it as the next call's

    def _settle(self, error: BaseException | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        answer, self.answer, self.pending = self.answer, None, memoryview(b"")
        if answer is None or answer.done():
            return
        if error is None:
            answer.set_result(None)
        else:
            answer.set_exception(error)

    def _fail_all(self, error: BaseException) -> None:
        if self.closed is None:
            self.closed = error
        self._settle(error)


def _unpad(payload: bytes, flags: int) -> bytes:
    if not flags & PADDED:
        return payload
    pad = payload[0]
    return payload[1:len(payload) - pad]


def _h2_error(code: int) -> str:
    return H2_ERRORS[code] if 0 <= code < len(H2_ERRORS) else f"error code {code}"
