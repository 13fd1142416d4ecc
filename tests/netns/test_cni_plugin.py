"""netplane-cni for real: exec'd as a CNI runtime does, inside a throwaway "node" namespace (entered with
`ip netns exec`, like the lab's agents), wiring throwaway pod namespaces; checked with ip, nft and ping.
Every test runs twice: with the plugin doing the work itself (standalone) and with a node helper
running in the node namespace, to which the launcher forwards ADD and DEL (as under the node agent)."""
from __future__ import annotations

import concurrent.futures
import copy
import ipaddress
import json
import os
import subprocess
import sys

import pytest

from netplane import netns
from netplane.cni import forward, helper, install, plugin
from tests.conftest import needs_root

pytestmark = [needs_root, pytest.mark.netns]

NETWORK = "np-cnitest"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
V4 = [{"subnet": "10.244.1.0/24", "gateway": "10.244.1.1"}]
V6 = [{"subnet": "fd00:10:244:1::/64", "gateway": "fd00:10:244:1::1"}]
FAMILIES = {"ipv4": [V4], "ipv6": [V6], "dual": [V4, V6]}


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> str:
    """The launcher a node would install (`python -m netplane.cni.install DIR`)."""
    return install.install(str(tmp_path_factory.mktemp("cni-bin")))


class Node:
    """A node namespace where the plugin runs, with its own IPAM directory; helper_name: the node
    helper's socket name ("" for none)."""

    def __init__(self, name: str, data_dir: str, plugin_path: str, helper_name: str = ""):
        self.name, self.data_dir, self.plugin_path, self.helper_name = name, data_dir, plugin_path, helper_name

    def conf(self, ranges=(V4,), **changes) -> dict:
        conf = {"cniVersion": "1.0.0", "name": NETWORK, "type": "netplane-cni", "bridge": "cni0",
                "isGateway": True, "isDefaultGateway": True, "ipMasq": False, "hairpinMode": True, "mtu": 1500,
                "ipam": {"type": "netplane", "ranges": [copy.deepcopy(r) for r in ranges],
                         "routes": [{"dst": "10.96.0.0/12"}], "dataDir": self.data_dir}}
        conf.update(changes)
        return conf

    def cni(self, command: str, conf, container_id: str = "", pod: str = "", ifname: str = "eth0",
            netns_path: str | None = None, **extra_env) -> tuple:
        """(exit code, parsed stdout) of one plugin exec."""
        env = {**os.environ, "CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_IFNAME": ifname,
               "CNI_PATH": "/usr/lib/cni",
               "CNI_NETNS": netns_path if netns_path is not None else (f"/run/netns/{pod}" if pod else ""),
               forward.HELPER_ENV: self.helper_name}
        env.update(extra_env)
        stdin = conf if isinstance(conf, str) else json.dumps(conf)
        proc = subprocess.run(["ip", "netns", "exec", self.name, self.plugin_path], input=stdin, env=env,
                              capture_output=True, text=True, timeout=60)
        return proc.returncode, (json.loads(proc.stdout) if proc.stdout.strip() else None)

    def add(self, conf, container_id: str, pod: str, **kw) -> dict:
        rc, result = self.cni("ADD", conf, container_id, pod, **kw)
        assert rc == 0, result
        return result

    def allocations(self) -> list:
        directory = os.path.join(self.data_dir, NETWORK)
        return sorted(n for n in os.listdir(directory) if _is_ip(n)) if os.path.isdir(directory) else []

    def forwarding(self) -> str:
        return ip_out(self.name, "cat", "/proc/sys/net/ipv4/ip_forward").strip()

    def nft_tables(self) -> str:
        return ip_out(self.name, "nft", "list", "tables")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def ip_out(ns: str, *argv) -> str:
    return netns.run(list(argv), netns=ns).stdout


def links(ns: str) -> list:
    return sorted(e["ifname"] for e in json.loads(ip_out(ns, "ip", "-j", "link", "show")))


def addresses(ns: str, dev: str) -> set:
    entries = json.loads(ip_out(ns, "ip", "-j", "addr", "show", "dev", dev))
    return {f"{a['local']}/{a['prefixlen']}" for e in entries for a in e["addr_info"] if a.get("scope") == "global"}


def ping(ns: str, address: str) -> bool:
    return netns.run(["ping", "-c", "1", "-W", "2", address], netns=ns, check=False).returncode == 0


