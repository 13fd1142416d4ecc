"""Table tests for the cluster zone: a question in, the answer/authority/additional sections and rcode
out, as zone-file text. The cases follow CoreDNS's plugin/kubernetes handler tests (the fixture in
netplane.dns.testing) and the Kubernetes DNS spec 1.1.0. Queries go through wire.respond(), the
function the server runs, so encoding, case echo and truncation are covered too.
"""
from __future__ import annotations

import pytest
from dnslib import DNSRecord, RCODE

from netplane.dns import model, wire, zone
from netplane.dns.testing import SERIAL, fixture_objects, fixture_table, query, section_text, zone_lines

SOA = f"cluster.local. 5 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. {SERIAL} 7200 1800 86400 5"
REV_SOA = f"in-addr.arpa. 5 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. {SERIAL} 7200 1800 86400 5"
Z = "testns.svc.cluster.local."

# (qname, qtype, rcode, answer, authority, additional)
CASES = [
    # ClusterIP A / AAAA (spec 2.3.1); a Service with no endpoints still answers
    ("svc1.testns.svc.cluster.local.", "A", "NOERROR", f"svc1.{Z} 5 IN A 10.0.0.1", "", ""),
    ("svcempty.testns.svc.cluster.local.", "A", "NOERROR", f"svcempty.{Z} 5 IN A 10.0.0.2", "", ""),
    ("svc6.testns.svc.cluster.local.", "AAAA", "NOERROR", f"svc6.{Z} 5 IN AAAA 1234:abcd::1", "", ""),
    ("svc-dual-stack.testns.svc.cluster.local.", "A", "NOERROR", f"svc-dual-stack.{Z} 5 IN A 10.0.0.3", "", ""),
    ("svc-dual-stack.testns.svc.cluster.local.", "AAAA", "NOERROR", f"svc-dual-stack.{Z} 5 IN AAAA 10::3", "", ""),
    # NODATA: the name exists, the type does not
    ("svc1.testns.svc.cluster.local.", "AAAA", "NOERROR", "", SOA, ""),
    ("svc1.testns.svc.cluster.local.", "TXT", "NOERROR", "", SOA, ""),
    ("svc1.testns.svc.cluster.local.", "SOA", "NOERROR", "", SOA, ""),
    ("svc1.testns.svc.cluster.local.", "HINFO", "NOERROR", "", SOA, ""),
    # NXDOMAIN: unknown service, unknown namespace, not svc/pod, zero-port ClusterIP, TXT on nothing
    ("svc0.testns.svc.cluster.local.", "A", "NXDOMAIN", "", SOA, ""),
    ("svc1.nons.svc.cluster.local.", "A", "NXDOMAIN", "", SOA, ""),
    ("svc1.testns.foo.cluster.local.", "A", "NXDOMAIN", "", SOA, ""),
    ("noports.testns.svc.cluster.local.", "A", "NXDOMAIN", "", SOA, ""),
    ("nothing.testns.svc.cluster.local.", "TXT", "NXDOMAIN", "", SOA, ""),
    ("foo.cluster.local.", "NS", "NXDOMAIN", "", SOA, ""),
    ("foo.svc.cluster.local.", "NS", "NXDOMAIN", "", SOA, ""),
    ("10-0-0-1.testns.pod.cluster.local.", "A", "NXDOMAIN", "", SOA, ""),  # pods disabled
    # empty non-terminals answer NODATA
    ("svc.cluster.local.", "A", "NOERROR", "", SOA, ""),
    ("pod.cluster.local.", "A", "NOERROR", "", SOA, ""),
    ("testns.svc.cluster.local.", "A", "NOERROR", "", SOA, ""),
    ("emptyns.svc.cluster.local.", "A", "NOERROR", "", SOA, ""),  # a Namespace with no Services
    ("svc.cluster.local.", "NS", "NOERROR", "", SOA, ""),
    ("testns.svc.cluster.local.", "NS", "NOERROR", "", SOA, ""),
    # apex
    ("cluster.local.", "SOA", "NOERROR", SOA, "", ""),
    ("cluster.local.", "NS", "NOERROR", "cluster.local. 5 IN NS ns.dns.cluster.local.", "",
     "ns.dns.cluster.local. 5 IN A 10.0.0.10"),
    ("cluster.local.", "A", "NOERROR", "", SOA, ""),
    ("cluster.local.", "SRV", "NOERROR", "", SOA, ""),
    ("ns.dns.cluster.local.", "A", "NOERROR", "ns.dns.cluster.local. 5 IN A 10.0.0.10", "", ""),
    # schema version (spec 2.2)
    ("dns-version.cluster.local.", "TXT", "NOERROR", 'dns-version.cluster.local. 28800 IN TXT "1.1.0"', "", ""),
    ("dns-version.cluster.local.", "A", "NOERROR", "", SOA, ""),
    # ClusterIP SRV (spec 2.3.2): named ports only; the bare name gives all ports (CoreDNS)
    ("_http._tcp.svc1.testns.svc.cluster.local.", "SRV", "NOERROR",
     f"_http._tcp.svc1.{Z} 5 IN SRV 0 100 80 svc1.{Z}", "", f"svc1.{Z} 5 IN A 10.0.0.1"),
    ("svc1.testns.svc.cluster.local.", "SRV", "NOERROR",
     f"svc1.{Z} 5 IN SRV 0 100 80 svc1.{Z}", "", f"svc1.{Z} 5 IN A 10.0.0.1"),
    ("svcempty.testns.svc.cluster.local.", "SRV", "NOERROR",
     f"svcempty.{Z} 5 IN SRV 0 100 80 svcempty.{Z}", "", f"svcempty.{Z} 5 IN A 10.0.0.2"),
    ("_http._udp.svc1.testns.svc.cluster.local.", "SRV", "NXDOMAIN", "", SOA, ""),
    ("_tcp.svc1.testns.svc.cluster.local.", "SRV", "NOERROR", "", SOA, ""),  # empty non-terminal
    ("_dns._udp.kube-dns.kube-system.svc.cluster.local.", "SRV", "NOERROR",
     "_dns._udp.kube-dns.kube-system.svc.cluster.local. 5 IN SRV 0 100 53 kube-dns.kube-system.svc.cluster.local.",
     "", "kube-dns.kube-system.svc.cluster.local. 5 IN A 10.0.0.10"),
    # headless A/AAAA (spec 2.4.1): one per ready endpoint; the not-ready 172.0.0.9 is left out
    ("hdls1.testns.svc.cluster.local.", "A", "NOERROR", "\n".join(
        f"hdls1.{Z} 5 IN A 172.0.0.{i}" for i in (2, 3, 4, 5)), "", ""),
    ("hdls1.testns.svc.cluster.local.", "AAAA", "NOERROR",
     f"hdls1.{Z} 5 IN AAAA 5678:abcd::1\nhdls1.{Z} 5 IN AAAA 5678:abcd::2", "", ""),
    ("hdlsprtls.testns.svc.cluster.local.", "A", "NOERROR", f"hdlsprtls.{Z} 5 IN A 172.0.0.20", "", ""),
    # headless without ready endpoints: NXDOMAIN (spec 2.4.1)
    ("hdlsnone.testns.svc.cluster.local.", "A", "NXDOMAIN", "", SOA, ""),
    # per-endpoint names: hostname, else the dashed IP; a hostname with two IPs has two records
    ("dup-name.hdls1.testns.svc.cluster.local.", "A", "NOERROR",
     f"dup-name.hdls1.{Z} 5 IN A 172.0.0.4\ndup-name.hdls1.{Z} 5 IN A 172.0.0.5", "", ""),
    ("172-0-0-2.hdls1.testns.svc.cluster.local.", "A", "NOERROR", f"172-0-0-2.hdls1.{Z} 5 IN A 172.0.0.2", "", ""),
    ("5678-abcd--1.hdls1.testns.svc.cluster.local.", "AAAA", "NOERROR",
     f"5678-abcd--1.hdls1.{Z} 5 IN AAAA 5678:abcd::1", "", ""),
    ("172-0-0-20.hdlsprtls.testns.svc.cluster.local.", "A", "NOERROR",
     f"172-0-0-20.hdlsprtls.{Z} 5 IN A 172.0.0.20", "", ""),
    ("ep1a.svc1.testns.svc.cluster.local.", "A", "NOERROR", f"ep1a.svc1.{Z} 5 IN A 172.0.0.1", "", ""),
    ("172-0-0-9.hdls1.testns.svc.cluster.local.", "A", "NXDOMAIN", "", SOA, ""),  # not ready
    ("bogusendpoint.hdls1.testns.svc.cluster.local.", "A", "NXDOMAIN", "", SOA, ""),
    ("bogusendpoint.hdls0.testns.svc.cluster.local.", "A", "NXDOMAIN", "", SOA, ""),
    # headless SRV (spec 2.4.2): one per ready endpoint name x named port, endpoint (target) port
    ("_http._tcp.hdls1.testns.svc.cluster.local.", "SRV", "NOERROR", "\n".join(
        f"_http._tcp.hdls1.{Z} 5 IN SRV 0 20 8080 {host}.hdls1.{Z}"
        for host in ("172-0-0-2", "172-0-0-3", "dup-name", "5678-abcd--1", "5678-abcd--2")), "", "\n".join(
        [f"172-0-0-2.hdls1.{Z} 5 IN A 172.0.0.2", f"172-0-0-3.hdls1.{Z} 5 IN A 172.0.0.3",
         f"dup-name.hdls1.{Z} 5 IN A 172.0.0.4", f"dup-name.hdls1.{Z} 5 IN A 172.0.0.5",
         f"5678-abcd--1.hdls1.{Z} 5 IN AAAA 5678:abcd::1", f"5678-abcd--2.hdls1.{Z} 5 IN AAAA 5678:abcd::2"])),
    # PTR (spec 2.3.3, 2.4.3): Service IPs and endpoint IPs
    ("1.0.0.10.in-addr.arpa.", "PTR", "NOERROR", f"1.0.0.10.in-addr.arpa. 5 IN PTR svc1.{Z}", "", ""),
    ("1.0.0.172.in-addr.arpa.", "PTR", "NOERROR", f"1.0.0.172.in-addr.arpa. 5 IN PTR ep1a.svc1.{Z}", "", ""),
    ("4.0.0.172.in-addr.arpa.", "PTR", "NOERROR", f"4.0.0.172.in-addr.arpa. 5 IN PTR dup-name.hdls1.{Z}", "", ""),
    ("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.c.b.a.4.3.2.1.ip6.arpa.", "PTR", "NOERROR",
     f"1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.c.b.a.4.3.2.1.ip6.arpa. 5 IN PTR svc6.{Z}", "", ""),
    ("1.0.0.10.in-addr.arpa.", "A", "NOERROR", "", REV_SOA, ""),
    # ExternalName (spec 2.5): CNAME; in-cluster target followed in the zone; names below: NXDOMAIN
    ("external.testns.svc.cluster.local.", "CNAME", "NOERROR",
     f"external.{Z} 5 IN CNAME ext.interwebs.test.", "", ""),
    ("external-to-service.testns.svc.cluster.local.", "A", "NOERROR",
     f"external-to-service.{Z} 5 IN CNAME svc1.{Z}\nsvc1.{Z} 5 IN A 10.0.0.1", "", ""),
    ("endpoint.external.testns.svc.cluster.local.", "CNAME", "NXDOMAIN", "", SOA, ""),
    ("subdomain.subdomain.external.testns.svc.cluster.local.", "A", "NXDOMAIN", "", SOA, ""),
]


