"""The proxy's pure core: model conversion, endpoint choice, partial syncs, conntrack choice,
and the reconcile loop against a fake backend."""
from __future__ import annotations

import asyncio

import pytest

from netplane.proxy import conntrack, iptables, nft
from netplane.proxy.model import NodeFacts, build_model, choose_endpoints
from netplane.proxy.proxier import Proxier

NODE = NodeFacts(name="worker-1", node_ips=("192.168.56.11",), cluster_cidrs=("10.244.0.0/16",))


def service(name="web", ns="default", ports=None, **spec):
    spec.setdefault("clusterIP", "10.96.0.50")
    spec["ports"] = ports if ports is not None else [{"name": "http", "port": 80, "protocol": "TCP"}]
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": spec}


def endpoint_slice(service_name="web", ns="default", endpoints=(), ports=None, name=None, address_type="IPv4"):
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": address_type,
        "metadata": {"name": name or f"{service_name}-1", "namespace": ns,
                     "labels": {"kubernetes.io/service-name": service_name}},
        "endpoints": list(endpoints),
        "ports": ports if ports is not None else [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def ep(ip, node="worker-2", **conditions):
    return {"addresses": [ip], "nodeName": node, "conditions": conditions}


# --- model -----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,field", [
    ({"ports": []}, "spec.ports"),
    ({"ports": [{"port": "80"}]}, "spec.ports[0].port"),
    ({"ports": [{"port": 70000}]}, "spec.ports[0].port"),
    ({"ports": [{"port": 80, "protocol": "ICMP"}]}, "spec.ports[0].protocol"),
    ({"clusterIP": "10.96.0.300"}, "spec.clusterIP"),
    ({"externalIPs": ["nope"]}, "spec.externalIPs[0]"),
    ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}},
     "spec.sessionAffinityConfig.clientIP.timeoutSeconds"),
])
def test_bad_service_is_skipped_with_an_error_naming_the_field(spec, field):
    svc = service(name="bad", **({"ports": [{"port": 80}]} | spec))
    model = build_model([svc, service(name="good", clusterIP="10.96.0.51")], [], NODE)
    assert [p.name for p in model.ports] == ["good"]
    assert len(model.errors) == 1 and f"Service default/bad: field {field}" in model.errors[0]


def test_bad_endpoint_slice_is_reported_and_others_still_used():
    bad = endpoint_slice(name="web-bad", endpoints=[{"addresses": ["not-an-ip"]}])
    good = endpoint_slice(endpoints=[ep("10.244.1.5")])
    model = build_model([service()], [bad, good], NODE)
    assert [e.ip for e in model.ports[0].endpoints] == ["10.244.1.5"]
    assert "EndpointSlice default/web-bad: field endpoints[0].addresses[0]" in model.errors[0]


def test_skipped_services():
    svcs = [service(name="headless", clusterIP="None"), service(name="ext", type="ExternalName"),
            {**service(name="other-proxy"), "metadata": {"name": "other-proxy", "namespace": "default",
             "labels": {"service.kubernetes.io/service-proxy-name": "foo"}}}]
    model = build_model(svcs, [], NODE)
    assert model.ports == () and model.errors == ()


def test_endpoints_matched_by_port_name_and_protocol_across_slices():
    svc = service(ports=[{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}])
    slices = [endpoint_slice(name="a", endpoints=[ep("10.244.1.5")],
                             ports=[{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}]),
              endpoint_slice(name="b", endpoints=[ep("10.244.2.5")], ports=[{"name": "http", "port": 8080}]),
              endpoint_slice(service_name="other", endpoints=[ep("10.244.3.5")])]
    ports = {p.port_name: p for p in build_model([svc], slices, NODE).ports}
    assert [(e.ip, e.port) for e in ports["http"].endpoints] == [("10.244.1.5", 8080), ("10.244.2.5", 8080)]
    assert [(e.ip, e.port) for e in ports["dns"].endpoints] == [("10.244.1.5", 5353)]


def test_ready_then_serving_terminating_fallback():
    slices = [endpoint_slice(endpoints=[
        ep("10.244.1.1", ready=False, serving=True, terminating=True),
        ep("10.244.1.2", ready=False, serving=False, terminating=True),
        ep("10.244.1.3", ready=False)])]
    port = build_model([service()], slices, NODE).ports[0]
    assert [e.ip for e in choose_endpoints(port, "worker-1").cluster] == ["10.244.1.1"]
    slices[0]["endpoints"].append(ep("10.244.1.4"))
    port = build_model([service()], slices, NODE).ports[0]
    assert [e.ip for e in choose_endpoints(port, "worker-1").cluster] == ["10.244.1.4"]


