"""A real CNI runtime drives netplane-cni: podman (Debian's, CNI network backend) starts two containers
from a local busybox rootfs on a netplane-cni network inside a throwaway node namespace, and one
fetches a page from the other by IP. The conflist chains the reference portmap plugin after
netplane-cni, and a client outside the node reaches a container through its hostPort. Config, plugin
and storage directories are the test's own."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

import pytest

from netplane import netns
from netplane.cni import install
from tests.conftest import needs_root

BUSYBOX = "/bin/busybox"
REFERENCE_PLUGINS = "/usr/lib/cni"      # Debian's containernetworking-plugins
PORTMAP = os.path.join(REFERENCE_PLUGINS, "portmap")
pytestmark = [
    needs_root, pytest.mark.netns,
    pytest.mark.skipif(not (shutil.which("podman") and shutil.which("runc") and os.path.exists(BUSYBOX)),
                       reason="needs Debian's podman, runc and busybox-static"),
]

CONTAINERS_CONF = """[containers]
default_ulimits = []
[network]
network_backend = "cni"
cni_plugin_dirs = ["{bin}", "{reference}"]
network_config_dir = "{net}"
[engine]
runtime = "runc"
"""


def make_rootfs(path) -> str:
    (path / "bin").mkdir(parents=True)
    (path / "www").mkdir()
    shutil.copy(BUSYBOX, path / "bin" / "busybox")
    for tool in ("sh", "httpd", "wget"):
        os.symlink("busybox", path / "bin" / tool)
    (path / "www" / "index.html").write_text("hello from a\n")
    return str(path)


@pytest.fixture
def podman(make_netns, tmp_path):
    """podman run in the node namespace. Entered with nsenter --net, not `ip netns exec`: the latter
    mounts a fresh /sys, which hides the cgroup mounts runc needs."""
    node = make_netns("cm")
    plugin_dir = os.path.dirname(install.install(str(tmp_path / "bin")))
    (tmp_path / "net").mkdir()
    plugins = [{
        "type": "netplane-cni", "bridge": "cni0", "isGateway": True, "isDefaultGateway": True, "hairpinMode": True,
        "ipam": {"type": "netplane", "ranges": [[{"subnet": "10.244.50.0/24"}]], "dataDir": str(tmp_path / "ipam")}}]
    if os.access(PORTMAP, os.X_OK):
        # Chained as libcni does: ADD after netplane-cni with its result as prevResult, DEL first;
        # podman fills runtimeConfig.portMappings from `-p` because of the capability.
        plugins.append({"type": "portmap", "capabilities": {"portMappings": True}, "snat": True})
    conflist = {"cniVersion": "1.0.0", "name": "np-podnet", "plugins": plugins}
    (tmp_path / "net" / "np-podnet.conflist").write_text(json.dumps(conflist))
    (tmp_path / "containers.conf").write_text(CONTAINERS_CONF.format(bin=plugin_dir, reference=REFERENCE_PLUGINS,
                                                                     net=tmp_path / "net"))
    env = {**os.environ, "CONTAINERS_CONF": str(tmp_path / "containers.conf")}
    runroot = tempfile.mkdtemp(prefix="nppm-")   # podman wants a runroot path under 50 characters
    base = ["nsenter", f"--net=/run/netns/{node}", "podman", "--root", str(tmp_path / "root"), "--runroot", runroot]

    def run(*args: str, check: bool = True) -> str:
        proc = subprocess.run(base + list(args), env=env, capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    run.node = node
    run.ipam_dir = tmp_path / "ipam" / "np-podnet"
    run.rootfs = make_rootfs(tmp_path / "rootfs")
    yield run
    run("rm", "--force", "--all", check=False)
    shutil.rmtree(runroot, ignore_errors=True)


def test_podman_containers_reach_each_other(podman):
    podman("run", "--detach", "--name", "a", "--network", "np-podnet", "--rootfs", podman.rootfs,
           "/bin/httpd", "-f", "-p", "8080", "-h", "/www")
    address = podman("inspect", "a", "--format", '{{(index .NetworkSettings.Networks "np-podnet").IPAddress}}').strip()
    assert address.startswith("10.244.50.")
    page = podman("run", "--rm", "--network", "np-podnet", "--rootfs", podman.rootfs,
                  "/bin/wget", "-q", "-O", "-", f"http://{address}:8080/")
    assert page == "hello from a\n"
    assert sorted(os.listdir(podman.ipam_dir)) == [address, "last_reserved_ip.0", "lock"]
    podman("rm", "--force", "a")
    # podman's DEL released the address and removed the veth: only the bridge is left on the node.
    assert sorted(os.listdir(podman.ipam_dir)) == ["last_reserved_ip.0", "lock"]
    assert node_links(podman.node) == ["cni0", "lo"]


def node_links(node: str) -> list:
    links = json.loads(subprocess.run(["ip", "-n", node, "-j", "link"], capture_output=True, text=True,
                                      check=True).stdout)
    return sorted(e["ifname"] for e in links)


def wire_client(make_netns, node: str) -> str:
    """A client namespace linked to the node by a veth: node side 192.168.78.1, client 192.168.78.2,
    and no route from the client to the pod subnet (only the hostPort DNAT gets it to the pod)."""
    client = make_netns("cc")
    node_if = f"np-h{os.getpid() % 10000}"
    netns.run(["ip", "link", "add", node_if, "netns", node, "type", "veth", "peer", "name", "eth0",
               "netns", client])
    netns.run(["ip", "addr", "add", "192.168.78.1/24", "dev", node_if], netns=node)
    netns.run(["ip", "link", "set", node_if, "up"], netns=node)
    netns.run(["ip", "addr", "add", "192.168.78.2/24", "dev", "eth0"], netns=client)
    netns.run(["ip", "link", "set", "eth0", "up"], netns=client)
    return client


def fetch(ns: str, url: str) -> tuple:
    """(True, body) or (False, why) of one GET from namespace `ns`."""
    code = ("import sys, urllib.request\n"
            "try:\n"
            f"    print(urllib.request.urlopen({url!r}, timeout=5).read().decode(), end='')\n"
            "except OSError as e:\n"
            "    print(e, end=''); sys.exit(3)\n")
    proc = subprocess.run(netns.in_netns(ns, ["python3", "-c", code]), capture_output=True, text=True, timeout=30)
    assert proc.returncode in (0, 3), proc.stderr
    return proc.returncode == 0, proc.stdout


@pytest.mark.skipif(not os.access(PORTMAP, os.X_OK), reason="needs Debian's containernetworking-plugins (portmap)")
def test_podman_host_port_reaches_the_container_through_portmap(podman, make_netns):
    client = wire_client(make_netns, podman.node)
    # Nothing listens on the node's port: before the container exists, the client is refused.
    ok, why = fetch(client, "http://192.168.78.1:30080/")
    assert not ok and "refused" in why, why
    podman("run", "--detach", "--name", "web", "--network", "np-podnet", "-p", "30080:8080",
           "--rootfs", podman.rootfs, "/bin/httpd", "-f", "-p", "8080", "-h", "/www")
    address = podman("inspect", "web", "--format",
                     '{{(index .NetworkSettings.Networks "np-podnet").IPAddress}}').strip()
    assert address.startswith("10.244.50.")
    nat = subprocess.run(["ip", "netns", "exec", podman.node, "iptables-save", "-t", "nat"],
                         capture_output=True, text=True, check=True).stdout
    assert f"--to-destination {address}:8080" in nat      # portmap's DNAT, in the node namespace
    assert fetch(client, "http://192.168.78.1:30080/") == (True, "hello from a\n")
    podman("rm", "--force", "web")
    # DEL ran through the chain: portmap's DNAT and netplane-cni's veth and address are gone.
    nat = subprocess.run(["ip", "netns", "exec", podman.node, "iptables-save", "-t", "nat"],
                         capture_output=True, text=True, check=True).stdout
    assert address not in nat
    assert sorted(os.listdir(podman.ipam_dir)) == ["last_reserved_ip.0", "lock"]
    assert node_links(podman.node) == sorted(["cni0", "lo", f"np-h{os.getpid() % 10000}"])
    ok, why = fetch(client, "http://192.168.78.1:30080/")
    assert not ok and "refused" in why, why
