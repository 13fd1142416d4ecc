"""The protocol (environment, results), the ip/nft text ADD asks for, and the JSON without `import json`."""
from __future__ import annotations

import json

import pytest

from netplane.cni import config, ipnet, jsonlite, link, masq, spec

ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc123", "CNI_NETNS": "/run/netns/np-pod-x",
       "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni:/opt/cni/bin",
       "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=web-1"}


def env_error(**changes) -> spec.CniError:
    environ = {k: v for k, v in {**ENV, **changes}.items() if v is not None}
    with pytest.raises(spec.CniError) as info:
        spec.parse_env(environ)
    assert info.value.code == spec.INVALID_ENVIRONMENT
    return info.value


def test_parse_env():
    env = spec.parse_env(ENV)
    assert env.command == "ADD" and env.container_id == "abc123" and env.ifname == "eth0"
    assert env.args == {"IgnoreUnknown": "1", "K8S_POD_NAME": "web-1"}
    assert env.path == ("/usr/lib/cni", "/opt/cni/bin")


@pytest.mark.parametrize("changes, variable", [
    ({"CNI_COMMAND": None}, "CNI_COMMAND"), ({"CNI_COMMAND": "FROB"}, "CNI_COMMAND"),
    ({"CNI_CONTAINERID": None}, "CNI_CONTAINERID"), ({"CNI_CONTAINERID": "-bad"}, "CNI_CONTAINERID"),
    ({"CNI_IFNAME": None}, "CNI_IFNAME"), ({"CNI_IFNAME": "a/b"}, "CNI_IFNAME"),
    ({"CNI_IFNAME": "x" * 16}, "CNI_IFNAME"), ({"CNI_NETNS": None}, "CNI_NETNS"),
    ({"CNI_ARGS": "novalue"}, "CNI_ARGS"),
])
def test_bad_environment_is_error_4_naming_the_variable(changes, variable):
    assert variable in env_error(**changes).msg


def test_del_needs_no_netns_and_version_needs_only_the_command():
    assert spec.parse_env({**ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": ""}).netns == ""
    assert spec.parse_env({"CNI_COMMAND": "VERSION"}).command == "VERSION"
    assert spec.parse_env({"CNI_COMMAND": "GC", "CNI_PATH": "/x"}).command == "GC"


def test_result_shape_per_version():
    interfaces = [spec.Interface("cni0", "aa:aa:aa:aa:aa:aa"), spec.Interface("np-1", "bb:bb:bb:bb:bb:bb", mtu=1500),
                  spec.Interface("eth0", "cc:cc:cc:cc:cc:cc", sandbox="/run/netns/p", mtu=1500)]
    ips = [spec.IPConfig("10.244.1.2/24", "10.244.1.1", 2), spec.IPConfig("fd00::2/64", "fd00::1", 2)]
    routes = [spec.Route("0.0.0.0/0", "10.244.1.1"), spec.Route("10.0.0.0/8")]
    v1 = spec.result_json("1.0.0", interfaces, ips, routes, {"nameservers": ["10.96.0.10"]})
    assert v1 == {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "cni0", "mac": "aa:aa:aa:aa:aa:aa"}, {"name": "np-1", "mac": "bb:bb:bb:bb:bb:bb"},
                       {"name": "eth0", "mac": "cc:cc:cc:cc:cc:cc", "sandbox": "/run/netns/p"}],
        "ips": [{"address": "10.244.1.2/24", "gateway": "10.244.1.1", "interface": 2},
                {"address": "fd00::2/64", "gateway": "fd00::1", "interface": 2}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}, {"dst": "10.0.0.0/8"}],
        "dns": {"nameservers": ["10.96.0.10"]}}
    v04 = spec.result_json("0.4.0", interfaces, ips, routes, None)
    assert [i["version"] for i in v04["ips"]] == ["4", "6"]
    v11 = spec.result_json("1.1.0", interfaces, ips, routes, None)
    assert v11["interfaces"][2]["mtu"] == 1500 and "mtu" not in v1["interfaces"][2]