def test_local_endpoints_for_traffic_policy_local():
    slices = [endpoint_slice(endpoints=[ep("10.244.1.1", node="worker-1"), ep("10.244.2.1", node="worker-2")])]
    port = build_model([service(internalTrafficPolicy="Local")], slices, NODE).ports[0]
    choice = choose_endpoints(port, "worker-1")
    assert [e.ip for e in choice.local] == ["10.244.1.1"] and choice.cluster == ()
    assert choose_endpoints(port, "worker-3").local == () and choose_endpoints(port, "worker-3").has_any


def test_dual_stack_gives_one_port_per_family():
    node = NodeFacts("worker-1", cluster_cidrs=("10.244.0.0/16", "fd00:10:244::/56"))
    svc = service(clusterIPs=["10.96.0.50", "fd00:10:96::50"])
    slices = [endpoint_slice(endpoints=[ep("10.244.1.1")]),
              endpoint_slice(name="web-v6", address_type="IPv6", endpoints=[ep("fd00:10:244:1::1")])]
    ports = build_model([svc], slices, node).ports
    assert [(p.family, p.cluster_ip, [e.ip for e in p.endpoints]) for p in ports] == [
        (4, "10.96.0.50", ["10.244.1.1"]), (6, "fd00:10:96::50", ["fd00:10:244:1::1"])]


# --- nftables partial syncs ----------------------------------------------------------------

def tables(services, slices, node=NODE):
    return nft.render_tables(build_model(services, slices, node))


def test_nft_delta_touches_only_the_changed_service():
    svcs = [service(), service(name="api", clusterIP="10.96.0.60")]
    two = [ep("10.244.1.8"), ep("10.244.1.9")]
    before = tables(svcs, [endpoint_slice(endpoints=[ep("10.244.1.1")]), endpoint_slice("api", endpoints=two)])
    after = tables(svcs, [endpoint_slice(endpoints=[ep("10.244.1.1"), ep("10.244.1.2")]),
                          endpoint_slice("api", endpoints=two)])
    lines = nft.delta_transaction(before[0], after[0]).splitlines()
    assert not any("api" in line or "10.96.0.60" in line for line in lines)
    assert any(line.startswith("flush chain ip netplane service-") and "default/web/tcp/http" in line for line in lines)
    assert any(line.endswith(" goto pick-endpoint-2") for line in lines)  # api's picker, re-used
    assert "add element ip netplane service-endpoints { 10.96.0.50 . tcp . 80 . 1 : 10.244.1.2 . 8080 }" in lines
    assert not any("hairpin-endpoints" in line for line in lines)  # 10.244.1.2 is not on this node
    # the picker for one endpoint is no longer used: removed after the chain that used it changed
    assert lines[-2:] == ["flush chain ip netplane pick-endpoint-1", "delete chain ip netplane pick-endpoint-1"]
    assert nft.delta_transaction(after[0], after[0]) == ""


def test_nft_delta_with_a_new_endpoint_count_recreates_the_table():
    # nft 1.0.6 cannot add a rule using the typeof endpoint maps outside their own transaction
    before = tables([service()], [endpoint_slice(endpoints=[ep("10.244.1.1")])])
    after = tables([service()], [endpoint_slice(endpoints=[ep("10.244.1.1"), ep("10.244.1.2")])])
    assert nft.delta_transaction(before[0], after[0]) is None


def test_nft_delta_keeps_elements_shared_with_unchanged_services():
    local = [ep("10.244.1.1", node="worker-1")]
    svcs = [service(), service(name="api", clusterIP="10.96.0.60")]
    before = tables(svcs, [endpoint_slice(endpoints=local), endpoint_slice("api", endpoints=local)])
    after = tables(svcs[1:], [endpoint_slice("api", endpoints=local)])
    lines = nft.delta_transaction(before[0], after[0]).splitlines()
    assert not any("hairpin-endpoints" in line for line in lines)  # the pod still backs "api"
    assert "delete element ip netplane service-endpoints { 10.96.0.50 . tcp . 80 . 0 }" in lines
    gone = tables([], [])
    lines = nft.delta_transaction(after[0], gone[0]).splitlines()
    assert "delete element ip netplane hairpin-endpoints { 10.244.1.1 . 10.244.1.1 }" in lines


