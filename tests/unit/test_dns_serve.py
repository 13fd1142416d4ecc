"""`netplane dns serve --objects` as a real process on 127.0.0.1, asked with the real dig over UDP and
TCP: answers, negative answers, case echo, EDNS0, truncation and dig's retry over TCP, health and
metrics, and the CLI's errors. Loopback only, no root."""
from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.request

import pytest
import yaml

from netplane.dns.testing import OBJECTS_YAML, ServerProcess, dig

pytestmark = pytest.mark.skipif(shutil.which("dig") is None, reason="needs dig (dnsutils)")

Z = "testns.svc.cluster.local."
BIG_ENDPOINTS = 100  # 100 A records: ~1.7 kB, more than fits in 1232 bytes of UDP
MID_ENDPOINTS = 40  # 40 A records: ~700 bytes, more than 512 and less than 1232


def big_headless(name: str = "big", count: int = BIG_ENDPOINTS, subnet: int = 1) -> str:
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "testns"},
               "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 80}]}}
    eps = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": f"{name}-1", "namespace": "testns",
                        "labels": {"kubernetes.io/service-name": name}},
           "endpoints": [{"addresses": [f"10.244.{subnet}.{i}"]} for i in range(1, count + 1)],
           "ports": [{"name": "http", "port": 80}]}
    return yaml.safe_dump_all([service, eps])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("dns") / "objects.yaml"
    path.write_text(OBJECTS_YAML + "\n---\n" + big_headless() + "\n---\n" + big_headless("mid", MID_ENDPOINTS, 2))
    with ServerProcess("--objects", str(path)) as proc:
        yield proc


def test_udp_answer(server):
    result = dig(server.port, "svc1.testns.svc.cluster.local", "A")
    assert result.status == "NOERROR" and not result.via_tcp
    assert {"qr", "aa"} <= result.flags
    assert result.records() == [f"svc1.{Z} 5 IN A 10.0.0.1"]


def test_tcp_answer_and_nxdomain_with_soa(server):
    result = dig(server.port, "+tcp", "hdls1.testns.svc.cluster.local", "A")
    assert result.via_tcp and result.status == "NOERROR"
    assert sorted(result.records()) == [f"hdls1.{Z} 5 IN A 172.0.0.{i}" for i in (2, 3, 4, 5)]
    result = dig(server.port, "+tcp", "nope.testns.svc.cluster.local", "A")
    assert result.status == "NXDOMAIN" and result.records() == []
    assert result.records("authority")[0].startswith("cluster.local. 5 IN SOA ns.dns.cluster.local. hostmaster.")


def test_empty_non_terminal_is_nodata(server):
    result = dig(server.port, "svc.cluster.local", "A")
    assert result.status == "NOERROR" and result.records() == []
    assert "SOA" in result.records("authority")[0]


def test_srv_ptr_txt_over_udp(server):
    result = dig(server.port, "_http._tcp.svc1.testns.svc.cluster.local", "SRV")
    assert result.records() == [f"_http._tcp.svc1.{Z} 5 IN SRV 0 100 80 svc1.{Z}"]
    assert result.records("additional") == [f"svc1.{Z} 5 IN A 10.0.0.1"]
    assert dig(server.port, "-x", "10.0.0.1").records() == [f"1.0.0.10.in-addr.arpa. 5 IN PTR svc1.{Z}"]
    assert dig(server.port, "dns-version.cluster.local", "TXT").records() == [
        'dns-version.cluster.local. 28800 IN TXT "1.1.0"']


def test_question_case_is_echoed(server):
    result = dig(server.port, "SvC1.TeStNs.SvC.cLuStEr.LoCaL", "A")
    assert result.records() == ["SvC1.TeStNs.SvC.cLuStEr.LoCaL. 5 IN A 10.0.0.1"]


def test_edns0_is_answered_with_our_buffer_size_and_plain_queries_without(server):
    assert dig(server.port, "+bufsize=4096", "svc1.testns.svc.cluster.local").udp_size == 1232
    plain = dig(server.port, "+noedns", "svc1.testns.svc.cluster.local")
    assert plain.status == "NOERROR" and plain.udp_size is None
    assert dig(server.port, "+edns=1", "+noednsnegotiation", "svc1.testns.svc.cluster.local").status == "BADVERS"


def test_big_answer_is_truncated_over_udp_and_complete_over_tcp(server):
    truncated = dig(server.port, "+ignore", "big.testns.svc.cluster.local", "A")
    assert "tc" in truncated.flags and truncated.records() == [] and not truncated.via_tcp
    retried = dig(server.port, "big.testns.svc.cluster.local", "A")  # dig retries over TCP on TC
    assert retried.via_tcp and "tc" not in retried.flags
    assert len(retried.records()) == BIG_ENDPOINTS
    small_buffer = dig(server.port, "+ignore", "+bufsize=512", "_http._tcp.hdls1.testns.svc.cluster.local", "SRV")
    assert "tc" in small_buffer.flags


