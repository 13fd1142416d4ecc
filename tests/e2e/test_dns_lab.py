"""Cluster DNS in a real lab: a pod asks kube-dns (10.96.0.10, the `netplane dns serve` pod behind it)
through its own resolv.conf. A deleted Service is NXDOMAIN within a second; the search path resolves
a short name and a name.namespace name; a pod's own a-b-c-d.<ns>.pod record answers (as kubeadm's
CoreDNS does); kube-dns's own log is read through the API server (pods/log, from its node's agent);
the probe pod's sandbox and start are told in Events; a command exec'd in it sees its resolver; a pod
with stdin and tty is attached to as `kubectl run -it` does.

A two-node lab (the DNS pod on the control plane, the probe pod on worker-1: the query crosses nodes
and the ClusterIP DNAT). Services without selectors: DNS needs a ClusterIP, not endpoints, so no
Deployment has to start. Never two labs at once: if one is already up, the module is skipped.
"""
from __future__ import annotations

import asyncio
import os
import time

import aiohttp
import pytest

from netplane import lab, netns
from netplane.client import Client
from netplane.demo import PROBE_POD, ensure_probe_pod, netplane
from tests.conftest import needs_root

pytestmark = [pytest.mark.e2e, needs_root]

NODES = lab.lab_nodes(2)
SERVER = lab.api_url(NODES)
KUBE_DNS = "10.96.0.10"
OTHER_NAMESPACE = "np-dns-other"
NXDOMAIN_WITHIN = 1.0  # seconds, the bound


def service(name: str, namespace: str = "default") -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "spec": {"ports": [{"name": "http", "port": 80}]}}


async def _create(objects: list[dict]) -> list[dict]:
    async with Client(SERVER) as client:
        return [await client.create(obj) for obj in objects]


async def _delete(kind: str, name: str, namespace: str | None = None) -> None:
    async with Client(SERVER) as client:
        await client.delete(kind, name, namespace)


def dig(pod_ns: str, name: str, *options: str) -> tuple[str, list[str]]:
    """(status, answer addresses) of `dig @kube-dns name` run in the pod's namespace."""
    out = netns.run(["dig", f"@{KUBE_DNS}", "+time=1", "+tries=1", *options, name], netns=pod_ns, check=False).stdout
    status = next((line.split("status: ")[1].split(",")[0] for line in out.splitlines() if "status: " in line),
                  "NO REPLY")
    answers = [line.split()[-1] for line in out.split(";; ANSWER SECTION:\n", 1)[-1].split("\n\n")[0].splitlines()
               if " IN A " in line.replace("\t", " ")] if ";; ANSWER SECTION:" in out else []
    return status, answers


def getent(pod_ns: str, name: str) -> list[str]:
    """The pod's own stub resolver (glibc: its resolv.conf, search path, ndots) on `name`."""
    return netns.run(["getent", "hosts", name], netns=pod_ns, check=False).stdout.split()


@pytest.fixture(scope="module")
def pod_ns():
    """A 2-node lab with the probe pod; its network namespace. `lab down` even when a test fails."""
    if os.path.exists(f"/sys/class/net/{lab.UNDERLAY_BRIDGE}"):
        pytest.skip(f"a lab is already up (bridge {lab.UNDERLAY_BRIDGE} exists): never two at once; "
                    "`netplane lab down` first if it is a leftover")
    up = netplane("lab", "up", "--nodes", str(len(NODES)), "--timeout", "30", check=False)
    if up.returncode != 0 and "already up" in up.stdout + up.stderr:
        pytest.skip("another lab came up meanwhile: never two at once (and it is not ours to take down)")
    try:
        assert up.returncode == 0, f"lab up failed:\n{up.stdout}\n{up.stderr}"
        ensure_probe_pod(SERVER)
        found = lab.pod_netns(PROBE_POD["metadata"]["name"], "default")
        assert found, "the probe pod has no network namespace"
        yield found
    finally:
        netplane("lab", "down", check=False)


def wait_status(pod_ns: str, name: str, wanted: str, timeout: float) -> tuple[float, tuple[str, list[str]]]:
    """Ask until the status is `wanted`; (seconds it took, last (status, answers))."""
    started = time.monotonic()
    while True:
        result = dig(pod_ns, name)
        if result[0] == wanted or time.monotonic() - started > timeout:
            return time.monotonic() - started, result
        time.sleep(0.02)


def test_deleted_service_is_nxdomain_within_a_second(pod_ns):
    name = "short-lived.default.svc.cluster.local"
    created = asyncio.run(_create([service("short-lived")]))[0]
    took, (status, answers) = wait_status(pod_ns, name, "NOERROR", timeout=10)
    assert (status, answers) == ("NOERROR", [created["spec"]["clusterIP"]]), f"after {took:.1f}s"
    asyncio.run(_delete("Service", "short-lived", "default"))
    took, (status, answers) = wait_status(pod_ns, name, "NXDOMAIN", timeout=5)
    assert status == "NXDOMAIN", f"still {status} {answers} {took:.2f}s after the delete"
    print(f"NXDOMAIN {took * 1000:.0f} ms after the delete")
    assert took < NXDOMAIN_WITHIN, f"NXDOMAIN only after {took:.2f}s"


