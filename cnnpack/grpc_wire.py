"""gRPC unary calls on a bare HTTP/2 connection (cleartext, prior knowledge): the load client's gRPC wire.

grpc.aio cost 190-650 us of CPU per request here (benchmarks/results/served-loadgen-*.md), on the 2 cores the
server needs too, so the load it drove read 0.78-0.87x of perf_analyzer's. One request of the load is the
same bytes every time, so this connection writes prebuilt HEADERS blocks and the gRPC message in DATA frames,
and reads back frames: the answer's headers and trailers are decoded (the server's HPACK table must be followed)
for `:status` and `grpc-status`/`grpc-message`, its message is not.

What the server pays per request counts as much as the client's own CPU, because the two share the cores. As
grpc's own client does, the first call's headers enter the server's HPACK table and every later call names
them by index (6 bytes, the server decodes no literal), and the calls one turn of the event loop starts (the
answers of one batch, each sending its next request) leave in one write, so they reach the server's batcher
together instead of one by one. Before them, at concurrency 16 against Triton on 2 cores, the load stalled (up to 16
answers read at once, p99 12-14 ms against perf_analyzer's 7-9) and read 0.938x perf_analyzer's throughput; with
them, p99 7-9 ms and 0.99-1.02x in four runs of 9 interleaved rounds while perf_analyzer sent random bytes (NaNs
as FP32); given the same pixels, 1.002x with the server and the load generator on
separate cores and 0.91-0.97x in three runs beside it on the 2 cores, where Triton batches its load smaller
(benchmarks/results/served-loadgen-cnn64-onnx-cpu2-amx*.md). Bursts are not what costs there: writing each request
at once instead read 0.866x against 0.924x coalesced (6 rounds of the three alternated, gRPC at 16, shared cores;
Triton's mean batch 3.7-5.6 against 7.5-8.2 and perf_analyzer's 7.7-8.5). Part of what cost there was the turn of the
event loop between an answer and the next request: the load client now starts its next calls while their answers are read
(`call(..., answer=)` settles an object of its own at once, not a future), and a read writes what it started as it
ends. On 2 shared Zen 4 cores that raised the load 1.026-1.087x over the tasks that awaited each answer (three runs of
9-12 rounds interleaved with perf_analyzer), to 0.958-1.064x perf_analyzer's against their 0.941-0.956x, on 49-57 us of
the client's CPU per request against 56-64.

What HTTP/2 asks of a client is done: the preface and SETTINGS (acknowledged both ways), PING answered,
the server's flow-control windows respected (the message waits for WINDOW_UPDATE), this side's windows
opened wide and topped up, GOAWAY and RST_STREAM failing the call with their code, CONTINUATION and
padding read, a smaller HPACK table the server asks for signalled as RFC 7541 4.2 says. Calls in flight share
the connection, a stream each, up to the server's SETTINGS_MAX_CONCURRENT_STREAMS (a call beyond it waits for
a stream to end).

    conn = await open_connection("127.0.0.1", 8001, "/inference.GRPCInferenceService/ModelInfer")
    await conn.call(serialized_request, timeout_s=30)    # raises GrpcError, ConnectionError, TimeoutError
"""

from __future__ import annotations

import asyncio
import collections
import struct
import urllib.parse

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS, SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 2, 3, 4, 5
SETTINGS_HEADER_TABLE_SIZE = 1
MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW, DEFAULT_FRAME, DEFAULT_TABLE = 65_535, 16_384, 4_096
STATIC_ENTRIES = 61  # HPACK's static table (RFC 7541 appendix A); the dynamic table's entries follow it
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


def _hpack_int(n: int, prefix_bits: int, flags: int = 0) -> bytes:
    """An integer in HPACK's prefix coding (RFC 7541 5.1); `flags`: the bits above the prefix in the first byte."""
    limit = (1 << prefix_bits) - 1
    if n < limit:
        return bytes((flags | n,))
    out, n = [flags | limit], n - limit
    while n >= 128:
        out.append((n & 127) | 128)
        n >>= 7
    return bytes((*out, n))


def header_block(fields: list[tuple[str, str]], *, index: bool = False) -> bytes:
    """HPACK: every field a literal with a new name, no Huffman; without `index` it touches no table, with it
    each field enters the peer's dynamic table (literal with incremental indexing, RFC 7541 6.2.1)."""
    out = bytearray()
    for name, value in fields:
        n, v = name.encode("ascii"), value.encode("ascii")
        out += (b"\x40" if index else b"\x00") + _hpack_int(len(n), 7) + n + _hpack_int(len(v), 7) + v
    return bytes(out)