def with_prev(conf: dict, result: dict) -> dict:
    return {**conf, "prevResult": result}


@pytest.fixture(params=["standalone", "helper"])
def node(request, make_netns, tmp_path, plugin_path):
    name = make_netns("cn")
    if request.param == "standalone":
        yield Node(name, str(tmp_path / "ipam"), plugin_path)
        return
    helper_name = f"{name}-helper"
    process = helper.start(helper_name, netns_cmd=["ip", "netns", "exec", name])
    try:
        yield Node(name, str(tmp_path / "ipam"), plugin_path, helper_name)
    finally:
        process.terminate()
        process.wait(timeout=10)


def assert_clean(node: Node, *pods: str) -> None:
    """Nothing of ours remains: no link but lo in the node, no interface in the pods, no allocation."""
    assert links(node.name) == ["lo"]
    for pod in pods:
        assert links(pod) == ["lo"]
    assert node.allocations() == []
    assert "netplane-cni" not in node.nft_tables()


# ---- ADD, CHECK, DEL ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_add_check_del_del(node, make_netns, family):
    pod = make_netns("cp")
    conf = node.conf(FAMILIES[family])
    result = node.add(conf, "c1", pod)

    host = plugin.host_veth_name("c1", "eth0")
    assert [i["name"] for i in result["interfaces"]] == ["cni0", host, "eth0"]
    assert result["interfaces"][2]["sandbox"] == f"/run/netns/{pod}"
    want = {"ipv4": ["10.244.1.2/24"], "ipv6": ["fd00:10:244:1::2/64"],
            "dual": ["10.244.1.2/24", "fd00:10:244:1::2/64"]}[family]
    assert [ip["address"] for ip in result["ips"]] == want
    assert all(ip["interface"] == 2 for ip in result["ips"])
    assert addresses(pod, "eth0") == set(want)
    assert {"0.0.0.0/0", "::/0"} & {r["dst"] for r in result["routes"]}
    if "ipv4" in family or family == "dual":
        assert "default via 10.244.1.1 dev eth0" in ip_out(pod, "ip", "route")
    if family != "ipv4":
        assert "default via fd00:10:244:1::1 dev eth0" in ip_out(pod, "ip", "-6", "route")
        assert ping(pod, "fd00:10:244:1::1")
    bridge = json.loads(ip_out(node.name, "ip", "-j", "-d", "link", "show", host))[0]
    assert bridge["master"] == "cni0" and bridge["linkinfo"]["info_slave_data"]["hairpin"] is True
    assert node.forwarding() == ("0" if family == "ipv6" else "1")
    if family != "ipv4":
        assert ip_out(node.name, "cat", "/proc/sys/net/ipv6/conf/all/forwarding").strip() == "1"
    assert node.allocations() == sorted(w.split("/")[0] for w in want)

    assert node.cni("CHECK", with_prev(conf, result), "c1", pod) == (0, None)
    assert node.cni("DEL", with_prev(conf, result), "c1", pod) == (0, None)
    assert links(pod) == ["lo"] and host not in links(node.name) and node.allocations() == []
    rc, reply = node.cni("CHECK", with_prev(conf, result), "c1", pod)
    assert rc == 1 and "eth0 is missing" in reply["msg"]
    assert node.cni("DEL", with_prev(conf, result), "c1", pod) == (0, None)
    assert node.cni("DEL", conf, "c1", netns_path="") == (0, None)


