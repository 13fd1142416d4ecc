"""The Vagrant provisioning path, run against network-namespace "VMs": vagrant/provision.sh on each of
three namespaces on the lab's underlay, exactly as the Vagrantfile runs it on the VMs (less the package
installs and systemd), so the same `netplane node join` bootstraps every node, with the control
plane's store on a real etcd. Then the cluster works: nodes and system pods Ready, the store's keys
in etcd, a pod reaches a Service by name across nodes, and the host reaches LoadBalancer addresses.
Also: the Vagrantfile itself validates (when vagrant is installed).
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from netplane import lab, netns
from netplane.client import Client
from netplane.demo import PROBE_POD, curl_many_in_pod, http_get, netplane, parse_echo, wait_deployment, wait_pod
from netplane.loadbalancer import ingress_ips
from tests.conftest import needs_root

pytestmark = [pytest.mark.e2e, needs_root]

ROOT = Path(__file__).resolve().parents[2]
PROVISION = ROOT / "vagrant" / "provision.sh"
VMS = lab.lab_nodes(3)
CONTROL_PLANE = VMS[0]
SERVER = lab.api_url(VMS)


def provision(vm: lab.LabNode) -> subprocess.Popen:
    """provision.sh ROLE NAME IP CONTROL_PLANE_IP inside the VM's network namespace."""
    env = {**os.environ, "NETPLANE_SKIP_INSTALL": "1", "NETPLANE_SUPERVISOR": "process",
           "NETPLANE_BIN": shutil.which("netplane", path=os.path.dirname(sys.executable)) or "netplane",
           "NETPLANE_STATE_DIR": str(lab.LAB_DIR / "vms" / vm.name),
           # not the host's resolver (the network rule): the DNS pod's own loopback, where nothing
           # answers; the provisioning still sets kube-dns up to forward (dnsPolicy Default, --upstream)
           "NETPLANE_DNS_UPSTREAM": "127.0.0.1:5353",
           lab.LAB_MARKER_ENV: str(lab.LAB_DIR)}  # so that `lab down` finds every process it starts
    role = "control-plane" if vm.control_plane else "worker"
    log = open(lab.LAB_DIR / f"provision-{vm.name}.log", "w")
    return subprocess.Popen(netns.enter(vm.netns, ["bash", str(PROVISION), role, vm.name, vm.address,
                                                   CONTROL_PLANE.address]),
                            stdout=log, stderr=subprocess.STDOUT, env=env)


def provision_log(vm: lab.LabNode) -> str:
    path = lab.LAB_DIR / f"provision-{vm.name}.log"
    return path.read_text() if path.exists() else ""


async def _state() -> dict:
    return await lab.cluster_state(SERVER)


@pytest.fixture(scope="module")
def vagrant_like_cluster(tmp_path_factory):
    assert lab.leftovers() == [], "the machine is not clean before the provisioning test"
    lab.LAB_DIR.mkdir(parents=True)
    (lab.LAB_DIR / "nodes.json").write_text(json.dumps([vm.__dict__ for vm in VMS]))  # for `lab exec`
    (lab.LAB_DIR / "kubeconfig").write_text(lab.kubeconfig_text(SERVER))              # for `netplane apply`
    try:
        lab.build_underlay(VMS)  # the Vagrant private network, host at .1
        workers = [provision(vm) for vm in VMS[1:]]  # they wait for the control plane, as on VMs
        control_plane = provision(CONTROL_PLANE)
        for vm, proc in zip([CONTROL_PLANE, *VMS[1:]], [control_plane, *workers]):
            assert proc.wait(timeout=90) == 0, f"provision.sh failed on {vm.name}:\n{provision_log(vm)}"
        state = lab.wait_until(lambda: lab._ready_state(SERVER, len(VMS)), 60, "nodes and system pods Ready")
        for path in ("deployment.yaml", "service.yaml", "loadbalancer.yaml", "ingress.yaml"):
            out = netplane("apply", "-f", str(ROOT / "examples" / path), check=False)
            assert out.returncode == 0, out.stdout + out.stderr
        asyncio.run(_create(PROBE_POD))
        wait_deployment(SERVER, "echo")
        wait_pod(SERVER, PROBE_POD["metadata"]["name"])
        yield state
    finally:
        for vm in VMS:
            log = lab.LAB_DIR / "vms" / vm.name / "logs"
            if log.exists():
                shutil.copytree(log, tmp_path_factory.mktemp(f"vm-logs-{vm.name}"), dirs_exist_ok=True)
        netplane("lab", "down", check=False)
        assert lab.leftovers() == []


