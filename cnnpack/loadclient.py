"""cnnpack's closed-loop load client: `concurrency` requests in flight against one served model, each loop
sending its next request as soon as the previous one answered (perf_analyzer's closed loop).

    with Load(client, model, batch, concurrency=16) as load:
        window = load.window(requests=1000)      # or seconds=...; a measure.Window

On a machine of few cores the client shares the CPU with the server it measures, so every request costs
here only what the wire needs: tritonclient's asyncio clients (which build and parse every request) took
300-550 us of CPU per request on 2 cores and left the server 0.65-0.89x perf_analyzer's throughput. The request is serialized once, by tritonclient's own request
builders (so BYTES inputs and every dtype are encoded exactly as `Client.infer` encodes them), and then:

- gRPC: sent as those bytes to the `ModelInfer` method on a bare HTTP/2 connection shared by up to 16 requests
  in flight (`cnnpack.grpc_wire`: grpc.aio's own stack took 190-650 us of CPU per request here, the wire 75-105
  at concurrency 16);
- HTTP: written as one prebuilt HTTP/1.1 request (the binary tensor extension) on a keep-alive connection
  per request in flight, the answer read by its Content-Length by an asyncio protocol (`cnnpack.http_wire`).

Requests in flight share an asyncio event loop, each closed loop a chain of callbacks rather than a task: an
answer is settled while its protocol reads it and starts its loop's next request there, so no task wakes between an
answer and the next request, and over gRPC the requests the answers of one read start leave in one write. A load of
one request at a time (concurrency 1) runs the same protocols on one blocking socket instead (`cnnpack.blocking_wire`),
as perf_analyzer's synchronous client does: there every request's latency includes the client's own time, and the
event loop's wake-ups were most of it.

An answer is taken as a success from its status alone (gRPC OK, HTTP 200); `Client.infer` is what checks
outputs. The first failed request stops the load and abandons the requests still in flight; `window` then
raises StageFailed naming the server and the first error, so a killed server is reported at once and a
stuck one within the client timeout.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from cnnpack.blocking_wire import Answer, Blocking
from cnnpack.client import host_and_port
from cnnpack.errors import UserInputError
from cnnpack.http_wire import HttpConnection, server_error
from cnnpack.measure import Window

GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"
# requests in flight at most: over HTTP each is a connection (a file descriptor, 1,024 by default on Linux); an
# absurd --concurrency (1e8) grew the client to gigabytes opening them, deaf to Ctrl-C, and orphaned tune's server
MAX_CONCURRENCY = 1000


def check_concurrency(values) -> None:
    """Refuses a --concurrency list with a value below 1 or above MAX_CONCURRENCY, in one line."""
    if not values or min(values) < 1 or max(values) > MAX_CONCURRENCY:
        raise UserInputError(f"--concurrency must be integers from 1 to {MAX_CONCURRENCY:,} (requests in flight), "
                             f"got {list(values)}")


class Load:
    def __init__(self, client, model, batch: np.ndarray, concurrency: int) -> None:
        check_concurrency((concurrency,))
        self.client, self.model, self.batch, self.concurrency = client, model, batch, concurrency
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wire: _Grpc | _Http | None = None

    def __enter__(self) -> Load:
        self._loop = asyncio.new_event_loop()
        wire = _Grpc if self.client.protocol == "grpc" else _Http
        try:
            self._wire = self._loop.run_until_complete(wire.open(self.client, self.model, self.batch))
        except BaseException:
            self._loop.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            # a window a Ctrl-C left pending (KeyboardInterrupt leaves run_until_complete with its task still
            # waiting): cancelled first, so the requests the close fails are not errors nobody reads
            if pending := asyncio.all_tasks(self._loop):
                for task in pending:
                    task.cancel()
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.run_until_complete(self._wire.close())
        finally:
            self._loop.close()

    def one(self) -> float:
        """One request alone (warm-up); its latency in seconds."""
        return self.window(requests=1, concurrency=1).latencies_s[0]

    def window(self, *, seconds: float = 0.0, requests: int = 0, min_requests: int = 1,
               concurrency: int | None = None) -> Window:
        """Load for at least `seconds` and `min_requests` requests, or for exactly `requests` requests."""
        concurrency = concurrency or self.concurrency
        if concurrency == self.concurrency == 1:  # a load of one request at a time: a blocking socket, no event loop
            return self._blocking_window(seconds, requests, max(min_requests, 1))
        return self._loop.run_until_complete(self._window(seconds, requests, max(min_requests, 1), concurrency))

    def _blocking_window(self, seconds: float, requests: int, min_requests: int) -> Window:
        lat: list[float] = []
        issued = 0
        clock = time.perf_counter
        start = clock()
        more = _goes_on(start, seconds, requests, min_requests)
        try:
            while more(issued):
                issued += 1
                t0 = clock()
                self._wire.send_blocking()
                lat.append(clock() - t0)
        except self.client.errors as e:
            raise self._failure(1, len(lat), issued, e) from None
        return Window(lat, clock() - start)

    def _failure(self, concurrency: int, answered: int, issued: int, e: BaseException):
        return self.client.failure(f"request under load to {self.model.name} ({concurrency} in flight; "
                                   f"{answered} of {issued} sent were answered)", e)

    async def _window(self, seconds: float, requests: int, min_requests: int, concurrency: int) -> Window:
        """`concurrency` closed loops, each a chain of callbacks: an answer is settled while the protocol reads it
        (`_Then`), and its loop's next request is started there, so the answers of one read start their next
        requests in one write (grpc_wire) with no task to wake between them. Tasks awaiting each answer read
        0.941-0.956x perf_analyzer's gRPC load at 16 on 2 shared Zen 4 cores, these callbacks 0.958-1.064x (three
        interleaved runs of 9-12 rounds)."""
        try:
            await self._wire.ready(concurrency)
        except self.client.errors as e:
            raise self.client.failure(f"connecting the load to {self.model.name} ({concurrency} in flight)", e) from None
        loop = asyncio.get_running_loop()
        lat: list[float] = []
        issued = 0
        clock = time.perf_counter
        start = clock()
        more = _goes_on(start, seconds, requests, min_requests)
        finished = loop.create_future()
        running = concurrency

        def issue(slot: int) -> None:
            nonlocal issued, running
            if finished.done():  # a request failed: the ones still in flight are abandoned, none is sent again
                return
            if not more(issued):
                running -= 1
                if not running:
                    finished.set_result(None)
                return
            issued += 1
            t0 = clock()

            def answered(error: BaseException | None) -> None:
                if finished.done():
                    return
                if error is not None:
                    finished.set_exception(error)
                    return
                lat.append(clock() - t0)
                try:
                    issue(slot)
                except Exception as e:  # noqa: BLE001 - a bug here must end the window, not the protocol's read
                    if not finished.done():
                        finished.set_exception(e)

            self._wire.start(slot, _Then(answered, finished.done))

        for slot in range(concurrency):
            issue(slot)
        try:
            await finished
        except self.client.errors as e:
            raise self._failure(concurrency, len(lat), issued, e) from None
        finally:
            if not finished.done():  # left early (cancelled): the requests in flight are abandoned, their errors too
                finished.cancel()
        return Window(lat, clock() - start)


class _Then:
    """A request's answer that calls `then(error or None)` as it is settled: the part of asyncio.Future the
    protocols use, without the turn of the event loop a future's callbacks wait for. Once `abandoned()` (its window
    ended by a failure) it reads as done, so a protocol neither settles it nor sends it from a queue."""

    __slots__ = ("then", "finished", "abandoned")

    def __init__(self, then, abandoned=lambda: False) -> None:
        self.then, self.finished, self.abandoned = then, False, abandoned

    def done(self) -> bool:
        return self.finished or self.abandoned()

    def set_result(self, _value) -> None:
        self.finished = True
        self.then(None)

    def set_exception(self, error: BaseException) -> None:
        self.finished = True
        self.then(error)


def _goes_on(start: float, seconds: float, requests: int, min_requests: int):
    """Whether a window started at `start` sends another request after `issued`: exactly `requests` of them, or
    (with `requests` 0) until `seconds` have passed and at least `min_requests` were sent."""
    if requests:
        return lambda issued: issued < requests
    until = start + seconds
    return lambda issued: time.perf_counter() < until or issued < min_requests


class _Grpc:
    """The request as serialized bytes, a call of the raw ModelInfer method on HTTP/2 connections
    (cnnpack.grpc_wire), up to STREAMS_PER_CONNECTION requests in flight sharing one."""

    # At concurrency 16 here: 16 per connection 1,642-1,776 requests/s, 4 per connection 1,682-1,924, one each
    # 1,296-1,462 (the server pays per connection), perf_analyzer 1,664-1,839, interleaved in one process (through
    # grpc.aio). perf_analyzer 2.41 itself opens 3 connections at 16 (`ss`); on the raw wire 16, 8 and 6 requests per
    # connection read the same (2,906-2,954 against perf_analyzer's 3,178 on 2 shared cores, 4 rounds).
    STREAMS_PER_CONNECTION = 16

    def __init__(self, host: str, port: int, body: bytes, timeout_s: float) -> None:
        self.host, self.port, self.body, self.timeout_s = host, port, body, timeout_s
        self.opening: dict[int, asyncio.Future] = {}  # connection number -> its (last) connection, being opened
        self.tasks: set[asyncio.Task] = set()  # requests waiting for their connection to open again (`start`)
        self.blocking: Blocking | None = None  # the connection of a load of one request at a time

    @classmethod
    async def open(cls, client, model, batch: np.ndarray) -> _Grpc:
        from tritonclient.grpc import InferRequestedOutput
        from tritonclient.grpc._utils import _get_inference_request

        request = _get_inference_request(model_name=model.name, inputs=client.inputs(model, batch), model_version="",
                                         request_id="", outputs=[InferRequestedOutput(model.output)], sequence_id=0,
                                         sequence_start=False, sequence_end=False, priority=0, timeout=None,
                                         parameters=None)
        return cls(*host_and_port(client.address), request.SerializeToString(), client.timeout_s)

    async def connection(self, key: int):
        """Connection `key`, opened once for the requests that share it (again once it has closed)."""
        from cnnpack.grpc_wire import open_connection

        opening = self.opening.get(key)
        if opening is None or (opening.done() and (_opened(opening) is None or _opened(opening).closed is not None)):
            opening = self.opening[key] = asyncio.ensure_future(
                open_connection(self.host, self.port, GRPC_INFER, timeout_s=self.timeout_s))
        return await asyncio.shield(opening)  # a cancelled request leaves the opening to the others

    async def ready(self, concurrency: int) -> None:
        """The connections `concurrency` requests in flight share, open."""
        await asyncio.gather(*(self.connection(key) for key in range(-(-concurrency // self.STREAMS_PER_CONNECTION))))

    def start(self, slot: int, answer) -> None:
        """Sends the request of `slot` on its connection; `answer` is settled with None or the server's error."""
        opening = self.opening.get(slot // self.STREAMS_PER_CONNECTION)
        conn = _opened(opening) if opening is not None and opening.done() else None
        if conn is None or conn.closed is not None:  # closed since (or still opening): open it, then send
            _settle_later(self._start_when_open(slot, answer), answer, self.tasks)
            return
        conn.call(self.body, self.timeout_s, _GrpcStatus(answer))

    async def _start_when_open(self, slot: int, answer) -> None:
        conn = await self.connection(slot // self.STREAMS_PER_CONNECTION)
        conn.call(self.body, self.timeout_s, _GrpcStatus(answer))

    def send_blocking(self) -> None:
        from cnnpack.grpc_wire import H2Connection, authority

        b = self.blocking
        if b is None or b.protocol.closed is not None:
            b = self.blocking = Blocking(H2Connection(authority(self.host, self.port), GRPC_INFER), self.host,
                                         self.port, self.timeout_s)
        answer = Answer()
        b.protocol.call(self.body, self.timeout_s, _GrpcStatus(answer))  # a gRPC status as tritonclient reports it
        b.wait(answer, self.timeout_s)

    async def close(self) -> None:
        if self.blocking is not None:
            self.blocking.protocol.close()
        await _cancel(self.tasks)
        for opening in self.opening.values():
            if not opening.done():
                opening.cancel()
            elif _opened(opening) is not None:
                _opened(opening).close()
        await asyncio.gather(*self.opening.values(), return_exceptions=True)


class _GrpcStatus:
    """An answer as the gRPC wire settles it, passed on with a call's gRPC status as tritonclient reports one."""

    __slots__ = ("answer",)

    def __init__(self, answer) -> None:
        self.answer = answer

    def done(self) -> bool:
        return self.answer.done()

    def set_result(self, value) -> None:
        self.answer.set_result(value)

    def set_exception(self, error: BaseException) -> None:
        from cnnpack.grpc_wire import GrpcError

        if isinstance(error, GrpcError):  # as tritonclient reports it: status and details
            error = server_error(error.message, error.status)
        self.answer.set_exception(error)


def _settle_later(opening, answer, tasks: set) -> None:
    """Runs `opening` (a connection opened, then the request sent on it) as a task kept in `tasks` until it ends
    (the wire's close cancels what is left); its failure settles `answer`."""
    def failed(task: asyncio.Task) -> None:
        tasks.discard(task)
        error = task.exception() if not task.cancelled() else ConnectionError("the connection's opening was cancelled")
        if error is not None and not answer.done():
            answer.set_exception(error)

    task = asyncio.ensure_future(opening)
    tasks.add(task)
    task.add_done_callback(failed)


def _opened(opening: asyncio.Future):
    """The connection an opening that is done gave, or None where it failed or was cancelled."""
    if opening.cancelled() or opening.exception() is not None:
        return None
    return opening.result()


class _Http:
    """One prebuilt HTTP/1.1 request, written on a keep-alive connection per request in flight."""

    def __init__(self, host: str, port: int, request: bytes, timeout_s: float) -> None:
        self.host, self.port, self.request, self.timeout_s = host, port, request, timeout_s
        self.conns: dict[int, HttpConnection] = {}
        self.tasks: set[asyncio.Task] = set()  # connections being opened (`ready`, `start`)
        self.blocking: Blocking | None = None  # the connection of a load of one request at a time

    @classmethod
    async def open(cls, client, model, batch: np.ndarray) -> _Http:
        import tritonclient.http as http

        body, json_size = http.InferenceServerClient.generate_request_body(
            client.inputs(model, batch), outputs=[http.InferRequestedOutput(model.output, binary_data=True)])
        head = [f"POST /v2/models/{model.name}/infer HTTP/1.1", f"Host: {client.address}",
                "Content-Type: application/octet-stream", f"Content-Length: {len(body)}"]
        if json_size is not None:
            head.append(f"Inference-Header-Content-Length: {json_size}")
        request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        return cls(*host_and_port(client.address), request, client.timeout_s)

    async def connection(self, slot: int) -> HttpConnection:
        """The keep-alive connection of `slot`, opened again once it has closed."""
        conn = self.conns.get(slot)
        if conn is None or conn.closed:
            loop = asyncio.get_running_loop()
            _, conn = await asyncio.wait_for(loop.create_connection(HttpConnection, self.host, self.port),
                                             self.timeout_s)
            self.conns[slot] = conn
        return conn

    async def ready(self, concurrency: int) -> None:
        """A connection for each of `concurrency` requests in flight, open (where one fails, the others opening
        are left to `close`)."""
        opening = [asyncio.ensure_future(self.connection(slot)) for slot in range(concurrency)]
        self.tasks.update(opening)
        try:
            await asyncio.gather(*opening)
        finally:
            self.tasks.difference_update(t for t in opening if t.done())

    def start(self, slot: int, answer) -> None:
        """Writes the request of `slot` on its connection; `answer` is settled with None or the server's error."""
        conn = self.conns.get(slot)
        if conn is None or conn.closed:  # the server closed it since: open it again, then send
            _settle_later(self._start_when_open(slot, answer), answer, self.tasks)
            return
        conn.send(self.request, self.timeout_s, answer)

    async def _start_when_open(self, slot: int, answer) -> None:
        (await self.connection(slot)).send(self.request, self.timeout_s, answer)

    def send_blocking(self) -> None:
        b = self.blocking
        if b is None or b.protocol.closed:
            b = self.blocking = Blocking(HttpConnection(), self.host, self.port, self.timeout_s)
        b.wait(b.protocol.send(self.request, self.timeout_s), self.timeout_s)

    async def close(self) -> None:
        if self.blocking is not None:
            self.blocking.protocol.close()
        await _cancel(self.tasks)
        for conn in self.conns.values():
            conn.close()


async def _cancel(tasks: set) -> None:
    """Cancels the tasks still running and waits for them to end."""
    pending = list(tasks)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    tasks.clear()
