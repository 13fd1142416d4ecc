"""The plugin's light replacements for heavy modules (ipnet for ipaddress, record for namedtuple), its
netlink message building, and the wire format between a plugin exec and the node helper."""
from __future__ import annotations

import ipaddress
import os
import struct
import subprocess
import sys

import pytest

from netplane.cni import forward, helper, ipnet, netlink
from netplane.cni.record import record


@pytest.mark.parametrize("text", ["10.244.1.7", "0.0.0.0", "255.255.255.255", "fd00::1", "::", "fe80::1:2:3:4",
                                  "2001:db8::ffff:0:1"])
def test_addresses_print_and_order_like_ipaddress(text):
    ours, theirs = ipnet.ip_address(text), ipaddress.ip_address(text)
    assert (str(ours), int(ours), ours.version) == (str(theirs), int(theirs), theirs.version)
    assert ours.is_link_local == theirs.is_link_local
    assert ipnet.ip_address(text) == ours and hash(ipnet.ip_address(text)) == hash(ours)


@pytest.mark.parametrize("text", ["10.244.1.0/24", "10.0.0.0/8", "fd00:10:244:1::/64", "0.0.0.0/0", "::/0",
                                  "10.1.1.1/32"])
def test_networks_match_ipaddress(text):
    ours, theirs = ipnet.ip_network(text), ipaddress.ip_network(text)
    assert str(ours) == str(theirs) and ours.prefixlen == theirs.prefixlen
    assert int(ours.network_address) == int(theirs.network_address)
    assert int(ours.broadcast_address) == int(theirs.broadcast_address)
    assert ours.num_addresses == theirs.num_addresses


def test_membership_overlap_and_interfaces():
    net = ipnet.ip_network("10.244.1.0/24")
    assert ipnet.ip_address("10.244.1.9") in net and ipnet.ip_address("10.244.2.9") not in net
    assert ipnet.ip_address("fd00::1") not in net
    assert net.overlaps(ipnet.ip_network("10.0.0.0/8")) and not net.overlaps(ipnet.ip_network("10.244.2.0/24"))
    iface = ipnet.ip_interface("10.244.1.9/24")
    assert (str(iface), str(iface.ip), iface.network, iface.version) == ("10.244.1.9/24", "10.244.1.9", net, 4)
    assert ipnet.ip_network("10.244.1.9/24", strict=False) == net


@pytest.mark.parametrize("bad", ["10.1.1.1/24", "10.1.1/24", "10.1.1.1/33", "fd00::/129", "x", "", None, 7,
                                 "10.1.1.1/ 8", "10.1.1.1/٣"])
def test_bad_networks_are_value_errors(bad):
    with pytest.raises(ValueError):
        ipnet.ip_network(bad)


def test_record_is_a_small_namedtuple():
    Point = record("Point", "x y z", defaults=(0,))
    p = Point(1, y=2)
    assert p == (1, 2, 0) and (p.x, p.y, p.z) == (1, 2, 0) and hash(p) == hash((1, 2, 0))
    assert repr(p) == "Point(x=1, y=2, z=0)" and Point._fields == ("x", "y", "z")
    with pytest.raises(TypeError):
        Point(1)
    with pytest.raises(TypeError):
        Point(1, 2, 3, 4)
    with pytest.raises(TypeError):
        Point(1, 2, w=3)
    with pytest.raises(AttributeError):
        p.x = 5


def test_netlink_link_message_round_trip():
    body = (netlink.ifinfo(index=7, flags=netlink.IFF_UP, change=netlink.IFF_UP)
            + netlink.link_attrs("np-abc", "02:00:00:00:00:01", 1450)
            + netlink.attr_u32(netlink.IFLA_MASTER, 3)
            + netlink.attr(netlink.IFLA_LINKINFO, netlink.attr_str(netlink.IFLA_INFO_KIND, "veth")))
    found = netlink.parse_link(body)
    assert (found.index, found.name, found.kind, found.mac, found.mtu, found.master) == (
        7, "np-abc", "veth", "02:00:00:00:00:01", 1450, 3)
    assert found.flags & netlink.IFF_UP
    # every attribute is padded to 4 bytes, as the kernel requires
    assert len(netlink.attr_str(netlink.IFLA_IFNAME, "eth0")) % 4 == 0


def test_netlink_error_words_include_the_extended_ack():
    original = struct.pack("IHHII", 40, netlink.RTM_NEWROUTE, 5, 1, 0)
    payload = struct.pack("i", -101) + original + netlink.attr_str(netlink.NLMSGERR_ATTR_MSG, "Nexthop has invalid gateway")
    words = netlink._error_words(101, payload, netlink.NLM_F_ACK_TLVS | netlink.NLM_F_CAPPED)
    assert words == f"{os.strerror(101)} (Nexthop has invalid gateway)"


def test_wire_request_round_trip():
    environ = {b"CNI_COMMAND": b"ADD", b"CNI_ARGS": b"K8S_POD_NAME=a=b;X=\xff", b"EMPTY": b""}
    stdin = b'{"cniVersion": "1.0.0"}\0tail'
    env, got = helper.parse_request(forward.request_bytes(environ, stdin))
    assert got == stdin
    assert env == {"CNI_COMMAND": "ADD", "CNI_ARGS": "K8S_POD_NAME=a=b;X=\udcff", "EMPTY": ""}


def test_helper_declines_what_it_does_not_serve():
    request = forward.request_bytes({b"CNI_COMMAND": b"CHECK"}, b"{}")
    assert helper.handle(request) == bytes([forward.NOT_HANDLED])


