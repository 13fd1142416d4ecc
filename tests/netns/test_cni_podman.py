"""A real CNI runtime drives netplane-cni: podman (Debian's, CNI network backend) starts two containers
from a local busybox rootfs on a netplane-cni network inside a throwaway node namespace, and one
fetches a page from the other by IP. Config, plugin and storage directories are the test's own."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

import pytest

from netplane.cni import install
from tests.conftest import needs_root

BUSYBOX = "/bin/busybox"
pytestmark = [
    needs_root, pytest.mark.netns,
    pytest.mark.skipif(not (shutil.which("podman") and shutil.which("runc") and os.path.exists(BUSYBOX)),
                       reason="needs Debian's podman, runc and busybox-static"),
]

CONTAINERS_CONF = """[containers]
default_ulimits = []
[network]
network_backend = "cni"
cni_plugin_dirs = ["{bin}"]
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
    conflist = {"cniVersion": "1.0.0", "name": "np-podnet", "plugins": [{
        "type": "netplane-cni", "bridge": "cni0", "isGateway": True, "isDefaultGateway": True, "hairpinMode": True,
        "ipam": {"type": "netplane", "ranges": [[{"subnet": "10.244.50.0/24"}]], "dataDir": str(tmp_path / "ipam")}}]}
    (tmp_path / "net" / "np-podnet.conflist").write_text(json.dumps(conflist))
    (tmp_path / "containers.conf").write_text(CONTAINERS_CONF.format(bin=plugin_dir, net=tmp_path / "net"))
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
    links = json.loads(subprocess.run(["ip", "-n", podman.node, "-j", "link"], capture_output=True,
                                      text=True, check=True).stdout)
    assert sorted(e["ifname"] for e in links) == ["cni0", "lo"]
