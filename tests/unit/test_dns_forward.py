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

import pytest
from dnslib import QTYPE, RR, A

from netplane.dns.forward import cache_ttl
from netplane.dns.testing import OBJECTS_YAML, ServerProcess, UpstreamStub, dig

pytestmark = pytest.mark.skipif(shutil.which("dig") is None, reason="needs dig (dnsutils)")

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
                          "big.example.test": [f"198.51.100.{i}" for i in range(1, 121)]},
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
