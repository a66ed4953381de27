"""cnnpack.grpc_wire: gRPC unary calls on a bare HTTP/2 connection.

Against a real Triton (tests/test_infer.py: a thousand calls, a rejected request, a killed and a stuck server)
and here against a scripted HTTP/2 peer, for what Triton sends rarely or never: a small flow-control window,
header blocks split over CONTINUATION with padding, a gRPC error, RST_STREAM, GOAWAY.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct

import hpack
import pytest

from cnnpack import grpc_wire as w

PATH = "/inference.GRPCInferenceService/ModelInfer"


class Peer:
    """An HTTP/2 server of one connection, scripted by `answer(peer, stream, message)`."""

    def __init__(self, answer, *, window: int = w.DEFAULT_WINDOW, max_streams: int | None = None,
                 table_sizes: tuple[int, ...] = ()) -> None:
        self.answer, self.window, self.max_streams, self.table_sizes = answer, window, max_streams, table_sizes
        self.open_streams, self.most_open = set(), 0
        self.encoder = hpack.Encoder()
        self.requests: list[tuple[int, dict, bytes]] = []
        self.frames: list[tuple[int, int, int]] = []  # (type, flags, stream) of every frame the client sent
        self.blocks: list[bytes] = []  # the header block of every call, as sent
        self.fields: list[list[tuple[str, str]]] = []  # ... and its fields, decoded, in order
        self.allowed = {0: w.DEFAULT_WINDOW}  # stream (0: the connection) -> bytes it may send so far
        self.received = {0: 0}
        self.overrun = False  # whether the client ever sent beyond a window

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.server.close()
        if getattr(self, "writer", None) is not None:
            self.writer.close()
            with contextlib.suppress(ConnectionError):
                await self.writer.wait_closed()
        await self.server.wait_closed()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        assert await reader.readexactly(len(w.PREFACE)) == w.PREFACE
        settings = struct.pack(">HI", w.SETTINGS_INITIAL_WINDOW_SIZE, self.window)
        if self.max_streams is not None:
            settings += struct.pack(">HI", w.SETTINGS_MAX_CONCURRENT_STREAMS, self.max_streams)
        self.decoder = decoder = hpack.Decoder()
        for size in self.table_sizes:  # several: the last one holds
            settings += struct.pack(">HI", w.SETTINGS_HEADER_TABLE_SIZE, size)
        writer.write(w.frame(w.SETTINGS, 0, 0, settings))
        headers, bodies = {}, {}
        try:
            while True:
                head = await reader.readexactly(9)
                length, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
                stream = int.from_bytes(head[5:], "big")
                payload = await reader.readexactly(length)
                self.frames.append((kind, flags, stream))
                if kind == w.SETTINGS and flags & w.ACK and self.table_sizes:
                    # the client has the settings (RFC 9113 6.5.3): a block must now keep the table within the size
                    decoder.max_allowed_table_size = self.table_sizes[-1]
                if kind == w.HEADERS:
                    self.blocks.append(payload)
                    self.fields.append(decoder.decode(payload))
                    headers[stream], bodies[stream] = dict(self.fields[-1]), bytearray()
                    self.open_streams.add(stream)
                    self.most_open = max(self.most_open, len(self.open_streams))
                elif kind == w.DATA:
                    body = bodies[stream]
                    body += payload
                    self.allowed.setdefault(stream, self.window)
                    for s in (0, stream):  # open a window only once the client has used all of it
                        self.received[s] = self.received.get(s, 0) + len(payload)
                        self.overrun |= self.received[s] > self.allowed[s]
                        if self.received[s] >= self.allowed[s] and not flags & w.END_STREAM:
                            more = self.window if s else w.DEFAULT_WINDOW
                            self.allowed[s] += more
                            writer.write(w.frame(w.WINDOW_UPDATE, 0, s, more.to_bytes(4, "big")))
                    if flags & w.END_STREAM:
                        message = bytes(body[5:])
                        assert body[:5] == b"\x00" + len(message).to_bytes(4, "big")
                        self.requests.append((stream, headers[stream], message))
                        self.answer(self, stream, message)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    def headers(self, stream: int, fields: list, *, end: bool = False, split: bool = False) -> None:
        block = self.encoder.encode(fields)
        if end:
            self.open_streams.discard(stream)
        end_flag = w.END_STREAM if end else 0
        if not split:
            self.writer.write(w.frame(w.HEADERS, w.END_HEADERS | end_flag, stream, block))
            return
        half = len(block) // 2  # padded HEADERS, then CONTINUATION
        first = bytes((3,)) + block[:half] + b"\x00" * 3
        self.writer.write(w.frame(w.HEADERS, w.PADDED | end_flag, stream, first)
                          + w.frame(w.CONTINUATION, w.END_HEADERS, stream, block[half:]))

    def ok(self, stream: int, *, split: bool = False) -> None:
        self.headers(stream, [(":status", "200"), ("content-type", "application/grpc")], split=split)
        self.writer.write(w.frame(w.DATA, 0, stream, b"\x00\x00\x00\x00\x02ok"))
        self.headers(stream, [("grpc-status", "0")], end=True, split=split)


async def _calls(answer, messages: list[bytes], *, settled: bool = False, **peer_args) -> tuple[Peer, list]:
    """`messages` called one after another on one connection; `settled`: the first only once the server's settings
    are in (without it the first call leaves with the preface, before them)."""
    peer = Peer(answer, **peer_args)
    port = await peer.start()
    conn = await w.open_connection("127.0.0.1", port, PATH, timeout_s=5)
    if settled:
        while (w.SETTINGS, w.ACK, 0) not in peer.frames:
            await asyncio.sleep(0.005)
    results = []
    for m in messages:
        try:
            results.append(await conn.call(m, timeout_s=5))
        except Exception as e:  # noqa: BLE001 - what each call ended with is the result
            results.append(e)
    conn.close()
    await peer.stop()
    return peer, results


def test_calls_on_one_connection_send_the_message_and_the_headers_grpc_needs():
    peer, results = asyncio.run(_calls(lambda p, s, m: p.ok(s), [b"first", b"second" * 1000, b"first"]))
    assert results == [None, None, None]
    assert [s for s, _, _ in peer.requests] == [1, 3, 5]  # a new stream per call
    assert [m for _, _, m in peer.requests] == [b"first", b"second" * 1000, b"first"]
    _, headers, _ = peer.requests[0]
    assert headers[":method"] == "POST" and headers[":path"] == PATH and headers["te"] == "trailers"
    assert headers["content-type"] == "application/grpc" and headers[":authority"].startswith("127.0.0.1:")
    assert (w.SETTINGS, w.ACK, 0) in peer.frames  # the server's settings acknowledged


def test_the_first_call_s_headers_enter_the_server_s_table_and_later_calls_index_them():
    peer, results = asyncio.run(_calls(lambda p, s, m: p.ok(s), [b"a", b"b", b"c"]))
    assert results == [None, None, None]
    first, *later = peer.blocks
    assert later == [bytes((0xC3, 0xC2, 0xC1, 0xC0, 0xBF, 0xBE))] * 2  # entries 67..62: the first field was added first
    assert len(first) > 100 and len(peer.decoder.header_table.dynamic_entries) == 6
    assert peer.fields[0] == peer.fields[1] == peer.fields[2]  # the same fields, in the same order, each time
    assert [k for k, _ in peer.fields[0]][:4] == [":method", ":scheme", ":path", ":authority"]  # pseudo-headers first


@pytest.mark.parametrize("settled", [False, True])
@pytest.mark.parametrize("table_size", [0, 200, 1000])
def test_a_server_with_a_smaller_hpack_table_gets_a_size_update_and_only_what_fits(table_size, settled):
    """The size update opens the first block after the settings; fields that no longer fit (the need is 323 bytes
    here) come as literals that touch no table, fields that fit stay indexed."""
    peer, results = asyncio.run(_calls(lambda p, s, m: p.ok(s), [b"a", b"b", b"c"], table_sizes=(table_size,),
                                       settled=settled))
    assert results == [None, None, None]
    assert peer.fields[0] == peer.fields[1] == peer.fields[2] and dict(peer.fields[0])[":path"] == PATH
    update = w._hpack_int(table_size, 5, 0x20)
    opened = [b.startswith(update) for b in peer.blocks]
    assert sum(opened) == 1 and opened[2] is False  # once, in the first block after the settings
    assert opened[0] if settled else True  # (unsettled, the first call usually leaves before them: the next block)
    if table_size < 323:  # never an index into a table the server could not keep
        assert all(len(b) > 100 for b in peer.blocks)
    else:
        assert peer.blocks[-1] == bytes((0xC3, 0xC2, 0xC1, 0xC0, 0xBF, 0xBE))
    assert peer.decoder.header_table.maxsize == table_size


def test_a_table_size_lowered_and_raised_before_the_next_block_signals_the_least_then_the_last():
    peer, results = asyncio.run(_calls(lambda p, s, m: p.ok(s), [b"a", b"b"], table_sizes=(0, 1000)))
    assert results == [None, None] and peer.fields[0] == peer.fields[1]
    assert peer.blocks[1].startswith(w._hpack_int(0, 5, 0x20) + w._hpack_int(1000, 5, 0x20))  # RFC 7541 4.2
    assert peer.decoder.header_table.maxsize == 1000 and not peer.decoder.header_table.dynamic_entries


def test_calls_started_in_one_turn_of_the_event_loop_leave_in_one_write():
    """The answers of one batch arrive together and each sends its next request: those requests reach the server
    together, in one write, not one syscall (and one scheduler slice of the client) apart."""
    async def go():
        peer = Peer(lambda p, s, m: p.ok(s))
        port = await peer.start()
        conn = await w.open_connection("127.0.0.1", port, PATH)
        await conn.call(b"first", timeout_s=5)
        real, writes = conn.transport, []

        class Counted:  # the connection's own transport, its writes recorded on the way
            def write(self, data):
                writes.append(bytes(data))
                real.write(data)

            def __getattr__(self, name):
                return getattr(real, name)

        conn.transport = Counted()
        out = await asyncio.gather(*(conn.call(b"m%d" % i, timeout_s=5) for i in range(8)))
        conn.close()
        await peer.stop()
        return peer, out, writes

    peer, out, writes = asyncio.run(go())
    assert out == [None] * 8 and sorted(m for _, _, m in peer.requests[1:]) == [b"m%d" % i for i in range(8)]
    kinds, at = [], 0
    while at < len(writes[0]):  # the frames of the first write
        kinds.append(writes[0][at + 3])
        at += 9 + int.from_bytes(writes[0][at:at + 3], "big")
    assert kinds == [w.HEADERS, w.DATA] * 8


def test_the_calls_the_answers_of_one_read_start_leave_in_one_write_as_the_read_ends():
    """The load client's closed loops start their next requests while their answers are read (loadclient._Then):
    those requests leave together in one write at the end of that read, not a turn of the event loop later."""
    from cnnpack.loadclient import _Then

    async def go():
        conn, writes = w.H2Connection("127.0.0.1:1", PATH), []

        class Recorded:  # a transport that keeps what is written
            def write(self, data):
                writes.append(bytes(data))

            def is_closing(self):
                return False

            def close(self):
                pass

        conn.connection_made(Recorded())
        settled, started = [], []

        def again(error):  # an answer that starts the next call as it is settled
            settled.append(error)
            started.append(conn.call(b"next", 5, _Then(lambda e: None)))

        for _ in range(4):
            conn.call(b"first", 5, _Then(again))
        await asyncio.sleep(0)  # the preface and the four calls leave at the end of this turn
        writes.clear()
        enc = hpack.Encoder()
        conn.data_received(b"".join(
            w.frame(w.HEADERS, w.END_HEADERS, s, enc.encode([(":status", "200")])) + w.frame(w.DATA, 0, s, b"\0" * 5)
            + w.frame(w.HEADERS, w.END_HEADERS | w.END_STREAM, s, enc.encode([("grpc-status", "0")]))
            for s in (1, 3, 5, 7)))
        in_the_read = list(writes)
        await asyncio.sleep(0)
        conn.close()
        return settled, started, in_the_read, writes

    settled, started, in_the_read, writes = asyncio.run(go())
    assert settled == [None] * 4 and len(started) == 4
    assert len(in_the_read) == 1 and writes == in_the_read  # one write, before the event loop turned; none after
    frames, at = [], 0
    while at < len(in_the_read[0]):
        b = in_the_read[0]
        frames.append((b[at + 3], int.from_bytes(b[at + 5:at + 9], "big")))
        at += 9 + int.from_bytes(b[at:at + 3], "big")
    assert frames == [(kind, s) for s in (9, 11, 13, 15) for kind in (w.HEADERS, w.DATA)]


def test_a_load_s_request_on_a_connection_closed_since_opens_it_again():
    """loadclient._Grpc.start sends on the connection its slot shares; closed since (GOAWAY after a previous
    window, say), the connection is opened again and the request sent on it."""
    from cnnpack.loadclient import _Grpc, _Then

    async def go():
        peer = Peer(lambda p, s, m: p.ok(s))
        port = await peer.start()
        wire = _Grpc("127.0.0.1", port, b"m", 5)
        await wire.ready(1)
        first = await wire.connection(0)
        first.close()
        done = asyncio.get_running_loop().create_future()
        wire.start(0, _Then(done.set_result))
        error = await asyncio.wait_for(done, 5)
        second = await wire.connection(0)
        await wire.close()
        await peer.stop()
        return error, first, second, peer

    error, first, second, peer = asyncio.run(go())
    assert error is None and second is not first and second.closed is not None  # (closed with the wire)
    assert [m for _, _, m in peer.requests] == [b"m"]


def test_a_message_beyond_the_servers_window_waits_for_window_update():
    big = bytes(range(256)) * 400  # 102,400 bytes against a window of 10,000 (the first call: the settings are in)
    peer, results = asyncio.run(_calls(lambda p, s, m: p.ok(s), [b"first", big, big], window=10_000))
    assert results == [None, None, None] and [m for _, _, m in peer.requests] == [b"first", big, big]
    sent = [f for f in peer.frames if f[0] == w.DATA and f[2] == 3]
    assert len(sent) >= 11 and sent[-1][1] & w.END_STREAM and not any(f[1] & w.END_STREAM for f in sent[:-1])
    assert not peer.overrun  # never more than the connection's window: 64 KiB, then what WINDOW_UPDATE added


def test_padded_headers_with_continuation_are_read():
    _, results = asyncio.run(_calls(lambda p, s, m: p.ok(s, split=True), [b"a", b"b"]))
    assert results == [None, None]


def test_a_grpc_error_comes_back_with_its_status_and_decoded_message():
    def refuse(peer, stream, message):
        peer.headers(stream, [(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "3"),
                              ("grpc-message", "unexpected shape for input %27input%27")], end=True)

    _, [e] = asyncio.run(_calls(refuse, [b"x"]))
    assert isinstance(e, w.GrpcError) and e.status == "StatusCode.INVALID_ARGUMENT"
    assert e.message == "unexpected shape for input 'input'"


def test_rst_stream_and_goaway_end_the_call_as_a_connection_error():
    def reset(peer, stream, message):
        peer.writer.write(w.frame(w.RST_STREAM, 0, stream, (7).to_bytes(4, "big")))

    def goaway(peer, stream, message):
        peer.writer.write(w.frame(w.GOAWAY, 0, 0, (0).to_bytes(4, "big") + (0).to_bytes(4, "big") + b"shutting down"))

    _, [e] = asyncio.run(_calls(reset, [b"x"]))
    assert isinstance(e, ConnectionResetError) and "REFUSED_STREAM" in str(e)
    _, [e, again] = asyncio.run(_calls(goaway, [b"x", b"y"]))
    assert isinstance(e, ConnectionResetError) and "GOAWAY NO_ERROR: shutting down" in str(e)
    assert again is e  # the connection is done: a later call fails at once, with the same reason


def test_no_answer_is_a_timeout_and_the_connection_is_not_reused():
    async def go():
        peer = Peer(lambda p, s, m: None)
        port = await peer.start()
        conn = await w.open_connection("127.0.0.1", port, PATH)
        with pytest.raises(TimeoutError):
            await conn.call(b"x", timeout_s=0.2)
        assert conn.closed is not None
        await peer.stop()

    asyncio.run(go())


@pytest.mark.parametrize(("n", "prefix", "encoded"), [(10, 5, b"\x0a"), (1337, 5, b"\x1f\x9a\x0a"), (42, 8, b"\x2a")])
def test_hpack_integers_as_rfc_7541_gives_them(n, prefix, encoded):
    assert w._hpack_int(n, prefix) == encoded  # RFC 7541 C.1.1-C.1.3
    assert w._hpack_int(n, prefix, 0x20)[0] == encoded[0] | 0x20 and w._hpack_int(n, prefix, 0x20)[1:] == encoded[1:]


def test_calls_in_flight_share_the_connection_and_each_gets_its_own_answer():
    """Three calls at once; the peer answers them in reverse order, the middle one with an error."""
    held: list[int] = []

    def later(peer, stream, message):
        held.append(stream)
        if len(held) < 3:
            return
        for s in reversed(held):
            if s == 3:
                peer.headers(s, [(":status", "200"), ("grpc-status", "5"), ("grpc-message", "no model m")], end=True)
            else:
                peer.ok(s)

    async def go():
        peer = Peer(later)
        port = await peer.start()
        conn = await w.open_connection("127.0.0.1", port, PATH)
        out = await asyncio.gather(*(conn.call(m, timeout_s=5) for m in (b"a", b"b" * 70_000, b"c")),
                                   return_exceptions=True)
        conn.close()
        await peer.stop()
        return peer, out

    peer, (a, b, c) = asyncio.run(go())
    # the big one waits for WINDOW_UPDATEs, and the small one behind it goes ahead in the meantime
    assert {s: m for s, _, m in peer.requests} == {1: b"a", 3: b"b" * 70_000, 5: b"c"} and not peer.overrun
    assert a is None and c is None and isinstance(b, w.GrpcError) and b.message == "no model m"


def test_beyond_the_servers_limit_of_concurrent_streams_a_call_waits_for_one_to_end():
    def answer_later(peer, stream, message):  # a stream stays open 50 ms: long enough for the others to pile up
        asyncio.get_running_loop().call_later(0.05, peer.ok, stream)

    async def go():
        peer = Peer(answer_later, max_streams=1)
        port = await peer.start()
        conn = await w.open_connection("127.0.0.1", port, PATH)
        await conn.call(b"first", timeout_s=5)  # the server's settings are in
        out = await asyncio.gather(*(conn.call(m, timeout_s=5) for m in (b"a", b"b", b"c")))
        conn.close()
        await peer.stop()
        return peer, out

    peer, out = asyncio.run(go())
    assert out == [None, None, None] and [m for _, _, m in peer.requests] == [b"first", b"a", b"b", b"c"]
    assert peer.most_open == 1


async def _load_on(peer: Peer, concurrency: int):
    """A loadclient.Load of `concurrency` gRPC calls of b"m" on `peer` (started here), its first call made so the
    peer's settings are in; Load's client is what it asks of cnnpack.client.Client beyond the wire."""
    import types

    from cnnpack.client import _client_errors
    from cnnpack.errors import StageFailed
    from cnnpack.loadclient import Load, _Grpc

    class Client:
        errors, protocol = _client_errors(), "grpc"

        def failure(self, what, e):
            return StageFailed(f"{what}: {e}")

    port = await peer.start()
    load = Load(Client(), types.SimpleNamespace(name="m"), None, concurrency=concurrency)
    load._wire = _Grpc("127.0.0.1", port, b"m", timeout_s=5)
    await (await load._wire.connection(0)).call(b"first", timeout_s=5)
    return load


def test_a_load_beyond_the_servers_stream_limit_takes_the_streams_in_turn():
    """Below the load's requests in flight, a server's SETTINGS_MAX_CONCURRENT_STREAMS makes calls wait for a stream.
    An answer's next call, started while the answer is settled, queues behind them: every request in flight keeps
    going, and none waits out the window (or, in a longer one, the client timeout)."""
    def answer_later(peer, stream, message):
        asyncio.get_running_loop().call_later(0.002, peer.ok, stream)

    async def go():
        peer = Peer(answer_later, max_streams=2)
        load = await _load_on(peer, concurrency=4)
        window = await load._window(1.0, 0, 1, 4)
        await load._wire.close()
        await peer.stop()
        return window, peer

    window, peer = asyncio.run(go())
    assert peer.most_open == 2 and len(window.latencies_s) > 40
    assert max(window.latencies_s) < 0.5  # each waited for a stream a few answers long, not for the others to stop


def test_after_a_failed_request_the_calls_waiting_for_a_stream_are_not_sent():
    """The first failure ends the load's window: the calls still waiting for a stream are abandoned with it."""
    from cnnpack.errors import StageFailed

    def refuse_the_second(peer, stream, message):  # the warm-up call passes, the load's first is refused
        if len(peer.requests) == 1:
            peer.ok(stream)
        else:
            peer.headers(stream, [(":status", "200"), ("grpc-status", "3"), ("grpc-message", "bad")], end=True)

    async def go():
        peer = Peer(refuse_the_second, max_streams=1)
        load = await _load_on(peer, concurrency=4)
        with pytest.raises(StageFailed, match="bad") as err:
            await load._window(1.0, 0, 1, 4)
        await asyncio.sleep(0.1)  # what the connection would still send, it would have sent by now
        await load._wire.close()
        await peer.stop()
        return peer, err.value

    peer, err = asyncio.run(go())
    assert "(4 in flight; 0 of 4 sent were answered)" in str(err)
    assert len(peer.requests) == 2  # the warm-up and the refused one; the 3 waiting for a stream never left