DNS = {"nameservers": ["10.96.0.10"], "domain": "cluster.local",
       "search": ["default.svc.cluster.local", "svc.cluster.local"], "options": ["ndots:5"]}


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0", "1.1.0"])
def test_add_check_del_in_each_cni_version(node, make_netns, version):
    """The result is in the shape of the requested version (0.4.0: ips[].version; 1.1.0: interfaces[].mtu),
    carries each family's gateway and the config's dns, and CHECK and DEL take it back as prevResult."""
    pod = make_netns("cp")
    conf = node.conf([V4, V6], cniVersion=version, dns=DNS)
    result = node.add(conf, "c1", pod)
    assert result["cniVersion"] == version
    want_ips = [{"address": "10.244.1.2/24", "gateway": "10.244.1.1", "interface": 2},
                {"address": "fd00:10:244:1::2/64", "gateway": "fd00:10:244:1::1", "interface": 2}]
    if version == "0.4.0":
        want_ips = [{"version": v, **ip} for v, ip in zip("46", want_ips)]
    assert result["ips"] == want_ips
    assert result["dns"] == DNS
    host = plugin.host_veth_name("c1", "eth0")
    mtu = {"mtu": 1500} if version == "1.1.0" else {}
    assert [{k: v for k, v in i.items() if k != "mac"} for i in result["interfaces"]] == [
        {"name": "cni0"}, {"name": host, **mtu}, {"name": "eth0", **mtu, "sandbox": f"/run/netns/{pod}"}]
    assert ping(pod, "10.244.1.1") and ping(pod, "fd00:10:244:1::1")

    assert node.cni("CHECK", with_prev(conf, result), "c1", pod) == (0, None)
    assert node.cni("DEL", with_prev(conf, result), "c1", pod) == (0, None)
    assert links(pod) == ["lo"] and links(node.name) == ["cni0", "lo"] and node.allocations() == []
    rc, reply = node.cni("CHECK", with_prev(conf, result), "c1", pod)
    assert (rc, reply["cniVersion"]) == (1, version) and "eth0 is missing" in reply["msg"]
    assert node.cni("DEL", with_prev(conf, result), "c1", pod) == (0, None)


def link_details(ns: str, dev: str) -> dict:
    return json.loads(ip_out(ns, "ip", "-j", "-d", "link", "show", "dev", dev))[0]


def test_mtu_and_promisc_mode(node, make_netns):
    pod = make_netns("cp")
    conf = node.conf(mtu=1400, promiscMode=True, hairpinMode=False)
    result = node.add(conf, "c1", pod)
    host = plugin.host_veth_name("c1", "eth0")
    assert link_details(pod, "eth0")["mtu"] == 1400
    assert link_details(node.name, host)["mtu"] == 1400
    bridge = link_details(node.name, "cni0")
    assert "PROMISC" in bridge["flags"] and bridge["promiscuity"] >= 1 and bridge["mtu"] == 1400
    # A packet as large as the MTU allows gets through, unfragmented (1372 + 28 bytes of headers).
    assert netns.run(["ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1372", "10.244.1.1"], netns=pod,
                     check=False).returncode == 0
    assert netns.run(["ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1373", "10.244.1.1"], netns=pod,
                     check=False).returncode != 0
    assert node.cni("CHECK", with_prev(conf, result), "c1", pod) == (0, None)
    assert node.cni("DEL", with_prev(conf, result), "c1", pod) == (0, None)
    assert links(pod) == ["lo"] and links(node.name) == ["cni0", "lo"]


def test_default_mtu_and_no_promisc_mode(node, make_netns):
    """The other side of test_mtu_and_promisc_mode: without them, the bridge is not promiscuous and the
    links keep the kernel's default MTU."""
    pod = make_netns("cp")
    conf = node.conf(promiscMode=False)
    del conf["mtu"]
    node.add(conf, "c1", pod)
    assert link_details(pod, "eth0")["mtu"] == 1500
    assert link_details(node.name, plugin.host_veth_name("c1", "eth0"))["mtu"] == 1500
    assert "PROMISC" not in link_details(node.name, "cni0")["flags"]


def test_promisc_mode_is_set_on_an_existing_bridge(node, make_netns):
    pod1, pod2 = make_netns("cp"), make_netns("cp")
    node.add(node.conf(hairpinMode=False), "c1", pod1)
    assert "PROMISC" not in link_details(node.name, "cni0")["flags"]
    node.add(node.conf(hairpinMode=False, promiscMode=True), "c2", pod2)
    assert "PROMISC" in link_details(node.name, "cni0")["flags"]


def test_check_reports_what_differs(node, make_netns):
    pod = make_netns("cp")
    conf = node.conf()
    result = node.add(conf, "c1", pod)
    netns.run(["ip", "route", "del", "10.96.0.0/12"], netns=pod)
    rc, reply = node.cni("CHECK", with_prev(conf, result), "c1", pod)
    assert (rc, reply["msg"]) == (1, "CHECK of c1/eth0 failed: route 10.96.0.0/12 via 10.244.1.1 is missing")
    netns.run(["ip", "addr", "del", "10.244.1.2/24", "dev", "eth0"], netns=pod)
    rc, reply = node.cni("CHECK", with_prev(conf, result), "c1", pod)
    assert rc == 1
    assert "eth0 lacks address 10.244.1.2/24" in reply["msg"]
    assert "route 10.96.0.0/12 via 10.244.1.1 is missing" in reply["msg"]
    netns.run(["ip", "link", "set", "eth0", "down"], netns=pod)
    rc, reply = node.cni("CHECK", with_prev(conf, result), "c1", pod)
    assert rc == 1 and "eth0 is down" in reply["msg"]
    rc, reply = node.cni("CHECK", conf, "c1", pod)
    assert (rc, reply["code"]) == (1, 7) and "prevResult" in reply["msg"]


