"""Forwarding names outside the cluster zone: upstreams in order with fail-over, and a cache.

- Upstreams are tried in the configured order; one that gives no answer (timeout, ICMP refused)
  counts a failure, and after MAX_FAILS in a row it is marked down and probed (`. IN NS`) every
  PROBE_INTERVAL until it answers. Down upstreams are tried last, so a query is never refused while
  any upstream might answer.
- Answers (positive and negative) are cached with their TTL (capped), and served with the TTL that
  remains; a cached answer outlives an upstream outage until its TTL ends. Identical queries in flight
  share one upstream exchange. SERVFAIL and failed exchanges are not cached.
- UDP first; a truncated answer is retried over TCP when the client itself came over TCP (the
  client on UDP gets the TC bit and retries over TCP, as with any server).

The cluster zone is never cached here: it is answered from the zone table, which changes as soon as
objects do.
"""
from __future__ import annotations

import asyncio
import logging
import random
import struct
import time
from dataclasses import dataclass

from dnslib import EDNS0, DNSHeader, DNSQuestion, DNSRecord, QTYPE

from netplane.dns.wire import MAX_UDP_SIZE, Tail, encode_name
from netplane.dns.zone import NOERROR, NXDOMAIN, SERVFAIL

log = logging.getLogger("dns")

MAX_FAILS = 2
PROBE_INTERVAL = 0.5
MAX_TTL = 3600
MAX_NEGATIVE_TTL = 1800
NEGATIVE_TTL_WITHOUT_SOA = 30


class UpstreamError(Exception):
    pass


@dataclass
class Result:
    """An upstream's answer, as records (dnslib RRs) whose TTLs are relative to `received`."""
    rcode: int
    answer: list
    authority: list
    additional: list
    truncated: bool
    received: float
    ttl: int  # how long it may be cached (0: not at all)
    encoded: tuple | None = None  # (elapsed seconds when encoded, Tail)
    fresh: Tail | None = None  # encoded as received; older forms are this with TTLs patched

    def aged(self, now: float) -> tuple[int, list, list, list]:
        """(elapsed seconds, records with TTLs lowered by the time spent in the cache)."""
        elapsed = int(now - self.received)
        out = []
        for section in (self.answer, self.authority, self.additional):
            copies = []
            for rr in section:
                rr = _copy_rr(rr)
                rr.ttl = max(0, rr.ttl - elapsed)
                copies.append(rr)
            out.append(copies)
        return (elapsed, *out)

    def tail(self, qname: str, qtype: int, now: float) -> Tail:
        """The encoded answer for the lower-case `qname`, changed only when the remaining TTL does
        (at most once a second): encoded once, then its TTLs patched, so cache hits cost a lookup."""
        elapsed = int(now - self.received)
        if self.encoded and self.encoded[0] == elapsed:
            return self.encoded[1]
        if self.fresh is None:
            self.fresh = Tail.from_rrs(qname, qtype, self.rcode, self.answer, self.authority, self.additional,
                                       authoritative=False, truncated=self.truncated)
        tail = self.fresh.lowered(elapsed) if elapsed else self.fresh
        self.encoded = (elapsed, tail)
        return tail


def _copy_rr(rr):
    clone = object.__new__(type(rr))
    clone.__dict__.update(rr.__dict__)
    return clone


def cache_ttl(rcode: int, answer: list, authority: list) -> int:
    """RFC 2308: positive answers by their smallest TTL; negative ones by the SOA's TTL and MINIMUM."""
    if rcode == NOERROR and answer:
        return min(MAX_TTL, min(rr.ttl for rr in answer))
    if rcode in (NOERROR, NXDOMAIN):
        soas = [rr for rr in authority if rr.rtype == QTYPE.SOA]
        if not soas:
            return NEGATIVE_TTL_WITHOUT_SOA
        return min(MAX_NEGATIVE_TTL, soas[0].ttl, soas[0].rdata.times[-1])
    return 0