def message_size(result) -> int:
    import re
    return int(re.search(r";; MSG SIZE\s+rcvd: (\d+)", result.text).group(1))


def test_edns0_lets_a_udp_answer_between_512_and_1232_bytes_through(server):
    name = "mid.testns.svc.cluster.local"
    expected = sorted(f"{name}. 5 IN A 10.244.2.{i}" for i in range(1, MID_ENDPOINTS + 1))
    for bufsize in ("+bufsize=4096", "+bufsize=1232"):
        result = dig(server.port, "+ignore", bufsize, name, "A")
        assert result.status == "NOERROR" and not result.via_tcp and "tc" not in result.flags
        assert sorted(result.records()) == expected
        assert 512 < message_size(result) <= 1232
        assert result.udp_size == 1232
    # without EDNS0 the limit is 512 bytes: TC and no records; dig's retry over TCP gets them all
    plain = dig(server.port, "+ignore", "+noedns", name, "A")
    assert "tc" in plain.flags and plain.records() == [] and not plain.via_tcp
    assert message_size(plain) <= 512 and plain.udp_size is None
    retried = dig(server.port, "+noedns", name, "A")
    assert retried.via_tcp and sorted(retried.records()) == expected
    # an EDNS0 buffer below 512 counts as 512 (RFC 6891 6.2.5): truncated too
    assert "tc" in dig(server.port, "+ignore", "+bufsize=300", name, "A").flags
    # the same question again (from the UDP thread's reply cache) keeps both forms apart
    assert "tc" not in dig(server.port, "+ignore", "+bufsize=4096", name, "A").flags
    assert "tc" in dig(server.port, "+ignore", "+noedns", name, "A").flags


def test_names_outside_the_zone_are_refused_without_upstream(server):
    result = dig(server.port, "example.com", "A")
    assert result.status == "REFUSED"


def test_health_ready_and_metrics(server):
    base = f"http://127.0.0.1:{server.health_port}"
    assert urllib.request.urlopen(base + "/healthz", timeout=5).status == 200
    assert urllib.request.urlopen(base + "/ready", timeout=5).status == 200
    dig(server.port, "nope2.testns.svc.cluster.local", "AAAA")
    metrics = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
    assert 'netplane_dns_queries_total{proto="udp",rcode="NXDOMAIN",type="AAAA"}' in metrics
    assert "netplane_dns_request_duration_seconds_bucket" in metrics


def run_cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "netplane", "dns", "serve", *args],
                          capture_output=True, text=True, timeout=30, env=env)


def test_cli_without_a_source_exits_with_a_clear_error():
    env = {k: v for k, v in __import__("os").environ.items() if k != "NETPLANE_SERVER"}
    proc = run_cli("--listen", "127.0.0.1:0", env=env)
    assert proc.returncode == 2
    assert "--objects" in proc.stderr and "NETPLANE_SERVER" in proc.stderr


def test_cli_rejects_bad_flags_and_files(tmp_path):
    proc = run_cli("--objects", "x", "--upstream", "192.0.2.1:notaport")
    assert proc.returncode == 2 and "--upstream" in proc.stderr
    proc = run_cli("--objects", str(tmp_path / "missing.yaml"), "--listen", "127.0.0.1:0")
    assert proc.returncode == 2 and "missing.yaml" in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [unclosed\n")
    proc = run_cli("--objects", str(bad), "--listen", "127.0.0.1:0")
    assert proc.returncode == 2 and "does not parse" in proc.stderr
    proc = run_cli("--objects", str(bad), "--listen", "nowhere")
    assert proc.returncode == 2 and "--listen" in proc.stderr
    proc = run_cli("--objects", str(bad), "--ttl", "99999")
    assert proc.returncode == 2 and "--ttl" in proc.stderr
    proc = run_cli("--objects", str(bad), "--cache-size", "-1")
    assert proc.returncode == 2 and "--cache-size" in proc.stderr
    proc = run_cli("--objects", str(bad), "--forward-timeout", "0")
    assert proc.returncode == 2 and "--forward-timeout" in proc.stderr


def test_cli_reports_a_port_it_cannot_bind(tmp_path):
    path = tmp_path / "objects.yaml"
    path.write_text(OBJECTS_YAML)
    with ServerProcess("--objects", str(path), health=False) as first:
        proc = run_cli("--objects", str(path), "--listen", f"127.0.0.1:{first.port}")
        assert proc.returncode == 1 and "cannot serve" in proc.stderr


def test_tcp_carries_several_queries_on_one_connection(server):
    import socket
    import struct
    from dnslib import DNSRecord

    from netplane.dns.testing import query
    queries = [query("svc1.testns.svc.cluster.local", "A", qid=1), query("nope.testns.svc.cluster.local", "A", qid=2)]
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as tcp:
        tcp.sendall(b"".join(struct.pack(">H", len(q)) + q for q in queries))  # pipelined in one write
        stream = tcp.makefile("rb")
        replies = {}
        for _ in queries:
            size = struct.unpack(">H", stream.read(2))[0]
            reply = DNSRecord.parse(stream.read(size))
            replies[reply.header.id] = reply.header.rcode
    assert replies == {1: 0, 2: 3}


def test_upstream_flag_forms(tmp_path):
    from netplane.dns.cli import parse_upstreams
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("search example\nnameserver 192.0.2.53\nnameserver 2001:db8::53\n")
    assert parse_upstreams(["192.0.2.1", "192.0.2.2:5353", "[2001:db8::1]:54", "2001:db8::2", str(resolv)]) == [
        ("192.0.2.1", 53), ("192.0.2.2", 5353), ("2001:db8::1", 54), ("2001:db8::2", 53),
        ("192.0.2.53", 53), ("2001:db8::53", 53)]
    with pytest.raises(ValueError, match="--upstream"):
        parse_upstreams(["192.0.2.1:99999"])


def test_workers_share_the_port_and_stop_together(tmp_path):
    path = tmp_path / "objects.yaml"
    path.write_text(OBJECTS_YAML)
    with ServerProcess("--objects", str(path), "--workers", "2", health=False) as proc:
        assert len(proc.logged("zone built")) >= 1
        for _ in range(5):
            assert dig(proc.port, "svc1.testns.svc.cluster.local").records() == [f"svc1.{Z} 5 IN A 10.0.0.1"]
        worker_ids = [int(line.split()[0]) for line in subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(proc.proc.pid)], capture_output=True, text=True).stdout.splitlines()]
        assert len(worker_ids) == 1
    assert proc.proc.returncode == 0
    assert subprocess.run(["ps", "-p", str(worker_ids[0])], capture_output=True).returncode != 0  # gone