def test_two_pods_reach_each_other_and_the_gateway(node, make_netns):
    pods = [make_netns("cp"), make_netns("cp")]
    conf = node.conf([V4, V6])
    results = [node.add(conf, f"c{i}", pod) for i, pod in enumerate(pods)]
    (a4, a6), (b4, b6) = [[ip["address"].split("/")[0] for ip in r["ips"]] for r in results]
    assert a4 != b4 and a6 != b6
    assert ping(pods[0], b4) and ping(pods[1], a4)
    assert ping(pods[0], b6) and ping(pods[1], a6)
    assert ping(pods[0], "10.244.1.1") and ping(pods[1], "fd00:10:244:1::1")


def test_same_container_again_gets_the_same_address_and_round_robin_after_release(node, make_netns):
    pod = make_netns("cp")
    conf = node.conf()
    first = node.add(conf, "c1", pod)
    assert node.cni("DEL", conf, "c1", pod) == (0, None)
    second = node.add(conf, "c1", pod)
    # Released .2 is not handed out again at once: round-robin moves on.
    assert [first["ips"][0]["address"], second["ips"][0]["address"]] == ["10.244.1.2/24", "10.244.1.3/24"]
    rc, reply = node.cni("ADD", conf, "c1", pod)
    assert rc == 1 and "already exists" in reply["msg"]
    assert node.allocations() == ["10.244.1.3"] and ping(pod, "10.244.1.1")


def test_del_when_the_namespace_is_gone_releases_the_address(node, make_netns):
    pod = make_netns("cp")
    conf = node.conf()
    node.add(conf, "c1", pod)
    netns.delete(pod)
    assert node.cni("DEL", conf, "c1", pod) == (0, None)
    assert node.cni("DEL", conf, "c1", pod) == (0, None)
    assert node.allocations() == [] and plugin.host_veth_name("c1", "eth0") not in links(node.name)


@pytest.mark.parametrize("with_prev_result", [False, True])
def test_del_with_empty_netns_while_attached_releases_and_removes_the_veth(node, make_netns, with_prev_result):
    """A runtime that lost the namespace path (CNI_NETNS="") still DELs a live attachment: the address
    is released and the host veth removed (its peer, the pod's eth0, goes with it)."""
    pod, other = make_netns("cp"), make_netns("cp")
    conf = node.conf([V4, V6], ipMasq=True)
    result = node.add(conf, "c1", pod)
    node.add(conf, "c2", other)
    host = plugin.host_veth_name("c1", "eth0")
    assert host in links(node.name) and links(pod) == ["eth0", "lo"]
    assert node.allocations() == ["10.244.1.2", "10.244.1.3", "fd00:10:244:1::2", "fd00:10:244:1::3"]
    del_conf = with_prev(conf, result) if with_prev_result else conf
    assert node.cni("DEL", del_conf, "c1", netns_path="") == (0, None)
    assert host not in links(node.name) and links(pod) == ["lo"]
    assert node.allocations() == ["10.244.1.3", "fd00:10:244:1::3"]
    # The other pod is untouched, and so is the masquerade table it still needs.
    assert ping(other, "10.244.1.1") and "netplane-cni-" + NETWORK in node.nft_tables()
    assert node.cni("DEL", del_conf, "c1", netns_path="") == (0, None)
    assert node.cni("DEL", conf, "c2", netns_path="") == (0, None)
    assert (links(node.name), links(other), node.allocations()) == (["cni0", "lo"], ["lo"], [])
    assert "netplane-cni" not in node.nft_tables()