def test_nft_delta_removes_a_deleted_service_after_its_map_elements():
    before = tables([service()], [endpoint_slice(endpoints=[ep("10.244.1.1")])])
    after = tables([], [])
    lines = nft.delta_transaction(before[0], after[0]).splitlines()
    first_chain_delete = next(i for i, l in enumerate(lines) if l.startswith("delete chain"))
    assert all(i < first_chain_delete for i, l in enumerate(lines) if l.startswith("delete element"))
    assert "delete element ip netplane service-ips { 10.96.0.50 . tcp . 80 }" in lines
    assert [l.split()[-1] for l in lines if l.startswith("delete chain")] == [
        next(l.split()[-1] for l in lines if l.startswith("flush chain ip netplane service-")), "pick-endpoint-1"]


def test_nft_partial_syncs_reuse_unchanged_blocks():
    builder = nft.TableBuilder()
    model = build_model([service()], [endpoint_slice(endpoints=[ep("10.244.1.1")])], NODE)
    first = builder.render(model, 4)
    again = builder.render(model, 4)
    assert next(iter(first.services.values())) is next(iter(again.services.values()))


def test_nft_delta_falls_back_to_full_when_node_facts_change():
    before = tables([service()], [])
    after = tables([service()], [], NodeFacts("worker-1", node_ips=("192.168.56.12",)))
    assert nft.delta_transaction(before[0], after[0]) is None


# --- iptables partial syncs ----------------------------------------------------------------

def test_iptables_statistic_probabilities():
    slices = [endpoint_slice(endpoints=[ep(f"10.244.1.{i}") for i in range(1, 5)])]
    rs = iptables.render_ruleset(build_model([service()], slices, NODE), 4)
    svc_rules = rs.tables["nat"][next(c for c in rs.tables["nat"] if c.startswith("NP-SVC-"))]
    probabilities = [r.split("--probability ")[1].split()[0] if "--probability" in r else None
                     for r in svc_rules if "NP-SEP-" in r]
    assert probabilities == ["0.2500000000", "0.3333333333", "0.5000000000", None]


def test_iptables_delta_rewrites_top_chains_and_changed_service_chains_only():
    svcs = [service(), service(name="api", clusterIP="10.96.0.60")]
    model1 = build_model(svcs, [endpoint_slice(endpoints=[ep("10.244.1.1")]),
                                endpoint_slice("api", endpoints=[ep("10.244.1.9")])], NODE)
    model2 = build_model(svcs, [endpoint_slice(endpoints=[ep("10.244.1.2")]),
                                endpoint_slice("api", endpoints=[ep("10.244.1.9")])], NODE)
    text = iptables.delta_restore_text(iptables.render_ruleset(model1, 4), iptables.render_ruleset(model2, 4))
    api_chains = [c for c in iptables.render_ruleset(model1, 4).tables["nat"] if iptables.is_service_chain(c)
                  and "default/api" in " ".join(iptables.render_ruleset(model1, 4).tables["nat"][c])]
    assert api_chains and not any(f":{c} " in text or f"-A {c} " in text for c in api_chains)
    assert ":NP-SERVICES - [0:0]" in text and "10.244.1.2:8080" in text
    assert any(line.startswith("-X NP-SEP-") for line in text.splitlines())


def test_iptables_cleanup_text_deletes_jumps_and_chains():
    saved = "\n".join(["*nat", ":PREROUTING ACCEPT [0:0]", ":NP-SERVICES - [0:0]", ":OTHER - [0:0]",
                       '-A PREROUTING -m comment --comment "netplane service portals" -j NP-SERVICES',
                       "-A PREROUTING -j OTHER", "COMMIT"])
    text = iptables.cleanup_text(saved)
    assert '-D PREROUTING -m comment --comment "netplane service portals" -j NP-SERVICES' in text
    assert "-X NP-SERVICES" in text and "OTHER" not in text


# --- conntrack -------------------------------------------------------------------------------