def test_version_reply_and_error_json():
    assert spec.version_json("1.0.0") == {"cniVersion": "1.0.0",
                                          "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}
    error = spec.CniError(7, "invalid network config: name: missing", "more")
    assert error.to_json("1.0.0") == {"cniVersion": "1.0.0", "code": 7,
                                      "msg": "invalid network config: name: missing", "details": "more"}


# ---- the plan's lines -------------------------------------------------------------------------

def netconf(**changes):
    data = {"cniVersion": "1.0.0", "name": "n", "bridge": "cni0", "isGateway": True, "isDefaultGateway": True,
            "hairpinMode": True, "mtu": 1450, "ipam": {"ranges": [[{"subnet": "10.244.1.0/24"}]]}}
    return config.parse_netconf({**data, **changes})


def gw(text):
    return ipnet.ip_interface(text)


def test_plan_new_bridge_with_gateway():
    steps = link.plan_bridge(netconf(), None, [gw("10.244.1.1/24"), gw("fd00::1/64")], "02:00:00:00:00:01")
    assert steps == [
        link.Step("link add cni0 mtu 1450 address 02:00:00:00:00:01 type bridge", "link del cni0"),
        link.Step("addr add 10.244.1.1/24 dev cni0", "addr del 10.244.1.1/24 dev cni0"),
        link.Step("addr add fd00::1/64 dev cni0 nodad", "addr del fd00::1/64 dev cni0"),
        link.Step("link set cni0 up", None),
    ]


def existing_bridge(*addresses, up=True):
    return link.LinkState("cni0", "bridge", "02:00:00:00:00:01", up, False, 1500, "",
                          tuple(gw(a) for a in addresses))


def test_plan_existing_bridge_needs_nothing():
    assert link.plan_bridge(netconf(), existing_bridge("10.244.1.1/24", "fe80::1/64"),
                            [gw("10.244.1.1/24")], "x") == []


def test_plan_existing_bridge_with_another_ipv4_address():
    with pytest.raises(spec.CniError) as info:
        link.plan_bridge(netconf(), existing_bridge("10.9.9.1/24"), [gw("10.244.1.1/24")], "x")
    assert "already has address 10.9.9.1/24" in info.value.msg
    steps = link.plan_bridge(netconf(forceAddress=True), existing_bridge("10.9.9.1/24", up=False),
                             [gw("10.244.1.1/24")], "x")
    assert [s.command for s in steps] == ["addr del 10.9.9.1/24 dev cni0", "addr add 10.244.1.1/24 dev cni0",
                                          "link set cni0 up"]
    assert steps[0].undo == "addr add 10.9.9.1/24 dev cni0" and steps[-1].undo == "link set cni0 down"


def test_plan_refuses_a_link_that_is_not_a_bridge():
    state = link.LinkState("cni0", "dummy", "m", True, False, 1500, "", ())
    with pytest.raises(spec.CniError, match="not a bridge"):
        link.plan_bridge(netconf(), state, [], "x")


def test_plan_veth_and_pod():
    steps = link.plan_veth(netconf(), "np-0123", "02:00:00:00:00:02", "eth0", "02:00:00:00:00:03", "/run/netns/p")
    assert steps == [
        link.Step("link add np-0123 address 02:00:00:00:00:02 mtu 1450 master cni0 up type veth "
                  "peer name eth0 address 02:00:00:00:00:03 mtu 1450 netns /run/netns/p", "link del np-0123"),
        link.Step("link set np-0123 type bridge_slave hairpin on", None),
    ]
    pod = link.plan_pod("eth0", [gw("10.244.1.2/24"), gw("fd00::2/64")],
                        [spec.Route("0.0.0.0/0", "10.244.1.1"), spec.Route("10.9.0.0/16")])
    assert [s.command for s in pod] == [
        "link set eth0 up", "addr add 10.244.1.2/24 dev eth0", "addr add fd00::2/64 dev eth0 nodad",
        "route add 0.0.0.0/0 via 10.244.1.1 dev eth0", "route add 10.9.0.0/16 dev eth0"]


def test_parse_link_from_ip_json():
    entry = {"ifname": "cni0", "flags": ["BROADCAST", "UP", "PROMISC"], "mtu": 1500, "address": "0a:58:0a:f4:01:01",
             "master": "", "linkinfo": {"info_kind": "bridge"},
             "addr_info": [{"family": "inet", "local": "10.244.1.1", "prefixlen": 24}]}
    state = link.parse_link(entry)
    assert state.kind == "bridge" and state.up and state.promisc and state.addresses == (gw("10.244.1.1/24"),)


def test_masquerade_table_text():
    text = masq.render("net1", [ipnet.ip_network("10.244.1.0/24"), ipnet.ip_network("fd00::/64")])
    assert text == (
        "table inet netplane-cni-net1 {}\n"
        "delete table inet netplane-cni-net1\n"
        "table inet netplane-cni-net1 {\n"
        "\tchain postrouting {\n"
        "\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
        "\t\tip saddr 10.244.1.0/24 ip daddr != 10.244.1.0/24 ip daddr != 224.0.0.0/4 masquerade\n"
        "\t\tip6 saddr fd00::/64 ip6 daddr != fd00::/64 ip6 daddr != ff00::/8 masquerade\n"
        "\t}\n"
        "}\n")


# ---- JSON --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [
    {"cniVersion": "1.0.0", "n": [1, 2.5, -3e10, True, False, None], "s": "é \" \\ \n \u2028", "e": {}},
    [], "x", 0,
])
def test_jsonlite_matches_json(value):
    text = json.dumps(value)
    assert jsonlite.loads(text) == value
    assert jsonlite.loads(text.encode()) == value
    assert json.loads(jsonlite.dumps(value)) == value
    assert jsonlite.dumps(value) == json.dumps(value)


@pytest.mark.parametrize("text", ["", "  ", "{", "{\"a\": }", "[1,]", "{} x", "nul"])
def test_jsonlite_rejects_what_json_rejects(text):
    with pytest.raises(ValueError):
        jsonlite.loads(text)
    with pytest.raises(ValueError):
        json.loads(text)