def test_launcher_forwards_to_the_helper(node, make_netns, tmp_path):
    """With a helper running, ADD and DEL work from a launcher whose package has nothing but the
    forwarder: the exec really hands them over (and CHECK, never forwarded, fails there)."""
    if not node.helper_name:
        pytest.skip("needs the node helper")
    only_forward = tmp_path / "forward-only"
    only_forward.mkdir()
    (only_forward / "forward.py").write_text(open(forward.__file__).read())
    launcher = tmp_path / "netplane-cni"
    launcher.write_text(install.launcher_text().replace(repr(os.path.dirname(forward.__file__)),
                                                        repr(str(only_forward))))
    launcher.chmod(0o755)
    bare = Node(node.name, node.data_dir, str(launcher), node.helper_name)
    pod = make_netns("cp")
    conf = node.conf()
    result = bare.add(conf, "c1", pod)
    assert addresses(pod, "eth0") == {"10.244.1.2/24"} and ping(pod, "10.244.1.1")
    assert bare.cni("CHECK", with_prev(conf, result), "c1", pod)[0] != 0   # ModuleNotFoundError: not forwarded
    assert bare.cni("DEL", with_prev(conf, result), "c1", pod) == (0, None)
    assert links(pod) == ["lo"] and node.allocations() == []


# ---- a failed ADD leaves nothing behind -----------------------------------------------------------

@pytest.mark.parametrize("step", plugin.ADD_STEPS)
def test_failure_after_each_step_leaves_nothing(node, make_netns, step):
    pod = make_netns("cp")
    conf = node.conf([V4, V6], ipMasq=True)
    assert node.forwarding() == "0"
    rc, reply = node.cni("ADD", conf, "c1", pod, **{plugin.FAIL_AFTER_ENV: step})
    assert rc == 1 and f"after step {step!r}" in reply["msg"]
    assert_clean(node, pod)
    assert node.forwarding() == "0"


def test_failure_on_a_node_with_pods_keeps_the_bridge_and_them(node, make_netns):
    pod1, pod2 = make_netns("cp"), make_netns("cp")
    conf = node.conf(ipMasq=True)
    node.add(conf, "c1", pod1)
    rc, _ = node.cni("ADD", conf, "c2", pod2, **{plugin.FAIL_AFTER_ENV: "masq"})
    assert rc == 1
    assert links(pod2) == ["lo"] and node.allocations() == ["10.244.1.2"]
    assert sorted(links(node.name)) == sorted(["lo", "cni0", plugin.host_veth_name("c1", "eth0")])
    assert "netplane-cni-" + NETWORK in node.nft_tables()
    assert ping(pod1, "10.244.1.1")


def test_failed_kernel_step_is_undone(node, make_netns):
    """Real failures, not injected ones: the pod already has the interface name; a route the kernel refuses."""
    pod = make_netns("cp")
    netns.run(["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"], netns=pod)
    rc, reply = node.cni("ADD", node.conf(), "c1", pod)
    assert rc == 1 and "already exists" in reply["msg"]
    assert links(node.name) == ["lo"] and node.allocations() == []
    netns.run(["ip", "link", "del", "eth0"], netns=pod)

    conf = node.conf()
    conf["ipam"]["routes"] = [{"dst": "10.77.0.0/16", "gw": "10.99.99.99"}]
    rc, reply = node.cni("ADD", conf, "c1", pod)
    assert rc == 1 and "route add 10.77.0.0/16 via 10.99.99.99" in reply["msg"]
    assert_clean(node, pod)


# ---- errors: the right code, and nothing created --------------------------------------------------

@pytest.mark.parametrize("case, code", [
    ("bad-json", 6), ("bad-version", 1), ("missing-env", 4), ("invalid-config", 7), ("unsupported-field", 2),
])
def test_bad_input_gets_its_code_and_creates_nothing(node, make_netns, case, code):
    pod = make_netns("cp")
    conf, env = node.conf(), {}
    if case == "bad-json":
        conf = json.dumps(conf)[:-5]
    elif case == "bad-version":
        conf["cniVersion"] = "0.2.0"
    elif case == "missing-env":
        env["CNI_CONTAINERID"] = ""
    elif case == "invalid-config":
        conf["ipam"]["ranges"] = [[{"subnet": "10.244.1.0/33"}]]
    else:
        conf["vlan"] = 100
    rc, reply = node.cni("ADD", conf, "c1", pod, **env)
    assert (rc, reply["code"]) == (1, code), reply
    assert_clean(node, pod)
    assert not os.path.exists(os.path.join(node.data_dir, NETWORK, "lock"))


