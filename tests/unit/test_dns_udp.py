"""The UDP thread's batches (dns/udp.py): replies from the whole-reply cache are byte for byte what
wire.respond() gives, a zone rebuild is seen at once, cached forwarded answers age and expire, bad
packets cost nothing but themselves; and a real socket on 127.0.0.1 answers a burst of queries.
No root."""
from __future__ import annotations

import asyncio
import socket

from dnslib import CNAME, QTYPE, RR, A, DNSHeader, DNSQuestion, DNSRecord

from netplane.dns import wire
from netplane.dns.forward import Forwarder
from netplane.dns.metrics import DnsMetrics
from netplane.dns.server import DnsServer
from netplane.dns.testing import fixture_objects, fixture_table, query
from netplane.dns.udp import MSG_TRUNC, Buffers, BatchAnswerer, UdpListener, _FLAGS_AT, _MMSG_UINTS

QUERIES = [
    query("svc1.testns.svc.cluster.local"),
    query("SvC1.TestNS.svc.cluster.local"),  # the letter case is echoed: its own cache entry
    query("svc1.testns.svc.cluster.local", "AAAA"),  # NODATA
    query("nope.testns.svc.cluster.local", edns=1232),  # NXDOMAIN, with OPT
    query("_http._tcp.hdls1.testns.svc.cluster.local", "SRV", edns=4096),
    query("hdls1.testns.svc.cluster.local", "A"),
    query("1.0.0.10.in-addr.arpa", "PTR"),
    query("svc.cluster.local"),  # an empty non-terminal
    query("dns-version.cluster.local", "TXT"),
    query("www.example.test"),  # outside the zone, no forwarder: REFUSED
]


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def run_batch(answerer: BatchAnswerer, packets: list[bytes], deferred=None) -> dict[int, bytes]:
    """Put `packets` in the receive slots, answer; {slot: reply datagram} for the slots sent."""
    for slot, packet in enumerate(packets):
        answerer.buffers.put(slot, packet)
    ready = answerer.answer(len(packets), deferred or (lambda *a: None))
    return {slot: answerer.buffers.reply(slot) for slot in ready}


def with_id(packet: bytes, qid: int) -> bytes:
    return qid.to_bytes(2, "big") + packet[2:]


def new_answerer(server: DnsServer, clock=None) -> BatchAnswerer:
    return BatchAnswerer(server, Buffers(socket.AF_INET), DnsMetrics(), **({"clock": clock} if clock else {}))


def test_cached_replies_are_exactly_what_respond_gives():
    server = DnsServer(fixture_table())
    answerer = new_answerer(server)
    reference = fixture_table()
    for round_ in range(3):  # the first asks the zone, the next ones hit the reply cache
        packets = [with_id(q, 100 * round_ + i) for i, q in enumerate(QUERIES)]
        replies = run_batch(answerer, packets)
        assert sorted(replies) == list(range(len(packets)))
        for slot, packet in enumerate(packets):
            assert replies[slot] == wire.respond(reference, packet), DNSRecord.parse(packet).q
    assert len(server.table.replies) == len(QUERIES) - 1  # REFUSED is never encoded: never cached
    counted = sum(answerer.metrics.queries.values())
    assert counted == 3 * len(QUERIES) and answerer.metrics.udp_batches == 3


def test_a_rebuilt_table_is_answered_from_its_first_query():
    server = DnsServer(fixture_table())
    answerer = new_answerer(server)
    packet = query("svc1.testns.svc.cluster.local")
    for _ in range(2):
        assert DNSRecord.parse(run_batch(answerer, [packet])[0]).header.rcode == 0
    without_svc1 = [o for o in fixture_objects() if o["metadata"]["name"] not in ("svc1", "svc1-abc")]
    server.table = fixture_table(without_svc1)
    reply = DNSRecord.parse(run_batch(answerer, [packet])[0])
    assert reply.header.rcode == 3 and reply.auth[0].rtype == QTYPE.SOA  # NXDOMAIN, with the SOA