async def _create(obj: dict) -> None:
    async with Client(SERVER) as client:
        await client.create(obj)


def test_every_vm_joined_by_node_join_and_is_ready(vagrant_like_cluster):
    nodes = {n["metadata"]["name"]: n for n in vagrant_like_cluster["nodes"]}
    assert set(nodes) == {vm.name for vm in VMS}
    assert all(lab.node_ready(n) for n in nodes.values())
    for vm in VMS:
        assert "joined" in provision_log(vm), provision_log(vm)
        pids = (lab.LAB_DIR / "vms" / vm.name / "pids").read_text()
        assert f"agent-{vm.name}" in pids and f"lb-speaker-{vm.name}" in pids
    assert "etcd" in (lab.LAB_DIR / "vms" / CONTROL_PLANE.name / "pids").read_text()


def test_the_control_plane_state_is_in_etcd(vagrant_like_cluster):
    keys = netns.run(["etcdctl", "--endpoints", "http://127.0.0.1:2379", "get", "", "--prefix", "--keys-only"],
                     netns=CONTROL_PLANE.netns).stdout.split()
    assert any("worker-1" in key for key in keys), keys[:20]
    assert any("kube-dns" in key for key in keys), keys[:20]
    assert not (lab.LAB_DIR / "vms" / CONTROL_PLANE.name / "store.db").exists()


def test_a_pod_reaches_a_service_by_name_across_nodes(vagrant_like_cluster):
    replies = curl_many_in_pod("client", "http://echo/", 20)
    assert {"worker-1", "worker-2"} <= {r["node"] for r in replies}


def test_the_host_reaches_load_balancer_addresses(vagrant_like_cluster):
    async def services():
        async with Client(SERVER) as client:
            return {s["metadata"]["name"]: ingress_ips(s) for s in (await client.list("Service"))["items"]}
    ips = lab.wait_until(lambda: (found := asyncio.run(services()))["echo-lb"] and found, 10, "LB addresses")
    status, body = http_get(f"http://{ips['echo-lb'][0]}/")
    assert status == 200 and parse_echo(body)["node"] in ("worker-1", "worker-2")
    status, body = http_get(f"http://{ips['ingress'][0]}/", host="echo.lab")
    assert status == 200 and parse_echo(body)["pod"].startswith("echo-")


def vagrant(*args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["vagrant", *args], cwd=ROOT / "vagrant", capture_output=True, text=True,
                              env={**os.environ, "VAGRANT_CHECKPOINT_DISABLE": "1"}, timeout=120)
    finally:
        shutil.rmtree(ROOT / "vagrant" / ".vagrant", ignore_errors=True)


@pytest.mark.skipif(shutil.which("vagrant") is None, reason="vagrant is not installed (apt-get install vagrant)")
def test_vagrantfile_validates():
    out = vagrant("validate", "--ignore-provider")
    assert out.returncode == 0 and "validated successfully" in out.stdout, out.stdout + out.stderr
    if "vagrant-libvirt" in vagrant("plugin", "list").stdout:  # a provider: plain validate works too
        out = vagrant("validate")
        assert out.returncode == 0 and "validated successfully" in out.stdout, out.stdout + out.stderr


def test_kube_dns_is_set_up_to_forward_outside_names(vagrant_like_cluster):
    async def get():
        async with Client(SERVER) as client:
            return await client.get("Deployment", "coredns", "kube-system")
    spec = asyncio.run(get())["spec"]["template"]["spec"]
    assert spec["dnsPolicy"] == "Default"  # its /etc/resolv.conf is the VM's, as CoreDNS's is
    assert spec["containers"][0]["args"][-2:] == ["--upstream", "127.0.0.1:5353"]
