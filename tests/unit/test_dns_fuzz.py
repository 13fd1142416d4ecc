"""Fuzzing: 100,000 random and mutated packets (truncated, bad label lengths, compression loops, huge
counts, flipped bits) through the server's answer path in process, and the same kind of traffic
against a real `netplane dns serve` over UDP and TCP. Malformed queries get FORMERR (or are dropped),
nothing crashes, and the server keeps answering."""
from __future__ import annotations

import random
import shutil
import socket
import struct

import pytest
from dnslib import DNSRecord

from netplane.dns.server import DnsServer
from netplane.dns.testing import OBJECTS_YAML, ServerProcess, dig, fixture_table, query

PACKETS = 100_000
SEEDS = [query(n, t, edns=e) for n, t, e in [
    ("svc1.testns.svc.cluster.local", "A", None), ("_http._tcp.hdls1.testns.svc.cluster.local", "SRV", 1232),
    ("1.0.0.10.in-addr.arpa", "PTR", None), ("nope.testns.svc.cluster.local", "AAAA", 4096),
    ("external.testns.svc.cluster.local", "CNAME", None)]]


def mutations(rng: random.Random):
    """Yield hostile packets, each kind in turn."""
    while True:
        seed = bytearray(rng.choice(SEEDS))
        yield bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 80)))  # noise
        yield bytes(seed[:rng.randrange(0, len(seed))])  # truncated
        flipped = bytearray(seed)
        for _ in range(rng.randrange(1, 6)):
            flipped[rng.randrange(len(flipped))] = rng.getrandbits(8)
        yield bytes(flipped)
        bad_label = bytearray(seed)
        bad_label[12] = rng.choice([64, 127, 191, 255, 200])  # label length > 63 / reserved bits
        yield bytes(bad_label)
        yield bytes(seed[:12]) + b"\xc0\x0c\x00\x01\x00\x01"  # compression pointer to itself
        yield bytes(seed[:12]) + b"\x01a\xc0\x0c\x00\x01\x00\x01"  # loop through a label
        counts = bytearray(seed)
        counts[4:12] = struct.pack(">HHHH", *(rng.choice([0, 1, 2, 0xFFFF]) for _ in range(4)))
        yield bytes(counts)
        yield bytes(seed) + bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 40)))  # trailing junk
        header = bytearray(seed)
        header[2], header[3] = rng.getrandbits(8), rng.getrandbits(8)  # QR, opcode, flags
        yield bytes(header)


def check_reply(packet: bytes, reply) -> None:
    if reply is None:
        return
    if not isinstance(reply, bytes):  # a forwarded name: not run here
        reply.close()
        return
    assert reply[:2] == packet[:2], "a reply must carry the query's id"
    parsed = DNSRecord.parse(reply)
    assert parsed.header.qr == 1


def test_100k_hostile_packets_in_process():
    server = DnsServer(fixture_table())
    server.forwarder = None
    rng = random.Random(20240601)
    stream = mutations(rng)
    formerr = 0
    for _ in range(PACKETS):
        packet = next(stream)
        tcp = rng.random() < 0.2
        reply = server.answer(packet, tcp)
        check_reply(packet, reply)
        if isinstance(reply, bytes) and reply[3] & 0xF == 1:
            formerr += 1
    assert formerr > PACKETS // 10  # the malformed ones got FORMERR, not silence
    good = server.answer(SEEDS[0], False)
    assert DNSRecord.parse(good).rr[0].rdata.__str__() == "10.0.0.1"


@pytest.mark.skipif(shutil.which("dig") is None, reason="needs dig (dnsutils)")
def test_real_server_survives_hostile_traffic(tmp_path):
    path = tmp_path / "objects.yaml"
    path.write_text(OBJECTS_YAML)
    rng = random.Random(7)
    stream = mutations(rng)
    with ServerProcess("--objects", str(path)) as server:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.setblocking(False)
            for _ in range(PACKETS // 5):
                try:
                    udp.sendto(next(stream), ("127.0.0.1", server.port))
                except (BlockingIOError, OSError):
                    pass  # our own send buffer is full: the point is the server, not delivery
        for _ in range(50):  # TCP: garbage frames, short frames, frames cut off mid-way
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as tcp:
                packet = next(stream)
                tcp.sendall(struct.pack(">H", rng.choice([len(packet), 0, 3, 9000])) + packet)
        assert server.proc.poll() is None
        result = dig(server.port, "svc1.testns.svc.cluster.local")
        assert result.records() == ["svc1.testns.svc.cluster.local. 5 IN A 10.0.0.1"]
        assert dig(server.port, "+tcp", "svc1.testns.svc.cluster.local").status == "NOERROR"
        assert not [e for e in server.lines if e.get("level") == "error"]
