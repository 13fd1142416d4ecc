"""ClusterIP and NodePort allocation: ranges, reservations, user-given values, clashes, release."""
from __future__ import annotations

import ipaddress

import pytest

from netplane.allocators import (AllocationError, Allocators, ClusterIPAllocator, NodePortAllocator,
                                 RangeAllocator, held_by)


def service(name="svc", svc_type="ClusterIP", cluster_ip=None, ports=None):
    spec = {"type": svc_type, "ports": ports if ports is not None else [{"port": 80, "protocol": "TCP"}]}
    if cluster_ip is not None:
        spec["clusterIP"] = cluster_ip
    return {"kind": "Service", "metadata": {"name": name, "namespace": "default"}, "spec": spec}


def test_automatic_cluster_ips_are_in_range_and_never_reserved_network_or_dot_zero():
    ips = ClusterIPAllocator()
    taken = [ips.allocate() for _ in range(600)]
    network = ipaddress.ip_network("10.96.0.0/12")
    assert len(set(taken)) == 600
    for ip in taken:
        address = ipaddress.ip_address(ip)
        assert address in network
        assert ip not in ("10.96.0.0", "10.96.0.1", "10.96.0.10")
        assert not ip.endswith((".0", ".255"))
    assert taken[0] == "10.96.1.1"  # above the 256-address band kept for user-chosen IPs


def test_reserved_ips_are_given_only_when_asked_for():
    ips = ClusterIPAllocator()
    assert ips.allocate_specific("10.96.0.1") == "10.96.0.1"
    assert ips.allocate_specific("10.96.0.10") == "10.96.0.10"
    with pytest.raises(AllocationError) as err:
        ips.allocate_specific("10.96.0.10")
    assert err.value.field == "spec.clusterIP"
    assert "already allocated" in str(err.value)


def test_an_ip_outside_the_range_names_the_range():
    with pytest.raises(AllocationError, match="10.96.0.0/12"):
        ClusterIPAllocator().allocate_specific("192.168.1.1")
    with pytest.raises(AllocationError, match="valid IP"):
        ClusterIPAllocator().allocate_specific("not-an-ip")


def test_a_released_value_is_not_handed_out_again_at_once():
    ips = ClusterIPAllocator()
    first = ips.allocate()
    ips.release(first)
    assert ips.allocate() != first
    assert first not in ips.in_use()


def test_range_allocator_falls_back_to_the_static_band_when_the_rest_is_full():
    small = RangeAllocator(1, 4, band=2)
    assert [small.allocate() for _ in range(4)] == [3, 4, 1, 2]
    assert small.allocate() is None


def test_node_ports_are_in_range_user_ports_honoured_and_clashes_named():
    ports = NodePortAllocator()
    auto = ports.allocate()
    assert 30000 <= auto <= 32767
    assert ports.allocate_specific(30080, "spec.ports[0].nodePort") == 30080
    with pytest.raises(AllocationError) as err:
        ports.allocate_specific(30080, "spec.ports[1].nodePort")
    assert err.value.field == "spec.ports[1].nodePort"
    with pytest.raises(AllocationError, match="30000-32767"):
        ports.allocate_specific(80, "spec.ports[0].nodePort")


def test_assign_gives_clusterip_and_node_ports_and_nothing_to_headless_or_external_name():
    alloc = Allocators()
    nodeport = alloc.assign(service(svc_type="NodePort", ports=[{"port": 80}, {"port": 443, "nodePort": 30443}]))
    assert nodeport["spec"]["clusterIP"].startswith("10.9")
    assert nodeport["spec"]["clusterIPs"] == [nodeport["spec"]["clusterIP"]]
    assert 30000 <= nodeport["spec"]["ports"][0]["nodePort"] <= 32767
    assert nodeport["spec"]["ports"][1]["nodePort"] == 30443
    headless = alloc.assign(service(cluster_ip="None"))
    assert headless["spec"]["clusterIP"] == "None"
    external = alloc.assign({"kind": "Service", "metadata": {"name": "x"},
                             "spec": {"type": "ExternalName", "externalName": "example.com"}})
    assert "clusterIP" not in external["spec"]
    plain = alloc.assign(service(ports=[{"port": 80, "nodePort": 30111}]))
    assert "nodePort" not in plain["spec"]["ports"][0]  # only NodePort/LoadBalancer keep node ports