def test_the_same_connection_on_a_blocking_socket_answers_fails_and_times_out_like_on_the_event_loop():
    """blocking_wire.Blocking drives H2Connection from the caller's thread (concurrency 1); the peer runs in its own."""
    import threading

    from cnnpack.blocking_wire import Blocking

    def answer(peer, stream, message):
        if message == b"bad":
            peer.headers(stream, [(":status", "200"), ("grpc-status", "5"), ("grpc-message", "no model m")], end=True)
        elif message != b"silent":
            peer.ok(stream, split=message == b"split")

    loop = asyncio.new_event_loop()
    peer = Peer(answer, window=10_000)
    port = loop.run_until_complete(peer.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        conn = Blocking(w.H2Connection(w.authority("127.0.0.1", port), PATH), "127.0.0.1", port, 5)
        big = bytes(range(256)) * 400  # beyond the stream window: the rest waits for WINDOW_UPDATE, read meanwhile
        for m in (b"first", big, b"split"):
            assert conn.wait(conn.protocol.call(m, 5), 5) is None
        with pytest.raises(w.GrpcError, match="no model m"):
            conn.wait(conn.protocol.call(b"bad", 5), 5)
        conn.wait(conn.protocol.call(b"after", 5), 5)  # an error of one call leaves the connection usable
        with pytest.raises(TimeoutError):
            conn.wait(conn.protocol.call(b"silent", 0.2), 0.2)
        assert conn.protocol.closed is not None and conn.sock.fileno() == -1  # never reused after a timeout
    finally:
        asyncio.run_coroutine_threadsafe(peer.stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
    assert [m for _, _, m in peer.requests] == [b"first", big, b"split", b"bad", b"after", b"silent"]
    assert not peer.overrun and (w.SETTINGS, w.ACK, 0) in peer.frames


def test_a_ctrl_c_in_a_load_s_window_leaves_no_error_unretrieved_as_the_load_closes():
    """A Ctrl-C under load (tune, bench --triton-url) left the window pending with requests in flight; closing the
    wire then failed them into a future nobody awaited: 'Future exception was never retrieved ... ConnectionResetError'
    printed after cnnpack's 'error: interrupted'."""
    import gc
    import threading
    import types

    from cnnpack.client import _client_errors
    from cnnpack.errors import StageFailed
    from cnnpack.loadclient import Load, _Grpc

    class Client:
        errors, protocol = _client_errors(), "grpc"

        def failure(self, what, e):
            return StageFailed(f"{what}: {e}")

    def ctrl_c():
        raise KeyboardInterrupt

    peer = Peer(lambda peer, stream, message: None)  # answers nothing: every request stays in flight
    peer_loop = asyncio.new_event_loop()  # the server in a thread of its own, as Triton is another process
    port = peer_loop.run_until_complete(peer.start())
    thread = threading.Thread(target=peer_loop.run_forever, daemon=True)
    thread.start()
    load = Load(Client(), types.SimpleNamespace(name="m"), None, concurrency=4)
    load._loop = loop = asyncio.new_event_loop()
    unretrieved = []
    loop.set_exception_handler(lambda _, context: unretrieved.append(context.get("message")))
    load._wire = _Grpc("127.0.0.1", port, b"m", timeout_s=5)
    loop.call_later(0.3, ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt):
            load.window(seconds=5)
        load.__exit__(KeyboardInterrupt, None, None)
        gc.collect()
    finally:
        peer_loop.call_soon_threadsafe(peer_loop.stop)
        thread.join(5)
    assert len(peer.requests) == 4 and unretrieved == []