class _UdpUpstream(asyncio.DatagramProtocol):
    """One connected UDP socket to an upstream; replies matched to queries by id and question."""

    def __init__(self):
        self.transport = None
        self.pending: dict[int, tuple[asyncio.Future, str, int]] = {}

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        try:
            reply = DNSRecord.parse(data)
        except Exception:
            return  # garbage from upstream: keep waiting for the real reply (or time out)
        waiting = self.pending.get(reply.header.id)
        if waiting is None or waiting[0].done():
            return
        future, qname, qtype = waiting
        if not reply.questions and reply.header.tc:
            future.set_result(reply)  # some servers truncate down to the bare header
        elif len(reply.questions) == 1:
            question = reply.questions[0]
            if str(question.qname).rstrip(".").lower() == qname and question.qtype == qtype:
                future.set_result(reply)

    def error_received(self, exc):
        # ICMP port unreachable and the like: the upstream is not there; fail everything in flight.
        for future, _, _ in list(self.pending.values()):
            if not future.done():
                future.set_exception(UpstreamError(str(exc)))

    def connection_lost(self, exc):
        self.error_received(exc or ConnectionError("socket closed"))

    def new_id(self) -> int:
        while True:
            qid = random.getrandbits(16)
            if qid not in self.pending:
                return qid


