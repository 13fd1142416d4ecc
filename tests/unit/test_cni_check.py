"""CHECK's comparison (check.compare_pod): prevResult against the pod's link and its routes as
`ip -j route show table all` prints them. Pure: no namespace, no root."""
from __future__ import annotations

import copy

import pytest

from netplane.cni import check, ipnet
from netplane.cni.link import LinkState

MAC = "ae:cd:52:63:ed:a7"
PREV = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "cni0", "mac": "ea:fb:e7:7c:bd:d0"}, {"name": "np-9d48f381831a", "mac": "96:1a:64:c4:db:be"},
                   {"name": "eth0", "mac": MAC, "sandbox": "/run/netns/np-cp-6343c5"}],
    "ips": [{"address": "10.244.1.2/24", "gateway": "10.244.1.1", "interface": 2},
            {"address": "fd00:10:244:1::2/64", "gateway": "fd00:10:244:1::1", "interface": 2}],
    "routes": [{"dst": "10.96.0.0/12", "gw": "10.244.1.1"}, {"dst": "0.0.0.0/0", "gw": "10.244.1.1"},
               {"dst": "::/0", "gw": "fd00:10:244:1::1"}],
    "dns": {},
}
# What `ip -j route show table all root 0.0.0.0/0` (and root ::/0) print in such a pod.
ROUTES = [
    {"dst": "default", "gateway": "10.244.1.1", "dev": "eth0", "flags": []},
    {"dst": "10.96.0.0/12", "gateway": "10.244.1.1", "dev": "eth0", "flags": []},
    {"dst": "10.244.1.0/24", "dev": "eth0", "protocol": "kernel", "scope": "link", "prefsrc": "10.244.1.2",
     "flags": []},
    {"type": "local", "dst": "10.244.1.2", "dev": "eth0", "table": "local", "protocol": "kernel",
     "scope": "host", "prefsrc": "10.244.1.2", "flags": []},
    {"dst": "fd00:10:244:1::/64", "dev": "eth0", "protocol": "kernel", "metric": 256, "flags": [], "pref": "medium"},
    {"dst": "default", "gateway": "fd00:10:244:1::1", "dev": "eth0", "metric": 1024, "flags": [], "pref": "medium"},
]


def pod_link(**changes) -> LinkState:
    fields = dict(name="eth0", kind="veth", mac=MAC, up=True, promisc=False, mtu=1500, master="",
                  addresses=(ipnet.ip_interface("10.244.1.2/24"), ipnet.ip_interface("fd00:10:244:1::2/64"),
                             ipnet.ip_interface("fe80::1/64")))
    fields.update(changes)
    return LinkState(**fields)


def without(routes: list, dst: str, gateway: str | None = None) -> list:
    left = [r for r in routes if not (r["dst"] == dst and (gateway is None or r.get("gateway") == gateway))]
    assert len(left) < len(routes), f"no route {dst} to remove"
    return left


def test_matching_state_has_no_problems():
    assert check.compare_pod(PREV, "eth0", pod_link(), ROUTES) == []


def test_mac_is_compared_without_case():
    assert check.compare_pod(PREV, "eth0", pod_link(mac=MAC.upper()), ROUTES) == []


def test_wrong_mac():
    assert check.compare_pod(PREV, "eth0", pod_link(mac="02:00:00:00:00:01"), ROUTES) == [
        f"eth0 has MAC 02:00:00:00:00:01, prevResult says {MAC}"]


def test_link_down():
    assert check.compare_pod(PREV, "eth0", pod_link(up=False), ROUTES) == ["eth0 is down"]


def test_missing_route():
    assert check.compare_pod(PREV, "eth0", pod_link(), without(ROUTES, "10.96.0.0/12")) == [
        "route 10.96.0.0/12 via 10.244.1.1 is missing"]


def test_missing_default_routes_of_each_family():
    routes = without(without(ROUTES, "default", "10.244.1.1"), "default", "fd00:10:244:1::1")
    assert check.compare_pod(PREV, "eth0", pod_link(), routes) == [
        "route 0.0.0.0/0 via 10.244.1.1 is missing", "route ::/0 via fd00:10:244:1::1 is missing"]


def test_route_via_another_gateway_does_not_count():
    routes = [dict(r, gateway="10.244.1.254") if r["dst"] == "10.96.0.0/12" else r for r in ROUTES]
    assert check.compare_pod(PREV, "eth0", pod_link(), routes) == ["route 10.96.0.0/12 via 10.244.1.1 is missing"]


def test_route_only_in_another_table_does_not_count():
    routes = [dict(r, table="100") if r["dst"] == "10.96.0.0/12" else r for r in ROUTES]
    assert check.compare_pod(PREV, "eth0", pod_link(), routes) == ["route 10.96.0.0/12 via 10.244.1.1 is missing"]


def test_on_link_route():
    prev = copy.deepcopy(PREV)
    prev["routes"].append({"dst": "192.168.5.0/24"})
    assert check.compare_pod(prev, "eth0", pod_link(), ROUTES) == ["route 192.168.5.0/24 via (on-link) is missing"]
    routes = ROUTES + [{"dst": "192.168.5.0/24", "dev": "eth0", "scope": "link", "flags": []}]
    assert check.compare_pod(prev, "eth0", pod_link(), routes) == []


def test_missing_address():
    link = pod_link(addresses=(ipnet.ip_interface("10.244.1.2/24"),))
    assert check.compare_pod(PREV, "eth0", link, ROUTES) == ["eth0 lacks address fd00:10:244:1::2/64"]
    # Same address with another prefix length is not the address ADD gave.
    link = pod_link(addresses=(ipnet.ip_interface("10.244.1.2/16"), ipnet.ip_interface("fd00:10:244:1::2/64")))
    assert check.compare_pod(PREV, "eth0", link, ROUTES) == ["eth0 lacks address 10.244.1.2/24"]


def test_everything_wrong_is_reported_together():
    link = pod_link(mac="02:00:00:00:00:01", up=False, addresses=())
    assert check.compare_pod(PREV, "eth0", link, []) == [
        f"eth0 has MAC 02:00:00:00:00:01, prevResult says {MAC}", "eth0 is down",
        "eth0 lacks address 10.244.1.2/24", "eth0 lacks address fd00:10:244:1::2/64",
        "route 10.96.0.0/12 via 10.244.1.1 is missing", "route 0.0.0.0/0 via 10.244.1.1 is missing",
        "route ::/0 via fd00:10:244:1::1 is missing"]


def test_missing_interface():
    assert check.compare_pod(PREV, "eth0", None, ROUTES) == ["interface eth0 is missing in the pod namespace"]


@pytest.mark.parametrize("prev", [
    {**PREV, "interfaces": PREV["interfaces"][:2]},
    {**PREV, "interfaces": [dict(i, sandbox="") for i in PREV["interfaces"]]},
    {key: value for key, value in PREV.items() if key != "interfaces"},
])
def test_prev_result_without_the_pod_interface(prev):
    assert check.compare_pod(prev, "eth0", pod_link(), ROUTES) == ["prevResult has no interface eth0 in a sandbox"]


def test_other_ifname():
    assert check.compare_pod(PREV, "net1", pod_link(name="net1"), ROUTES) == [
        "prevResult has no interface net1 in a sandbox"]
