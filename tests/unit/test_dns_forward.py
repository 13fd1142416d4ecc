"""Forwarding names outside the cluster zone: two small upstream servers of the test's own on
127.0.0.1, `netplane dns serve --upstream A --upstream B` as a real process, the real dig.

Shows: answers come from the first upstream and are cached (positive and negative); when it is
stopped, new names fail over to the second while cached answers survive until their TTL ends;
a truncated upstream answer is fetched over TCP for a TCP client; ExternalName targets outside the
cluster are chased upstream; with every upstream gone, SERVFAIL.
"""
from __future__ import annotations

import shutil
import time
import urllib.request

import pytest
from dnslib import QTYPE, RR, A

from netplane.dns.forward import cache_ttl
from netplane.dns.testing import OBJECTS_YAML, ServerProcess, UpstreamStub, dig

pytestmark = pytest.mark.skipif(shutil.which("dig") is None, reason="needs dig (dnsutils)")

MID = 40  # A records in an answer of ~700 bytes: over 512, under 1232
SHORT_TTL = 4  # long enough for the steps that rely on the cache, short enough to wait out
EXTERNAL = """
---
apiVersion: v1
kind: Service
metadata: {name: outside, namespace: testns}
spec: {type: ExternalName, externalName: www.example.test}
"""