def metric(text: str, name: str) -> float:
    """The value of the unlabelled sample `name` in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_count_cache_hits_of_a_repeated_forwarded_query(tmp_path):
    from netplane.dns.testing import UpstreamStub
    upstream = UpstreamStub({"www.example.test": ["192.0.2.1"]}, ttl=300).start()
    path = tmp_path / "objects.yaml"
    path.write_text(OBJECTS_YAML)
    try:
        with ServerProcess("--objects", str(path), "--upstream", upstream.address) as proc:
            url = f"http://127.0.0.1:{proc.health_port}/metrics"

            def scrape() -> str:
                return urllib.request.urlopen(url, timeout=5).read().decode()
            before = scrape()
            assert metric(before, "netplane_dns_cache_hits_total") == 0
            assert dig(proc.port, "www.example.test", "A").records() == ["www.example.test. 300 IN A 192.0.2.1"]
            first = scrape()
            assert metric(first, "netplane_dns_cache_hits_total") == 0
            assert metric(first, "netplane_dns_cache_misses_total") == 1
            for expected_hits in (1, 2):
                again = dig(proc.port, "www.example.test", "A")
                assert again.status == "NOERROR" and "192.0.2.1" in again.records()[0]
                assert metric(scrape(), "netplane_dns_cache_hits_total") == expected_hits
            assert upstream.asked("www.example.test") == 1  # the repeats came from the cache
            # cluster names are never cache hits
            dig(proc.port, "svc1.testns.svc.cluster.local", "A")
            assert metric(scrape(), "netplane_dns_cache_hits_total") == 2
    finally:
        upstream.stop()


def test_zone_flag_serves_that_zone_and_not_cluster_local(tmp_path):
    path = tmp_path / "objects.yaml"
    path.write_text(OBJECTS_YAML)
    zone = "testns.svc.example.internal."
    with ServerProcess("--objects", str(path), "--zone", "example.internal", health=False) as proc:
        assert proc.logged("listening")[0]["zone"] == "example.internal"
        result = dig(proc.port, "svc1.testns.svc.example.internal", "A")
        assert result.status == "NOERROR" and "aa" in result.flags
        assert result.records() == [f"svc1.{zone} 5 IN A 10.0.0.1"]
        assert dig(proc.port, "_http._tcp.svc1.testns.svc.example.internal", "SRV").records() == [
            f"_http._tcp.svc1.{zone} 5 IN SRV 0 100 80 svc1.{zone}"]
        assert dig(proc.port, "-x", "10.0.0.1").records() == [f"1.0.0.10.in-addr.arpa. 5 IN PTR svc1.{zone}"]
        missing = dig(proc.port, "nope.testns.svc.example.internal", "A")
        assert missing.status == "NXDOMAIN"
        assert missing.records("authority")[0].startswith("example.internal. 5 IN SOA ns.dns.example.internal. ")
        # cluster.local is not ours now: with no upstream, REFUSED, as any name outside the zone
        other = dig(proc.port, "svc1.testns.svc.cluster.local", "A")
        assert other.status == "REFUSED" and other.records() == [] and "aa" not in other.flags