def test_helper_answers_with_the_exit_code_and_stdout():
    request = forward.request_bytes({b"CNI_COMMAND": b"ADD"}, b"{not json")
    reply = helper.handle(request)
    assert reply[0] == 1 and b'"code": 4' in reply[1:]   # CNI_CONTAINERID is missing: checked first


def test_forwarder_imports_only_builtins_and_socket():
    """It runs first in every exec, before the launcher knows whether a helper will answer."""
    code = ("import sys; before = set(sys.modules); import netplane.cni.forward; "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert set(out) <= {"netplane", "netplane.cni", "netplane.cni.forward", "_socket"}, out


def test_no_helper_means_the_plugin_runs_itself(tmp_path):
    """Nobody listens on the name: the launcher runs the command itself (here: an error it finds)."""
    from netplane.cni import install
    path = install.install(str(tmp_path))
    env = {"PATH": os.environ.get("PATH", ""), "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1",
           "CNI_NETNS": "/run/netns/np-nonexistent", "CNI_IFNAME": "eth0",
           forward.HELPER_ENV: f"np-nobody-{os.getpid()}"}
    proc = subprocess.run([path], input='{"cniVersion": "1.0.0", "name": "n", "ipam": {"ranges": '
                          '[[{"subnet": "10.9.0.0/24"}]], "dataDir": "/nonexistent"}}', env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "does not exist" in proc.stdout


class _FakeRtnl:
    """Answers batches as the kernel would: each request in order, `refuse` (by request type) refused."""

    def __init__(self, refuse=(), links=None):
        self.refuse, self.indexes, self.writes = set(refuse), {}, []
        self.links = dict(links or {})

    def requests(self, messages):
        self.writes.append([m[0] for m in messages])
        out = []
        for msg_type, body, _ in messages:
            if msg_type in self.refuse:
                out.append(netlink.NetlinkError(17, "File exists"))
                continue
            if msg_type == netlink.RTM_NEWLINK and body[16:]:
                name = netlink.attrs(body, 16).get(netlink.IFLA_IFNAME, b"").rstrip(b"\0").decode()
                self.links.setdefault(name, len(self.links) + 2)
            out.append([])
        return out

    def index(self, name):
        if name not in self.links:
            raise netlink.NetlinkError(19, f'Cannot find device "{name}"')
        self.indexes[name] = self.links[name]
        return self.indexes[name]


def _batch(rtnl, steps) -> tuple:
    """(the undo lines pushed, the CniError raised or None) of link.run_batch on the fake socket."""
    from netplane.cni import link, spec
    undone = []
    link._connections[None] = rtnl
    try:
        link.run_batch(steps, lambda netns, line: undone.append(line))
    except spec.CniError as e:
        return undone, e
    finally:
        link._connections.pop(None, None)
    return undone, None


def test_a_plan_goes_in_one_write_until_a_step_names_a_link_made_in_it():
    from netplane.cni import link
    steps = [link.Step("link add np-br0 address 02:00:00:00:00:01 type bridge", "link del np-br0"),
             link.Step("addr add 10.1.0.1/24 dev np-br0", "addr del 10.1.0.1/24 dev np-br0"),
             link.Step("link set np-br0 up", "link set np-br0 down")]
    rtnl = _FakeRtnl()
    undone, failed = _batch(rtnl, steps)
    assert failed is None
    # the address needs the new bridge's index: the bridge's request is answered first
    assert rtnl.writes == [[netlink.RTM_NEWLINK], [netlink.RTM_NEWADDR, netlink.RTM_NEWLINK]]
    assert undone == ["link del np-br0", "addr del 10.1.0.1/24 dev np-br0", "link set np-br0 down"]


def test_a_refused_step_is_named_and_those_that_took_effect_are_undone():
    from netplane.cni import link
    steps = [link.Step("link set np-br0 up", "link set np-br0 down"),
             link.Step("addr add 10.1.0.1/24 dev np-br0", "addr del 10.1.0.1/24 dev np-br0"),
             link.Step("link set np-br0 promisc on", "link set np-br0 promisc off")]
    rtnl = _FakeRtnl(refuse={netlink.RTM_NEWADDR}, links={"np-br0": 5})
    rtnl.indexes["np-br0"] = 5
    undone, failed = _batch(rtnl, steps)
    assert "ip 'addr add 10.1.0.1/24 dev np-br0' failed: File exists" in failed.msg
    assert rtnl.writes == [[netlink.RTM_NEWLINK, netlink.RTM_NEWADDR, netlink.RTM_NEWLINK]]
    assert undone == ["link set np-br0 down", "link set np-br0 promisc off"]   # each that took effect


@pytest.mark.parametrize("directory, name", [("/var/lib/cni", "net1"), ("/var/lib/cni/", "net1"), ("rel", "x"),
                                             ("/a", "/abs"), ("", "x")])
def test_paths_join_is_os_path_join(directory, name):
    from netplane.cni import paths
    assert paths.join(directory, name) == os.path.join(directory, name)


def test_paths_makedirs_and_exists(tmp_path):
    from netplane.cni import paths
    deep = str(tmp_path / "a" / "b" / "c")
    assert not paths.exists(deep)
    paths.makedirs(deep, 0o755)
    paths.makedirs(deep, 0o755)   # already there: fine
    assert os.path.isdir(deep) and paths.exists(deep) and not paths.exists(deep + "\0x")
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError):
        paths.makedirs(str(tmp_path / "file"))