def ask(table: wire.Table, qname: str, qtype: str, **kw) -> DNSRecord:
    reply = wire.respond(table, query(qname, qtype, **kw), tcp=True)
    assert isinstance(reply, bytes), f"expected reply bytes, got {reply!r}"
    return DNSRecord.parse(reply)


@pytest.fixture(scope="module")
def table():
    return fixture_table()


@pytest.mark.parametrize("qname,qtype,rcode,answer,authority,additional", CASES,
                         ids=[f"{c[1]}-{c[0]}" for c in CASES])
def test_table(table, qname, qtype, rcode, answer, authority, additional):
    reply = ask(table, qname, qtype)
    assert RCODE[reply.header.rcode] == rcode
    assert reply.header.aa == 1 and reply.header.qr == 1
    assert sorted(section_text(reply.rr)) == sorted(zone_lines(answer))
    assert sorted(section_text(reply.auth)) == sorted(zone_lines(authority))
    assert sorted(section_text(reply.ar)) == sorted(zone_lines(additional))


def test_answers_repeat_identically_from_the_table_and_the_computed_cache(table):
    for qname, qtype in [("svc1.testns.svc.cluster.local.", "A"), ("x.testns.svc.cluster.local.", "A")]:
        first, second = ask(table, qname, qtype), ask(table, qname, qtype)
        assert first.pack() == second.pack()