def test_ip_families_are_defaulted_single_stack_and_the_other_family_is_refused():
    alloc = Allocators()
    spec = alloc.assign(service())["spec"]
    assert (spec["ipFamilyPolicy"], spec["ipFamilies"]) == ("SingleStack", ["IPv4"])
    preferred = alloc.assign({**service("p"), "spec": {**service()["spec"], "ipFamilyPolicy": "PreferDualStack"}})
    assert (preferred["spec"]["ipFamilyPolicy"], preferred["spec"]["ipFamilies"]) == ("PreferDualStack", ["IPv4"])
    assert alloc.assign(service("h", cluster_ip="None"))["spec"]["ipFamilies"] == ["IPv4"]
    external = alloc.assign({"kind": "Service", "metadata": {"name": "x"},
                             "spec": {"type": "ExternalName", "externalName": "example.com"}})
    assert "ipFamilies" not in external["spec"] and "ipFamilyPolicy" not in external["spec"]
    for extra, field, message in [({"ipFamilyPolicy": "RequireDualStack"}, "spec.ipFamilyPolicy",
                                    "this cluster is not configured for dual-stack services"),
                                   ({"ipFamilies": ["IPv6"]}, "spec.ipFamilies[0]", "not configured on this cluster"),
                                   ({"ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "PreferDualStack"},
                                    "spec.ipFamilies[1]", "not configured on this cluster")]:
        with pytest.raises(AllocationError) as err:
            alloc.assign({**service("bad"), "spec": {**service()["spec"], **extra}})
        assert (err.value.field, err.value.message) == (field, message)
    v6 = Allocators(ClusterIPAllocator("fd00:10:96::/112")).assign(service())["spec"]
    assert v6["ipFamilies"] == ["IPv6"] and ":" in v6["clusterIP"]


def test_a_failed_assign_leaves_nothing_allocated():
    alloc = Allocators()
    alloc.assign(service("a", svc_type="NodePort", ports=[{"port": 80, "nodePort": 30001}]))
    before = (alloc.cluster_ips.in_use(), alloc.node_ports.in_use())
    with pytest.raises(AllocationError) as err:
        alloc.assign(service("b", svc_type="NodePort", ports=[{"port": 80, "name": "a"},
                                                               {"port": 81, "name": "b", "nodePort": 30001}]))
    assert err.value.field == "spec.ports[1].nodePort"
    assert (alloc.cluster_ips.in_use(), alloc.node_ports.in_use()) == before


def test_update_keeps_what_the_old_version_holds_and_releases_what_it_dropped():
    alloc = Allocators()
    old = alloc.assign(service(svc_type="NodePort"))
    old_port = old["spec"]["ports"][0]["nodePort"]
    # the same manifest again (no clusterIP, no nodePort): keeps both
    again = alloc.assign(service(svc_type="NodePort"), old)
    assert again["spec"]["clusterIP"] == old["spec"]["clusterIP"]
    assert again["spec"]["ports"][0]["nodePort"] == old_port
    alloc.commit_release(old, again)
    assert old_port in alloc.node_ports.in_use()
    # switching to ClusterIP gives the node port back
    plain = alloc.assign(service(), again)
    alloc.commit_release(again, plain)
    assert old_port not in alloc.node_ports.in_use()
    assert plain["spec"]["clusterIP"] in alloc.cluster_ips.in_use()
    alloc.release(plain)
    assert alloc.cluster_ips.in_use() == set()


def test_rebuild_marks_stored_services_and_reports_clashes():
    alloc = Allocators()
    stored = [service("a", svc_type="NodePort", cluster_ip="10.96.0.10",
                      ports=[{"port": 53, "nodePort": 30053}]),
              service("b", cluster_ip="10.96.0.10")]
    problems = alloc.rebuild(stored)
    assert len(problems) == 1 and "10.96.0.10" in problems[0]
    assert alloc.cluster_ips.in_use() == {"10.96.0.10"}
    assert alloc.node_ports.in_use() == {30053}
    assert held_by(stored[0]) == ({"10.96.0.10"}, {30053})
