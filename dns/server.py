"""The I/O shell around wire.respond(): UDP on a thread of its own (udp.py: batched system calls, a
cache of whole replies), TCP on asyncio (uvloop in the daemon), as are forwarded names.

The server holds one Table and swaps it whole when the zone is rebuilt (an attribute assignment, so a
query, or a UDP batch, sees the old table or the new one, never a mix).
"""
from __future__ import annotations

import asyncio
import logging
import struct
from time import perf_counter

from netplane.dns import wire
from netplane.dns.metrics import DnsMetrics
from netplane.dns.udp import UdpListener
from netplane.dns.zone import NOERROR

log = logging.getLogger("dns")

TCP_IDLE_TIMEOUT = 10.0  # seconds, as CoreDNS
MAX_TCP_PENDING = 100  # forwarded queries in flight per TCP connection
FOREVER = float("inf")


class DnsServer:
    def __init__(self, table: wire.Table, forwarder=None, metrics: DnsMetrics | None = None):
        self.table = table
        self.forwarder = forwarder
        self.metrics = metrics or DnsMetrics()
        self._udp: list = []
        self._servers: list[asyncio.base_events.Server] = []
        self._tasks: set[asyncio.Task] = set()

    # -- listening --------------------------------------------------------------------------

    async def start(self, host: str, port: int, reuse_port: bool = False) -> tuple[str, int]:
        """Listen on UDP and TCP `host:port` (port 0: a free port, the same for both); with
        `reuse_port`, several worker processes share the port (SO_REUSEPORT).
        Returns the bound address."""
        loop = asyncio.get_running_loop()
        for attempt in range(20):
            udp = UdpListener(self, host, port, reuse_port)
            bound = udp.address
            try:
                server = await loop.create_server(lambda: _TcpProtocol(self), host, bound[1], reuse_address=True,
                                                  reuse_port=reuse_port or None)
            except OSError:
                udp.stop()
                if port or attempt == 19:  # a fixed port is taken; or no free port for both
                    raise
                continue  # the free UDP port is taken for TCP: another
            self.metrics.shards.append(udp.metrics)
            udp.start(loop)
            self._udp.append(udp)
            self._servers.append(server)
            return bound

    async def stop(self) -> None:
        for udp in self._udp:
            await asyncio.get_running_loop().run_in_executor(None, udp.stop)
        for server in self._servers:
            server.close()
            await server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        if self.forwarder:
            await self.forwarder.close()

    # -- answering ---------------------------------------------------------------------------

    def answer(self, query: bytes, tcp: bool):
        """Reply bytes, None, or a coroutine that produces the reply (a forwarded name)."""
        request = wire.respond(self.table, query, tcp, self.forwarder is not None)
        if request is None or request.__class__ is bytes:
            return request
        return self._finish(request, query)

    def cached_reply(self, table: wire.Table, query: bytes) -> tuple[bytes, float, int] | None:
        """For a plain UDP query whose answer is already encoded (in `table`, or the forwarder's
        cache): (reply, seconds it stays valid, 1 if forwarded else 0). None: ask answer()."""
        fast = wire.parse_fast(query, False)
        if fast is None:
            return None
        key, qtype, question_end, limit, edns = fast
        tail = table.find(key, qtype)
        if tail is not None:
            return tail.reply(query, question_end, limit, edns), FOREVER, 0
        cached = self.forwarder.cached(key, qtype) if self.forwarder is not None else None  # the zone first
        if cached is None:
            return None
        tail, valid = cached
        return tail.reply(query, question_end, limit, edns), valid, 1

    async def _finish(self, request, query: bytes) -> bytes | None:
        q = request.question
        try:
            if isinstance(request, wire.Forward):
                tail = await self.forwarder.resolve(q.name, q.qtype, request.tcp)
            else:
                tail = await self._chase(request)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("forwarding failed")
            tail = wire.servfail_tail(q)
        return tail.reply(query, q.question_end, q.limit, q.edns)

    async def _chase(self, request: wire.Chase) -> wire.Tail:
        """An ExternalName: our CNAME, then the upstream's answer for the target (CoreDNS does the
        same; a stub resolver would not chase the CNAME itself)."""
        q = request.question
        cname = [wire.to_rr(r) for r in request.answer.answer]
        result = await self.forwarder.result(request.target, q.qtype, request.tcp)
        if result is None:
            return wire.Tail.from_rrs(q.name, q.qtype, NOERROR, cname, [], [])
        _, answer, authority, additional = result.aged(self.forwarder.clock())
        return wire.Tail.from_rrs(q.name, q.qtype, result.rcode, cname + answer, authority, additional,
                                  truncated=result.truncated)

    def spawn(self, coro, done) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def finished(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is None:
                done(t.result())

        task.add_done_callback(finished)


class _TcpProtocol(asyncio.Protocol):
    """Length-prefixed messages (RFC 1035 4.2.2 / RFC 7766), several per connection, idle timeout."""

    def __init__(self, server: DnsServer):
        self.server = server
        self.transport = None
        self.buffer = bytearray()
        self.idle = None
        self.pending = 0

    def connection_made(self, transport):
        self.transport = transport
        self._touch()

    def _touch(self) -> None:
        if self.idle:
            self.idle.cancel()
        self.idle = asyncio.get_running_loop().call_later(TCP_IDLE_TIMEOUT, self.transport.close)

    def connection_lost(self, exc):
        if self.idle:
            self.idle.cancel()

    def data_received(self, data: bytes) -> None:
        self._touch()
        self.buffer += data
        while len(self.buffer) >= 2:
            size = (self.buffer[0] << 8) | self.buffer[1]
            if size < 12:  # too short to be a DNS message: the stream is garbage
                self.transport.close()
                return
            if len(self.buffer) < 2 + size:
                return
            query = bytes(self.buffer[2:2 + size])
            del self.buffer[:2 + size]
            self._handle(query)

    def _handle(self, query: bytes) -> None:
        started = perf_counter()
        server = self.server
        try:
            reply = server.answer(query, True)
        except Exception:
            log.exception("query failed")
            reply = wire.error_reply(query, 2)
        if reply is None:
            server.metrics.dropped += 1
        elif reply.__class__ is bytes:
            self._send(reply, started)
        elif self.pending >= MAX_TCP_PENDING:
            reply.close()
            server.metrics.dropped += 1
        else:
            self.pending += 1

            def send(message: bytes | None) -> None:
                self.pending -= 1
                if message:
                    self._send(message, started)
            server.spawn(reply, send)

    def _send(self, reply: bytes, started: float) -> None:
        if self.transport.is_closing():
            return
        self.transport.write(struct.pack(">H", len(reply)) + reply)
        self.server.metrics.answered(reply, "tcp", started)