def test_question_case_is_echoed_in_every_owner_name(table):
    reply = ask(table, "SvC1.TeStNs.SvC.cLuStEr.LoCaL.", "A")
    assert section_text(reply.rr) == ["SvC1.TeStNs.SvC.cLuStEr.LoCaL. 5 IN A 10.0.0.1"]
    reply = ask(table, "Cluster.local.", "SOA")
    assert str(reply.rr[0].rname) == "Cluster.local."
    reply = ask(table, "NoPe.TeStNs.SvC.cLuStEr.LoCaL.", "A")
    assert RCODE[reply.header.rcode] == "NXDOMAIN" and str(reply.auth[0].rname) == "cLuStEr.LoCaL."


def test_any_gives_every_record_set_and_zone_transfers_are_refused(table):
    reply = ask(table, "svc1.testns.svc.cluster.local.", "ANY")
    assert sorted(section_text(reply.rr)) == [f"svc1.{Z} 5 IN A 10.0.0.1", f"svc1.{Z} 5 IN SRV 0 100 80 svc1.{Z}"]
    assert RCODE[ask(table, "cluster.local.", "AXFR").header.rcode] == "REFUSED"
    assert RCODE[ask(table, "cluster.local.", "IXFR").header.rcode] == "REFUSED"


def test_cname_precedes_its_target(table):
    reply = ask(table, "external-to-service.testns.svc.cluster.local.", "A")
    assert [r.rtype for r in reply.rr] == [5, 1]