def indexed_block(fields: list[tuple[str, str]]) -> bytes:
    """HPACK: the fields `header_block(fields, index=True)` added to an empty dynamic table, each by its index (the
    last added is 62, the first index past the 61 of the static table)."""
    return bytes(0x80 | (STATIC_ENTRIES + len(fields) - i) for i in range(len(fields)))


def table_bytes(fields: list[tuple[str, str]]) -> int:
    """The room `fields` take in an HPACK dynamic table: name + value + 32 bytes each (RFC 7541 4.1)."""
    return sum(len(n) + len(v) + 32 for n, v in fields)


def authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def open_connection(host: str, port: int, path: str, *, timeout_s: float = 30.0) -> H2Connection:
    loop = asyncio.get_running_loop()
    _, conn = await asyncio.wait_for(
        loop.create_connection(lambda: H2Connection(authority(host, port), path), host, port), timeout_s)
    return conn


class _Call:
    """One unary call in flight: its stream's answer, timer, unsent message and send window."""

    __slots__ = ("answer", "timer", "pending", "window", "status")

    def __init__(self, answer: asyncio.Future, window: int) -> None:
        self.answer, self.window = answer, window
        self.timer: asyncio.TimerHandle | None = None
        self.pending = memoryview(b"")
        self.status: str | None = None  # :status of the answer's headers