def test_search_path_resolves_short_and_namespaced_names(pod_ns):
    echo, db = asyncio.run(_create([
        service("echo"),
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OTHER_NAMESPACE}},
        service("db", OTHER_NAMESPACE)]))[::2]
    resolv = netns.run(["cat", "/etc/resolv.conf"], netns=pod_ns).stdout
    assert f"nameserver {KUBE_DNS}" in resolv and "search default.svc.cluster.local svc.cluster.local" in resolv
    wait_status(pod_ns, f"db.{OTHER_NAMESPACE}.svc.cluster.local", "NOERROR", timeout=10)
    assert getent(pod_ns, "echo") == [echo["spec"]["clusterIP"], "echo.default.svc.cluster.local"]
    assert getent(pod_ns, f"db.{OTHER_NAMESPACE}") == [db["spec"]["clusterIP"],
                                                        f"db.{OTHER_NAMESPACE}.svc.cluster.local"]
    assert getent(pod_ns, "db") == [], "a short name must not leave the pod's own namespace"


def test_pod_records_answer_as_in_a_kubeadm_cluster(pod_ns):
    """kubeadm's Corefile has `pods insecure`: a-b-c-d.<ns>.pod.<zone> answers a-b-c-d's address."""
    pod_ip = netns.run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"], netns=pod_ns).stdout.split()[3].split("/")[0]
    status, answers = dig(pod_ns, f"{pod_ip.replace('.', '-')}.default.pod.cluster.local")
    assert (status, answers) == ("NOERROR", [pod_ip])


def test_kube_dns_log_is_read_through_the_api_server_as_kubectl_logs_reads_it(pod_ns):
    async def read_log() -> str:
        async with Client(SERVER) as client:
            pods = await client.list("Pod", "kube-system", label_selector="k8s-app=kube-dns")
            name = pods["items"][0]["metadata"]["name"]
            async with aiohttp.ClientSession() as session, session.get(
                    f"{SERVER}/api/v1/namespaces/kube-system/pods/{name}/log", params={"tailLines": "50"}) as resp:
                assert resp.status == 200, await resp.text()
                return await resp.text()
    text = asyncio.run(read_log())
    assert '"component": "dns"' in text and '"msg": "zone built"' in text, text[-500:]


def test_the_probe_pods_life_is_told_in_events_as_kubectl_describe_lists_them(pod_ns):
    async def pod_events() -> list[dict]:
        async with Client(SERVER) as client:
            field = f"involvedObject.name={PROBE_POD['metadata']['name']},involvedObject.namespace=default"
            return (await client.list("Event", "default", field_selector=field))["items"]
    deadline = time.monotonic() + 10
    while True:
        seen = {(e["reason"], e["source"].get("component")) for e in asyncio.run(pod_events())}
        if {("SandboxReady", "kubelet"), ("Started", "kubelet")} <= seen or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {("SandboxReady", "kubelet"), ("Started", "kubelet")} <= seen, seen


def test_kubectl_exec_runs_in_the_pod_with_its_resolver(pod_ns):
    """pods/exec through the API server to the node's agent: the pod's own resolv.conf answers."""
    from tests.unit.test_podexec import exec_over
    url = f"{SERVER}/api/v1/namespaces/default/pods/{PROBE_POD['metadata']['name']}/exec"
    out, _, status = asyncio.run(exec_over(url, ["sh", "-c", "cat /etc/resolv.conf; ip -4 -o addr show eth0"]))
    assert status == {"metadata": {}, "status": "Success"}, status
    assert f"nameserver {KUBE_DNS}".encode() in out and b"inet 10.244." in out, out


def test_each_node_agent_tells_its_start_in_events(pod_ns):
    async def node_events() -> set:
        async with Client(SERVER) as client:
            items = (await client.list("Event", "default", field_selector="involvedObject.kind=Node"))["items"]
            return {(e["involvedObject"]["name"], e["reason"]) for e in items}
    seen = asyncio.run(node_events())
    assert {(node, "NodeReady") for node in ("control-plane", "worker-1")} <= seen, seen


def test_a_pod_with_stdin_and_tty_is_attached_to_as_kubectl_run_it_does(pod_ns):
    """`kubectl run -it dbg --image=busybox -- sh`: a shell on a terminal in the pod, reached by attach."""
    from tests.unit.test_podexec import attach_over
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "np-dbg", "namespace": "default"},
           "spec": {"restartPolicy": "Never", "containers": [{"name": "np-dbg", "image": "busybox", "args": ["sh"],
                                                              "stdin": True, "tty": True}]}}

    async def scenario():
        async with Client(SERVER) as client:
            await client.create(pod)
            try:
                deadline = time.monotonic() + 15
                while (await client.get("Pod", "np-dbg", "default")).get("status", {}).get("phase") != "Running":
                    assert time.monotonic() < deadline, "the pod did not start"
                    await asyncio.sleep(0.1)
                url = f"{SERVER}/api/v1/namespaces/default/pods/np-dbg/attach"
                return await attach_over(url, b"echo from-$(hostname) $((6*7)); exit 3\n", tty=True)
            finally:
                await client.delete("Pod", "np-dbg", "default")
    out, status = asyncio.run(scenario())
    assert b"from-np-dbg 42" in out, out
    assert status["details"]["causes"][0]["message"] == "3", status