def test_reply_keeps_id_and_rd_flag(table):
    message = DNSRecord.question("svc1.testns.svc.cluster.local", "A")
    message.header.id, message.header.rd = 777, 0
    reply = DNSRecord.parse(wire.respond(table, bytes(message.pack())))
    assert reply.header.id == 777 and reply.header.rd == 0 and reply.header.ra == 1


def test_ttl_is_configurable():
    table = fixture_table(ttl=30)
    reply = ask(table, "svc1.testns.svc.cluster.local.", "A")
    assert reply.rr[0].ttl == 30
    reply = ask(table, "nope.testns.svc.cluster.local.", "A")
    assert reply.auth[0].ttl == 30 and str(reply.auth[0].rdata).endswith(" 30")


def test_unsynced_zone_gives_servfail_for_cluster_names_only():
    table = wire.Table(zone.unsynced_zone("cluster.local"))
    reply = ask(table, "svc1.testns.svc.cluster.local.", "A")
    assert RCODE[reply.header.rcode] == "SERVFAIL"
    assert isinstance(wire.respond(table, query("example.com", "A"), forwarding=True), wire.Forward)


def test_outside_names_are_refused_without_an_upstream_and_forwarded_with_one(table):
    reply = ask(table, "example.com.", "A")
    assert RCODE[reply.header.rcode] == "REFUSED" and not reply.rr
    assert isinstance(wire.respond(table, query("example.com", "A"), forwarding=True), wire.Forward)
    # unknown reverse names are not ours either (CoreDNS: fallthrough in-addr.arpa)
    assert isinstance(wire.respond(table, query("9.9.9.9.in-addr.arpa", "PTR"), forwarding=True), wire.Forward)


def test_externalname_outside_the_zone_is_chased_upstream_when_forwarding(table):
    request = wire.respond(table, query("external.testns.svc.cluster.local", "A"), forwarding=True)
    assert isinstance(request, wire.Chase) and request.target == "ext.interwebs.test"
    assert [r.text() for r in request.answer.answer] == [f"external.{Z} 5 IN CNAME ext.interwebs.test."]


def test_custom_zone_name():
    views = model.from_objects(fixture_objects())
    table = wire.Table(zone.build_zone(views, "example.internal", 5, SERIAL))
    reply = ask(table, "svc1.testns.svc.example.internal.", "A")
    assert section_text(reply.rr) == ["svc1.testns.svc.example.internal. 5 IN A 10.0.0.1"]
    assert RCODE[ask(table, "svc1.testns.svc.cluster.local.", "A").header.rcode] == "REFUSED"


