"""Network config parsing: the node agent's shape, defaults, and an error naming the field for each bad one."""
from __future__ import annotations

import copy
import ipaddress

import pytest

from netplane.cni import config, ipnet, spec

AGENT_CONFIG = {
    "cniVersion": "1.0.0", "name": "netplane", "type": "netplane-cni", "bridge": "cni0",
    "isGateway": True, "isDefaultGateway": True, "ipMasq": False, "hairpinMode": True, "mtu": 1500,
    "ipam": {"type": "netplane", "ranges": [[{"subnet": "10.244.1.0/24", "gateway": "10.244.1.1"}]],
             "routes": [{"dst": "10.96.0.0/12"}], "dataDir": "/var/lib/netplane/cni"},
}


def with_changes(**changes) -> dict:
    conf = copy.deepcopy(AGENT_CONFIG)
    for key, value in changes.items():
        if value is None:
            conf.pop(key, None)
        else:
            conf[key] = value
    return conf


def with_ipam(**changes) -> dict:
    conf = copy.deepcopy(AGENT_CONFIG)
    conf["ipam"].update(changes)
    return conf


def error_of(data) -> spec.CniError:
    with pytest.raises(spec.CniError) as info:
        config.parse_netconf(data)
    return info.value


def test_agent_config_parses():
    conf = config.parse_netconf(AGENT_CONFIG)
    assert (conf.name, conf.bridge, conf.mtu, conf.hairpin, conf.ip_masq) == ("netplane", "cni0", 1500, True, False)
    assert conf.is_gateway and conf.is_default_gateway and conf.ipam.builtin
    (range_set,) = conf.ipam.range_sets
    (r,) = range_set.ranges
    assert r.subnet == ipnet.ip_network("10.244.1.0/24")
    assert r.gateway == ipnet.ip_address("10.244.1.1")
    assert (ipaddress.ip_address(r.start), ipaddress.ip_address(r.end)) == (
        ipaddress.ip_address("10.244.1.1"), ipaddress.ip_address("10.244.1.254"))
    assert conf.ipam.routes[0].dst == ipnet.ip_network("10.96.0.0/12")
    assert conf.ipam.data_dir == "/var/lib/netplane/cni"


def test_defaults_and_builtin_ipam_when_type_absent():
    conf = config.parse_netconf({"cniVersion": "0.4.0", "name": "n",
                                 "ipam": {"ranges": [[{"subnet": "fd00:1::/64"}]]}})
    assert conf.bridge == "cni0" and not conf.is_gateway and conf.mtu is None
    assert conf.ipam.builtin and conf.ipam.data_dir == config.DEFAULT_DATA_DIR
    r = conf.ipam.range_sets[0].ranges[0]
    assert str(r.gateway) == "fd00:1::1"
    assert ipaddress.ip_address(r.end) == ipaddress.ip_address("fd00:1::ffff:ffff:ffff:ffff")


def test_is_default_gateway_implies_is_gateway():
    conf = config.parse_netconf(with_changes(isGateway=None, isDefaultGateway=True))
    assert conf.is_gateway


def test_dual_stack_and_legacy_subnet():
    conf = config.parse_netconf(with_ipam(ranges=[[{"subnet": "10.244.1.0/24"}], [{"subnet": "fd00:1::/64"}]]))
    assert [rs.version for rs in conf.ipam.range_sets] == [4, 6]
    legacy = copy.deepcopy(AGENT_CONFIG)
    legacy["ipam"] = {"type": "netplane", "subnet": "10.9.0.0/16", "rangeStart": "10.9.1.10", "rangeEnd": "10.9.1.20"}
    r = config.parse_netconf(legacy).ipam.range_sets[0].ranges[0]
    assert str(ipaddress.ip_address(r.start)) == "10.9.1.10" and str(ipaddress.ip_address(r.end)) == "10.9.1.20"


def test_other_ipam_type_is_delegated_unparsed():
    conf = config.parse_netconf(with_ipam(type="host-local", ranges="anything the plugin takes"))
    assert not conf.ipam.builtin and conf.ipam.type == "host-local" and conf.raw["ipam"]["type"] == "host-local"


@pytest.mark.parametrize("data, field", [
    (with_changes(name=None), "name"),
    (with_changes(name="bad name"), "name"),
    (with_changes(bridge="a-bridge-name-too-long"), "bridge"),
    (with_changes(isGateway="yes"), "isGateway"),
    (with_changes(mtu=20), "mtu"),
    (with_changes(promiscMode=True), "hairpinMode"),
    (with_changes(ipam=None), "ipam"),
    (with_ipam(ranges=[]), "ipam.ranges"),
    (with_ipam(ranges=[[{"subnet": "10.244.1.5/24"}]]), "ipam.ranges[0][0].subnet"),
    (with_ipam(ranges=[[{"subnet": "nonsense"}]]), "ipam.ranges[0][0].subnet"),
    (with_ipam(ranges=[[{"subnet": "10.244.1.0/31"}]]), "ipam.ranges[0][0].subnet"),
    (with_ipam(ranges=[[{"subnet": "10.244.1.0/24", "rangeStart": "10.244.2.1"}]]), "ipam.ranges[0][0].rangeStart"),
    (with_ipam(ranges=[[{"subnet": "10.244.1.0/24", "gateway": "10.0.0.1"}]]), "ipam.ranges[0][0].gateway"),
    (with_ipam(ranges=[[{"subnet": "10.244.1.0/24", "rangeStart": "10.244.1.9", "rangeEnd": "10.244.1.3"}]]),
     "ipam.ranges[0][0]"),
    (with_ipam(ranges=[[{"subnet": "10.244.1.0/24"}, {"subnet": "fd00::/64"}]]), "ipam.ranges[0]"),
    (with_ipam(ranges=[[{"subnet": "10.244.0.0/16"}], [{"subnet": "10.244.1.0/24"}]]), "ipam.ranges[1][0]"),
    (with_ipam(routes=[{"dst": "not-a-net"}]), "ipam.routes[0].dst"),
    (with_ipam(routes=[{"dst": "0.0.0.0/0", "gw": "fd00::1"}]), "ipam.routes[0].gw"),
    (with_ipam(dataDir="relative/dir"), "ipam.dataDir"),
])
def test_invalid_config_names_the_field(data, field):
    error = error_of(data)
    assert error.code == spec.INVALID_NETWORK_CONFIG
    assert f": {field}: " in error.msg


@pytest.mark.parametrize("key, value", [("vlan", 5), ("macspoofchk", True), ("ipMasqBackend", "iptables")])
def test_unsupported_option_is_error_2_naming_key_and_value(key, value):
    error = error_of(with_changes(**{key: value}))
    assert error.code == spec.UNSUPPORTED_FIELD
    assert key in error.msg and repr(value) in error.msg


@pytest.mark.parametrize("version", ["0.2.0", "2.0.0", None, 1])
def test_unsupported_version_is_error_1(version):
    assert error_of(with_changes(cniVersion=version)).code == spec.INCOMPATIBLE_VERSION


def test_unknown_fields_are_ignored():
    conf = config.parse_netconf(with_changes(somethingElse={"x": 1}, capabilities={"portMappings": True}))
    assert conf.name == "netplane"


def test_valid_attachments_reads_both_keys():
    data = {"cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"}],
            "cni.dev/attachments": [{"containerID": "b", "ifname": "eth1"}]}
    assert config.valid_attachments(data) == {("a", "eth0"), ("b", "eth1")}
    with pytest.raises(spec.CniError):
        config.valid_attachments({"cni.dev/valid-attachments": [{"containerID": "a"}]})