def test_bad_packets_cost_only_themselves():
    server = DnsServer(fixture_table())
    answerer = new_answerer(server)
    good = query("svc1.testns.svc.cluster.local")
    as_response = bytes([good[0], good[1], good[2] | 0x80]) + good[3:]
    packets = [good, b"\x12\x34\x00", good[:20], as_response, with_id(good, 7), good]
    replies = run_batch(answerer, packets)
    assert set(replies) == {0, 2, 4, 5}  # too short for a header, and a response: no reply (no loops)
    assert DNSRecord.parse(replies[2]).header.rcode == 1  # FORMERR
    assert replies[4] == with_id(replies[0], 7)
    answerer.buffers.put(0, query("svcempty.testns.svc.cluster.local"))
    answerer.buffers.recv_words[0 * _MMSG_UINTS + _FLAGS_AT] = MSG_TRUNC  # longer than a slot
    assert answerer.answer(1, lambda *a: None) == []
    assert answerer.metrics.dropped == 3


def upstream_reply(name: str, address: str, ttl: int) -> DNSRecord:
    reply = DNSRecord(DNSHeader(qr=1, ra=1), q=DNSQuestion(name))
    reply.add_answer(RR(name, QTYPE.A, ttl=ttl, rdata=A(address)))
    return reply


def test_forwarded_answers_age_in_the_cache_and_expire():
    clock = FakeClock()
    forwarder = Forwarder([("127.0.0.1", 9)], clock=clock)
    forwarder.cache[(wire.encode_name("www.example.test"), 1)] = (
        "www.example.test", forwarder._result(upstream_reply("www.example.test", "192.0.2.1", ttl=3)))
    server = DnsServer(fixture_table(), forwarder)
    answerer = new_answerer(server, clock)
    packet = query("www.example.test")
    ttls = []
    for step in (0.0, 0.5, 1.0, 2.9):
        clock.now = 1000.0 + step
        reply = DNSRecord.parse(run_batch(answerer, [packet])[0])
        assert reply.header.aa == 0 and str(reply.rr[0].rdata) == "192.0.2.1"
        ttls.append(reply.rr[0].ttl)
    assert ttls == [3, 3, 2, 1]  # the TTL that remains, as dnslib would encode it afresh
    assert answerer.metrics.cache_hits == 4
    clock.now = 1003.0
    deferred = []
    assert run_batch(answerer, [packet], lambda reply, slot, started: deferred.append(reply)) == {}
    assert len(deferred) == 1  # expired: to the event loop, to ask upstream
    deferred[0].close()


def test_lowered_ttls_match_a_fresh_encoding():
    answer = [RR("www.example.test.", QTYPE.CNAME, ttl=300, rdata=CNAME("x.example.test.")),
              RR("x.example.test.", QTYPE.A, ttl=30, rdata=A("192.0.2.9"))]
    tail = wire.Tail.from_rrs("www.example.test", 1, 0, answer, [], [], authoritative=False)
    for seconds in (1, 29, 31, 1000):
        aged = [RR(rr.rname, rr.rtype, ttl=max(0, rr.ttl - seconds), rdata=rr.rdata) for rr in answer]
        fresh = wire.Tail.from_rrs("www.example.test", 1, 0, aged, [], [], authoritative=False)
        assert tail.lowered(seconds).bodies == fresh.bodies


def test_real_socket_answers_a_burst():
    async def scenario() -> tuple[dict[int, bytes], list[bytes]]:
        server = DnsServer(fixture_table())
        host, port = await server.start("127.0.0.1", 0)
        try:
            packets = [with_id(QUERIES[i % len(QUERIES)], i) for i in range(300)]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.settimeout(5)
                replies = {}
                for start in range(0, len(packets), 50):  # within the socket buffers
                    for packet in packets[start:start + 50]:
                        client.sendto(packet, (host, port))
                    while len(replies) < start + 50:
                        data = await asyncio.get_running_loop().run_in_executor(None, client.recv, 4096)
                        replies[int.from_bytes(data[:2], "big")] = data
            return replies, packets
        finally:
            await server.stop()

    replies, packets = asyncio.run(scenario())
    reference = fixture_table()
    assert sorted(replies) == list(range(len(packets)))
    for qid, packet in enumerate(packets):
        assert replies[qid] == wire.respond(reference, packet)


def test_listener_stops_promptly():
    async def scenario():
        listener = UdpListener(DnsServer(fixture_table()), "127.0.0.1", 0)
        listener.start(asyncio.get_running_loop())
        listener.stop()
        return listener.thread.is_alive()
    assert asyncio.run(scenario()) is False