def test_publish_not_ready_addresses_includes_unready_endpoints():
    objects = fixture_objects()
    for obj in objects:
        if obj["kind"] == "Service" and obj["metadata"]["name"] == "hdlsnone":
            obj["spec"]["publishNotReadyAddresses"] = True
    reply = ask(fixture_table(objects), "hdlsnone.testns.svc.cluster.local.", "A")
    assert section_text(reply.rr) == [f"hdlsnone.{Z} 5 IN A 172.0.0.30"]


def test_bad_objects_are_skipped_with_a_reason():
    objects = fixture_objects() + [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bad", "namespace": "testns"},
         "spec": {"clusterIP": "not-an-ip", "ports": [{"port": 80}]}}]
    objects += [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "list", "namespace": "testns"}, "spec": ["x"]},
        {"apiVersion": "v1", "kind": "Service", "metadata": "oops"},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "svc1-bad", "namespace": "testns", "labels": {"kubernetes.io/service-name": "svc1"}},
         "endpoints": [{"addresses": ["10.0.0.300"]}]},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "svc1-worse", "namespace": "testns", "labels": {"kubernetes.io/service-name": "svc1"}},
         "endpoints": "nope"}]
    views = model.from_objects(objects)
    assert any("Service testns/bad" in why and "clusterIPs" in why for why in views.skipped)
    assert any("Service testns/list" in why and "wrong type" in why for why in views.skipped)
    assert any("metadata is not a mapping" in why for why in views.skipped)
    assert any("EndpointSlice testns/svc1-bad" in why and "endpoints[0].addresses" in why for why in views.skipped)
    assert any("EndpointSlice testns/svc1-worse" in why for why in views.skipped)
    table = wire.Table(zone.build_zone(views, "cluster.local", 5, SERIAL))
    assert RCODE[ask(table, "svc1.testns.svc.cluster.local.", "A").header.rcode] == "NOERROR"


POD_CASES = [
    ("10-240-0-1.podns.pod.cluster.local.", "A", "NOERROR",
     "10-240-0-1.podns.pod.cluster.local. 5 IN A 10.240.0.1", ""),
    ("1234-abcd--1.podns.pod.cluster.local.", "AAAA", "NOERROR",
     "1234-abcd--1.podns.pod.cluster.local. 5 IN AAAA 1234:abcd::1", ""),
    ("10-240-0-1.podns.pod.cluster.local.", "AAAA", "NOERROR", "", SOA),
    ("blah.podns.pod.cluster.local.", "A", "NXDOMAIN", "", SOA),
    ("podns.pod.cluster.local.", "A", "NOERROR", "", SOA),
    ("x.10-240-0-1.podns.pod.cluster.local.", "A", "NXDOMAIN", "", SOA),
]


@pytest.mark.parametrize("qname,qtype,rcode,answer,authority", POD_CASES, ids=[c[0] for c in POD_CASES])
def test_pods_insecure(qname, qtype, rcode, answer, authority):
    views = model.from_objects(fixture_objects())
    table = wire.Table(zone.build_zone(views, "cluster.local", 5, SERIAL, pods="insecure"))
    reply = ask(table, qname, qtype)
    assert RCODE[reply.header.rcode] == rcode
    assert section_text(reply.rr) == zone_lines(answer)
    assert section_text(reply.auth) == zone_lines(authority)


def test_rebuilt_table_keeps_unchanged_answers_and_drops_changed_ones():
    objects = fixture_objects()
    old = fixture_table(objects)
    for name in ("svc1", "svcempty", "nope"):
        ask(old, f"{name}.testns.svc.cluster.local.", "A")
    key = wire.encode_name
    kept = {n: old.find(key(f"{n}.testns.svc.cluster.local"), 1) for n in ("svc1", "svcempty", "nope")}
    for obj in objects:
        if obj["kind"] == "Service" and obj["metadata"]["name"] == "svcempty":
            obj["spec"]["clusterIP"] = "10.0.0.99"
    views = model.from_objects(objects)
    new = wire.Table(zone.build_zone(views, "cluster.local", 5, SERIAL), previous=old)
    assert new.find(key("svc1.testns.svc.cluster.local"), 1) is kept["svc1"]
    assert new.find(key("nope.testns.svc.cluster.local"), 1) is kept["nope"]  # still NXDOMAIN
    assert new.find(key("svcempty.testns.svc.cluster.local"), 1) is None  # changed: encoded anew
    assert section_text(ask(new, "svcempty.testns.svc.cluster.local.", "A").rr) == [
        f"svcempty.{Z} 5 IN A 10.0.0.99"]