class H2Connection(asyncio.Protocol):
    """One HTTP/2 connection carrying unary gRPC calls to one method, any number at a time (a stream each).

    `loop` (None: the running one) makes its answers' futures and timeout timers; a driver without an event loop
    (`blocking_wire.Blocking`) sets its own and calls `timed_out` itself.
    """

    loop = None

    def __init__(self, authority: str, path: str) -> None:
        import hpack

        fields = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", authority),
                  ("content-type", "application/grpc"), ("te", "trailers")]
        # the first call's block adds the fields to the server's table, later ones index them; a server whose table
        # is too small for them (SETTINGS_HEADER_TABLE_SIZE) gets literals that touch no table
        self.blocks = {"first": header_block(fields, index=True), "indexed": indexed_block(fields),
                       "literal": header_block(fields)}
        self.table_need = table_bytes(fields)
        self.hpack = "first" if self.table_need <= DEFAULT_TABLE else "literal"
        self.table_size = DEFAULT_TABLE  # the size this side's table may have: the server's latest setting
        # the smallest size the server's settings named since the last block, None: none changed it; the next block
        # starts by signalling it, then the final size where that is larger (RFC 7541 4.2)
        self.table_least: int | None = None
        self.out: list[bytes] = []  # writes of this turn of the event loop, sent together at its end (`_write`)
        self.reading = False  # in data_received, which writes what its answers started as it ends
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
        self.calls: dict[int, _Call] = {}  # stream -> the call in flight on it
        self.max_streams = MAX_WINDOW  # the server's SETTINGS_MAX_CONCURRENT_STREAMS (none: unlimited)
        self.waiting: collections.deque = collections.deque()  # (message, answer, timer) beyond that limit
        self.fragments: list[bytes] = []  # a header block across HEADERS + CONTINUATION
        self.fragments_end = False  # whether that HEADERS frame ended the stream
        self.known: dict[bytes, dict[str, str]] = {}  # header blocks that only index the table, decoded
        self.framed: tuple[bytes, int, bytearray, list[int]] | None = None  # the message's DATA frames, prebuilt

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        settings = struct.pack(">HIHI", SETTINGS_ENABLE_PUSH, 0, SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW)
        self._write(PREFACE + frame(SETTINGS, 0, 0, settings)
                    + frame(WINDOW_UPDATE, 0, 0, (MAX_WINDOW - DEFAULT_WINDOW).to_bytes(4, "big")))

    def _write(self, data: bytes) -> None:
        """On an event loop: kept until the callbacks of this turn have run, then written with the others in one
        call (`_flush`). A driver of its own (`loop` set) writes at once."""
        if self.loop is not None:
            self.transport.write(data)
            return
        if not self.out and not self.reading:  # (a read flushes what it started as it ends)
            asyncio.get_running_loop().call_soon(self._flush)
        self.out.append(data)

    def _flush(self) -> None:
        out, self.out = self.out, []
        if out and not self.transport.is_closing():
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def connection_lost(self, exc) -> None:
        self._fail_all(exc or ConnectionResetError("the server closed the connection"))

    def close(self, why: BaseException | None = None) -> None:
        self._fail_all(why or ConnectionResetError("the connection was closed"))
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        buf, at = self.buffer, 0
        self.reading = True
        try:
            while len(buf) - at >= 9 and self.closed is None:  # (after GOAWAY nothing more is read)
                length = int.from_bytes(buf[at:at + 3], "big")
                if len(buf) - at < 9 + length:
                    break
                kind, flags = buf[at + 3], buf[at + 4]
                stream = int.from_bytes(buf[at + 5:at + 9], "big") & MAX_WINDOW
                self._frame(kind, flags, stream, bytes(buf[at + 9:at + 9 + length]))
                at += 9 + length
        except ConnectionError as e:  # the server broke the protocol: nothing more on this connection is trusted
            self.close(e)
        finally:
            self.reading = False
        del buf[:at]
        if self.out:  # what the answers read here started (the load client's next calls) leaves now, in one write
            self._flush()

    # -- the calls ---------------------------------------------------------------------------------
    def call(self, message: bytes, timeout_s: float, answer=None) -> asyncio.Future:
        """Sends one gRPC message (the serialized request); the future ends with None or the call's error. Beyond
        the server's limit of concurrent streams it waits for a stream to end (its timeout runs meanwhile).
        `answer`: settled instead of a new future (an object with a future's done, set_result, set_exception)."""
        loop = self.loop or asyncio.get_running_loop()
        answer = loop.create_future() if answer is None else answer
        if self.closed is not None:
            answer.set_exception(self.closed)
        elif self.waiting or len(self.calls) >= self.max_streams:  # behind the calls already waiting: a stream freed
            # while an answer is settled (its callback may call again at once) goes to the oldest, not the newest
            self.waiting.append((message, answer, loop.call_later(timeout_s, self.timed_out)))
        else:
            self._start(message, answer, loop.call_later(timeout_s, self.timed_out))
        return answer

    def _start(self, message: bytes, answer: asyncio.Future, timer: asyncio.TimerHandle) -> None:
        stream, self.next_stream = self.next_stream, self.next_stream + 2
        c = self.calls[stream] = _Call(answer, self.stream_window_initial)
        c.timer = timer
        body = b"\x00" + len(message).to_bytes(4, "big") + message
        headers = frame(HEADERS, END_HEADERS, stream, self._header_block())
        queued = any(x.pending for x in self.calls.values())
        if not queued and len(body) <= min(self.send_window, c.window):  # the usual case: all of it at once
            self.send_window -= len(body)
            c.window -= len(body)
            self._write(headers + self._frames(message, body, stream))
        else:  # behind the calls still waiting for a window
            c.pending = memoryview(body)
            self._write(headers)
            self._pump()

    def _header_block(self) -> bytes:
        update = b""
        if self.table_least is not None:
            update = _hpack_int(self.table_least, 5, 0x20)
            if self.table_size > self.table_least:
                update += _hpack_int(self.table_size, 5, 0x20)
            self.table_least = None
        block = update + self.blocks[self.hpack]
        if self.hpack == "first":
            self.hpack = "indexed"
        return block

    def _frames(self, message: bytes, body: bytes, stream: int) -> bytes:
        """The message in DATA frames for `stream` (built once per message and frame size)."""
        if self.framed is None or self.framed[0] is not message or self.framed[1] != self.max_frame:
            out, offsets = bytearray(), []
            for at in range(0, len(body), self.max_frame):
                chunk = body[at:at + self.max_frame]
                offsets.append(len(out) + 5)
                out += frame(DATA, END_STREAM if at + len(chunk) == len(body) else 0, 0, chunk)
            self.framed = (message, self.max_frame, out, offsets)
        _, _, out, offsets = self.framed
        sid = stream.to_bytes(4, "big")
        for at in offsets:
            out[at:at + 4] = sid
        return bytes(out)

    def _pump(self) -> None:
        """Writes as much of the waiting messages as the server's windows allow, oldest call first; the last
        frame of each ends its stream."""
        out = []
        for stream, c in self.calls.items():
            while c.pending:
                n = min(len(c.pending), self.max_frame, self.send_window, c.window)
                if n <= 0:
                    break
                chunk, c.pending = c.pending[:n], c.pending[n:]
                self.send_window -= n
                c.window -= n
                out.append(frame(DATA, 0 if c.pending else END_STREAM, stream, bytes(chunk)))
            if c.pending and self.send_window <= 0:
                break
        if out:
            self._write(b"".join(out))

    # -- frames from the server ---------------------------------------------------------------------
    def _frame(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if kind == DATA:
            self.received += len(payload)
            if self.received > MAX_WINDOW // 2:  # keep this side's connection window open
                self._write(frame(WINDOW_UPDATE, 0, 0, self.received.to_bytes(4, "big")))
                self.received = 0
            if flags & END_STREAM:
                self._settle(stream, ConnectionError("the server ended the gRPC call without trailers"))
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
                self._write(frame(SETTINGS, ACK, 0))
        elif kind == PING:
            if not flags & ACK:
                self._write(frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE:
            inc = int.from_bytes(payload[:4], "big") & MAX_WINDOW
            if stream == 0:
                self.send_window += inc
            elif stream in self.calls:
                self.calls[stream].window += inc
            self._pump()
        elif kind == RST_STREAM:
            code = int.from_bytes(payload[:4], "big")
            self._settle(stream, ConnectionResetError(f"the server reset the gRPC call ({_h2_error(code)})"))
        elif kind == GOAWAY:
            code = int.from_bytes(payload[4:8], "big")
            debug = payload[8:].decode("utf-8", "replace").strip()
            self.close(ConnectionResetError(f"the server closed the connection (GOAWAY {_h2_error(code)}"
                                            + (f": {debug})" if debug else ")")))
        elif kind == PUSH_PROMISE:
            raise ConnectionError("the server sent PUSH_PROMISE after push was disabled")
        # PRIORITY and unknown frame types are ignored, as RFC 9113 asks

    def _settings(self, payload: bytes) -> None:
        for i in range(0, len(payload) - 5, 6):
            key, value = struct.unpack(">HI", payload[i:i + 6])
            if key == SETTINGS_MAX_CONCURRENT_STREAMS:
                self.max_streams = value
            elif key == SETTINGS_INITIAL_WINDOW_SIZE:
                for c in self.calls.values():
                    c.window += value - self.stream_window_initial
                self.stream_window_initial = value
            elif key == SETTINGS_MAX_FRAME_SIZE:
                self.max_frame = value
            elif key == SETTINGS_HEADER_TABLE_SIZE:
                # this side's table may no longer exceed it (a larger one is not used: 4,096 bytes hold the fields)
                value = min(value, DEFAULT_TABLE)
                if value < self.table_size or self.table_least is not None:
                    self.table_least = min(value, self.table_size if self.table_least is None else self.table_least)
                    self.table_size = value
                if value < self.table_need:  # the update evicts the fields: literals that touch no table follow
                    self.hpack = "literal"
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
        c = self.calls.get(stream)
        if c is None:
            return
        if ":status" in got:
            c.status = got[":status"]
        if c.status is not None and c.status != "200":
            self._settle(stream, ConnectionError(f"HTTP status {c.status} to a gRPC call: is it Triton's gRPC port?"))
        elif ended:
            code = got.get("grpc-status")
            if code is None:
                self._settle(stream, ConnectionError("the gRPC call ended without grpc-status"))
            elif code == "0":
                self._settle(stream, None)
            else:
                self._settle(stream, GrpcError(int(code), urllib.parse.unquote(got.get("grpc-message", ""))))

    # -- the end of a call ---------------------------------------------------------------------------
    def timed_out(self) -> None:
        # a call unanswered for its timeout: the server is stuck or overloaded, and an answer that comes later
        # must never be read as another call's, so every call on this connection ends the same way
        self.close(TimeoutError())

    def _settle(self, stream: int, error: BaseException | None) -> None:
        c = self.calls.pop(stream, None)
        if c is None:
            return
        if c.timer is not None:
            c.timer.cancel()
        if not c.answer.done():
            if error is None:
                c.answer.set_result(None)
            else:
                c.answer.set_exception(error)
        while self.waiting and self.closed is None and len(self.calls) < self.max_streams:
            message, answer, timer = self.waiting.popleft()
            if answer.done():  # cancelled while it waited
                timer.cancel()
                continue
            self._start(message, answer, timer)

    def _fail_all(self, error: BaseException) -> None:
        if self.closed is None:
            self.closed = error
        for stream in list(self.calls):
            self._settle(stream, error)
        while self.waiting:
            _, answer, timer = self.waiting.popleft()
            timer.cancel()
            if not answer.done():
                answer.set_exception(error)


def _unpad(payload: bytes, flags: int) -> bytes:
    if not flags & PADDED:
        return payload
    pad = payload[0]
    return payload[1:len(payload) - pad]


def _h2_error(code: int) -> str:
    return H2_ERRORS[code] if 0 <= code < len(H2_ERRORS) else f"error code {code}"