LISTING = """\
udp      17 29 src=10.244.1.20 dst=10.96.0.10 sport=40000 dport=53 src=10.244.2.7 dst=10.244.1.20 sport=53 dport=40000 mark=0 use=1
udp      17 29 src=10.244.1.21 dst=10.96.0.10 sport=40001 dport=53 src=10.244.1.5 dst=10.244.1.21 sport=53 dport=40001 mark=0 use=1
udp      17 29 src=10.244.1.22 dst=10.96.0.10 sport=40002 dport=53 src=10.96.0.10 dst=10.244.1.22 sport=53 dport=40002 mark=0 use=1
udp      17 29 src=192.168.56.1 dst=192.168.56.11 sport=40003 dport=30053 src=10.244.2.7 dst=192.168.56.11 sport=53 dport=40003 mark=0 use=1
udp      17 29 src=10.244.1.23 dst=10.96.0.99 sport=40004 dport=53 src=10.244.9.9 dst=10.244.1.23 sport=53 dport=40004 mark=0 use=1
"""


def test_stale_udp_flows_are_those_to_endpoints_no_longer_serving():
    svc = service(name="dns", clusterIP="10.96.0.10", type="NodePort",
                  ports=[{"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}])
    slices = [endpoint_slice("dns", endpoints=[ep("10.244.1.5")], ports=[{"name": "dns", "port": 53, "protocol": "UDP"}])]
    stale = conntrack.stale_flows(build_model([svc], slices, NODE), conntrack.parse_flows(LISTING))
    # to the gone endpoint 10.244.2.7 (ClusterIP and NodePort), and the one never DNATed; the live
    # endpoint's flow and flows to other addresses stay
    assert sorted(f.orig_sport for f in stale) == [40000, 40002, 40003]


# --- the reconcile loop ----------------------------------------------------------------------

class FakeView:
    def __init__(self, objs):
        self.objs = objs

    def list(self, kind):
        return [o for o in self.objs if o["kind"] == kind]


class FakeBackend:
    namespace = None

    def __init__(self):
        self.models, self.fail = [], False

    def sync(self, model, force_full=False):
        if self.fail:
            raise RuntimeError("nft: boom")
        self.models.append(model)
        from netplane.proxy.apply import SyncResult
        return SyncResult(True, len(model.ports), 1, 1, 1)


def test_proxier_keeps_pending_change_on_failure_and_reports_unhealthy():
    now = [100.0]
    backend = FakeBackend()
    view = FakeView([service(), service(name="bad", ports=[])])
    proxier = Proxier(view, NODE, backend, clean_conntrack=False, clock=lambda: now[0])
    assert proxier.healthy() == (False, "not synced yet")
    proxier.on_change()
    asyncio.run(proxier.sync())
    assert proxier.healthy() == (True, "ok") and len(backend.models[0].ports) == 1
    assert any("Service default/bad" in e for e in proxier.reported_errors)
    backend.fail = True
    proxier.on_change()
    with pytest.raises(RuntimeError):
        asyncio.run(proxier.sync())
    now[0] += 60
    healthy, why = proxier.healthy()
    assert not healthy and "waited 60s" in why
    backend.fail = False
    asyncio.run(proxier.sync())
    assert proxier.healthy() == (True, "ok")


# --- health checks ---------------------------------------------------------------------------

def test_health_checks_count_ready_local_endpoints_of_local_policy_services():
    from netplane.proxy.model import HealthCheck, health_checks
    from netplane.proxy.proxier import health_answer
    svc = service(type="NodePort", externalTrafficPolicy="Local", healthCheckNodePort=32000,
                  ports=[{"name": "http", "port": 80, "nodePort": 30080},
                         {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}])
    cluster = service(name="cluster", clusterIP="10.96.0.51", type="NodePort", healthCheckNodePort=32001,
                      ports=[{"name": "http", "port": 80, "nodePort": 30081}])
    slices = [endpoint_slice(endpoints=[ep("10.244.1.1", node="worker-1"), ep("10.244.2.1", node="worker-2"),
                                        ep("10.244.1.2", node="worker-1", ready=False, serving=True,
                                           terminating=True)],
                             ports=[{"name": "http", "port": 8080}, {"name": "dns", "port": 53, "protocol": "UDP"}])]
    checks = health_checks(build_model([svc, cluster], slices, NODE))
    assert checks == {32000: HealthCheck("default", "web", 1)}  # the terminating one does not count
    status, body, headers = health_answer(checks[32000], proxy_healthy=True)
    assert status == 200 and headers["X-Load-Balancing-Endpoint-Weight"] == "1"
    assert '"localEndpoints": 1' in body and '"name": "web"' in body
    assert health_answer(HealthCheck("default", "web", 0), True)[0] == 503
    assert health_answer(HealthCheck("default", "web", 2), False)[0] == 503