@dataclass
class Upstream:
    host: str
    port: int
    fails: int = 0
    down: bool = False
    udp: _UdpUpstream | None = None
    probe: asyncio.Task | None = None

    @property
    def label(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _request(qname: str, qtype: int, qid: int) -> bytes:
    message = DNSRecord(DNSHeader(id=qid, rd=1), q=DNSQuestion(qname, qtype))
    message.add_ar(EDNS0(udp_len=MAX_UDP_SIZE))
    return bytes(message.pack())


class Forwarder:
    def __init__(self, upstreams: list[tuple[str, int]], timeout: float = 2.0, cache_size: int = 10000,
                 metrics=None, clock=time.monotonic):
        if not upstreams:
            raise ValueError("a forwarder needs at least one upstream")
        self.upstreams = [Upstream(host, port) for host, port in upstreams]
        self.timeout = timeout
        self.cache_size = cache_size
        self.metrics = metrics
        self.clock = clock
        self.cache: dict[tuple[bytes, int], tuple[str, Result]] = {}  # (wire name, qtype) -> (name, result)
        self.in_flight: dict[tuple[str, int, bool], asyncio.Future] = {}

    async def resolve(self, qname: str, qtype: int, tcp: bool = False) -> Tail:
        """The answer for (lower-case qname, qtype), from the cache or upstream; SERVFAIL when no
        upstream answers."""
        result = await self.result(qname, qtype, tcp)
        if result is None:
            return Tail.from_rrs(qname, qtype, SERVFAIL, [], [], [], authoritative=False)
        return result.tail(qname, qtype, self.clock())

    def cached(self, key: bytes, qtype: int) -> tuple[Tail, float] | None:
        """A fresh cached answer, encoded, and the seconds it stays exactly this (until its remaining
        TTL drops by one, or ends), for the UDP thread's reply cache; `key` is the lower-case wire
        name. Counts nothing: the caller's thread keeps its own counters."""
        entry = self.cache.get((key, qtype))
        if entry is None:
            return None
        now = self.clock()
        qname, result = entry
        age = now - result.received
        if age >= result.ttl:
            return None
        return result.tail(qname, qtype, now), min(result.ttl, int(age) + 1) - age

    async def result(self, qname: str, qtype: int, tcp: bool = False) -> Result | None:
        now = self.clock()
        cache_key = (encode_name(qname), qtype)
        cached = self.cache.get(cache_key)
        if cached is not None:
            if now - cached[1].received < cached[1].ttl:
                if self.metrics:
                    self.metrics.cache_hits += 1
                return cached[1]
            del self.cache[cache_key]
        if self.metrics:
            self.metrics.cache_misses += 1
        key = (qname, qtype, tcp)
        shared = self.in_flight.get(key)
        if shared is not None:
            return await asyncio.shield(shared)
        future = asyncio.get_running_loop().create_future()
        self.in_flight[key] = future
        try:
            result = await self._ask_upstreams(qname, qtype, tcp)
            future.set_result(result)
        except BaseException as err:
            future.set_exception(err)
            future.exception()  # mark retrieved: nobody else may be waiting
            raise
        finally:
            del self.in_flight[key]
        return result

    async def _ask_upstreams(self, qname: str, qtype: int, tcp: bool) -> Result | None:
        for upstream in sorted(self.upstreams, key=lambda u: u.down):
            try:
                reply = await self._exchange(upstream, qname, qtype, tcp)
            except (UpstreamError, OSError, asyncio.TimeoutError, EOFError, ValueError) as err:
                self._failed(upstream, err)
                continue
            upstream.fails = 0
            result = self._result(reply)
            if result.ttl > 0 and not result.truncated:
                self._store(qname, qtype, result)
            return result
        return None

    def _store(self, qname: str, qtype: int, result: Result) -> None:
        """Cache `result`, evicting the oldest entries to stay within cache_size (0: no cache)."""
        if self.cache_size <= 0:
            return
        key = (encode_name(qname), qtype)
        self.cache.pop(key, None)  # a TCP and a UDP exchange for one name may both land here
        while len(self.cache) >= self.cache_size:
            self.cache.pop(next(iter(self.cache)))
        self.cache[key] = (qname, result)

    def _result(self, reply: DNSRecord) -> Result:
        answer = list(reply.rr)
        authority = list(reply.auth)
        additional = [rr for rr in reply.ar if rr.rtype != QTYPE.OPT]
        rcode = reply.header.rcode
        return Result(rcode, answer, authority, additional, bool(reply.header.tc), self.clock(),
                      cache_ttl(rcode, answer, authority))

    async def _exchange(self, upstream: Upstream, qname: str, qtype: int, tcp: bool) -> DNSRecord:
        reply = await asyncio.wait_for(self._udp(upstream, qname, qtype), self.timeout)
        if reply.header.tc and tcp:
            reply = await asyncio.wait_for(self._tcp(upstream, qname, qtype), self.timeout)
        return reply

    async def _udp(self, upstream: Upstream, qname: str, qtype: int) -> DNSRecord:
        if upstream.udp is None or upstream.udp.transport is None or upstream.udp.transport.is_closing():
            loop = asyncio.get_running_loop()
            _, upstream.udp = await loop.create_datagram_endpoint(
                _UdpUpstream, remote_addr=(upstream.host, upstream.port))
        sock = upstream.udp
        qid = sock.new_id()
        future = asyncio.get_running_loop().create_future()
        sock.pending[qid] = (future, qname, qtype)
        try:
            sock.transport.sendto(_request(qname, qtype, qid))
            return await future
        finally:
            sock.pending.pop(qid, None)

    async def _tcp(self, upstream: Upstream, qname: str, qtype: int) -> DNSRecord:
        reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
        try:
            request = _request(qname, qtype, random.getrandbits(16))
            writer.write(struct.pack(">H", len(request)) + request)
            size = struct.unpack(">H", await reader.readexactly(2))[0]
            return DNSRecord.parse(await reader.readexactly(size))
        finally:
            writer.close()

    def _failed(self, upstream: Upstream, err: BaseException) -> None:
        upstream.fails += 1
        if self.metrics:
            self.metrics.upstream_error(upstream.label)
        if upstream.fails >= MAX_FAILS and not upstream.down:
            upstream.down = True
            log.warning("upstream %s is down (%s); probing it every %.1fs",
                        upstream.label, err.__class__.__name__, PROBE_INTERVAL)
            upstream.probe = asyncio.get_running_loop().create_task(self._probe(upstream))

    async def _probe(self, upstream: Upstream) -> None:
        while upstream.down:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                await asyncio.wait_for(self._udp(upstream, "", QTYPE.NS), self.timeout)
            except (UpstreamError, OSError, asyncio.TimeoutError, ValueError):
                continue
            upstream.down, upstream.fails = False, 0
            log.info("upstream %s is back", upstream.label)

    async def close(self) -> None:
        for upstream in self.upstreams:
            if upstream.probe:
                upstream.probe.cancel()
            if upstream.udp and upstream.udp.transport:
                upstream.udp.transport.close()