def test_netns_of_the_node_itself_is_refused(node):
    rc, reply = node.cni("ADD", node.conf(), "c1", node.name)
    assert (rc, reply["code"]) == (1, 4) and "own network namespace" in reply["msg"]
    assert links(node.name) == ["lo"] and node.allocations() == []


def test_exhausted_range(node, make_netns):
    pod1, pod2 = make_netns("cp"), make_netns("cp")
    conf = node.conf([[{"subnet": "10.244.9.0/30"}]])
    node.add(conf, "c1", pod1)
    rc, reply = node.cni("ADD", conf, "c2", pod2)
    assert (rc, reply["code"], reply["msg"]) == (1, 100, "no free address in 10.244.9.0/30")
    assert links(pod2) == ["lo"] and node.allocations() == ["10.244.9.2"]
    assert sorted(links(node.name)) == sorted(["lo", "cni0", plugin.host_veth_name("c1", "eth0")])


# ---- ipMasq, STATUS, GC --------------------------------------------------------------------------

def make_outside(node: Node, make_netns) -> str:
    """A namespace "outside" the node, linked to it: node 192.168.77.1, outside 192.168.77.2, and no
    route from outside to the pod subnet."""
    outside = make_netns("co")
    node_if = f"np-o{os.getpid() % 10000}"
    netns.run(["ip", "link", "add", node_if, "netns", node.name, "type", "veth", "peer", "name", "eth0",
               "netns", outside])
    netns.run(["ip", "addr", "add", "192.168.77.1/24", "dev", node_if], netns=node.name)
    netns.run(["ip", "link", "set", node_if, "up"], netns=node.name)
    netns.run(["ip", "addr", "add", "192.168.77.2/24", "dev", "eth0"], netns=outside)
    netns.run(["ip", "link", "set", "eth0", "up"], netns=outside)
    return outside


def accept_once(ns: str, address: str, port: int) -> subprocess.Popen:
    """A TCP server in `ns` that accepts one connection and prints the client's address (after 'ready')."""
    server = subprocess.Popen(netns.in_netns(ns, [
        "python3", "-c",
        "import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
        f"s.bind(('{address}', {port})); s.listen(1); print('ready', flush=True); "
        "c, a = s.accept(); print(a[0], flush=True)"]), stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"
    return server


def connect(ns: str, address: str, port: int) -> None:
    netns.run(["python3", "-c", f"import socket; socket.create_connection(('{address}', {port}), timeout=5)"],
              netns=ns)


def test_ip_masq_pod_reaches_outside_as_the_node(node, make_netns):
    """The "outside" namespace has no route back to the pod subnet: only masquerading lets replies
    return, and the server there sees the node's address."""
    outside, pod = make_outside(node, make_netns), make_netns("cp")
    conf = node.conf(ipMasq=True)
    result = node.add(conf, "c1", pod)
    assert f"table inet netplane-cni-{NETWORK}" in node.nft_tables()
    server = accept_once(outside, "192.168.77.2", 7777)
    try:
        connect(pod, "192.168.77.2", 7777)
        assert server.stdout.readline().strip() == "192.168.77.1"
    finally:
        server.kill()
        server.wait()
    assert ping(pod, "192.168.77.2")

    assert node.cni("DEL", with_prev(conf, result), "c1", pod) == (0, None)
    assert "netplane-cni" not in node.nft_tables()


def test_status(node, make_netns):
    conf = node.conf([[{"subnet": "10.244.9.0/30"}]], cniVersion="1.1.0")
    assert node.cni("STATUS", conf) == (0, None)
    node.add(conf, "c1", make_netns("cp"))
    rc, reply = node.cni("STATUS", conf)
    assert (rc, reply["code"]) == (1, 50) and "no free address" in reply["msg"]


def test_gc_removes_what_is_not_valid(node, make_netns):
    pods = [make_netns("cp") for _ in range(3)]
    conf = node.conf(cniVersion="1.1.0", ipMasq=True)
    for i, pod in enumerate(pods):
        node.add(conf, f"c{i}", pod)
    gc = {**conf, "cni.dev/valid-attachments": [{"containerID": "c0", "ifname": "eth0"}]}
    assert node.cni("GC", gc) == (0, None)
    assert node.allocations() == ["10.244.1.2"]
    assert sorted(links(node.name)) == sorted(["lo", "cni0", plugin.host_veth_name("c0", "eth0")])
    assert links(pods[1]) == ["lo"] and links(pods[2]) == ["lo"]
    assert ping(pods[0], "10.244.1.1") and "netplane-cni" in node.nft_tables()
    assert node.cni("GC", {**conf, "cni.dev/valid-attachments": []}) == (0, None)
    assert node.allocations() == [] and links(node.name) == ["cni0", "lo"]
    assert "netplane-cni" not in node.nft_tables()


# ---- many at once, many in a row --------------------------------------------------------------------

def test_parallel_adds_get_distinct_addresses(node, make_netns):
    count = 200
    pods = [make_netns("cq") for _ in range(count)]
    conf = node.conf()
    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(lambda i: node.cni("ADD", conf, f"c{i}", pods[i]), range(count)))
    assert all(rc == 0 for rc, _ in results), [r for r in results if r[0] != 0][:3]
    got = {r["ips"][0]["address"] for _, r in results}
    assert len(got) == count and len(node.allocations()) == count
    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        assert all(rc == 0 for rc, _ in pool.map(lambda i: node.cni("DEL", conf, f"c{i}", pods[i]), range(count)))
    assert node.allocations() == [] and links(node.name) == ["cni0", "lo"]