def wait_for(check, timeout: float = 15.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


@pytest.fixture
def upstreams():
    first = UpstreamStub({"www.example.test": ["192.0.2.1"], "other.example.test": ["192.0.2.11"],
                          "big.example.test": [f"198.51.100.{i}" for i in range(1, 121)],
                          "mid.example.test": [f"198.51.100.{i}" for i in range(1, MID + 1)]},
                         ttl=SHORT_TTL, negative_ttl=SHORT_TTL).start()
    second = UpstreamStub({"www.example.test": ["192.0.2.2"], "other.example.test": ["192.0.2.12"]},
                          ttl=SHORT_TTL).start()
    yield first, second
    first.stop()
    second.stop()


@pytest.fixture
def server(upstreams, tmp_path):
    path = tmp_path / "objects.yaml"
    path.write_text(OBJECTS_YAML + EXTERNAL)
    first, second = upstreams
    with ServerProcess("--objects", str(path), "--upstream", first.address, "--upstream", second.address,
                       "--forward-timeout", "1") as proc:
        yield proc


def addresses(result) -> list[str]:
    return sorted(line.split()[-1] for line in result.records() if " IN A " in line)


def test_forward_cache_and_fail_over(server, upstreams):
    first, second = upstreams
    result = dig(server.port, "www.example.test", "A")
    assert result.status == "NOERROR" and addresses(result) == ["192.0.2.1"]
    assert "aa" not in result.flags
    assert dig(server.port, "WWW.Example.Test", "A").records()[0].startswith("WWW.Example.Test.")
    assert first.asked("www.example.test") == 1  # the second answer came from the cache
    # negative answers are cached too
    assert dig(server.port, "missing.example.test", "A").status == "NXDOMAIN"
    assert dig(server.port, "missing.example.test", "A").status == "NXDOMAIN"
    assert first.asked("missing.example.test") == 1

    first.stop()
    cached = dig(server.port, "www.example.test", "A")
    assert addresses(cached) == ["192.0.2.1"]  # survives the outage within its TTL
    assert int(cached.records()[0].split()[1]) <= SHORT_TTL
    assert addresses(dig(server.port, "other.example.test", "A")) == ["192.0.2.12"]  # fail-over
    assert second.asked("other.example.test") == 1
    # once the TTL has run out, the name is asked again, of the upstream still up
    assert wait_for(lambda: addresses(dig(server.port, "www.example.test", "A")) == ["192.0.2.2"])


def test_truncated_upstream_answer_is_fetched_over_tcp(server, upstreams):
    first, _ = upstreams
    result = dig(server.port, "big.example.test", "A")  # UDP: TC, then dig retries over TCP
    assert result.via_tcp and len(addresses(result)) == 120
    assert ("big.example.test", "A", "tcp") in first.queries


def test_forwarded_answer_between_512_and_1232_bytes_needs_edns0_over_udp(server, upstreams):
    first, _ = upstreams
    result = dig(server.port, "+ignore", "+bufsize=4096", "mid.example.test", "A")
    assert result.status == "NOERROR" and "tc" not in result.flags and not result.via_tcp
    assert len(addresses(result)) == MID
    plain = dig(server.port, "+ignore", "+noedns", "mid.example.test", "A")  # now from the cache
    assert "tc" in plain.flags and plain.records() == []
    assert dig(server.port, "+noedns", "mid.example.test", "A").via_tcp  # dig's retry gets it all
    assert first.queries.count(("mid.example.test", "A", "udp")) == 1  # TC only to our client


def test_external_name_is_chased_upstream(server):
    result = dig(server.port, "outside.testns.svc.cluster.local", "A")
    assert result.status == "NOERROR"
    assert result.records() == ["outside.testns.svc.cluster.local. 5 IN CNAME www.example.test.",
                                f"www.example.test. {SHORT_TTL} IN A 192.0.2.1"]


def test_servfail_when_no_upstream_answers(server, upstreams):
    for stub in upstreams:
        stub.stop()
    assert dig(server.port, "+time=5", "nowhere.example.test", "A").status == "SERVFAIL"
    # the cluster zone does not depend on upstreams
    assert dig(server.port, "svc1.testns.svc.cluster.local", "A").status == "NOERROR"


def test_cache_ttl_follows_rfc2308():
    answer = [RR("a.test.", QTYPE.A, ttl=600, rdata=A("192.0.2.1")),
              RR("a.test.", QTYPE.A, ttl=30, rdata=A("192.0.2.2"))]
    assert cache_ttl(0, answer, []) == 30
    assert cache_ttl(0, [RR("a.test.", QTYPE.A, ttl=99999, rdata=A("192.0.2.1"))], []) == 3600
    stub = UpstreamStub({}, negative_ttl=45)
    from dnslib import DNSRecord
    negative = stub.resolve(DNSRecord.question("nope.test"), type("H", (), {"protocol": "udp"})())
    assert cache_ttl(3, [], negative.auth) == 45
    assert cache_ttl(2, [], []) == 0  # SERVFAIL is not cached


# -- fail-over on a timeout: an upstream that reads and never replies -----------------------------

class SilentUpstream:
    """A UDP socket on 127.0.0.1 that reads queries and says nothing, until `answering` is set;
    then it answers every A question with `address` (and the probe's `. NS`). Counts what it read."""

    def __init__(self, address: str = "192.0.2.77"):
        import socket
        import threading
        self.address_answered = address
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.answering = False
        self.received: list[tuple[str, str]] = []  # (name, type)
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import socket

        from dnslib import NS, DNSRecord
        while not self.stopping:
            try:
                data, peer = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            request = DNSRecord.parse(data)
            name = str(request.q.qname).rstrip(".").lower()
            self.received.append((name, QTYPE[request.q.qtype]))
            if not self.answering:
                continue
            reply = request.reply()
            if request.q.qtype == QTYPE.NS:
                reply.add_answer(RR(".", QTYPE.NS, ttl=60, rdata=NS("silent.test.")))
            else:
                reply.add_answer(RR(request.q.qname, QTYPE.A, ttl=60, rdata=A(self.address_answered)))
            self.sock.sendto(reply.pack(), peer)

    def asked(self, qtype: str = "A") -> int:
        return sum(1 for _, kind in self.received if kind == qtype)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def silent():
    stub = SilentUpstream()
    yield stub
    stub.stop()


FORWARD_TIMEOUT = 0.5


def logged_starting(server, prefix: str) -> list[dict]:
    return [e for e in server.lines if str(e.get("msg", "")).startswith(prefix)]


def timed_dig(port: int, name: str):
    started = time.monotonic()
    result = dig(port, name, "A")
    return result, time.monotonic() - started


def test_silent_first_upstream_times_out_is_marked_down_and_used_again_when_it_answers(silent, tmp_path):
    """The first upstream reads and never replies: each name still gets the second upstream's
    answer, within the forward timeout (plus the second's reply); after MAX_FAILS timeouts it is
    marked down and tried last, so answers come at once; once it answers the probe, it is first again."""
    from netplane.dns.forward import MAX_FAILS
    working = UpstreamStub({f"n{i}.example.test": [f"192.0.2.{i}"] for i in range(1, 10)}).start()
    path = tmp_path / "objects.yaml"
    path.write_text(OBJECTS_YAML)
    try:
        with ServerProcess("--objects", str(path), "--upstream", silent.address, "--upstream", working.address,
                           "--forward-timeout", str(FORWARD_TIMEOUT)) as server:
            for i in range(1, MAX_FAILS + 1):
                result, took = timed_dig(server.port, f"n{i}.example.test")
                assert result.status == "NOERROR" and addresses(result) == [f"192.0.2.{i}"]
                assert FORWARD_TIMEOUT * 0.9 <= took < FORWARD_TIMEOUT + 0.4  # waited out the silent one, once
            assert silent.asked("A") == MAX_FAILS
            assert wait_for(lambda: logged_starting(server, f"upstream {silent.address} is down"), timeout=2)
            # marked down: tried last, so the working upstream answers at once
            result, took = timed_dig(server.port, f"n{MAX_FAILS + 1}.example.test")
            assert addresses(result) == [f"192.0.2.{MAX_FAILS + 1}"] and took < FORWARD_TIMEOUT / 2
            assert silent.asked("A") == MAX_FAILS
            errors = urllib.request.urlopen(f"http://127.0.0.1:{server.health_port}/metrics", timeout=5).read()
            assert f'netplane_dns_upstream_errors_total{{upstream="{silent.address}"}} {float(MAX_FAILS)}' \
                in errors.decode()

            silent.answering = True  # the next probe (`. NS`) succeeds and it is first again
            assert wait_for(lambda: logged_starting(server, f"upstream {silent.address} is back"), timeout=3)
            assert silent.asked("NS") >= 1
            result, took = timed_dig(server.port, "n9.example.test")
            assert addresses(result) == [silent.address_answered] and took < FORWARD_TIMEOUT / 2
            assert working.asked("n9.example.test") == 0
    finally:
        working.stop()


# -- the cache's caps: entries, and the TTL of negative answers ----------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class NoSoaStub(UpstreamStub):
    """Negative answers without an SOA in the authority section (some forwarders strip it)."""

    def resolve(self, request, handler):
        reply = super().resolve(request, handler)
        reply.auth = []
        return reply


def forwarder_run(stub: UpstreamStub, steps, **kwargs):
    """Run `steps(forwarder, clock)` (a coroutine function) against a Forwarder on `stub`."""
    import asyncio

    from netplane.dns.forward import Forwarder

    async def main():
        clock = Clock()
        forwarder = Forwarder([("127.0.0.1", stub.port)], timeout=1.0, clock=clock, **kwargs)
        try:
            return await steps(forwarder, clock)
        finally:
            await forwarder.close()
    stub.start()
    try:
        return asyncio.run(main())
    finally:
        stub.stop()


def test_a_tiny_cache_keeps_at_most_its_size_and_evicts_the_oldest():
    stub = UpstreamStub({f"c{i}.example.test": [f"192.0.2.{i}"] for i in range(1, 5)}, ttl=300)

    async def steps(forwarder, clock):
        for i in range(1, 5):
            result = await forwarder.result(f"c{i}.example.test", QTYPE.A)
            assert str(result.answer[0].rdata) == f"192.0.2.{i}"
            assert len(forwarder.cache) <= 2
        assert sorted(name for name, _ in forwarder.cache.values()) == ["c3.example.test", "c4.example.test"]
        await forwarder.result("c4.example.test", QTYPE.A)  # still cached
        assert stub.asked("c4.example.test") == 1
        await forwarder.result("c1.example.test", QTYPE.A)  # evicted: asked again
        assert stub.asked("c1.example.test") == 2
        assert len(forwarder.cache) == 2
        # negative answers take room too
        await forwarder.result("nope.example.test", QTYPE.A)
        assert len(forwarder.cache) == 2 and stub.asked("nope.example.test") == 1
    forwarder_run(stub, steps, cache_size=2)


def test_cache_size_zero_caches_nothing_and_still_answers():
    stub = UpstreamStub({"z.example.test": ["192.0.2.5"]}, ttl=300)

    async def steps(forwarder, clock):
        for _ in range(2):
            result = await forwarder.result("z.example.test", QTYPE.A)
            assert result is not None and str(result.answer[0].rdata) == "192.0.2.5"
        assert forwarder.cache == {} and stub.asked("z.example.test") == 2
    forwarder_run(stub, steps, cache_size=0)


@pytest.mark.parametrize("negative_ttl, expected", [(99999, 1800), (1801, 1800), (120, 120)])
def test_negative_answers_are_cached_for_the_soa_ttl_capped(negative_ttl, expected):
    from netplane.dns.forward import MAX_NEGATIVE_TTL
    assert MAX_NEGATIVE_TTL == 1800
    stub = UpstreamStub({"known.example.test": ["192.0.2.1"]}, negative_ttl=negative_ttl)

    async def steps(forwarder, clock):
        for name, qtype, rcode in (("gone.example.test", QTYPE.A, 3), ("known.example.test", QTYPE.AAAA, 0)):
            result = await forwarder.result(name, qtype)  # NXDOMAIN, then NODATA
            assert result.rcode == rcode and result.answer == [] and result.ttl == expected
            clock.now += expected - 1
            assert (await forwarder.result(name, qtype)).rcode == rcode
            assert stub.asked(name) == 1  # still cached a second before the cap
            clock.now += 1
            await forwarder.result(name, qtype)
            assert stub.asked(name) == 2  # the cap reached: asked again
    forwarder_run(stub, steps)


def test_negative_answers_without_an_soa_are_cached_briefly():
    from netplane.dns.forward import NEGATIVE_TTL_WITHOUT_SOA
    assert NEGATIVE_TTL_WITHOUT_SOA == 30
    stub = NoSoaStub({"known.example.test": ["192.0.2.1"]}, negative_ttl=99999)

    async def steps(forwarder, clock):
        for name, qtype in (("gone.example.test", QTYPE.A), ("known.example.test", QTYPE.AAAA)):
            result = await forwarder.result(name, qtype)
            assert result.authority == [] and result.ttl == NEGATIVE_TTL_WITHOUT_SOA
            clock.now += NEGATIVE_TTL_WITHOUT_SOA - 0.5
            await forwarder.result(name, qtype)
            assert stub.asked(name) == 1
            clock.now += 0.5
            await forwarder.result(name, qtype)
            assert stub.asked(name) == 2
    forwarder_run(stub, steps)


def test_negative_cache_ttl_is_the_smaller_of_soa_ttl_and_minimum():
    from dnslib import SOA
    from netplane.dns.forward import MAX_NEGATIVE_TTL, NEGATIVE_TTL_WITHOUT_SOA

    def soa(ttl: int, minimum: int):
        return [RR("test.", QTYPE.SOA, ttl=ttl, rdata=SOA("ns.test.", "admin.test.", (1, 60, 60, 60, minimum)))]
    assert cache_ttl(3, [], soa(600, 60)) == 60
    assert cache_ttl(3, [], soa(50, 600)) == 50
    assert cache_ttl(0, [], soa(7200, 7200)) == MAX_NEGATIVE_TTL  # NODATA
    assert cache_ttl(3, [], soa(0, 300)) == 0  # SOA TTL 0: not cached at all
    assert cache_ttl(3, [], []) == cache_ttl(0, [], []) == NEGATIVE_TTL_WITHOUT_SOA