def test_add_del_cycles_leave_nothing(node, make_netns):
    pod = make_netns("cp")
    conf = node.conf([V4, V6], ipMasq=True)
    for i in range(int(os.environ.get("NETPLANE_CNI_CYCLES", "50"))):
        node.add(conf, f"c{i}", pod)
        assert node.cni("DEL", conf, f"c{i}", pod) == (0, None)
    assert links(node.name) == ["cni0", "lo"] and links(pod) == ["lo"] and node.allocations() == []
    assert "netplane-cni" not in node.nft_tables()


# ---- other callers' ways: /proc/PID/ns/net, chaining with the reference portmap ------------------

def test_netns_given_as_proc_path(node, make_netns):
    pod = make_netns("cp")
    holder = subprocess.Popen(netns.in_netns(pod, ["sleep", "60"]))
    try:
        path = f"/proc/{holder.pid}/ns/net"
        deadline = 50
        while os.readlink(path) == os.readlink("/proc/self/ns/net") and deadline:  # until exec'd in the pod ns
            deadline -= 1
            subprocess.run(["sleep", "0.02"])
        conf = node.conf()
        result = node.add(conf, "c1", "", netns_path=path)
        assert result["interfaces"][2]["sandbox"] == path
        assert addresses(pod, "eth0") == {"10.244.1.2/24"}
        assert node.cni("CHECK", with_prev(conf, result), "c1", netns_path=path) == (0, None)
        assert node.cni("DEL", with_prev(conf, result), "c1", netns_path=path) == (0, None)
        assert links(pod) == ["lo"]
    finally:
        holder.kill()
        holder.wait()


PORTMAP = "/usr/lib/cni/portmap"


@pytest.mark.skipif(not os.access(PORTMAP, os.X_OK), reason="needs Debian's containernetworking-plugins")
def test_chained_with_reference_portmap(node, make_netns):
    """A conflist [netplane-cni, portmap], driven as libcni does: ADD in order with prevResult, DEL in
    reverse; a client outside the node reaches the pod through the node's hostPort."""
    outside, pod = make_outside(node, make_netns), make_netns("cp")
    conf = node.conf()
    result = node.add(conf, "c1", pod)
    portmap = {"cniVersion": "1.0.0", "name": NETWORK, "type": "portmap", "snat": True,
               "runtimeConfig": {"portMappings": [{"hostPort": 30080, "containerPort": 8080, "protocol": "tcp"}]}}
    runner = Node(node.name, node.data_dir, PORTMAP)
    rc, chained = runner.cni("ADD", with_prev(portmap, result), "c1", pod)
    assert rc == 0, chained
    try:
        server = accept_once(pod, "0.0.0.0", 8080)
        try:
            connect(outside, "192.168.77.1", 30080)
            assert server.stdout.readline().strip() == "192.168.77.2"
        finally:
            server.kill()
            server.wait()
    finally:
        assert runner.cni("DEL", with_prev(portmap, chained), "c1", pod)[0] == 0
    assert node.cni("DEL", with_prev(conf, chained), "c1", pod) == (0, None)
    assert "CNI-DN" not in ip_out(node.name, "iptables-save", "-t", "nat")


@pytest.mark.skipif(not os.access("/usr/lib/cni/host-local", os.X_OK), reason="needs Debian's containernetworking-plugins")
def test_other_ipam_type_is_delegated(node, make_netns):
    """ipam.type host-local: exec'd from CNI_PATH for ADD and DEL, its addresses used for the pod."""
    pod = make_netns("cp")
    conf = node.conf()
    conf["ipam"] = {"type": "host-local", "ranges": [[{"subnet": "10.244.3.0/24"}]], "dataDir": node.data_dir,
                    "routes": [{"dst": "0.0.0.0/0"}]}
    result = node.add(conf, "c1", pod)
    assert result["ips"][0]["address"] == "10.244.3.2/24" and result["ips"][0]["interface"] == 2
    assert addresses(pod, "eth0") == {"10.244.3.2/24"} and ping(pod, "10.244.3.1")
    assert "default via 10.244.3.1 dev eth0" in ip_out(pod, "ip", "route")
    assert node.allocations() == ["10.244.3.2"]   # host-local's file, same layout
    assert node.cni("DEL", with_prev(conf, result), "c1", pod) == (0, None)
    assert node.allocations() == [] and links(pod) == ["lo"]


_DETACHED_DELETES = """
import os, sys, time
from netplane.cni import netlink
rtnl = netlink.Rtnl()
for name in ("np-va", "np-vb"):
    netlink.delete_link_detached(rtnl, rtnl.index(name))
# the same socket straight away: its answers must be its own, not a child's acknowledgement
assert rtnl.link("np-vc") is not None, "np-vc not found: this process read another's answer"
assert rtnl.link("np-va") is None and rtnl.link("np-vb") is None, "a deleted link is still listed"
deadline = time.monotonic() + 5
children = 2
while children and time.monotonic() < deadline:
    pid, _ = os.waitpid(-1, os.WNOHANG)
    if pid:
        children -= 1
    else:
        time.sleep(0.01)
print("children left:", children)
"""


def test_detached_deletions_leave_the_socket_to_its_owner(make_netns):
    """Each deletion's child speaks on a socket of its own: the parent may go on using its socket at
    once (two deletions in a row here, then a lookup) and every child finishes."""
    ns, pod = make_netns("cnidel"), make_netns("cnipod")
    for pair in ("a", "b", "c"):   # the far ends in another namespace make the kernel's clean-up slow, as for pods
        subprocess.run(["ip", "-n", ns, "link", "add", f"np-v{pair}", "type", "veth", "peer", f"np-p{pair}",
                        "netns", pod], check=True)
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", _DETACHED_DELETES],
                         capture_output=True, text=True, timeout=30, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "children left: 0"
    assert links(ns) == ["lo", "np-vc"] and links(pod) == ["lo", "np-pc"]


def test_add_on_a_kernel_that_does_not_echo_the_new_veth(make_netns, tmp_path):
    """Before Linux 6.3 a new link is only acknowledged, not echoed: the pod's socket then asks for
    its interface's index, and ADD, CHECK and DEL come out the same."""
    wrapper = tmp_path / "netplane-cni-no-echo"
    wrapper.write_text(f"#!{sys.executable} -I\nimport sys\nsys.path.insert(0, {REPO!r})\n"
                       "from netplane.cni import netlink, plugin\n"
                       "netlink.NLM_F_ECHO = 0   # what such a kernel does: no echo\n"
                       "plugin.main_and_exit()\n")
    wrapper.chmod(0o755)
    node = Node(make_netns("cn"), str(tmp_path / "ipam"), str(wrapper))
    pod = make_netns("cp")
    conf = node.conf(ranges=FAMILIES["dual"])
    result = node.add(conf, "c1", pod)
    assert addresses(pod, "eth0") == {"10.244.1.2/24", "fd00:10:244:1::2/64"}
    assert "default via 10.244.1.1 dev eth0" in ip_out(pod, "ip", "route")
    assert node.cni("CHECK", with_prev(conf, result), "c1", pod) == (0, None)
    assert node.cni("DEL", with_prev(conf, result), "c1", pod) == (0, None)
    assert links(pod) == ["lo"] and links(node.name) == ["cni0", "lo"] and node.allocations() == []
